"""storage.transfer in-process: rows compared and hashed alike on both engines, identical rows
left, different or unwritable ones refused, a verification that notices a change."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.errors import TransferError
from dgxqueue.storage import create_engine, dispose_engines, ensure_schema, session_scope
from dgxqueue.storage.models import G
from dgxqueue.storage.transfer import (
    archive,
    archive_preview,
    copy_queue,
    loaded,
    normal,
    put_rows,
    stored_columns,
    verify,
)
from tests.support.db import postgres_database_url, sqlite_url
from tests.support.transfer import fill_queue

#: Ids that a collation orders otherwise than bytes do (case, accents, punctuation).
ODD_IDS = ("a-1", "B-2", "é-3", "_4", "Z", "e-5", "ä")


def _job(job_id: str, **values: Any) -> dict[str, Any]:
    return {"id": job_id, "prompt": "hand written", "model_name": "synth", "duration_seconds": 1.0,
            "sample_rate": 32000, "channels": 2, "file_path": f"outputs/{job_id}.wav", "status": "pending",
            "created_at": datetime(2025, 11, 7, 10, 0, tzinfo=UTC), "metadata": None, **values}


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """A SQLite queue holding every state and jobs written by plain SQL with odd ids, and an
    empty target at head: one SQLite file, one PostgreSQL database."""
    (tmp_path / "source").mkdir()
    url = sqlite_url(tmp_path / "source")
    fill_queue(url)
    source = create_engine(url)
    with source.begin() as conn:
        conn.execute(sa.insert(G), [_job(job_id) for job_id in ODD_IDS])  # metadata: the JSON null
        conn.execute(sa.update(G).where(G.c.id.in_(ODD_IDS[:3])).values(metadata=sa.null()))  # SQL NULL
    with postgres_database_url() as target_url:
        target = create_engine(target_url)
        ensure_schema(target)
        yield source, target
        target.dispose()
        source.dispose()
        dispose_engines()


def test_copy_queue__odd_ids_and_every_state_verify_on_postgres(engines: tuple[sa.Engine, sa.Engine]) -> None:
    """Both sides hash their rows in the same (bytewise) order, whatever PostgreSQL's collation."""
    source, target = engines
    seen: list[tuple[str, int, int, int]] = []
    digests = copy_queue(source, target, batch_size=2, progress=lambda *report: seen.append(report))
    assert digests["generations"].rows == 8 + len(ODD_IDS)
    assert sum(new for table, _, _, new in seen if table == "generations") == digests["generations"].rows
    assert verify(source, target) == digests
    nulls = sa.select(sa.func.count()).select_from(G).where(G.c.metadata.is_(None))
    json_nulls = sa.select(sa.func.count()).select_from(G).where(sa.cast(G.c.metadata, sa.Text) == "null")
    with source.connect() as here, target.connect() as there:  # SQL NULL and the JSON null stay apart
        assert there.execute(nulls).scalar_one() == here.execute(nulls).scalar_one() == 3
        assert there.execute(json_nulls).scalar_one() == here.execute(json_nulls).scalar_one() == len(ODD_IDS) - 3


def test_verify__a_row_changed_at_the_target_fails_naming_the_table(engines: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = engines
    copy_queue(source, target, batch_size=50, progress=lambda *_: None)
    with target.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == "Z").values(attempts=2))
    with pytest.raises(TransferError, match="verification failed for generations"):
        verify(source, target)
    with pytest.raises(TransferError, match=r"differs from the source's .*attempts"):  # and a rerun refuses
        copy_queue(source, target, batch_size=50, progress=lambda *_: None)


def test_put_rows__identical_left_different_unreadable_and_too_large_refused(
        engines: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = engines
    with source.begin() as conn:  # plain SQL: a time that is no time
        conn.execute(sa.text("UPDATE generations SET completed_at = 'tomorrow' WHERE id = 'e-5'"))
        conn.execute(sa.update(G).where(G.c.id == "B-2").values(file_size_bytes=2**40))  # SQLite's INTEGER holds it
    with session_scope(source) as session:
        rows = [loaded(G, row) for row in session.execute(sa.select(*stored_columns(G)).where(G.c.id.in_(ODD_IDS)))]
    with session_scope(target) as session:
        new, refused = put_rows(session, G, rows)
    assert len(new) == len(ODD_IDS) - 2
    assert "completed_at" in refused["e-5"] and "tomorrow" in refused["e-5"]
    assert "file_size_bytes" in refused["B-2"] and "INTEGER" in refused["B-2"]
    with target.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == "a-1").values(error_message="changed"))
    with session_scope(target) as session:
        new, refused = put_rows(session, G, rows)
    assert new == []
    assert set(refused) == {"e-5", "B-2", "a-1"} and "error_message" in refused["a-1"]


def test_copy_queue__back_from_postgres_to_a_new_sqlite_file(engines: tuple[sa.Engine, sa.Engine],
                                                             tmp_path: Path) -> None:
    """Any pair of engines: the PostgreSQL copy copied on to SQLite holds the same rows."""
    source, middle = engines
    copy_queue(source, middle, batch_size=3, progress=lambda *_: None)
    last = create_engine(sqlite_url(tmp_path))
    ensure_schema(last)
    try:
        assert copy_queue(middle, last, batch_size=3, progress=lambda *_: None) == verify(source, middle)
    finally:
        last.dispose()


def test_archive__from_postgres_moves_only_old_finished_rows_whole(engines: tuple[sa.Engine, sa.Engine],
                                                                   tmp_path: Path) -> None:
    """Rows read back by DELETE ... RETURNING on PostgreSQL arrive as a SELECT reads them (times,
    metadata); unfinished and recent rows stay."""
    source, queue = engines
    copy_queue(source, queue, batch_size=50, progress=lambda *_: None)
    old = datetime(2025, 1, 1, tzinfo=UTC)
    with queue.begin() as conn:
        conn.execute(sa.update(G).where(G.c.status.in_(("completed", "failed"))).values(completed_at=old))
        conn.execute(sa.update(G).where(G.c.id.in_(("a-1", "é-3"))).values(
            status="completed", completed_at=old, metadata={"bpm": 120, "tags": ["x"]}))
    with session_scope(queue) as session:
        before = {row[0]: loaded(G, row) for row in session.execute(sa.select(*stored_columns(G)))}
    moved = [job_id for job_id, row in before.items()
             if row[list(G.columns.keys()).index("status")] in ("completed", "failed")]
    archive_engine = create_engine(sqlite_url(tmp_path))
    ensure_schema(archive_engine)
    try:
        report = archive(queue, archive_engine, datetime(2025, 6, 1, tzinfo=UTC), batch_size=2,
                         progress=lambda _: None)
        assert (report.moved, report.already, report.refused) == (len(moved), 0, {})
        with session_scope(archive_engine) as session:
            there = {row[0]: loaded(G, row) for row in session.execute(sa.select(*stored_columns(G)))}
        with session_scope(queue) as session:
            left = {row[0] for row in session.execute(sa.select(G.c.id))}
    finally:
        archive_engine.dispose()
    assert sorted(there) == sorted(moved) and left == set(before) - set(moved)
    assert {k: normal(G, v) for k, v in there.items()} == {k: normal(G, before[k]) for k in moved}


def test_archive__a_row_the_archive_rejects_stays_here_reported_and_the_rest_of_its_batch_moves(
        engines: tuple[sa.Engine, sa.Engine]) -> None:
    """PostgreSQL refuses a NUL character, which SQLite holds: that row stays in the queue,
    reported, and its batch's other rows are archived; a poison row must not stop every
    later (timer) run at the same batch."""
    source, target = engines
    old = datetime(2025, 1, 1, tzinfo=UTC)
    finished = {"status": "completed", "created_at": old, "completed_at": old}
    with source.begin() as conn:
        conn.execute(sa.insert(G), [_job(f"old-{i}", **finished) for i in range(5)])
        conn.execute(sa.update(G).where(G.c.id == "old-2").values(prompt="before\x00after"))
    report = archive(source, target, datetime(2025, 6, 1, tzinfo=UTC), batch_size=4, progress=lambda _: None)
    assert set(report.refused) == {"old-2"} and "NUL" in report.refused["old-2"], report.refused
    assert report.moved == 4
    with source.connect() as here, target.connect() as there:
        assert set(here.execute(sa.select(G.c.id).where(G.c.id.like("old-%"))).scalars()) == {"old-2"}
        assert set(there.execute(sa.select(G.c.id)).scalars()) == {"old-0", "old-1", "old-3", "old-4"}


def test_archive__a_job_whose_file_the_archive_holds_for_another_job_stays_here_naming_it(
        engines: tuple[sa.Engine, sa.Engine]) -> None:
    """Once a job is archived its path is free here again: a later job of that path, archived in
    turn, would break the archive's unique index. It stays here, reported with the job that holds
    the file there, and the rest of its batch moves; a failed row of the same path takes no file."""
    source, target = engines
    old = datetime(2025, 1, 1, tzinfo=UTC)
    finished = {"status": "completed", "created_at": old, "completed_at": old}
    failed = finished | {"status": "failed"}
    with target.begin() as conn:
        conn.execute(sa.insert(G), [_job("archived-first", file_path="outputs/song.wav", **finished)])
    with source.begin() as conn:
        conn.execute(sa.insert(G), [_job("again", file_path="outputs/song.wav", **finished),
                                    _job("failed-too", file_path="outputs/song.wav", **failed),
                                    *[_job(f"old-{i}", **finished) for i in range(3)]])
    report = archive(source, target, datetime(2025, 6, 1, tzinfo=UTC), batch_size=10, progress=lambda _: None)
    assert set(report.refused) == {"again"}, report.refused
    assert "'outputs/song.wav'" in report.refused["again"] and "'archived-first'" in report.refused["again"]
    assert report.moved == 4
    with source.connect() as here:
        assert set(here.execute(sa.select(G.c.id).where(G.c.file_path == "outputs/song.wav")).scalars()) == {"again"}


def test_archive__finished_times_plain_sql_wrote_in_another_iso_form_compare_as_times(
        engines: tuple[sa.Engine, sa.Engine]) -> None:
    """As prune compares them: '2025-01-01T10:00:00Z' finished before the cutoff, 12:00 that day
    (its text sorts after the stored form's, by the 'T'); '2024-12-31T23:30:00-13:00' after it
    (12:30 UTC, its offset ignored by a comparison of text)."""
    source, target = engines
    cutoff = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    with source.begin() as conn:
        conn.execute(sa.insert(G), [_job(job_id, status="completed") for job_id in ("iso-old", "iso-new")])
        conn.execute(sa.text("UPDATE generations SET completed_at = '2025-01-01T10:00:00Z' WHERE id = 'iso-old'"))
        conn.execute(sa.text("UPDATE generations SET completed_at = '2024-12-31T23:30:00-13:00' WHERE id = 'iso-new'"))
    with session_scope(source) as session:
        assert archive_preview(session, cutoff) == {"completed": 1}
    report = archive(source, target, cutoff, batch_size=10, progress=lambda _: None)
    assert (report.moved, report.refused) == (1, {})
    with source.connect() as here, target.connect() as there:
        assert set(there.execute(sa.select(G.c.id)).scalars()) == {"iso-old"}
        assert here.execute(sa.select(G.c.id).where(G.c.id == "iso-new")).scalar_one() == "iso-new"
