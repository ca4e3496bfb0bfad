"""The ORM models against the user's specification: tables, columns, types, nullability, indexes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from dgxqueue.storage import Base, Generation, GenerationStatus, Prompt
from dgxqueue.storage.models import UTCDateTime, utcnow

# The specification's tables, column by column: (name, type, nullable).
SPEC_GENERATIONS = [
    ("id", sa.Text, False), ("prompt", sa.Text, False), ("model_name", sa.Text, False),
    ("model_version", sa.Text, True), ("duration_seconds", sa.Float, False),
    ("sample_rate", sa.Integer, False), ("channels", sa.Integer, False), ("file_path", sa.Text, False),
    ("file_size_bytes", sa.Integer, True), ("status", sa.Text, False), ("created_at", UTCDateTime, False),
    ("completed_at", UTCDateTime, True), ("generation_time_seconds", sa.Float, True),
    ("error_message", sa.Text, True), ("metadata", sa.JSON, True),
]
# Migrations 002 and 004's queue columns: nullable or with a server default, so spec-only inserts still work.
QUEUE_COLUMNS = [
    ("priority", sa.Integer, False, "0"), ("attempts", sa.Integer, False, "0"),
    ("max_attempts", sa.Integer, False, "3"), ("run_after", UTCDateTime, True, None),
    ("worker_id", sa.Text, True, None), ("claimed_at", UTCDateTime, True, None),
    ("lease_expires_at", UTCDateTime, True, None),
    # Migration 004's isolation columns.
    ("started_at", UTCDateTime, True, None), ("lease_losses", sa.Integer, False, "0"),
    # Migration 005's producer and operator columns: all nullable.
    ("progress_done", sa.Integer, True, None), ("progress_total", sa.Integer, True, None),
    ("cancel_requested_at", UTCDateTime, True, None), ("cancelled_at", UTCDateTime, True, None),
    ("expires_at", UTCDateTime, True, None), ("expired_at", UTCDateTime, True, None),
    ("dedupe_key", sa.Text, True, None),
]
SPEC_PROMPTS = [
    ("id", sa.Integer, False), ("text", sa.Text, False), ("used_count", sa.Integer, True),
    ("first_used_at", UTCDateTime, False), ("last_used_at", UTCDateTime, False),
]
GENERATIONS = Base.metadata.tables["generations"]
PROMPTS = Base.metadata.tables["prompts"]


def _index(table: sa.Table, name: str) -> sa.Index:
    [index] = [i for i in table.indexes if i.name == name]
    return index


def _server_default(column: sa.Column[object]) -> str | None:
    default = column.server_default
    if default is None:
        return None
    assert isinstance(default, sa.DefaultClause)
    return str(default.arg)


def test_metadata__has_the_two_tables_and_the_operators_two() -> None:
    """The schema holds the specification's two tables, and migration 005's paused models and
    daemon registry."""
    assert set(Base.metadata.tables) == {"generations", "prompts", "paused_models", "daemons"}


def test_generations__columns_types_and_nullability_match_the_specification() -> None:
    """generations has the spec's 15 columns, in order, with its types and NOT NULLs, then 002's, 004's and 005's."""
    names = [c.name for c in GENERATIONS.columns]
    assert names == [n for n, _, _ in SPEC_GENERATIONS] + [n for n, *_ in QUEUE_COLUMNS]
    for name, kind, nullable in SPEC_GENERATIONS:
        column = GENERATIONS.c[name]
        # metadata is sa.JSON under a TypeDecorator that reads values that are not JSON
        assert isinstance(column.type, kind) or isinstance(getattr(column.type, "impl_instance", None), kind), name
        assert column.nullable is nullable, name
    assert [c.name for c in GENERATIONS.primary_key] == ["id"]


def test_generations__queue_columns_are_safe_for_spec_only_inserts() -> None:
    """Every column 002 adds is nullable or has a server default (and the right type)."""
    for name, kind, nullable, default in QUEUE_COLUMNS:
        column = GENERATIONS.c[name]
        assert isinstance(column.type, kind), name
        assert column.nullable is nullable, name
        assert _server_default(column) == default, name
        assert column.nullable or column.server_default is not None, name


def test_prompts__columns_types_and_constraints_match_the_specification() -> None:
    """prompts: integer autoincrement key, unique NOT NULL text, used_count DEFAULT 1, timestamps."""
    assert [c.name for c in PROMPTS.columns] == [n for n, _, _ in SPEC_PROMPTS]
    for name, kind, nullable in SPEC_PROMPTS:
        assert isinstance(PROMPTS.c[name].type, kind), name
        assert PROMPTS.c[name].nullable is nullable, name
    assert [c.name for c in PROMPTS.primary_key] == ["id"]
    assert PROMPTS.c.id.autoincrement is True and PROMPTS.dialect_options["sqlite"]["autoincrement"]
    assert _server_default(PROMPTS.c.used_count) == "1"
    uniques = [c for c in PROMPTS.constraints if isinstance(c, sa.UniqueConstraint)]
    assert [[col.name for col in u.columns] for u in uniques] == [["text"]]


def test_indexes__names_and_columns_match_the_specification() -> None:
    """The five index names of the spec exist on their columns; created/completed are DESC."""
    assert {i.name for i in GENERATIONS.indexes} == {
        "idx_generations_status", "idx_generations_created_at", "idx_generations_model_name",
        "idx_generations_completed_at", "idx_generations_claim", "idx_generations_lease",
        "uq_generations_dedupe_key", "idx_generations_expires_at",
    }
    assert {i.name for i in PROMPTS.indexes} == {"idx_prompts_text"}
    assert [c.name for c in _index(GENERATIONS, "idx_generations_status").columns] == ["status"]
    assert [c.name for c in _index(GENERATIONS, "idx_generations_model_name").columns] == ["model_name"]
    assert [c.name for c in _index(PROMPTS, "idx_prompts_text").columns] == ["text"]
    for name, column in (("idx_generations_created_at", "created_at"),
                         ("idx_generations_completed_at", "completed_at")):
        ddl = str(sa.schema.CreateIndex(_index(GENERATIONS, name)).compile(dialect=sqlite.dialect()))
        assert ddl.endswith(f"ON generations ({column} DESC)"), ddl


def test_generation__metadata_attribute_maps_to_the_metadata_column() -> None:
    """The Python attribute is ``meta``; the column is ``metadata``."""
    assert Generation.__mapper__.columns["meta"].name == "metadata"


def test_generation__python_defaults_and_repr() -> None:
    """A Generation built in Python has readable repr and a status enum view."""
    job = Generation(id="a", prompt="p", model_name="m", duration_seconds=1.0, sample_rate=32000,
                     channels=1, file_path="outputs/a.wav", status="pending", created_at=utcnow())
    assert job.status_enum is GenerationStatus.PENDING
    assert repr(job) == "Generation(id='a', status='pending', model_name='m')"
    assert repr(Prompt(text="p", used_count=2)) == "Prompt(text='p', used_count=2)"


def test_generation_status__is_exactly_the_specification_four() -> None:
    """GenerationStatus has exactly pending, processing, completed, failed, usable as text."""
    assert [s.value for s in GenerationStatus] == ["pending", "processing", "completed", "failed"]
    text: str = GenerationStatus.COMPLETED  # a str, not only an enum member
    assert text == "completed"
    assert f"{GenerationStatus.FAILED}" == "failed"


def test_utcnow__is_timezone_aware_utc() -> None:
    """utcnow() returns an aware UTC datetime."""
    assert utcnow().tzinfo is UTC


SQLITE, POSTGRES = sqlite.dialect(), postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
PLUS_TWO = timezone(timedelta(hours=2))


@pytest.mark.parametrize(
    ("given", "on_sqlite", "on_postgres"),
    [
        (datetime(2025, 11, 7, 10, 0), datetime(2025, 11, 7, 10, 0),
         datetime(2025, 11, 7, 10, 0, tzinfo=UTC)),
        (datetime(2025, 11, 7, 12, 0, tzinfo=PLUS_TWO), datetime(2025, 11, 7, 10, 0),
         datetime(2025, 11, 7, 10, 0, tzinfo=UTC)),
        (None, None, None),
    ],
    ids=["naive-means-utc", "aware-converted", "none"],
)
def test_utc_datetime__binds_utc(given: datetime | None, on_sqlite: datetime | None,
                                 on_postgres: datetime | None) -> None:
    """Bound values become UTC: naive UTC text on SQLite, aware UTC on PostgreSQL."""
    kind = UTCDateTime()
    stored_sqlite = kind.process_bind_param(given, SQLITE)
    stored_pg = kind.process_bind_param(given, POSTGRES)
    assert stored_sqlite == on_sqlite and (stored_sqlite is None or stored_sqlite.tzinfo is None)
    assert stored_pg == on_postgres and (stored_pg is None or stored_pg.tzinfo is UTC)


def test_utc_datetime__results_are_aware_utc() -> None:
    """Values read back are always timezone-aware UTC, whatever the driver returned."""
    kind = UTCDateTime()
    naive = kind.process_result_value(datetime(2025, 11, 7, 10, 0), SQLITE)
    aware = kind.process_result_value(datetime(2025, 11, 7, 12, 0, tzinfo=PLUS_TWO), POSTGRES)
    assert naive == aware == datetime(2025, 11, 7, 10, 0, tzinfo=UTC)
    assert naive is not None and aware is not None
    assert naive.tzinfo is UTC and aware.tzinfo is UTC
    assert kind.process_result_value(None, SQLITE) is None


def test_utc_datetime__is_a_timestamp_with_time_zone() -> None:
    """The column type is TIMESTAMP (WITH TIME ZONE on PostgreSQL), as the spec's TIMESTAMP."""
    assert str(sa.Column("t", UTCDateTime()).type.compile(dialect=POSTGRES)) == "TIMESTAMP WITH TIME ZONE"
    assert str(sa.Column("t", UTCDateTime()).type.compile(dialect=SQLITE)) == "TIMESTAMP"


def test_utc_datetime__binds_aware_utc_on_an_engine_without_a_profile() -> None:
    """A dialect with no engine profile (compiling for display, say) gets aware UTC, as PostgreSQL does."""
    given = datetime(2025, 11, 7, 12, 0, tzinfo=PLUS_TWO)
    assert UTCDateTime().process_bind_param(given, sa.engine.default.DefaultDialect()) == datetime(
        2025, 11, 7, 10, 0, tzinfo=UTC)


def test_engine_names__are_tested_only_in_storage_engines() -> None:
    """Every engine difference lives in storage/engines.py's profiles: no other module of the
    package or the workers tests a dialect's name."""
    root = Path(__file__).resolve().parents[2]
    engines = root / "dgxqueue" / "storage" / "engines.py"
    found = [f"{path.relative_to(root)}:{number}"
             for folder in ("dgxqueue", "workers") for path in sorted((root / folder).rglob("*.py"))
             if path != engines
             for number, line in enumerate(path.read_text().splitlines(), 1) if "dialect.name" in line]
    assert found == []
