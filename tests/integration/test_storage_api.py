"""Every function of ``dgxqueue.storage`` on a real SQLite file and on the real PostgreSQL server."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dgxqueue.config import DatabaseSettings, JobSettings
from dgxqueue.errors import InvalidStateError, JobNotFoundError, ValidationError
from dgxqueue.storage import (
    Generation,
    GenerationStatus,
    Session,
    cancel_generation,
    complete_generation,
    create_engine,
    create_generation,
    create_generations,
    delete_generation,
    dispose_engines,
    fail_generation,
    get_all_generations,
    get_database_stats,
    get_engine,
    get_generation,
    get_most_used_prompts,
    get_pending_generations,
    get_session,
    init_db,
    resolve_url,
    retry_generation,
    session_scope,
    track_prompt_usage,
)
from dgxqueue.storage.database import head_revision, upgrade
from dgxqueue.storage.models import G
from tests.unit.test_validation import BAD_INPUTS

Scope = Callable[[], AbstractContextManager[Session]]
SPEC_EXAMPLE: dict[str, Any] = {
    "prompt": "hip hop beat", "model_name": "musicgen-small", "duration_seconds": 16.0,
    "sample_rate": 32000, "channels": 2, "file_path": "outputs/test.wav", "metadata": {"bpm": 120},
}
SPEC_COLUMNS = (
    "id, prompt, model_name, model_version, duration_seconds, sample_rate, channels, file_path, "
    "file_size_bytes, status, created_at, completed_at, generation_time_seconds, error_message, metadata"
)
# The specification's two example records, verbatim.
SPEC_PENDING_VALUES = """(
    'a1b2c3d4-e5f6-7890-abcd-ef1234567890', 'trap beat with heavy 808 bass at 140 BPM',
    'musicgen-small', NULL, 16.0, 32000, 2, 'outputs/a1b2c3d4.wav', NULL, 'pending',
    '2025-11-07 10:00:00', NULL, NULL, NULL, NULL)"""
SPEC_COMPLETED_VALUES = """(
    'b2c3d4e5-f6a7-8901-bcde-f12345678901', 'chill lo-fi hip hop with piano', 'musicgen-small', '1.0',
    30.0, 32000, 2, 'outputs/b2c3d4e5.wav', 5242880, 'completed', '2025-11-07 09:00:00',
    '2025-11-07 09:00:22', 22.3, NULL, '{"bpm": 90, "key": "Am", "genre": "lo-fi"}')"""


@pytest.fixture
def scope(engine: Engine) -> Scope:
    """A committing session on the test's migrated database."""
    return lambda: session_scope(engine)


def _new(scope: Scope, **overrides: Any) -> str:
    with scope() as session:
        return create_generation(session=session, **_spec(**overrides)).id


def _spec(**overrides: Any) -> dict[str, Any]:
    """The specification's example with a file of its own (each job's file_path is its own)."""
    return {**SPEC_EXAMPLE, "file_path": f"outputs/{uuid.uuid4().hex}.wav", **overrides}


def _counts(engine: Engine) -> tuple[int, int]:
    """(generation rows, sum of prompt use counts)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM generations")).scalar_one()
        uses = conn.execute(sa.text("SELECT coalesce(sum(used_count), 0) FROM prompts")).scalar_one()
    return int(rows), int(uses)


def _used_count(scope: Scope, text: str) -> int | None:
    with scope() as session:
        found = [p.used_count for p in get_most_used_prompts(session, limit=1000) if p.text == text]
    return found[0] if found else None


def test_create_generation__spec_call_returns_pending_uuid4_row(scope: Scope) -> None:
    """The spec's keyword call returns a pending row with a UUID v4 id and the given values."""
    with scope() as session:
        gen = create_generation(session=session, **SPEC_EXAMPLE)
        gen_id = gen.id
        assert gen.status == GenerationStatus.PENDING
    assert uuid.UUID(gen_id).version == 4 and str(uuid.UUID(gen_id)) == gen_id
    with scope() as session:
        stored = get_generation(session, gen_id)
        assert stored is not None
        assert (stored.prompt, stored.model_name, stored.duration_seconds, stored.sample_rate,
                stored.channels, stored.file_path, stored.meta) == tuple(SPEC_EXAMPLE.values())
        assert stored.status == "pending" and stored.file_size_bytes is None
        assert stored.completed_at is None and stored.created_at.tzinfo is UTC
        assert (stored.priority, stored.attempts, stored.max_attempts) == (0, 0, 3)


def test_create_generation__counts_the_prompt_in_the_same_transaction(scope: Scope, engine: Engine) -> None:
    """The prompt count rises with the row; a rolled-back session leaves neither."""
    _new(scope)
    assert _counts(engine) == (1, 1)
    with pytest.raises(RuntimeError), scope() as session:
        create_generation(session=session, **_spec())
        create_generation(session=session, **_spec(prompt="another one"))
        raise RuntimeError("caller fails after creating")
    assert _counts(engine) == (1, 1)
    with scope() as session:
        create_generation(session=session, **_spec())
        session.rollback()
    assert _counts(engine) == (1, 1)
    assert _used_count(scope, "another one") is None


def test_create_generation__defaults_path_from_its_id(scope: Scope) -> None:
    """Without file_path the row gets outputs/<id>.wav and the configured defaults."""
    with scope() as session:
        gen = create_generation(session, "ambient pads")
        assert gen.file_path == f"outputs/{gen.id}.wav"
        assert (gen.model_name, gen.duration_seconds) == ("synth", 8.0)
        assert (gen.sample_rate, gen.channels) == (32000, 1)


def test_create_generations__inserts_a_batch_in_order(scope: Scope, engine: Engine) -> None:
    """A batch returns one id per spec in order and counts repeated prompts once per use."""
    specs: list[dict[str, Any]] = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a", "priority": 5}]
    with scope() as session:
        ids = create_generations(session, specs)
    assert len(set(ids)) == 3 and _counts(engine) == (3, 3)
    assert _used_count(scope, "a") == 2
    with scope() as session:
        assert [get_generation(session, i).prompt for i in ids] == ["a", "b", "a"]  # type: ignore[union-attr]
        assert create_generations(session, []) == []


def test_get_generation__unknown_id_is_none(scope: Scope) -> None:
    """get_generation of an id that does not exist returns None."""
    with scope() as session:
        assert get_generation(session, str(uuid.uuid4())) is None


def test_complete_generation__sets_the_outcome_fields(scope: Scope) -> None:
    """complete_generation sets status, completed_at (UTC), generation_time_seconds, file_size_bytes."""
    gen_id = _new(scope)
    with scope() as session:
        done = complete_generation(session, gen_id, generation_time=18.5, file_size_bytes=5_000_000)
        assert done.status == "completed"
    with scope() as session:
        gen = get_generation(session, gen_id)
        assert gen is not None and gen.status == GenerationStatus.COMPLETED
        assert gen.generation_time_seconds == 18.5 and gen.file_size_bytes == 5_000_000
        assert gen.completed_at is not None and gen.completed_at.tzinfo is UTC
        assert gen.created_at <= gen.completed_at <= datetime.now(UTC)
        assert gen.error_message is None


def test_complete_generation__merges_new_metadata(scope: Scope) -> None:
    """Metadata given at completion replaces the row's metadata."""
    gen_id = _new(scope)
    with scope() as session:
        complete_generation(session, gen_id, 1.0, 10, metadata={"bpm": 121, "key": "Am"})
    with scope() as session:
        assert get_generation(session, gen_id).meta == {"bpm": 121, "key": "Am"}  # type: ignore[union-attr]


def test_complete_generation__a_known_total_reads_done_fail_keeps_where_it_stopped(
        scope: Scope, engine: Engine) -> None:
    """complete_generation writes the row itself, as the daemon's finish does: progress 40/50
    becomes 50/50; fail_generation keeps 40/50; no progress stays NULL."""
    done, stopped, silent = _new(scope), _new(scope), _new(scope)
    with engine.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id.in_((done, stopped))).values(progress_done=40, progress_total=50))
    with scope() as session:
        complete_generation(session, done, 1.0, 10)
        fail_generation(session, stopped, "it broke")
        complete_generation(session, silent, 1.0, 10)
    with engine.connect() as conn:
        progress = {row.id: (row.progress_done, row.progress_total)
                    for row in conn.execute(sa.select(G.c.id, G.c.progress_done, G.c.progress_total))}
    assert (progress[done], progress[stopped], progress[silent]) == ((50, 50), (40, 50), (None, None))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("generation_time", {"generation_time": -1.0}), ("generation_time", {"generation_time": math.nan}),
     ("generation_time", {"generation_time": "fast"}), ("file_size_bytes", {"file_size_bytes": -5}),
     ("file_size_bytes", {"file_size_bytes": 1.5}), ("metadata", {"metadata": [1]})],
)
def test_complete_generation__rejects_bad_values(scope: Scope, field: str, kwargs: dict[str, Any]) -> None:
    """Bad completion values raise ValidationError naming the field, and the row stays pending."""
    gen_id = _new(scope)
    with pytest.raises(ValidationError) as caught, scope() as session:
        complete_generation(session, gen_id, **{"generation_time": 1.0, "file_size_bytes": 1, **kwargs})
    assert caught.value.field == field
    with scope() as session:
        assert get_generation(session, gen_id).status == "pending"  # type: ignore[union-attr]


def test_complete_generation__refuses_finished_or_missing(scope: Scope) -> None:
    """Completing a finished job raises InvalidStateError; an unknown id raises JobNotFoundError."""
    gen_id = _new(scope)
    with scope() as session:
        complete_generation(session, gen_id, generation_time=1.0, file_size_bytes=1)
    with pytest.raises(InvalidStateError, match="already completed"), scope() as session:
        complete_generation(session, gen_id, generation_time=2.0, file_size_bytes=2)
    with pytest.raises(JobNotFoundError), scope() as session:
        complete_generation(session, str(uuid.uuid4()), generation_time=1.0, file_size_bytes=1)


def test_fail_generation__records_the_error(scope: Scope) -> None:
    """fail_generation sets status failed, the message and completed_at."""
    gen_id = _new(scope)
    with scope() as session:
        fail_generation(session, gen_id, error_message="CUDA out of memory")
    with scope() as session:
        gen = get_generation(session, gen_id)
        assert gen is not None and gen.status == "failed"
        assert gen.error_message == "CUDA out of memory" and gen.completed_at is not None
    with pytest.raises(InvalidStateError), scope() as session:
        fail_generation(session, gen_id, error_message="again")
    with pytest.raises(ValidationError) as caught, scope() as session:
        fail_generation(session, _new(scope), error_message="  ")
    assert caught.value.field == "error_message"


def test_cancel_generation__fails_a_pending_job_and_asks_a_running_one(scope: Scope) -> None:
    """Cancelling a pending job marks it failed 'cancelled by request'; a running one stays
    running with cancel_requested_at set (its daemon stops it); a finished one refuses."""
    gen_id, running_id = _new(scope), _new(scope)
    with scope() as session:
        session.execute(sa.update(Generation).where(Generation.id == running_id).values(status="processing"))
    with scope() as session:
        cancelled = cancel_generation(session, gen_id)
        assert (cancelled.status, cancelled.error_message) == ("failed", "cancelled by request")
    with scope() as session:
        asked = cancel_generation(session, running_id)
        assert (asked.status, asked.cancelled_at) == ("processing", None)
        assert asked.cancel_requested_at is not None
    with pytest.raises(InvalidStateError, match="already failed"), scope() as session:
        cancel_generation(session, gen_id)
    with pytest.raises(JobNotFoundError), scope() as session:
        cancel_generation(session, str(uuid.uuid4()))


def test_retry_generation__requeues_a_failed_job(scope: Scope) -> None:
    """Retrying a failed job makes it pending with fresh attempts and no error; others refuse."""
    gen_id = _new(scope)
    later = datetime.now(UTC) + timedelta(hours=1)
    with scope() as session:
        fail_generation(session, gen_id, error_message="boom")
        session.execute(sa.update(Generation).where(Generation.id == gen_id).values(attempts=3))
    with scope() as session:
        retry_generation(session, gen_id, run_after=later)
    with scope() as session:
        gen = get_generation(session, gen_id)
        assert gen is not None and gen.status == "pending" and gen.attempts == 0
        assert gen.error_message is None and gen.completed_at is None
        assert gen.run_after is not None and abs(gen.run_after - later) < timedelta(milliseconds=1)
    with pytest.raises(InvalidStateError, match="only failed jobs"), scope() as session:
        retry_generation(session, gen_id)


def test_get_all_generations__filters_orders_and_pages(scope: Scope) -> None:
    """Newest first; a status filter (enum or text); limit and offset page through the rows."""
    ids = [_new(scope, prompt=f"p{i}") for i in range(5)]
    with scope() as session:
        complete_generation(session, ids[3], generation_time=1.0, file_size_bytes=1)
    with scope() as session:
        complete_generation(session, ids[1], generation_time=1.0, file_size_bytes=1)
    with scope() as session:
        assert [g.id for g in get_all_generations(session)] == ids[::-1]
        assert [g.id for g in get_all_generations(session, limit=2, offset=1)] == [ids[3], ids[2]]
        assert [g.id for g in get_all_generations(session, status="pending")] == [ids[4], ids[2], ids[0]]
        completed = get_all_generations(session, status=GenerationStatus.COMPLETED)
        assert [g.id for g in completed] == [ids[1], ids[3]]  # most recently completed first
        assert get_all_generations(session, status="failed") == []
        assert get_all_generations(session, limit=0) == []
        with pytest.raises(ValidationError) as caught:
            get_all_generations(session, status="done")
        assert caught.value.field == "status"
        with pytest.raises(ValidationError):
            get_all_generations(session, offset=-1)


def test_get_pending_generations__priority_then_age(scope: Scope) -> None:
    """Pending jobs come highest priority first, then oldest first; others are left out."""
    low, high_old, normal, high_new, done = (
        _new(scope, priority=-1), _new(scope, priority=5), _new(scope), _new(scope, priority=5), _new(scope)
    )
    with scope() as session:
        fail_generation(session, done, error_message="x")
    with scope() as session:
        assert [g.id for g in get_pending_generations(session)] == [high_old, high_new, normal, low]
        assert [g.id for g in get_pending_generations(session, limit=2)] == [high_old, high_new]


def test_get_most_used_prompts__by_use_count(scope: Scope) -> None:
    """Prompts come most used first, limited."""
    for prompt, times in (("rare", 1), ("common", 3), ("middle", 2)):
        for _ in range(times):
            _new(scope, prompt=prompt)
    with scope() as session:
        top = get_most_used_prompts(session, limit=2)
        assert [(p.text, p.used_count) for p in top] == [("common", 3), ("middle", 2)]
        assert len(get_most_used_prompts(session)) == 3


def test_delete_generation__removes_the_row(scope: Scope) -> None:
    """delete_generation removes the row and says whether it existed."""
    gen_id, kept = _new(scope), _new(scope)
    with scope() as session:
        assert delete_generation(session, gen_id) is True
    with scope() as session:
        assert get_generation(session, gen_id) is None and get_generation(session, kept) is not None
        assert delete_generation(session, gen_id) is False


def test_track_prompt_usage__upserts_counts_and_times(scope: Scope) -> None:
    """A new prompt starts at 1 (first == last use); each use adds 1 and moves last_used_at only."""
    with scope() as session:
        first = track_prompt_usage(session, "  dub techno  ")
        assert (first.text, first.used_count) == ("dub techno", 1)
        assert first.first_used_at == first.last_used_at and first.first_used_at.tzinfo is UTC
        started = first.first_used_at
    with scope() as session:
        again = track_prompt_usage(session, "dub techno")
        assert again.used_count == 2 and again.first_used_at == started and again.last_used_at >= started
    with pytest.raises(ValidationError) as caught, scope() as session:
        track_prompt_usage(session, "x\x00")
    assert caught.value.field == "prompt"


def test_get_database_stats__totals_match_the_rows(scope: Scope) -> None:
    """total_generations and the count of each status equal the rows in the table."""
    ids = [_new(scope, duration_seconds=10.0) for _ in range(6)]
    with scope() as session:
        complete_generation(session, ids[0], generation_time=2.0, file_size_bytes=1)
        complete_generation(session, ids[1], generation_time=4.0, file_size_bytes=1)
        fail_generation(session, ids[2], error_message="x")
        session.execute(sa.update(Generation).where(Generation.id == ids[3]).values(status="processing"))
    with scope() as session:
        stats = get_database_stats(session)
        by_status = sa.select(Generation.status, sa.func.count()).group_by(Generation.status)
        rows = session.execute(by_status).all()
    assert stats["total_generations"] == 6 == sum(n for _, n in rows)
    assert stats["by_status"] == {"pending": 2, "processing": 1, "completed": 2, "failed": 1}
    assert {s: stats[f"{s}_generations"] for s in ("pending", "processing", "completed", "failed")} == \
        stats["by_status"]
    assert stats["total_prompts"] == 1 and stats["average_generation_time_seconds"] == 3.0
    assert stats["total_audio_seconds"] == 20.0 and stats["oldest_pending_created_at"] is not None


def test_get_database_stats__empty_database(scope: Scope) -> None:
    """On an empty database every count is zero."""
    with scope() as session:
        stats = get_database_stats(session)
    assert stats["total_generations"] == 0 and set(stats["by_status"].values()) == {0}
    assert stats["average_generation_time_seconds"] is None and stats["oldest_pending_created_at"] is None


def test_get_session__commits_on_success_and_rolls_back_on_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_session() and init_db() with no arguments use $DATABASE_URL; commit or roll back."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    init_db()
    with get_session() as session:
        kept = create_generation(session=session, **SPEC_EXAMPLE).id
    with pytest.raises(ZeroDivisionError), get_session() as session:
        lost = create_generation(session=session, **_spec()).id
        _ = 1 / 0
    with get_session() as session:
        assert get_generation(session, kept) is not None and get_generation(session, lost) is None
        assert get_database_stats(session)["total_generations"] == 1


def test_init_db__default_url_creates_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $DATABASE_URL the database is sqlite:///data/generations.db, its folder created."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_url() == "sqlite:///data/generations.db"
    try:
        engine = init_db()
        assert (tmp_path / "data" / "generations.db").is_file()
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert version == head_revision()
    finally:
        dispose_engines()


@pytest.fixture
def sqlite_engine(sqlite_db_url: str) -> Iterator[Engine]:
    yield init_db(sqlite_db_url)


def _pragmas(conn: sa.Connection) -> tuple[Any, ...]:
    return tuple(
        conn.exec_driver_sql(f"PRAGMA {name}").scalar()
        for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys", "cache_size")
    )


def test_sqlite__pragmas_on_every_connection(sqlite_engine: Engine) -> None:
    """Every SQLite connection has WAL, a 5 s busy timeout, synchronous NORMAL, foreign keys and a
    1 MiB page cache."""
    with sqlite_engine.connect() as first, sqlite_engine.connect() as second:
        assert _pragmas(first) == _pragmas(second) == ("wal", 5000, 1, 1, -1024)
    sqlite_engine.dispose()  # a brand-new connection gets them too
    with sqlite_engine.connect() as third:
        assert _pragmas(third) == ("wal", 5000, 1, 1, -1024)


def test_sqlite__synchronous_and_timeout_are_configurable(sqlite_db_url: str) -> None:
    """database.sqlite_synchronous, sqlite_busy_timeout_ms and sqlite_cache_kib reach every connection."""
    settings = DatabaseSettings(sqlite_synchronous="FULL", sqlite_busy_timeout_ms=250, sqlite_cache_kib=4096)
    engine = create_engine(sqlite_db_url, settings)
    try:
        with engine.connect() as conn:
            assert _pragmas(conn) == ("wal", 250, 2, 1, -4096)
    finally:
        engine.dispose()


def test_timestamps__stored_as_utc_and_read_back_aware(scope: Scope, engine: Engine) -> None:
    """created_at is stored in UTC and read back timezone-aware UTC on both engines."""
    before = datetime.now(UTC)
    gen_id = _new(scope)
    with engine.connect() as conn:
        query = sa.text("SELECT created_at FROM generations WHERE id = :id")
        raw = conn.execute(query, {"id": gen_id}).scalar_one()
    if engine.dialect.name == "sqlite":
        assert isinstance(raw, str)  # naive UTC text, sortable
        stored = datetime.fromisoformat(raw).replace(tzinfo=UTC)
    else:
        assert raw.tzinfo is not None
        stored = raw
    assert before - timedelta(seconds=1) <= stored <= datetime.now(UTC)
    with scope() as session:
        gen = get_generation(session, gen_id)
        assert gen is not None and gen.created_at == stored and gen.created_at.tzinfo is UTC


def test_plain_sql__spec_example_rows_read_back_with_queue_defaults(scope: Scope, engine: Engine) -> None:
    """The spec's example INSERTs (15 values) read back fine and get migration 002's defaults."""
    columns = f"({SPEC_COLUMNS})" if engine.dialect.name == "sqlite" else ""
    with engine.begin() as conn:
        # PostgreSQL takes the spec's statements verbatim (the first 15 columns); SQLite needs the
        # column list, since the table now has more columns than the 15 values.
        conn.exec_driver_sql(f"INSERT INTO generations {columns} VALUES {SPEC_PENDING_VALUES}")
        conn.exec_driver_sql(f"INSERT INTO generations {columns} VALUES {SPEC_COMPLETED_VALUES}")
    with scope() as session:
        pending = get_generation(session, "a1b2c3d4-e5f6-7890-abcd-ef1234567890")
        done = get_generation(session, "b2c3d4e5-f6a7-8901-bcde-f12345678901")
        assert pending is not None and done is not None
        assert pending.created_at == datetime(2025, 11, 7, 10, 0, tzinfo=UTC)
        assert (pending.priority, pending.attempts, pending.max_attempts) == (0, 0, 3)
        assert pending.run_after is None
        assert pending.meta is None and pending.status_enum is GenerationStatus.PENDING
        assert done.meta == {"bpm": 90, "key": "Am", "genre": "lo-fi"}
        assert done.completed_at == datetime(2025, 11, 7, 9, 0, 22, tzinfo=UTC)
        assert (done.generation_time_seconds, done.file_size_bytes) == (22.3, 5242880)
        assert [g.id for g in get_pending_generations(session)] == [pending.id]
        assert get_database_stats(session)["by_status"]["completed"] == 1


def test_plain_sql__spec_prompt_rows_count_on(scope: Scope, engine: Engine) -> None:
    """A prompt row inserted by plain SQL (used_count defaulted) keeps counting through the API."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO prompts (text, first_used_at, last_used_at) "
            "VALUES ('chill lo-fi hip hop with piano', '2025-11-07 10:15:00', '2025-11-07 10:15:00')"
        )
    _new(scope, prompt="chill lo-fi hip hop with piano")
    with scope() as session:
        [prompt] = get_most_used_prompts(session)
        assert prompt.used_count == 2 and prompt.first_used_at == datetime(2025, 11, 7, 10, 15, tzinfo=UTC)


@pytest.mark.parametrize("revision", ["before", "after"])
def test_plain_sql__spec_prompt_rows_with_their_ids_leave_room_for_new_ones(db_url: str, revision: str) -> None:
    """The spec's example prompts, inserted with their own ids (1 and 2), before or after
    migration 003: new prompts counted through the API take other ids. On PostgreSQL the id
    sequence did not see those ids, and the next two new prompts failed on the primary key."""
    engine = get_engine(db_url)
    upgrade(engine, "002" if revision == "before" else "head")
    with engine.begin() as conn:  # the specification's two example records, verbatim
        conn.exec_driver_sql("INSERT INTO prompts VALUES (1, 'trap beat with heavy 808 bass at 140 BPM', 3,"
                             " '2025-11-07 09:00:00', '2025-11-07 11:30:00')")
        conn.exec_driver_sql("INSERT INTO prompts VALUES (2, 'chill lo-fi hip hop with piano', 1,"
                             " '2025-11-07 10:15:00', '2025-11-07 10:15:00')")
    init_db(db_url)
    with session_scope(engine) as session:
        for prompt in ("new prompt A", "new prompt B", "chill lo-fi hip hop with piano"):
            create_generation(session=session, **_spec(prompt=prompt))
    with session_scope(engine) as session:
        counts = {p.text: (p.id, p.used_count) for p in get_most_used_prompts(session, limit=10)}
    assert counts["trap beat with heavy 808 bass at 140 BPM"] == (1, 3)
    assert counts["chill lo-fi hip hop with piano"] == (2, 2)
    assert {counts["new prompt A"][0], counts["new prompt B"][0]}.isdisjoint({1, 2})


def test_bad_input__every_rule_writes_nothing(scope: Scope, engine: Engine) -> None:
    """For every validation rule, create_generation raises and no row or prompt count is written."""
    for field, value, _ in BAD_INPUTS:
        with pytest.raises(ValidationError) as caught, scope() as session:
            create_generation(session=session, **{**SPEC_EXAMPLE, field: value})
        assert caught.value.field == field
        assert _counts(engine) == (0, 0), (field, value)


def test_bad_input__a_bad_spec_in_a_batch_or_transaction_writes_nothing(scope: Scope, engine: Engine) -> None:
    """A bad spec in a batch, or after a good create in the same session, leaves nothing behind."""
    with pytest.raises(ValidationError), scope() as session:
        create_generations(session, [SPEC_EXAMPLE, {**SPEC_EXAMPLE, "duration_seconds": 0}])
    with pytest.raises(ValidationError), scope() as session:
        create_generation(session=session, **SPEC_EXAMPLE)
        create_generation(session=session, **{**SPEC_EXAMPLE, "file_path": "../escape.wav"})
    assert _counts(engine) == (0, 0)


def test_bad_input__prompt_up_to_the_index_limit_is_stored(scope: Scope, engine: Engine) -> None:
    """A prompt of 2600 bytes of UTF-8 (incompressible, so stored whole) fits PostgreSQL's unique
    index on prompts; one byte more is refused at the door, not by the database after it."""
    rng = random.Random(7)
    text = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(866)) + "ab"  # 3 bytes a character
    assert len(text.encode()) == 2600
    _new(scope, prompt=text)
    assert _used_count(scope, text) == 1
    with pytest.raises(ValidationError, match="at most 2600 bytes") as caught, scope() as session:
        create_generation(session=session, **{**SPEC_EXAMPLE, "prompt": text + "c"})
    assert caught.value.field == "prompt" and _counts(engine) == (1, 1)


def test_bad_input__what_the_columns_cannot_hold_is_refused(scope: Scope, engine: Engine) -> None:
    """Values that would fail in the database, or crash before it, raise ValidationError naming
    their field: a WAV too big for file_size_bytes (32-bit on PostgreSQL), a run_after past the
    last datetime in UTC, metadata nested past the JSON encoder's limit, a spec that is not a
    mapping; nothing is written."""
    big = JobSettings(max_duration_seconds=3600, max_sample_rate=384000, max_channels=8)
    nested: list[Any] = []
    for _ in range(5000):
        nested = [nested]
    late = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("duration_seconds", {"duration_seconds": 3600, "sample_rate": 192000, "channels": 2}, {"limits": big}),
        ("run_after", {"run_after": late}, {}),
        ("metadata", {"metadata": {"a": nested}}, {}),
    ]
    for field, spec, options in cases:
        with pytest.raises(ValidationError) as caught, scope() as session:
            create_generation(session=session, **{**SPEC_EXAMPLE, **spec}, **options)
        assert caught.value.field == field
    with pytest.raises(ValidationError) as caught, scope() as session:
        create_generations(session, [SPEC_EXAMPLE, "hip hop beat"])  # type: ignore[list-item]
    assert caught.value.field == "specs[1]"
    assert _counts(engine) == (0, 0)
    gen_id = _new(scope)
    with pytest.raises(ValidationError) as caught, scope() as session:
        complete_generation(session, gen_id, generation_time=1.0, file_size_bytes=3_000_000_000)
    assert caught.value.field == "file_size_bytes"
    with scope() as session:
        fail_generation(session, gen_id, error_message="boom")
    with pytest.raises(ValidationError) as caught, scope() as session:
        retry_generation(session, gen_id, run_after="tomorrow")  # type: ignore[arg-type]
    assert caught.value.field == "run_after"
    with scope() as session:
        assert get_generation(session, gen_id).status == "failed"  # type: ignore[union-attr]


def test_fail_generation__any_text_is_stored(scope: Scope) -> None:
    """A message with a NUL byte (PostgreSQL text refuses it) or a lone surrogate (no driver
    encodes it) is stored with those replaced, on both engines."""
    gen_id = _new(scope)
    with scope() as session:
        fail_generation(session, gen_id, error_message="boom\x00 at \udcff")
    with scope() as session:
        assert get_generation(session, gen_id).error_message == "boom\ufffd at ?"  # type: ignore[union-attr]


def test_bad_input__configured_limits_apply(scope: Scope, engine: Engine) -> None:
    """Limits passed to create_generation (the configured maximum) are enforced."""
    with pytest.raises(ValidationError, match=r"\(0, 5\]"), scope() as session:
        create_generation(session=session, **SPEC_EXAMPLE, limits=JobSettings(max_duration_seconds=5))
    assert _counts(engine) == (0, 0)


def test_engine__a_postgres_connection_the_pool_closed_is_not_held(pg_db_url: str) -> None:
    """The UTF8 check run on each new PostgreSQL connection keeps no reference to it: the
    check was memoised by connection (a misplaced lru_cache), so the last 1024 connections a
    long-running daemon or web server had closed stayed in memory."""
    import gc
    import weakref

    engine = create_engine(pg_db_url)
    with engine.connect() as conn:
        driver = weakref.ref(conn.connection.dbapi_connection)
    engine.dispose()
    gc.collect()
    assert driver() is None


def test_rows_of__bind_names_are_made_once_per_shape() -> None:
    """rows_of's bind names for a shape of rows are built once and reused (the lru_cache that
    made them once had moved onto the UTF8 check above them)."""
    from dgxqueue.storage.engines import _bind_names

    assert _bind_names(("id", "status"), 3) is _bind_names(("id", "status"), 3)
