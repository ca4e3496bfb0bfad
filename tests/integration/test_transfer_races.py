"""copy and archive beside other writers: a producer enqueuing during a copy; on PostgreSQL, where
rows are locked, not the whole database, a job retried or rows pruned while archive's DELETE waits
for their locks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.errors import TransferError
from dgxqueue.storage import create_engine, create_generations, dispose_engines, ensure_schema, session_scope
from dgxqueue.storage.admin import retry_job
from dgxqueue.storage.models import G
from dgxqueue.storage.transfer import ArchiveReport, archive, copy_queue, verify
from tests.support.db import postgres_database_url, sqlite_url
from tests.support.processes import wait_until
from tests.support.transfer import fill_queue, run_dgxqueue

OLD = datetime(2025, 1, 1, tzinfo=UTC)
CUTOFF = datetime(2025, 6, 1, tzinfo=UTC)


def _job(job_id: str, status: str) -> dict[str, Any]:
    return {"id": job_id, "prompt": f"prompt {job_id}", "model_name": "synth", "duration_seconds": 1.0,
            "sample_rate": 32000, "channels": 2, "file_path": f"outputs/{job_id}.wav", "status": status,
            "created_at": OLD, "completed_at": OLD, "error_message": "boom" if status == "failed" else None}


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """A PostgreSQL queue at head, empty, and an archive (a SQLite file at head)."""
    with postgres_database_url(at_head=True) as url:
        source = create_engine(url)
        target = create_engine(sqlite_url(tmp_path))
        ensure_schema(target)
        yield source, target
        target.dispose()
        source.dispose()
        dispose_engines()


def _archive_waiting_on(source: sa.Engine, target: sa.Engine,
                        hold: sa.Connection) -> tuple[threading.Thread, list[Any]]:
    """archive() started in a thread; returns once its DELETE waits for a lock ``hold`` has."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(archive(source, target, CUTOFF, batch_size=10, progress=lambda _: None))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    holder = hold.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    activity = sa.table("pg_stat_activity", sa.column("pid"))
    blocked = sa.select(sa.func.count()).select_from(activity) \
        .where(sa.func.array_position(sa.func.pg_blocking_pids(activity.c.pid), holder).is_not(None))

    def waiting() -> bool:
        with source.connect() as watcher:  # a new transaction each time: pg_stat_activity is a snapshot per transaction
            return watcher.execute(blocked).scalar_one() > 0 or bool(result)

    wait_until(waiting, 20, "archive's DELETE waiting for the held row lock")
    assert not result, f"archive finished without waiting: {result}"
    return thread, result


def _ids(engine: sa.Engine, status: str | None = None) -> set[str]:
    query = sa.select(G.c.id)
    if status is not None:
        query = query.where(G.c.status == status)
    with engine.connect() as conn:
        return set(conn.execute(query).scalars())


def test_archive__a_job_retried_while_its_batch_waits_stays_in_the_queue(
        engines: tuple[sa.Engine, sa.Engine]) -> None:
    """The retry commits after archive chose the row (as failed) but before it could delete it:
    the now pending job must stay in the queue, not be archived as pending."""
    source, target = engines
    with source.begin() as conn:
        conn.execute(sa.insert(G), [_job("f-1", "failed"), _job("c-1", "completed")])
    with source.connect() as hold:
        retry_job(sa.orm.Session(bind=hold), "f-1")  # not yet committed: it holds the row's lock
        thread, result = _archive_waiting_on(source, target, hold)
        hold.commit()
        thread.join(30)
    assert not thread.is_alive()
    (report,) = result
    assert isinstance(report, ArchiveReport), report
    assert _ids(source, "pending") == {"f-1"}, "the retried job is still queued"
    assert _ids(target) == {"c-1"}
    assert report.moved == 1


def test_archive__rows_a_concurrent_prune_deleted_do_not_end_the_run(engines: tuple[sa.Engine, sa.Engine]) -> None:
    """Prune deletes the first batch while archive's DELETE waits for it: archive goes on with
    the rest instead of taking an empty batch for the end."""
    source, target = engines
    first = [f"a-{i:02}" for i in range(10)]
    rest = [f"b-{i:02}" for i in range(5)]
    with source.begin() as conn:
        conn.execute(sa.insert(G), [_job(job_id, "completed") for job_id in first + rest])
    with source.connect() as hold:
        hold.execute(sa.delete(G).where(G.c.id.in_(first)))  # a prune, not yet committed
        thread, result = _archive_waiting_on(source, target, hold)
        hold.commit()
        thread.join(30)
    assert not thread.is_alive()
    (report,) = result
    assert isinstance(report, ArchiveReport), report
    assert _ids(source) == set()
    assert _ids(target) == set(rest)
    assert report.moved == len(rest)


def test_copy_queue__a_producer_during_the_copy_the_message_says_what_makes_a_rerun_pass(tmp_path: Path) -> None:
    """A job enqueued on the source mid-copy counts its prompt again, a row already copied: the
    verification fails, and a plain rerun refuses that prompt (it never overwrites). The
    message must name the step that works: empty the target, then copy again."""
    (tmp_path / "source").mkdir()
    url = sqlite_url(tmp_path / "source")
    fill_queue(url, extra=4)
    source = create_engine(url)

    def produce(table: str, done: int, total: int, new: int) -> None:
        if table == "generations" and done == 2:  # the prompts are copied by now
            with session_scope(source) as session:
                create_generations(session, [{"prompt": "lofi piano 0 ✓", "model_name": "synth",
                                              "duration_seconds": 0.5}])

    with postgres_database_url() as target_url:
        target = create_engine(target_url)
        ensure_schema(target)
        try:
            with pytest.raises(TransferError, match="verification failed") as failed:
                copy_queue(source, target, batch_size=2, progress=produce)
            with pytest.raises(TransferError, match="differs from the source's"):  # a plain rerun
                copy_queue(source, target, batch_size=2, progress=lambda *_: None)
            assert "db reset" in str(failed.value), str(failed.value)
            reset = run_dgxqueue(target_url, "db", "reset", "--yes")
            assert reset.returncode == 0, reset.stderr
            digests = copy_queue(source, target, batch_size=2, progress=lambda *_: None)
            assert verify(source, target) == digests
        finally:
            target.dispose()
            source.dispose()
            dispose_engines()
