"""Job handles (submit, get_job, wait, wait_async, cancel) and completion events, against real
daemon processes on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import dgxqueue
from dgxqueue.config import Settings, load_settings
from dgxqueue.errors import InvalidStateError, JobNotFoundError, WaitTimeoutError
from dgxqueue.jobs import Job
from dgxqueue.storage import get_engine, init_db
from dgxqueue.storage.admin import CANCEL_CHANNEL
from dgxqueue.storage.queue import EVENTS_CHANNEL
from tests.support.generators import read_executions
from tests.support.processes import start_worker, stop, wait_until, worker_config

SPEC: dict[str, Any] = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}


def setup(url: str, tmp_path: Path, **worker: Any) -> tuple[Path, Settings]:
    init_db(url)
    config = worker_config(tmp_path, url, **worker)
    return config, load_settings(config, env={})


def submit(settings: Settings, prompt: str) -> Job:
    return dgxqueue.submit(prompt, **SPEC, settings=settings)


def set_status(url: str, job_id: str, status: str) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(sa.text("UPDATE generations SET status = :s WHERE id = :id"), {"s": status, "id": job_id})


def test_wait__returns_when_a_daemon_completes_the_job(db_url: str, tmp_path: Path) -> None:
    """A producer blocked in wait() wakes when a daemon process records the outcome, and the
    handle then holds the completed row: its output file is there, or comes a moment later."""
    config, settings = setup(db_url, tmp_path)
    job = submit(settings, "block")
    assert job.status == "pending" and job.progress is None and job.output_path is None
    daemon = start_worker(config, tmp_path / "w.log")
    try:
        wait_until(lambda: read_executions(tmp_path / "executions.log")[job.id] == 1, 30, "the job to start",
                   alive=daemon)
        assert job.refresh().status == "processing"
        result: list[Any] = []
        waiter = threading.Thread(target=lambda: result.append(job.wait(30)))
        waiter.start()
        (tmp_path / "release").touch()
        waiter.join(40)
        assert result == ["completed"]
        assert job.status == "completed" and job.error is None
        path = job.output_path
        assert path is not None
        # The daemon renames the WAV into place just after the outcome commits, and wait() returns
        # on the commit: the file may be a moment behind (README, "What a reader may see").
        wait_until(path.is_file, 10, f"the completed job's WAV at {path}", alive=daemon)
    finally:
        assert stop(daemon) == 0


def test_wait__times_out_on_a_job_no_daemon_runs(db_url: str, tmp_path: Path) -> None:
    """No daemon: wait(timeout) raises WaitTimeoutError (a TimeoutError) after about ``timeout``
    seconds, naming the job, which stays pending."""
    _, settings = setup(db_url, tmp_path)
    job = submit(settings, "fine")
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError) as raised:
        job.wait(0.3)
    took = time.monotonic() - started
    assert 0.3 <= took < 3.0
    assert isinstance(raised.value, TimeoutError) and raised.value.unfinished == [job.id]
    assert job.status == "pending"


def test_wait_all__failed_and_completed_jobs_from_a_burst_daemon(db_url: str, tmp_path: Path) -> None:
    """wait_all returns each job's final status in order; a failed job's error is on its handle."""
    config, settings = setup(db_url, tmp_path)
    jobs = [submit(settings, "fine"), submit(settings, "permanent"), submit(settings, "fine")]
    daemon = start_worker(config, tmp_path / "w.log", "--burst")
    assert dgxqueue.wait_all(jobs, 30) == ["completed", "failed", "completed"]
    assert jobs[1].error and jobs[0].error is None
    assert daemon.wait(30) == 0


def test_events__carry_id_and_status_of_each_outcome(pg_db_url: str, tmp_path: Path) -> None:
    """On PostgreSQL every outcome a daemon records is published on the events channel, as a JSON
    array of {"id", "status"} sent when the outcome commits."""
    config, settings = setup(pg_db_url, tmp_path)
    url = get_engine(pg_db_url).url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {EVENTS_CHANNEL}")
        ok, bad = submit(settings, "fine"), submit(settings, "permanent")
        many = [submit(settings, "fine") for _ in range(60)]  # more than one payload's worth (40)
        daemon = start_worker(config, tmp_path / "w.log", "--burst")
        ours = {job.id for job in (ok, bad, *many)}
        seen: dict[str, str] = {}
        payloads: list[str] = []
        deadline = time.monotonic() + 30
        # NOTIFY is per database, not per schema: other tests' queues in this database are heard too.
        while len(seen) < 62 and time.monotonic() < deadline:
            for notify in listener.notifies(timeout=1.0, stop_after=1):
                payloads.append(notify.payload)
                seen.update({event["id"]: event["status"] for event in json.loads(notify.payload)
                             if event["id"] in ours})
        assert daemon.wait(30) == 0
    assert seen[ok.id] == "completed" and seen[bad.id] == "failed"
    assert all(seen[job.id] == "completed" for job in many) and len(seen) == 62
    assert all(len(payload.encode()) < 8000 for payload in payloads)


def test_get_job__rebuilds_a_handle_and_refuses_an_unknown_id(db_url: str, tmp_path: Path) -> None:
    """get_job(id) reads the row; an unknown id raises JobNotFoundError."""
    _, settings = setup(db_url, tmp_path)
    job = submit(settings, "fine")
    again = dgxqueue.get_job(job.id, settings=settings)
    assert again.id == job.id and again.status == "pending"
    with pytest.raises(JobNotFoundError):
        dgxqueue.get_job("00000000-0000-4000-8000-000000000000", settings=settings)


def test_cancel__pending_job_fails_at_once_and_wait_returns(db_url: str, tmp_path: Path) -> None:
    """cancel() of a pending job makes it failed ('cancelled by request'); a finished job refuses."""
    _, settings = setup(db_url, tmp_path)
    job = submit(settings, "fine")
    assert job.cancel() == "failed"
    assert job.error == "cancelled by request"
    assert job.wait(1) == "failed"
    with pytest.raises(InvalidStateError):
        job.cancel()


def test_cancel__processing_job_only_records_the_request(db_url: str, tmp_path: Path) -> None:
    """cancel() of a processing job sets cancel_requested_at and leaves it processing (its daemon
    ends it); asking twice keeps the first request's time."""
    _, settings = setup(db_url, tmp_path)
    job = submit(settings, "fine")
    set_status(db_url, job.id, "processing")
    assert job.cancel() == "processing" and job.cancel_requested
    with get_engine(db_url).connect() as conn:
        first = conn.execute(sa.text("SELECT cancel_requested_at FROM generations WHERE id = :id"),
                             {"id": job.id}).scalar_one()
    job.cancel()
    with get_engine(db_url).connect() as conn:
        assert conn.execute(sa.text("SELECT cancel_requested_at FROM generations WHERE id = :id"),
                            {"id": job.id}).scalar_one() == first


def test_wait_async__returns_when_a_daemon_completes_the_job(db_url: str, tmp_path: Path) -> None:
    """await wait_async() returns the status once a daemon process completes the job, and the
    event loop keeps running meanwhile."""
    config, settings = setup(db_url, tmp_path)
    job = submit(settings, "block")
    daemon = start_worker(config, tmp_path / "w.log")

    async def main() -> tuple[str, int]:
        ticks = 0
        waiting = asyncio.create_task(job.wait_async(30))
        wait_until(lambda: read_executions(tmp_path / "executions.log")[job.id] == 1, 30, "the job to start",
                   alive=daemon)
        (tmp_path / "release").touch()
        while not waiting.done():
            ticks += 1
            await asyncio.sleep(0.01)  # the loop's own work, which wait_async must not block
        return await waiting, ticks

    try:
        status, ticks = asyncio.run(main())
        assert status == "completed" and job.output_path is not None
        assert ticks > 0
    finally:
        assert stop(daemon) == 0


def test_wait_async__cancelling_the_task_stops_the_wait(db_url: str, tmp_path: Path) -> None:
    """Cancelling the task awaiting wait_async ends its thread's wait promptly (no daemon runs)."""
    _, settings = setup(db_url, tmp_path)
    job = submit(settings, "fine")
    before = threading.active_count()

    async def main() -> None:
        waiting = asyncio.create_task(job.wait_async(60))
        await asyncio.sleep(0.2)  # let it block (not synchronisation: either order passes)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    wait_until(lambda: threading.active_count() <= before, 5, "the waiting thread to end")


def test_import__handles_are_exported_lazily() -> None:
    """``import dgxqueue`` stays free of SQLAlchemy; dgxqueue.submit loads it on first use."""
    import subprocess
    import sys

    from tests.support.processes import REPO

    code = ("import sys, dgxqueue; assert 'sqlalchemy' not in sys.modules; "
            "assert callable(dgxqueue.submit) and dgxqueue.Job and dgxqueue.get_job; "
            "assert 'sqlalchemy' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_cancel__of_a_processing_job_wakes_its_daemon_at_once(pg_db_url: str, tmp_path: Path) -> None:
    """On PostgreSQL a handle's cancel of a running job is announced on the cancel channel, as the
    CLI's is, so the daemon stops it at once rather than at its next heartbeat."""
    _, settings = setup(pg_db_url, tmp_path)
    job = submit(settings, "fine")
    set_status(pg_db_url, job.id, "processing")
    url = get_engine(pg_db_url).url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CANCEL_CHANNEL}")
        assert job.cancel() == "processing"
        heard: list[str] = []
        deadline = time.monotonic() + 10
        # NOTIFY is per database: other tests' cancels may be heard too.
        while job.id not in heard and time.monotonic() < deadline:
            heard.extend(notify.payload for notify in listener.notifies(timeout=1.0, stop_after=1))
    assert job.id in heard


def test_events__a_cancel_of_a_pending_job_is_published(pg_db_url: str, tmp_path: Path) -> None:
    """A pending job cancelled (handle or CLI) ends without a daemon: its outcome is published on
    the events channel all the same, so a web app listening hears it and a waiter wakes at once."""
    _, settings = setup(pg_db_url, tmp_path)
    job = submit(settings, "fine")
    url = get_engine(pg_db_url).url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {EVENTS_CHANNEL}")
        assert job.cancel() == "failed"
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 10
        while job.id not in seen and time.monotonic() < deadline:  # other tests' events too
            for notify in listener.notifies(timeout=1.0, stop_after=1):
                seen.update({event["id"]: event["status"] for event in json.loads(notify.payload)})
    assert seen.get(job.id) == "failed"
