"""ORM models: the user's two tables, plus the queue columns that migration 002 adds.

Migration 001 is exactly the user's schema (``../shared/seed/DATABASE_SCHEMA.md``); the columns
below the "queue" comment come from 002. ``alembic check`` keeps these models and the migrations
equal.

A column whose stored value is not of its type (a row written by plain SQL) reads back as
:class:`~dgxqueue.storage.rowvalues.Unreadable`, its raw text, instead of raising.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The time type binds as each engine stores a time, which its profile says (engines imports no model).
from dgxqueue.storage.engines import UTCDateTime as UTCDateTime
from dgxqueue.storage.engines import as_utc as as_utc
from dgxqueue.storage.rowvalues import read_json

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class GenerationStatus(enum.StrEnum):
    """The four job states of the specification."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class MetadataJSON(sa.types.TypeDecorator[Any]):
    """The ``metadata`` column (JSON): read as text and parsed here, so that a value that is not
    JSON (SQLite stores anything) comes back as rowvalues.Unreadable instead of raising."""

    impl = sa.JSON
    cache_ok = True

    def column_expression(self, colexpr: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        # As text on both engines: psycopg would parse json itself, before this type sees it.
        return sa.cast(colexpr, _JSONText())


class _JSONText(sa.types.TypeDecorator[Any]):
    impl = sa.Text
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return read_json(value)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


#: The ends of the counters' type (PostgreSQL's ``integer``; SQLite's integers are wider): plain SQL
#: can leave a counter at one, where adding to it raises "integer out of range" and rolls back the
#: whole statement, so the statements that add keep such a counter where it is.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def uses_after(used: sa.ColumnElement[Any], more: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """A prompt's ``used_count`` (NULL read as 0) plus ``more``, held at :data:`INT_MAX`."""
    before = sa.func.coalesce(used, 0)
    return sa.case((before > INT_MAX - more, INT_MAX), else_=before + more)


#: The unique index on dedupe_key, and its predicate: the insert's ON CONFLICT names it as written here.
DEDUPE_INDEX = "uq_generations_dedupe_key"
DEDUPE_HELD_SQL = "status IN ('pending', 'processing') AND dedupe_key IS NOT NULL"
_EXPIRING = "status = 'pending' AND expires_at IS NOT NULL"
#: The rows that hold their file_path (migration 007's unique index): every row but a failed one,
#: which never wrote its file (a WAV is renamed into place only with a completed outcome).
HOLDS_ITS_FILE_SQL = "status <> 'failed'"


class Generation(Base):
    """One generation job (a row of ``generations``)."""

    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    prompt: Mapped[str] = mapped_column(sa.Text, nullable=False)
    model_name: Mapped[str] = mapped_column(sa.Text, nullable=False)
    model_version: Mapped[str | None] = mapped_column(sa.Text)
    duration_seconds: Mapped[float] = mapped_column(sa.Float, nullable=False)
    sample_rate: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    channels: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    file_path: Mapped[str] = mapped_column(sa.Text, nullable=False)
    file_size_bytes: Mapped[int | None] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    generation_time_seconds: Mapped[float | None] = mapped_column(sa.Float)
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    # The column is "metadata"; the attribute cannot be (SQLAlchemy reserves it).
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", MetadataJSON)

    # --- queue columns (migration 002); every one has a server default or is nullable, so a
    # row inserted with only the specification's columns is claimed like any other.
    priority: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0", default=0)
    attempts: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0", default=0)
    max_attempts: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="3", default=3)
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(sa.Text)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # --- isolation columns (migration 004): set when a backend call starts the attempt, and how
    # many attempts ended with the daemon dead (or the time limit) while the job ran.
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_losses: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0")
    # --- producer and operator columns (migration 005), all nullable: the latest progress a
    # generator reported, a cancel of a running job and when a job ended cancelled or expired,
    # when a pending job stops being wanted, and the key that makes an enqueue idempotent.
    progress_done: Mapped[int | None] = mapped_column(sa.Integer)
    progress_total: Mapped[int | None] = mapped_column(sa.Integer)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dedupe_key: Mapped[str | None] = mapped_column(sa.Text)

    __table_args__ = (
        sa.Index("idx_generations_status", "status"),
        sa.Index("idx_generations_model_name", "model_name"),
        # The rescuer looks for expired leases among running rows only.
        sa.Index(
            "idx_generations_lease", "lease_expires_at",
            sqlite_where=sa.text("status = 'processing'"),
            postgresql_where=sa.text("status = 'processing'"),
        ),
        # At most one unfinished job holds a dedupe key; a finished one frees it.
        sa.Index(
            DEDUPE_INDEX, "dedupe_key", unique=True,
            sqlite_where=sa.text(DEDUPE_HELD_SQL), postgresql_where=sa.text(DEDUPE_HELD_SQL),
        ),
        # The expiry sweep reads pending rows that have an expiry only.
        sa.Index(
            "idx_generations_expires_at", "expires_at",
            sqlite_where=sa.text(_EXPIRING), postgresql_where=sa.text(_EXPIRING),
        ),
    )

    @property
    def status_enum(self) -> GenerationStatus:
        return GenerationStatus(self.status)

    def __repr__(self) -> str:
        return f"Generation(id={self.id!r}, status={self.status!r}, model_name={self.model_name!r})"


# Indexes with a sort order name the mapped columns, so they are declared after the class.
sa.Index("idx_generations_created_at", Generation.created_at.desc())
sa.Index("idx_generations_completed_at", Generation.completed_at.desc())
# Claiming reads pending rows of one model in priority order: O(log n) on any backlog.
sa.Index(
    "idx_generations_claim", Generation.model_name, Generation.priority.desc(), Generation.created_at,
    sqlite_where=sa.text("status = 'pending'"),
    postgresql_where=sa.text("status = 'pending'"),
)


class Prompt(Base):
    """How often each distinct prompt text was used (a row of ``prompts``)."""

    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    text: Mapped[str] = mapped_column(sa.Text, nullable=False, unique=True)
    used_count: Mapped[int] = mapped_column(sa.Integer, nullable=True, server_default="1", default=1)
    first_used_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (
        sa.Index("idx_prompts_text", "text"),
        {"sqlite_autoincrement": True},
    )

    def __repr__(self) -> str:
        return f"Prompt(text={self.text!r}, used_count={self.used_count})"


# The tables and statuses as Core statements use them.
G = cast(sa.Table, Generation.__table__)
P = cast(sa.Table, Prompt.__table__)
PENDING, PROCESSING = GenerationStatus.PENDING.value, GenerationStatus.PROCESSING.value
COMPLETED, FAILED = GenerationStatus.COMPLETED.value, GenerationStatus.FAILED.value

# The statuses as SQL literals, not bind parameters: the partial indexes (WHERE status = 'pending',
# WHERE status = 'processing') can only serve a query whose predicate is known when it is planned,
# which a PostgreSQL generic plan for a prepared statement, or SQLite's planner, cannot assume of a
# parameter. Constants of this module, never user input.
IS_PENDING = G.c.status == sa.literal_column("'pending'")
IS_PROCESSING = G.c.status == sa.literal_column("'processing'")
#: The status ``completed`` as SQL, to compare a column other than ``generations.status`` with.
COMPLETED_SQL: sa.ColumnElement[str] = sa.literal_column("'completed'", sa.Text)


class PausedModel(Base):
    """A model no daemon claims until it is resumed (a row of ``paused_models``)."""

    __tablename__ = "paused_models"

    model_name: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    reason: Mapped[str | None] = mapped_column(sa.Text)


PAUSED = cast(sa.Table, PausedModel.__table__)


class DaemonRecord(Base):
    """A live daemon as it registered itself (a row of ``daemons``); its heartbeat moves
    ``expires_at`` on, a clean stop deletes it, and a row past ``expires_at`` is stale."""

    __tablename__ = "daemons"

    id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    host: Mapped[str] = mapped_column(sa.Text, nullable=False)
    pid: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    generator: Mapped[str] = mapped_column(sa.Text, nullable=False)
    models: Mapped[str] = mapped_column(sa.Text, nullable=False)  # a JSON list of model names
    version: Mapped[str] = mapped_column(sa.Text, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    holding: Mapped[str | None] = mapped_column(sa.Text)  # a JSON list of the job ids it holds
