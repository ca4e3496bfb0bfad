"""Leases and due times read the database's clock: a daemon whose own clock is off changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.storage import (
    Generation,
    cancel_generation,
    create_generation,
    get_engine,
    get_generation,
    queue,
    session_scope,
)
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.reads import database_now
from tests.support import queue_calls
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.generators import ScriptedGenerator
from tests.support.processes import REPO, wait_until
from tests.support.skew import SKEW_PRELUDE

SKEWS = pytest.mark.parametrize("skew", [-300.0, 120.0], ids=["5-minutes-slow", "120-s-fast"])


def enqueue(url: str, prompt: str, **kw: object) -> str:
    with session_scope(get_engine(url)) as s:
        return create_generation(s, prompt=prompt, model_name="scripted", duration_seconds=0.05,
                                 sample_rate=8000, channels=1, **kw).id  # type: ignore[arg-type]


def row(url: str, job_id: str) -> Generation:
    with session_scope(get_engine(url)) as s:
        job = get_generation(s, job_id)
        assert job is not None
        s.expunge(job)
        return job


@SKEWS
def test_daemon_clock__a_skewed_daemon_keeps_its_leases(engine: sa.Engine, db_url: str, tmp_path: Path,
                                                         skew: float) -> None:
    """A daemon whose clock is off claims a job with a lease that is not born expired and its
    heartbeat keeps it: another daemon's rescuer leaves the running job alone, and the skewed
    daemon's rescuer leaves the other daemon's running job alone."""
    outputs = tmp_path / "outputs"
    gen = ScriptedGenerator()
    def skewed_clock() -> datetime:
        return utcnow() + timedelta(seconds=skew)

    skewed = make_daemon(db_url, outputs, gen, worker_id="skewed", clock=skewed_clock)
    honest_hooks, skewed_hooks = RecordingHooks(), RecordingHooks()
    honest = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=honest_hooks, worker_id="honest")
    skewed_rescuer = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=skewed_hooks, worker_id="rescuer",
                                 clock=skewed_clock)
    job_id = enqueue(db_url, "block")
    thread = threading.Thread(target=skewed.run_once)
    thread.start()
    try:
        assert gen.entered.wait(10)
        claimed = row(db_url, job_id)
        first_lease = claimed.lease_expires_at
        assert claimed.claimed_at is not None and first_lease is not None
        assert abs(claimed.claimed_at - utcnow()) < timedelta(seconds=30)
        wait_until(lambda: (lease := row(db_url, job_id).lease_expires_at) and lease > first_lease, 10, "a heartbeat")
        honest.rescuer.run_once()
        enqueue(db_url, "fine")
        [other] = queue_calls.claim(get_engine(db_url), worker_id="honest", models=["scripted"], limit=1,
                                    lease=timedelta(seconds=30))  # the other daemon's running job
        skewed_rescuer.rescuer.run_once()
        assert honest_hooks.rescued == [] and skewed_hooks.rescued == []
        assert (row(db_url, job_id).status, row(db_url, job_id).worker_id) == ("processing", "skewed")
        assert (row(db_url, other.id).status, row(db_url, other.id).worker_id) == ("processing", "honest")
    finally:
        gen.gate.set()
        thread.join(10)
        for daemon in (skewed, honest, skewed_rescuer):
            daemon.shutdown()
    assert (row(db_url, job_id).status, row(db_url, job_id).attempts) == ("completed", 1)


@SKEWS
def test_daemon_clock__a_skewed_daemon_claims_what_is_due(engine: sa.Engine, db_url: str, tmp_path: Path,
                                                          skew: float) -> None:
    """A daemon whose clock is off claims the job due a second ago, not the one due in a minute,
    and waits a normal poll for it rather than spinning."""
    daemon = make_daemon(db_url, tmp_path / "outputs", ScriptedGenerator(), worker_id="skewed",
                         clock=lambda: utcnow() + timedelta(seconds=skew))
    due = enqueue(db_url, "fine", run_after=utcnow() - timedelta(seconds=1))
    enqueue(db_url, "fine", run_after=utcnow() + timedelta(seconds=60))
    try:
        daemon.claimer.run_once()
        assert [job.id for job in daemon.held.next] == [due]
        daemon.tick()  # schedules the next watchdog ping, which also bounds the idle wait
        assert daemon._idle_timeout() == pytest.approx(daemon.config.poll_interval_seconds)
    finally:
        daemon.shutdown()
    with session_scope(get_engine(db_url)) as s:
        waiting = queue.next_due(s, ["scripted"])
    assert waiting is not None and timedelta(seconds=30) < waiting <= timedelta(seconds=60)


def _db_now(url: str) -> datetime:
    with session_scope(get_engine(url)) as s:
        return database_now(s)


@SKEWS
def test_daemon_clock__a_skewed_daemon_backs_off_from_the_database_clock(engine: sa.Engine, db_url: str,
                                                                          tmp_path: Path, skew: float) -> None:
    """A transient failure on a daemon whose clock is off is due again its backoff (30 to 60 s
    here) after the database's now: not at once (a slow clock), nor minutes late (a fast one)."""
    daemon = make_daemon(db_url, tmp_path / "outputs", ScriptedGenerator(), worker_id="skewed",
                         clock=lambda: utcnow() + timedelta(seconds=skew), backoff_base_seconds=60.0,
                         backoff_max_seconds=60.0)
    job_id = enqueue(db_url, "transient:1")
    before = _db_now(db_url)
    try:
        daemon.run_once()
    finally:
        daemon.shutdown()
    after = _db_now(db_url)
    retried = row(db_url, job_id)
    assert (retried.status, retried.attempts) == ("pending", 1), retried.error_message
    assert retried.run_after is not None
    slack = timedelta(milliseconds=5)  # SQLite's clock reads whole milliseconds
    assert before + timedelta(seconds=30) - slack <= retried.run_after <= after + timedelta(seconds=60) + slack, \
        (retried.run_after, before, after)


@SKEWS
@pytest.mark.parametrize("behind", [False, True], ids=["with-the-claim", "alone"])
def test_daemon_clock__a_skewed_daemon_dates_outcomes_by_the_database_clock(
    engine: sa.Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skew: float, behind: bool,
) -> None:
    """A job completed, one failed for good and one cancelled while it ran, by a daemon whose
    clock is off, get ``completed_at`` (and ``cancelled_at``) from the database's now when written,
    whether written with the next claim or alone: prune, archive and the status page count from them."""
    from dgxqueue.daemon import completer

    monkeypatch.setattr(completer, "HIDE_WRITES_AFTER", 1e-9 if behind else 60.0)
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, worker_id="skewed",
                         clock=lambda: utcnow() + timedelta(seconds=skew), heartbeat_seconds=0.2)
    daemon.completer.writes_behind = behind
    done, broken, stopped = enqueue(db_url, "fine"), enqueue(db_url, "permanent"), enqueue(db_url, "steps:5")
    before = _db_now(db_url)
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        wait_until(lambda: row(db_url, stopped).progress_total == 5, 10, "the job to run")
        with session_scope(get_engine(db_url)) as s:
            assert cancel_generation(s, stopped).status == "processing"
        wait_until(lambda: row(db_url, stopped).status == "failed", 10, "the cancelled job to fail")
    finally:
        gen.steps.release(10)
        thread.join(20)
        daemon.shutdown()
    after = _db_now(db_url)
    rows = {job_id: row(db_url, job_id) for job_id in (done, broken, stopped)}
    assert [rows[j].status for j in (done, broken, stopped)] == ["completed", "failed", "failed"]
    stamps = [rows[done].completed_at, rows[broken].completed_at, rows[stopped].completed_at,
              rows[stopped].cancelled_at]
    slack = timedelta(milliseconds=5)  # SQLite's clock reads whole milliseconds
    for at in stamps:
        assert at is not None and before - slack <= at <= after + slack, (stamps, before, after)


# A daemon's write of an outcome the database refuses (a size past 64 bits), by a process whose
# clock is skewed by argv[2].
_REFUSED = SKEW_PRELUDE + """
from datetime import timedelta
from dgxqueue.storage import get_engine, queue
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.storage.results import Completed
link = HeldConnection(get_engine(sys.argv[1]))
[job] = queue.claim(link, worker_id="w", models=["scripted"], limit=1, lease=timedelta(seconds=30))
assert queue.finish(link, worker_id="w", results=[(job, Completed(None, 1.0, 2**70, {}))]) == set()
link.close()
"""


@SKEWS
def test_daemon_clock__an_outcome_recorded_failed_instead_is_dated_by_the_database(engine: sa.Engine, db_url: str,
                                                                                   skew: float) -> None:
    """An outcome the database refuses is recorded failed instead, dated by the database's now,
    not by the clock of the daemon writing it."""
    job_id = enqueue(db_url, "fine")
    before = _db_now(db_url)
    done = subprocess.run([sys.executable, "-c", _REFUSED, db_url, str(skew)], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    after = _db_now(db_url)
    failed = row(db_url, job_id)
    assert failed.status == "failed" and (failed.error_message or "").startswith("the outcome could not be stored")
    slack = timedelta(milliseconds=5)  # SQLite's clock reads whole milliseconds
    assert failed.completed_at is not None and before - slack <= failed.completed_at <= after + slack, \
        (failed.completed_at, before, after)


def _set_time(url: str, job_id: str, column: str, text: str) -> None:
    """Write ``text`` into a time column by plain SQL, as another program would."""
    table = sa.table("generations", sa.column("id"), sa.column(column))
    with get_engine(url).begin() as connection:
        connection.execute(sa.update(table).where(table.c.id == job_id).values({column: text}))


def test_db_clock__times_written_by_plain_sql_in_other_iso_forms_compare_as_times(engine: sa.Engine,
                                                                                   db_url: str) -> None:
    """A run_after or lease written by plain SQL as '2026-12-06T10:00:00+00:00', with a 'Z' or an
    offset is judged by the time it names: due an hour ago is claimed and not waited for, a lease
    that expired an hour ago is rescued, one that runs for another hour (written with an
    offset) is left alone."""
    hour = timedelta(hours=1)
    ago, ahead = utcnow() - hour, utcnow() + hour
    due_t, due_z, due_offset, later = (enqueue(db_url, f"p{i}") for i in range(4))
    _set_time(db_url, due_t, "run_after", ago.strftime("%Y-%m-%dT%H:%M:%S+00:00"))
    _set_time(db_url, due_z, "run_after", ago.strftime("%Y-%m-%d %H:%M:%SZ"))
    # With an offset the text reads an hour off the other way: due an hour ago, due in an hour.
    _set_time(db_url, due_offset, "run_after", ahead.strftime("%Y-%m-%dT%H:%M:%S+02:00"))
    _set_time(db_url, later, "run_after", ago.strftime("%Y-%m-%d %H:%M:%S-02:00"))
    with session_scope(engine) as s:
        wait = queue.next_due(s, ["scripted"])
    claimed = {job.id for job in queue_calls.claim(engine, worker_id="w", models=["scripted"], limit=10,
                                                   lease=timedelta(seconds=60))}
    assert claimed == {due_t, due_z, due_offset}
    assert wait is not None and timedelta(minutes=50) < wait < timedelta(minutes=70)
    expired, live = due_t, due_z
    _set_time(db_url, expired, "lease_expires_at", ago.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00"))
    _set_time(db_url, live, "lease_expires_at", ago.strftime("%Y-%m-%d %H:%M:%S-02:00"))
    with session_scope(engine) as s:
        requeued, failed = queue.rescue_expired(s)
    assert (sorted(requeued), failed) == ([expired], [])
    assert row(db_url, live).status == "processing"
