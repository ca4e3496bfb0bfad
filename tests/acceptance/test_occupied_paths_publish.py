"""A file that appears at a job's path after its outcome committed, before its rename: a real daemon
process, stopped (SIGSTOP) at that very step, on real SQLite and PostgreSQL. The rename never
replaces the file (before, ``os.replace`` destroyed it silently); the daemon goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from dgxqueue.storage import init_db
from tests.acceptance.test_daemon_processes import enqueue, job
from tests.acceptance.test_occupied_paths import FOREIGN
from tests.support.processes import REPO, STARTUP_SECONDS, start_worker, stop, wait_until, worker_config


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (state ``T`` in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


def log_entries(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_daemon__a_file_that_appears_between_the_commit_and_the_rename_is_never_replaced(
        db_url: str, tmp_path: Path) -> None:
    """The daemon stops after committing a job completed, before renaming its WAV into place; a
    file is put at the job's path; continued, the daemon leaves that file byte for byte and its
    result under its temporary name, logs an error naming the job, the path and what to do, and
    goes on: a second job completes and the daemon exits 0 on SIGTERM, no machine fault."""
    init_db(db_url)
    [blocked] = enqueue(db_url, ["fine"], file_path="outputs/blocked.wav")
    outputs = tmp_path / "outputs"
    target = outputs / "blocked.wav"
    log = tmp_path / "worker.log"
    process = start_worker(worker_config(tmp_path, db_url), log, env={"DGXQ_TEST_STOP_AT": "after-commit"})
    try:
        wait_until(lambda: stopped(process.pid), STARTUP_SECONDS + 30, "the daemon to stop after its commit",
                   alive=process)
        assert job(db_url, blocked)[:2] == ("completed", 1)
        [temp] = [p.name for p in outputs.iterdir()]
        assert temp.startswith(".blocked.wav.") and temp.endswith(".tmp")
        target.write_bytes(FOREIGN)
        process.send_signal(signal.SIGCONT)

        def refused() -> list[dict[str, Any]]:
            return [e for e in log_entries(log) if e.get("level") == "error" and e.get("job_id") == blocked]

        [error] = wait_until(refused, 30, "the refused rename to be logged", alive=process)
        assert error["path"] == str(target.resolve()) and error["temporary"] == temp
        assert error["file_path"] == "outputs/blocked.wav" and "move that file away" in error["event"]
        assert target.read_bytes() == FOREIGN
        assert sorted(p.name for p in outputs.iterdir()) == sorted([temp, "blocked.wav"])

        [second] = enqueue(db_url, ["fine"], file_path="outputs/second.wav")
        wait_until(lambda: job(db_url, second)[0] == "completed" and (outputs / "second.wav").exists(), 30,
                   "a second job to complete", alive=process)
    finally:
        process.send_signal(signal.SIGCONT)
        code = stop(process)
    assert code == 0, log.read_text()[-3000:]
    assert target.read_bytes() == FOREIGN and (outputs / temp).exists()
    assert job(db_url, blocked)[:2] == ("completed", 1)
    assert "machine fault" not in log.read_text()


def test_prune__delete_files_leaves_the_file_a_refused_rename_left_at_a_jobs_path(sqlite_db_url: str,
                                                                                 tmp_path: Path) -> None:
    """A completed job whose rename was refused (a file appeared at its path after its commit):
    ``prune --delete-files`` deletes its row but leaves that file, which is not the job's, and
    says so; it deleted it, the very file the refused rename had kept byte for byte."""
    url = sqlite_db_url
    init_db(url)
    [blocked] = enqueue(url, ["fine"], file_path="outputs/blocked.wav")
    [done] = enqueue(url, ["fine"], file_path="outputs/done.wav")
    outputs = tmp_path / "outputs"
    target = outputs / "blocked.wav"
    config = worker_config(tmp_path, url)
    log = tmp_path / "worker.log"
    process = start_worker(config, log, env={"DGXQ_TEST_STOP_AT": "after-commit"})
    try:
        wait_until(lambda: stopped(process.pid), STARTUP_SECONDS + 30, "the daemon to stop after its commit",
                   alive=process)
        target.write_bytes(FOREIGN)
        process.send_signal(signal.SIGCONT)
        wait_until(lambda: job(url, done)[0] == "completed" and (outputs / "done.wav").exists(), 30,
                   "the second job to complete", alive=process)
        assert job(url, blocked)[0] == "completed" and "move that file away" in log.read_text()
    finally:
        process.send_signal(signal.SIGCONT)
        assert stop(process) == 0, log.read_text()[-3000:]
    pruned = subprocess.run([sys.executable, "-m", "dgxqueue", "--config", str(config), "prune", "--older-than", "0s",
                             "--delete-files", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert pruned.returncode == 0, pruned.stderr
    result = json.loads(pruned.stdout)
    assert result["generations"] == 2 and result["files"] == 1, result
    assert result["kept_not_its"] == ["outputs/blocked.wav"], result
    assert target.read_bytes() == FOREIGN and not (outputs / "done.wav").exists()
