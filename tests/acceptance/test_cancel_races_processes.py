"""Issue 17's cancel against a real daemon process at its worst moments, on SQLite and PostgreSQL:
as the job finishes, and after its daemon was SIGKILLed."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.errors import InvalidStateError
from dgxqueue.jobs import Job
from dgxqueue.storage import get_engine, init_db
from dgxqueue.storage.queue import RESCUED_CANCEL_MESSAGE
from tests.support.generators import read_executions
from tests.support.processes import start_worker, stop, wait_ready, wait_until, worker_config

SPEC: dict[str, Any] = {"model_name": "scripted", "sample_rate": 8000, "channels": 1}


def _rows(url: str, ids: list[str]) -> dict[str, sa.RowMapping]:
    with get_engine(url).connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT id, status, cancelled_at, cancel_requested_at, file_size_bytes, file_path, error_message"
            " FROM generations")).mappings().all()
    return {row["id"]: row for row in rows if row["id"] in ids}


def _started(job: Job) -> bool:
    return job.refresh().status != "pending"


def test_cancel__racing_each_jobs_completion_leaves_one_outcome_and_whole_files(db_url: str, tmp_path: Path) -> None:
    """Each of 16 jobs (0.2 s of work) is cancelled at a random moment around its end. Whichever
    commits first wins: completed with its whole WAV in place, or failed as cancelled with no
    file at all; no temporary is left once the daemon stopped."""
    init_db(db_url)
    config = worker_config(tmp_path, db_url, heartbeat_seconds=0.05)
    settings = load_settings(config, env={})
    jobs = [dgxqueue.submit("work:0.2", duration_seconds=0.5, **SPEC, settings=settings) for _ in range(16)]
    ids = [job.id for job in jobs]
    rng = random.Random(17)
    daemon = start_worker(config, tmp_path / "w.log")
    try:
        for job in jobs:
            wait_until(functools.partial(_started, job), 30, "the job to start", alive=daemon)
            threading.Event().wait(rng.uniform(0.1, 0.35))  # the race's moment (0.2 s of work), not a sync
            with contextlib.suppress(InvalidStateError):  # it ended first
                job.cancel()
        wait_until(lambda: all(row["status"] in ("completed", "failed") for row in _rows(db_url, ids).values()),
                   30, "every job to end", alive=daemon)
    finally:
        assert stop(daemon) == 0, (tmp_path / "w.log").read_text()[-3000:]
    outputs = tmp_path / "outputs"
    outcomes = {"completed": 0, "failed": 0}
    for job_id, row in _rows(db_url, ids).items():
        outcomes[row["status"]] += 1
        files = sorted(outputs.rglob(f"*{job_id}*"))
        if row["status"] == "completed":
            assert files == [outputs / f"{job_id}.wav"], files
            assert files[0].stat().st_size == row["file_size_bytes"] == 44 + 4000 * 2
        else:
            assert row["cancelled_at"] is not None and files == [], (row, files)
    assert sorted(path.name for path in outputs.rglob("*") if not path.name.endswith(".wav")) == []
    assert outcomes["failed"] > 0 and outcomes["completed"] > 0, outcomes  # both sides of the race were hit


def test_cancel__of_a_job_whose_daemon_was_sigkilled(db_url: str, tmp_path: Path) -> None:
    """A cancel asked while the job's daemon is dead stays asked (the job stays processing, held
    by a dead lease); the next daemon's rescuer fails it as cancelled without running it again."""
    init_db(db_url)
    config = worker_config(tmp_path, db_url, lease_seconds=2.0, heartbeat_seconds=0.2)
    settings = load_settings(config, env={})
    job = dgxqueue.submit("block", duration_seconds=0.5, **SPEC, settings=settings)
    first = start_worker(config, tmp_path / "first.log")
    try:
        wait_ready(first, tmp_path / "first.log")
        wait_until(lambda: read_executions(tmp_path / "executions.log")[job.id] == 1, 30, "the job to start",
                   alive=first)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    assert job.cancel() == "processing" and job.cancel_requested
    second = start_worker(config, tmp_path / "second.log")
    try:
        wait_ready(second, tmp_path / "second.log")  # the 30 s below are its rescue's, not its start-up's
        wait_until(lambda: job.refresh().finished, 30, "the rescuer to end the job", alive=second)
        (tmp_path / "release").touch()  # were it run again, it would not block
    finally:
        assert stop(second) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert job.status == "failed" and job.error == RESCUED_CANCEL_MESSAGE
    assert _rows(db_url, [job.id])[job.id]["cancelled_at"] is not None
    assert read_executions(tmp_path / "executions.log")[job.id] == 1
    assert list((tmp_path / "outputs").rglob(f"*{job.id}*")) == []
