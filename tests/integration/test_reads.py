"""The read and administration queries (storage.reads, storage.admin) agree with the rows, on both engines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dgxqueue.storage import Generation, admin, create_generations, get_engine, init_db, reads, session_scope


def _fill(engine: Engine) -> list[str]:
    """Pending jobs over two models and three priorities, plus one of each other status."""
    specs: list[dict[str, Any]] = [
        {"prompt": "a", "model_name": "synth", "priority": 0},
        {"prompt": "b", "model_name": "synth", "priority": 5},
        {"prompt": "c", "model_name": "musicgen-small", "priority": -2},
        {"prompt": "d", "model_name": "synth", "priority": 0},
        {"prompt": "e", "model_name": "synth"},  # becomes processing
        {"prompt": "f", "model_name": "synth"},  # completed
        {"prompt": "g", "model_name": "musicgen-small"},  # failed
    ]
    ids = []
    for spec in specs:  # one transaction each: distinct created_at, oldest first
        with session_scope(engine) as session:
            ids.extend(create_generations(session, [spec]))
    with session_scope(engine) as session:
        for job_id, status in zip(ids[4:], ("processing", "completed", "failed"), strict=True):
            session.execute(sa.update(Generation).where(Generation.id == job_id).values(
                status=status, completed_at=None if status == "processing" else datetime.now(UTC)))
    return ids


def test_pending_reads__per_model_and_oldest(engine: Engine) -> None:
    """pending_by_model counts pending rows per model; oldest_pending_created_at is the first one's."""
    ids = _fill(engine)
    with session_scope(engine) as session:
        assert reads.pending_by_model(session) == {"synth": 3, "musicgen-small": 1}
        first = session.get(Generation, ids[0])
        assert first is not None
        assert reads.oldest_pending_created_at(session) == first.created_at
        assert reads.count_by_status(session) == {"pending": 4, "processing": 1, "completed": 1, "failed": 1}


def test_queue_depth__equals_the_rows(engine: Engine) -> None:
    """queue_depth's counts by status and model, and the oldest pending time, match the table."""
    ids = _fill(engine)
    with session_scope(engine) as session:
        depth = reads.queue_depth(session)
        first = session.get(Generation, ids[0])
    assert depth.by_status == {"pending": 4, "processing": 1, "completed": 1, "failed": 1}
    assert depth.pending_by_model == {"synth": 3, "musicgen-small": 1}
    assert first is not None and depth.oldest_pending_created_at == first.created_at
    assert depth.completed_is_estimate is False


def test_queue_depth__oldest_is_of_the_jobs_that_may_run(engine: Engine) -> None:
    """A job scheduled for later is pending and counted, but not waiting yet: the oldest pending
    time is that of the oldest job that may run now (none: no oldest)."""
    later = datetime.now(UTC) + timedelta(hours=1)
    with session_scope(engine) as session:
        [scheduled] = create_generations(session, [{"prompt": "later", "run_after": later}])
    with session_scope(engine) as session:
        [due] = create_generations(session, [{"prompt": "now"}])
    with session_scope(engine) as session:
        depth = reads.queue_depth(session)
        assert depth.by_status["pending"] == 2
        assert depth.oldest_pending_created_at == session.get(Generation, due).created_at  # type: ignore[union-attr]
        session.execute(sa.delete(Generation).where(Generation.id == due))
        assert reads.queue_depth(session).oldest_pending_created_at is None
        assert reads.queue_depth(session, later).oldest_pending_created_at == session.get(
            Generation, scheduled).created_at  # type: ignore[union-attr]


def test_queue_depth__empty_queue(engine: Engine) -> None:
    """On an empty table every count is zero and there is no oldest pending job."""
    with session_scope(engine) as session:
        depth = reads.queue_depth(session)
    assert set(depth.by_status.values()) == {0} and depth.pending_by_model == {}
    assert depth.oldest_pending_created_at is None


def test_finished_jobs_before__and_delete_jobs_remove_only_finished(engine: Engine) -> None:
    """Retention finds finished jobs older than a cutoff and deletes them (never pending ones)."""
    ids = _fill(engine)
    later = datetime.now(UTC) + timedelta(minutes=1)
    with session_scope(engine) as session:
        victims = reads.finished_jobs_before(session, ["completed", "failed", "pending"], later)
        assert sorted(job_id for job_id, _ in victims) == sorted(ids[5:])
        assert reads.finished_jobs_before(session, ["completed"], datetime(2000, 1, 1, tzinfo=UTC)) == []
        assert admin.delete_jobs(session, [*ids[5:], ids[0]], chunk=1) == 2  # the pending one stays
    with session_scope(engine) as session:
        assert reads.count_by_status(session) == {"pending": 4, "processing": 1, "completed": 0, "failed": 0}


def test_queue_depth__gives_up_on_a_locked_table(pg_db_url: str) -> None:
    """On PostgreSQL a lock on generations (a migration, a VACUUM FULL) makes the depth read fail
    after its 5 s statement timeout, freeing its connection, rather than wait with it for good."""
    engine = init_db(pg_db_url)
    holder = get_engine(pg_db_url).connect()
    holder.execute(sa.text("LOCK TABLE generations IN ACCESS EXCLUSIVE MODE"))
    try:
        with pytest.raises(sa.exc.OperationalError, match="statement timeout"), session_scope(engine) as session:
            reads.queue_depth(session)
    finally:
        holder.rollback()
        holder.close()
    with session_scope(engine) as session:
        assert reads.queue_depth(session).by_status["pending"] == 0


def test_finished_jobs_before__reads_a_time_plain_sql_wrote_in_another_iso_form(sqlite_db_url: str) -> None:
    """A completed_at written by plain SQL as '...T...+02:00' names a time two hours before its digits:
    prune compares the time it names, not its text (which sorts by the 'T' after every stored time)."""
    init_db(sqlite_db_url)
    engine = get_engine(sqlite_db_url)
    ids = _fill(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE generations SET status='completed', completed_at=:t WHERE id=:id"),
                           {"t": "2026-01-01T01:00:00+02:00", "id": ids[0]})
    with session_scope(engine) as session:
        before = reads.finished_jobs_before(session, ["completed"], datetime(2025, 12, 31, 23, 30, tzinfo=UTC))
        after = reads.finished_jobs_before(session, ["completed"], datetime(2025, 12, 31, 23, 0, tzinfo=UTC))
    assert ids[0] in [job_id for job_id, _ in before]
    assert ids[0] not in [job_id for job_id, _ in after]
