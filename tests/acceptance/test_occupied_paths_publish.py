"""A file that appears at a job's path after its outcome committed, before its rename: a real daemon
process, stopped (SIGSTOP) at that very step, on real SQLite and PostgreSQL. The rename never
replaces the file (before, ``os.replace`` destroyed it silently); the daemon goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.audio import OWNER_XATTR
from dgxqueue.daemon.staging import UNKNOWN_JOB_GRACE
from dgxqueue.storage import init_db
from tests.acceptance.test_daemon_processes import enqueue, job
from tests.acceptance.test_occupied_paths import FOREIGN, burst
from tests.support import zygote
from tests.support.processes import REPO, STARTUP_SECONDS, start_worker, stop, stopped, wait_until, worker_config

OTHER = "5d1e2f3a-0000-4c5e-9f43-2a1c8e7d9b11"  # an archived job, whose WAV is put at another's path


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


def _refused_publish(url: str, tmp_path: Path) -> tuple[Path, str, str]:
    """A real daemon completes two jobs, the rename of the first refused (a file put at its path
    after its commit), and stops: its config, the refused job's id and the other's."""
    init_db(url)
    [blocked] = enqueue(url, ["fine"], file_path="outputs/blocked.wav")
    [done] = enqueue(url, ["fine"], file_path="outputs/done.wav")
    outputs = tmp_path / "outputs"
    config = worker_config(tmp_path, url)
    log = tmp_path / "worker.log"
    process = start_worker(config, log, env={"DGXQ_TEST_STOP_AT": "after-commit"})
    try:
        wait_until(lambda: stopped(process.pid), STARTUP_SECONDS + 30, "the daemon to stop after its commit",
                   alive=process)
        (outputs / "blocked.wav").write_bytes(FOREIGN)
        process.send_signal(signal.SIGCONT)
        wait_until(lambda: job(url, done)[0] == "completed" and (outputs / "done.wav").exists(), 30,
                   "the second job to complete", alive=process)
        assert job(url, blocked)[0] == "completed" and "move that file away" in log.read_text()
    finally:
        process.send_signal(signal.SIGCONT)
        assert stop(process) == 0, log.read_text()[-3000:]
    return config, blocked, done


def _dgxqueue(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return zygote.run([sys.executable, "-m", "dgxqueue", "--config", str(config), *args], cwd=REPO,
                      capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


def _held_temporary(tmp_path: Path) -> Path:
    [temp] = [p for p in (tmp_path / "outputs").iterdir() if p.name.startswith(".blocked.wav.")]
    return temp


def test_show__a_held_result_is_not_reported_as_the_other_file_at_its_path(db_url: str, tmp_path: Path) -> None:
    """A completed job whose rename was refused (another job's WAV appeared at its path after its
    commit): ``show`` says its WAV is not there, that the file at its path is that other job's,
    where its result is held and what to do (--json: ``output_exists`` false, the temporary and
    the holder); it said ``output_exists: yes`` of the other job's file. Its batch-mate's own WAV
    is there. Once that file is moved away, a daemon's sweep publishes the result: yes."""
    config, blocked, done = _refused_publish(db_url, tmp_path)
    target, temp = tmp_path / "outputs" / "blocked.wav", _held_temporary(tmp_path)
    result = temp.read_bytes()
    os.setxattr(target, OWNER_XATTR, OTHER.encode())  # an archived job's WAV carries its id
    shown = _dgxqueue(config, "show", blocked)
    assert shown.returncode == 0, shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if line.startswith("output_exists")]
    assert " no: the file at " in line and f"job {OTHER}'s WAV" in line, line
    assert str(temp.resolve()) in line and "move that file away" in line, line
    data = json.loads(_dgxqueue(config, "show", blocked, "--json").stdout)
    assert data["output_exists"] is False and data["output_held_at"] == str(temp.resolve()), data
    assert data["output_holder"] == OTHER, data
    mate = json.loads(_dgxqueue(config, "show", done, "--json").stdout)
    assert mate["output_exists"] is True and mate["output_held_at"] is None, mate

    target.rename(tmp_path / "moved-away.wav")
    burst(config, tmp_path / "sweep.log")  # a daemon sweeps when it starts
    published = json.loads(_dgxqueue(config, "show", blocked, "--json").stdout)
    assert published["output_exists"] is True and published["output_held_at"] is None, published
    assert target.read_bytes() == result and not temp.exists()


def test_prune__keeps_a_completed_job_whose_result_is_held(db_url: str, tmp_path: Path) -> None:
    """``prune`` (files kept) leaves the row of a completed job whose rename was refused, names
    it and why, prunes the rest and exits 65, as ``archive`` does. It deleted that row, and a
    day later a daemon's sweep deleted the held result as a temporary no row names: the job's
    only result lost. Here the sweep, a day later, keeps it."""
    config, blocked, done = _refused_publish(db_url, tmp_path)
    temp = _held_temporary(tmp_path)
    pruned = _dgxqueue(config, "prune", "--older-than", "0s")
    assert pruned.returncode == 65, pruned.stdout + pruned.stderr
    assert "deleted 1 generation(s)" in pruned.stdout and f"kept generation {blocked}" in pruned.stdout
    assert blocked in pruned.stderr and "move that file away" in pruned.stderr, pruned.stderr
    assert job(db_url, blocked)[0] == "completed"
    with pytest.raises(sa.exc.NoResultFound):  # pruned
        job(db_url, done)
    again = _dgxqueue(config, "prune", "--older-than", "0s", "--json")
    assert again.returncode == 65, again.stderr
    result = json.loads(again.stdout)
    assert result["generations"] == 0 and list(result["kept_held"]) == [blocked], result
    assert result["kept_not_its"] == [], result  # files were not asked for

    day_old = time.time() - UNKNOWN_JOB_GRACE - 3600
    os.utime(temp, (day_old, day_old))
    burst(config, tmp_path / "sweep.log")  # its sweep deletes a day-old temporary no row names
    assert temp.exists() and (tmp_path / "outputs" / "blocked.wav").read_bytes() == FOREIGN
    assert (tmp_path / "outputs" / "done.wav").exists()  # no --delete-files


def test_prune__delete_files_leaves_a_held_jobs_row_and_the_file_at_its_path(sqlite_db_url: str,
                                                                             tmp_path: Path) -> None:
    """A completed job whose rename was refused (a file appeared at its path after its commit):
    ``prune --delete-files`` leaves its row and that file, which is not the job's (it deleted the
    file once, the very file the refused rename had kept byte for byte, then the row alone, which
    doomed the held result), names both, deletes the rest with its file and exits 65."""
    config, blocked, _ = _refused_publish(sqlite_db_url, tmp_path)
    pruned = _dgxqueue(config, "prune", "--older-than", "0s", "--delete-files", "--json")
    assert pruned.returncode == 65, pruned.stderr
    result = json.loads(pruned.stdout)
    assert result["generations"] == 1 and result["files"] == 1, result
    assert result["kept_not_its"] == ["outputs/blocked.wav"] and list(result["kept_held"]) == [blocked], result
    assert blocked in pruned.stderr
    outputs = tmp_path / "outputs"
    assert (outputs / "blocked.wav").read_bytes() == FOREIGN and not (outputs / "done.wav").exists()
    assert job(sqlite_db_url, blocked)[0] == "completed" and _held_temporary(tmp_path).exists()


def test_archive__leaves_a_completed_job_whose_result_waits_under_its_temporary_name(db_url: str,
                                                                                    tmp_path: Path) -> None:
    """A completed job whose rename was refused stays out of the archive, named with what to do
    (exit 65); its batch-mate is archived. Archived, its row was gone from here, so the sweep
    deleted its result a day later (a temporary of a job no row names), and the archive's row named
    another's file as its WAV."""
    config, blocked, done = _refused_publish(db_url, tmp_path)
    archived = _dgxqueue(config, "archive", "--older-than", "0s", "--to", f"sqlite:///{tmp_path / 'archive.db'}")
    assert archived.returncode == 65 and blocked in archived.stderr and "move that file away" in archived.stderr, (
        archived.stdout + archived.stderr)
    assert job(db_url, blocked)[0] == "completed"
    with pytest.raises(sa.exc.NoResultFound):  # archived: no row here any more
        job(db_url, done)
    assert [p.name for p in (tmp_path / "outputs").iterdir() if p.name.startswith(".blocked.wav.")]
