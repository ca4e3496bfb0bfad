"""Live progress and cancelling a running job, with the daemon in-process on real SQLite and
PostgreSQL (issue 17)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.errors import InvalidStateError
from dgxqueue.storage import cancel_generation, get_engine, session_scope
from tests.integration.test_daemon import enqueue, row
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.generators import ScriptedGenerator
from tests.support.processes import wait_until

HEARTBEAT = 0.2


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    return tmp_path / "outputs"


def progress(url: str, job_id: str) -> tuple[int | None, int | None]:
    job = row(url, job_id)
    return job.progress_done, job.progress_total


def cancel(url: str, job_id: str) -> str:
    with session_scope(get_engine(url)) as s:
        return str(cancel_generation(s, job_id).status)


def test_progress__moves_in_the_row_while_the_job_runs(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """Each step the backend reports reaches the row within about a second, while it runs."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen, heartbeat_seconds=HEARTBEAT)
    job_id = enqueue(db_url, "steps:3")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        wait_until(lambda: progress(db_url, job_id) == (0, 3), 10, "progress 0/3 in the row")
        for k in (1, 2):
            gen.steps.release()
            wait_until(lambda: progress(db_url, job_id) == (k, 3), 10, f"progress {k}/3 in the row")
            assert row(db_url, job_id).status == "processing"
        gen.steps.release()
    finally:
        gen.gate.set()
        gen.steps.release(10)
        thread.join(20)
    assert row(db_url, job_id).status == "completed"


def test_progress__unchanged_progress_is_not_written_again(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """The progress tick writes only what changed: a backend that reports nothing costs no
    statement beyond the lease heartbeat."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen, heartbeat_seconds=30.0, lease_seconds=60.0)
    beats: list[object] = []
    real = daemon.store.extend

    def spy(jobs: Any, progress: Any = None) -> Any:
        beats.append(progress)
        return real(jobs, progress)

    daemon.store.extend = spy  # type: ignore[method-assign]
    job_id = enqueue(db_url, "steps:2")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        wait_until(lambda: progress(db_url, job_id) == (0, 2), 10, "progress 0/2 in the row")
        deadline = time.monotonic() + 2.5  # two more progress ticks, nothing new to say
        while time.monotonic() < deadline:
            gen.gate.wait(0.05)
        assert beats == [{job_id: (0, 2)}]
    finally:
        gen.steps.release(2)
        thread.join(20)
    assert row(db_url, job_id).status == "completed"


def test_cancel__a_running_job_stops_within_a_heartbeat(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A cancel of a running job is noticed by the next heartbeat: the backend stops it, the row
    is failed with cancelled_at and a reason, no WAV is left, and it is not retried; the job
    beside it in the batch completes."""
    gen, hooks = ScriptedGenerator(), RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, heartbeat_seconds=HEARTBEAT)
    stopped, kept = enqueue(db_url, "steps:5", max_attempts=3), enqueue(db_url, "fine")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        wait_until(lambda: progress(db_url, stopped) == (0, 5), 10, "the job to run")
        asked = time.monotonic()
        assert cancel(db_url, stopped) == "processing"
        wait_until(lambda: row(db_url, stopped).status == "failed", 10, "the cancelled job to fail")
        assert time.monotonic() - asked < HEARTBEAT + 2.0
    finally:
        gen.steps.release(10)
        thread.join(20)
    job = row(db_url, stopped)
    assert job.cancelled_at is not None and job.error_message == "cancelled by request while it ran"
    assert job.attempts == 1 and job.file_size_bytes is None
    assert not (outputs / f"{stopped}.wav").exists() and not list(outputs.glob(f"*{stopped}*"))
    assert row(db_url, kept).status == "completed"
    assert hooks.outcomes(stopped) == ["cancelled"] and hooks.outcomes(kept) == ["completed"]
    daemon.run_once()  # nothing left to run: it is not retried
    assert row(db_url, stopped).status == "failed"


def test_cancel__a_backend_that_cannot_stop_finishes_and_its_result_is_discarded(
    engine: sa.Engine, db_url: str, outputs: Path,
) -> None:
    """A backend that never looks at the cancel finishes its call; the job was recorded cancelled
    already and the result's file is deleted, never published."""
    gen, hooks = ScriptedGenerator(), RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, heartbeat_seconds=HEARTBEAT)
    job_id = enqueue(db_url, "block")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        assert gen.entered.wait(10)
        cancel(db_url, job_id)
        wait_until(lambda: row(db_url, job_id).status == "failed", 10, "the cancelled job to fail")
    finally:
        gen.gate.set()
        thread.join(20)
    assert row(db_url, job_id).cancelled_at is not None
    assert list(outputs.rglob("*.wav*")) == []
    assert hooks.outcomes(job_id) == ["cancelled"]


def test_cancel__a_finished_job_refuses_a_pending_one_fails_at_once(
    engine: sa.Engine, db_url: str, outputs: Path,
) -> None:
    """Of a cancel and a completion the first to commit wins: a completed job refuses the cancel."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen)
    done = enqueue(db_url, "fine")
    daemon.run_once()
    assert row(db_url, done).status == "completed"
    with pytest.raises(InvalidStateError, match="already completed"):
        cancel(db_url, done)
    waiting = enqueue(db_url, "fine")
    assert cancel(db_url, waiting) == "failed"
    assert row(db_url, waiting).cancelled_at is not None


def test_cancel__postgres_notify_reaches_the_daemon_before_its_heartbeat(
    pg_db_url: str, outputs: Path,
) -> None:
    """On PostgreSQL the cancel's NOTIFY makes the daemon beat at once: with a 30 s heartbeat and
    nothing reporting progress, the job still ends within a couple of seconds."""
    gen = ScriptedGenerator()
    daemon = make_daemon(pg_db_url, outputs, gen, heartbeat_seconds=30.0, lease_seconds=60.0)
    daemon.start()  # its waker listens from the start
    job_id = enqueue(pg_db_url, "block")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        assert gen.entered.wait(10)
        asked = time.monotonic()
        cancel(pg_db_url, job_id)
        wait_until(lambda: row(pg_db_url, job_id).status == "failed", 10, "the cancelled job to fail")
        assert time.monotonic() - asked < 3.0
    finally:
        gen.gate.set()
        thread.join(20)
        daemon.waker.close()


class _Reports(ScriptedGenerator):
    """Reports one (done, total) pair for each request, then runs its prompt (``block``: waits)."""

    def __init__(self, done: Any, total: Any) -> None:
        super().__init__()
        self.value = (done, total)

    def generate(self, requests: Any) -> Any:
        for request in requests:
            request.control.report(*self.value)
        return super().generate(requests)


@pytest.mark.parametrize(("reported", "stored"), [
    ((3_000_000_000, 6_000_000_000), (1_073_741_823, 2**31 - 1)),  # past PostgreSQL's INTEGER: scaled
    ((2**70, 2**71), (1_073_741_823, 2**31 - 1)),  # past SQLite's 64-bit INTEGER too
    ((-5, 10), (0, 10)),
    ((15, 10), (10, 10)),
    ((5, 0), (None, None)),  # no total: no progress
    ((float("nan"), 10), (None, None)),
], ids=["past-int32", "past-int64", "negative", "done-past-total", "zero-total", "nan"])
def test_progress__a_backends_report_out_of_range_is_bounded_not_fatal(
    engine: sa.Engine, db_url: str, outputs: Path, reported: tuple[Any, Any], stored: tuple[int | None, int | None],
) -> None:
    """Progress is a display: a backend reporting values the columns cannot hold (a count of
    samples past 2**31) or that make no sense must neither stop the daemon (its heartbeat's
    write failed, so run_once raised and the job went back to pending, to crash the next daemon
    too) nor cost the job; the row gets the report bounded, its fraction kept."""
    gen = _Reports(*reported)
    daemon = make_daemon(db_url, outputs, gen, heartbeat_seconds=HEARTBEAT)
    job_id = enqueue(db_url, "block")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run_once()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert gen.entered.wait(10)
        first = row(db_url, job_id).lease_expires_at
        wait_until(lambda: errors or row(db_url, job_id).lease_expires_at != first, 10, "a heartbeat after the report")
        assert not errors
        assert progress(db_url, job_id) == stored
    finally:
        gen.gate.set()
        thread.join(20)
    assert not errors
    assert row(db_url, job_id).status == "completed"
