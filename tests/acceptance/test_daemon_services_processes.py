"""Review of the daemon's split into services (issue 16): the lease services' cadences, as real
daemon processes with real signals, on real SQLite and PostgreSQL.

Each test runs a second daemon beside the one under test that serves another model: it claims
nothing, so the job stays with the first, but its rescuer and sweeper run on their own cadence.
"""

from __future__ import annotations

import signal
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from dgxqueue.daemon import EXIT_MACHINE_FAULT
from dgxqueue.storage import create_generations, get_engine, init_db, session_scope
from dgxqueue.storage.models import G
from tests.acceptance.test_machine_faults import assert_given_back, config, logged, spawn
from tests.support.generators import read_executions
from tests.support.processes import start_worker, stop, wait_ready, wait_until, worker_config


def enqueue(url: str, prompts: list[str], duration_seconds: float = 0.01) -> list[str]:
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [{"prompt": p, "model_name": "scripted", "duration_seconds": duration_seconds,
                                       "sample_rate": 8000, "channels": 1} for p in prompts])


def row(url: str, job_id: str) -> sa.Row[str, int, datetime | None, str | None]:
    with get_engine(url).connect() as conn:
        return conn.execute(sa.select(G.c.status, G.c.attempts, G.c.lease_expires_at, G.c.file_path)
                            .where(G.c.id == job_id)).one()


def bystander(tmp_path: Path, url: str, *, lease_seconds: float) -> subprocess.Popen[bytes]:
    """A daemon that serves another model: it claims none of the test's jobs, and is ready."""
    config = worker_config(tmp_path, url, models=["another"], rescue_interval_seconds=0.2, lease_seconds=lease_seconds)
    log = tmp_path / "bystander.log"
    process = start_worker(config, log)
    wait_ready(process, log)
    return process


def test_daemon__a_call_longer_than_the_lease_keeps_its_job_from_a_rescuing_daemon(db_url: str,
                                                                                   tmp_path: Path) -> None:
    """A backend call four leases long: the heartbeat keeps extending the lease while it runs, so
    another daemon's rescue (every 0.2 s) never takes the job; it runs once, on its first attempt."""
    init_db(db_url)
    [job_id] = enqueue(db_url, ["work:6"])
    watcher = bystander(tmp_path, db_url, lease_seconds=1.5)
    # Its own rescuer, which refreshes its leases too, held off: only the heartbeat keeps them.
    holder = start_worker(worker_config(tmp_path, db_url, lease_seconds=1.5, heartbeat_seconds=0.3,
                                        rescue_interval_seconds=3600.0), tmp_path / "holder.log")
    try:
        wait_ready(holder, tmp_path / "holder.log")
        executions = tmp_path / "executions.log"
        wait_until(lambda: read_executions(executions)[job_id] == 1, 30, "the job to start", alive=holder)
        first = row(db_url, job_id).lease_expires_at
        assert first is not None
        # Past the first lease's end by two leases, the call still running.
        extended = wait_until(lambda: (lease := row(db_url, job_id).lease_expires_at) is not None
                              and lease > first + timedelta(seconds=3), 30, "the lease to be extended", alive=holder)
        assert extended and row(db_url, job_id).status == "processing"
        wait_until(lambda: row(db_url, job_id).status == "completed", 30, "the job to complete", alive=holder)
        assert stop(holder) == 0 and stop(watcher) == 0
    finally:
        for process in (holder, watcher):
            if process.poll() is None:
                process.kill()
    assert row(db_url, job_id)[:2] == ("completed", 1)
    assert read_executions(executions)[job_id] == 1
    assert "lease lost" not in (tmp_path / "holder.log").read_text()


def test_daemon__a_running_daemon_rescues_a_killed_ones_job_on_its_cadence(db_url: str, tmp_path: Path) -> None:
    """An already-running daemon's rescuer (not only a starting one's) requeues the job of a
    daemon killed mid-call once its lease expires; a daemon that serves the model then runs it."""
    init_db(db_url)
    [job_id] = enqueue(db_url, ["block"])
    config = worker_config(tmp_path, db_url, lease_seconds=1.0, heartbeat_seconds=0.2)
    victim = start_worker(config, tmp_path / "victim.log")
    wait_ready(victim, tmp_path / "victim.log")
    executions = tmp_path / "executions.log"
    wait_until(lambda: read_executions(executions)[job_id] == 1, 30, "the job to start", alive=victim)
    watcher = bystander(tmp_path, db_url, lease_seconds=1.0)
    try:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert row(db_url, job_id).status == "processing"
        wait_until(lambda: row(db_url, job_id).status == "pending", 15, "the bystander's rescue", alive=watcher)
        assert row(db_url, job_id).attempts == 1  # spent: the killed call had started it
        assert stop(watcher) == 0
    finally:
        for process in (victim, watcher):
            if process.poll() is None:
                process.kill()


def test_daemon__a_running_daemon_sweeps_a_killed_ones_committed_file_within_a_lease(db_url: str,
                                                                                    tmp_path: Path) -> None:
    """A daemon killed between its commit and its rename leaves a completed row whose file is
    still a temporary; an already-running daemon's sweeper (once a lease period, not only at
    start) renames it into place."""
    init_db(db_url)
    [job_id] = enqueue(db_url, ["fine"])
    watcher = bystander(tmp_path, db_url, lease_seconds=1.5)
    config = worker_config(tmp_path, db_url, lease_seconds=1.5)
    victim = start_worker(config, tmp_path / "victim.log", env={"DGXQ_TEST_KILL_AT": "after-commit"})
    try:
        assert victim.wait(60) == -signal.SIGKILL
        status, _, _, file_path = row(db_url, job_id)
        assert status == "completed" and file_path is not None
        target = tmp_path / file_path
        assert not target.exists()
        wait_until(target.exists, 15, "the bystander's sweep to publish the file", alive=watcher)
        assert stop(watcher) == 0
    finally:
        for process in (victim, watcher):
            if process.poll() is None:
                process.kill()


def test_daemon__sighup_then_sigterm_gives_the_running_and_prefetched_jobs_back_at_once(db_url: str,
                                                                                     tmp_path: Path) -> None:
    """With worker.prefetch, a job claimed ahead and one written behind the running call: SIGHUP
    starts a graceful stop (a long grace), and a SIGTERM then ends it at once. The finished job's
    outcome is written; the running job and the one claimed ahead go back pending with their
    attempts unspent; exit 0 well inside the grace period."""
    init_db(db_url)
    finished, running, ahead, queued = enqueue(db_url, ["work:0.2", "block", "fine", "fine"])
    config = worker_config(tmp_path, db_url, grace_seconds=600.0, prefetch=True, batch_size=1)
    process = start_worker(config, tmp_path / "w.log")
    try:
        executions = tmp_path / "executions.log"
        wait_until(lambda: read_executions(executions)[running] == 1, 30, "the blocking job to start", alive=process)
        wait_until(lambda: row(db_url, ahead).status == "processing", 30, "the claim ahead", alive=process)
        process.send_signal(signal.SIGHUP)
        log = tmp_path / "w.log"
        wait_until(lambda: '"stopping"' in log.read_text(), 30, "the stop to begin", alive=process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert row(db_url, finished)[:2] == ("completed", 1)
    assert row(db_url, running)[:2] == ("pending", 0) and row(db_url, ahead)[:2] == ("pending", 0)
    assert row(db_url, queued)[:2] == ("pending", 0)
    assert read_executions(tmp_path / "executions.log")[ahead] == 0


def test_machine_fault__full_disk_on_postgres_writes_the_finished_outcomes_and_exits_75(
        pg_db_url: str, tmp_path: Path, outputs_disk: Path) -> None:
    """The outputs disk fills while a PostgreSQL daemon writes each call's outcomes behind the
    next call (a job a call): the outcomes of the calls that finished are written before it exits
    75, each completed row with its file in place; every other job is pending, its attempt unspent."""
    url = pg_db_url
    init_db(url)
    (outputs_disk / "filler").write_bytes(b"\0" * (2048 - 64) * 1024)  # room for about eight files
    ids = enqueue(url, ["fine"] * 24, duration_seconds=0.5)
    process = spawn(config(tmp_path, url, batch_size=1), tmp_path / "w.log")
    assert process.wait(60) == EXIT_MACHINE_FAULT, (tmp_path / "w.log").read_text()[-3000:]
    assert logged(tmp_path / "w.log", '"reason": "disk_full"')()
    assert_given_back(url, "disk_full")
    done = [row(url, job_id) for job_id in ids if row(url, job_id).status == "completed"]
    assert done, "some files fit before the disk filled"
    for status, attempts, _, file_path in done:
        assert attempts == 1 and file_path is not None and (tmp_path / file_path).exists()
    assert not list(outputs_disk.rglob(".*.tmp"))
