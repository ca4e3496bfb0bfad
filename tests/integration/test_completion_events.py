"""Completion events on real PostgreSQL: what a finish publishes on the events channel, written
by storage.queue itself (the daemon's processes are in tests/acceptance/test_job_handles.py)."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

import psycopg
import sqlalchemy as sa

from dgxqueue.storage import create_generations, get_engine, init_db, queue, session_scope
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.engines import EVENTS_PER_NOTIFY
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.storage.results import Completed, Failed, Result, Retried

SPEC = {"model_name": "m", "duration_seconds": 1.0, "sample_rate": 8000, "channels": 1}


def listen(url: str) -> psycopg.Connection[tuple[object, ...]]:
    dsn = get_engine(url).url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = psycopg.connect(dsn, autocommit=True)
    connection.execute(f"LISTEN {queue.EVENTS_CHANNEL}")
    return connection


def received(connection: psycopg.Connection[tuple[object, ...]], ours: set[str]) -> list[list[dict[str, str]]]:
    """The payloads naming jobs of ``ours``: NOTIFY is per database, and other tests' schemas share it."""
    payloads = [json.loads(notify.payload) for notify in connection.notifies(timeout=0.5)]
    return [payload for payload in payloads if any(event["id"] in ours for event in payload)]


def test_finish__publishes_each_written_row_in_bounded_payloads(pg_db_url: str) -> None:
    """100 results: every written row's id and status, EVENTS_PER_NOTIFY to a payload, each under
    NOTIFY's 8000 bytes; a fenced-out result is not announced."""
    init_db(pg_db_url)
    engine = get_engine(pg_db_url)
    with session_scope(engine) as s:
        create_generations(s, [{"prompt": f"p{i}", **SPEC} for i in range(101)])
    listener = listen(pg_db_url)
    link = HeldConnection(engine)
    jobs = queue.claim(link, worker_id="w", models=["m"], limit=101, lease=timedelta(minutes=1))
    now = utcnow()
    results: list[tuple[ClaimedJob, Result]] = [(job, Completed(now, 1.0, 1, {}) if i % 3 else Failed(now, "boom", 0.1))
               for i, job in enumerate(jobs[:99])]
    results.append((jobs[99], Retried(now, "again")))
    results.append((dataclasses.replace(jobs[100], attempt=5), Completed(now, 1.0, 1, {})))  # fenced out
    written = queue.finish(link, worker_id="w", results=results)
    link.close()
    payloads = received(listener, {job.id for job in jobs})
    listener.close()
    events = {event["id"]: event["status"] for payload in payloads for event in payload}
    assert set(events) == written and len(written) == 100
    assert events[jobs[0].id] == "failed" and events[jobs[1].id] == "completed" and events[jobs[99].id] == "pending"
    assert max(len(payload) for payload in payloads) == EVENTS_PER_NOTIFY
    assert all(len(json.dumps(payload)) < 8000 for payload in payloads)


def test_finish__an_overlong_id_is_written_but_not_announced(pg_db_url: str) -> None:
    """A row whose id (plain SQL) would overflow a payload is still recorded; only its event is left out."""
    init_db(pg_db_url)
    engine = get_engine(pg_db_url)
    with session_scope(engine) as s:
        [short] = create_generations(s, [{"prompt": "p", **SPEC}])
    long_id = "x" * 9000
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO generations (id, prompt, model_name, duration_seconds, sample_rate, "
                             "channels, file_path, status, priority, attempts, max_attempts, created_at) "
                             "SELECT :id, prompt, model_name, duration_seconds, sample_rate, channels, "
                             "'long.wav', status, priority, attempts, max_attempts, created_at "
                             "FROM generations WHERE id = :short"), {"id": long_id, "short": short})
    listener = listen(pg_db_url)
    link = HeldConnection(engine)
    jobs = queue.claim(link, worker_id="w", models=["m"], limit=2, lease=timedelta(minutes=1))
    written = queue.finish(link, worker_id="w", results=[(job, Completed(utcnow(), 1.0, 1, {})) for job in jobs])
    link.close()
    payloads = received(listener, {short, long_id})
    listener.close()
    assert written == {short, long_id}
    assert payloads == [[{"id": short, "status": "completed"}]]


def test_expiry__a_pending_job_failed_as_expired_is_announced(pg_db_url: str) -> None:
    """The rescuer's expiry fails pending jobs unrun: each is published as failed, like a daemon's outcome."""
    init_db(pg_db_url)
    engine = get_engine(pg_db_url)
    with session_scope(engine) as s:
        [job_id] = create_generations(s, [{"prompt": "p", **SPEC}])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE generations SET expires_at = now() - interval '1 second'"))
    listener = listen(pg_db_url)
    with session_scope(engine) as s:
        assert queue.expire_pending(s) == [(job_id, "m")]
    payloads = received(listener, {job_id})
    listener.close()
    assert payloads == [[{"id": job_id, "status": "failed"}]]
