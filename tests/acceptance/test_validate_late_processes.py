"""Jobs validated inside their backend call (a claim larger than a call), run by real daemon
processes: a cancel, a hanging validate, the batch counts."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from dgxqueue.storage import Generation, cancel_generation, create_generations, get_engine, init_db, session_scope
from tests.support.generators import read_executions
from tests.support.processes import start_worker, stop, wait_until, write_config

SPEC = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}


def rows(url: str) -> dict[str, Generation]:
    with session_scope(get_engine(url)) as s:
        jobs = s.scalars(sa.select(Generation)).all()
        s.expunge_all()
        return {job.id: job for job in jobs}


def test_daemon__a_job_cancelled_before_its_call_never_reaches_the_backend(db_url: str, tmp_path: Path) -> None:
    """A claim of three in calls of one: the second job, cancelled while the first call runs
    (its validate not run yet), is recorded cancelled and never rendered."""
    init_db(db_url)
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **SPEC} for p in ["block", "fine", "fine"]])
    log, release = tmp_path / "executions.log", tmp_path / "release"
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": "tests.support.generators:ScriptedGenerator"},
        "generator.options": {"log_path": str(log), "release_path": str(release), "max_batch_size": 1},
        "worker": {"batch_size": 3, "heartbeat_seconds": 0.2, "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    worker = start_worker(config, tmp_path / "worker.log")
    try:
        wait_until(lambda: read_executions(log)[ids[0]] == 1, 30, "the first call to run", alive=worker)
        with session_scope(get_engine(db_url)) as s:
            assert cancel_generation(s, ids[1]).status == "processing"
        wait_until(lambda: rows(db_url)[ids[1]].cancelled_at is not None and rows(db_url)[ids[1]].status == "failed",
                   30, "the cancel to be recorded", alive=worker)
        release.touch()
        wait_until(lambda: rows(db_url)[ids[2]].status == "completed", 30, "the last job", alive=worker)
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert read_executions(log)[ids[1]] == 0
    assert rows(db_url)[ids[0]].status == "completed"
