"""Every query dgxqueue runs lives here. Callers own the session and its transaction.

Producer side: the prompt upsert (the insert is :mod:`fastinsert`'s). Daemon side: claim,
heartbeat, finish (fenced), release, rescue. Reads: lists, stats, queue depth. Nothing here builds SQL from strings.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dgxqueue.errors import InvalidStateError, JobNotFoundError
from dgxqueue.storage import rowvalues
from dgxqueue.storage.models import Generation, GenerationStatus, Prompt, UTCDateTime, as_utc, utcnow

G = cast(sa.Table, Generation.__table__)
P = cast(sa.Table, Prompt.__table__)
PENDING, PROCESSING = GenerationStatus.PENDING.value, GenerationStatus.PROCESSING.value
COMPLETED, FAILED = GenerationStatus.COMPLETED.value, GenerationStatus.FAILED.value
CANCELLED_MESSAGE = "cancelled by request"
#: PostgreSQL channel a producer notifies (payload: the model name) so idle daemons wake at once.
NOTIFY_CHANNEL = "dgxqueue_jobs"


# The statuses as SQL literals, not bind parameters: the partial indexes (WHERE status = 'pending',
# WHERE status = 'processing') can only serve a query whose predicate is known when it is planned,
# which a PostgreSQL generic plan for a prepared statement, or SQLite's planner, cannot assume of a
# parameter. Constants of this module, never user input.
IS_PENDING = G.c.status == sa.literal_column("'pending'")
IS_PROCESSING = G.c.status == sa.literal_column("'processing'")


# --- producer side --------------------------------------------------------------------------


def notify_models(session: Session, models: Iterable[str]) -> None:
    """Wake daemons serving ``models`` (PostgreSQL NOTIFY, delivered when the transaction commits)."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite daemons notice commits through PRAGMA data_version
    for model in sorted(models):
        session.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, model)))


def prompt_upsert(dialect: str) -> sa.Insert:
    """``INSERT INTO prompts ... ON CONFLICT (text) DO UPDATE`` adding to ``used_count``."""
    insert = postgresql.insert(P) if dialect == "postgresql" else sqlite.insert(P)
    return insert.on_conflict_do_update(
        index_elements=[P.c.text],
        set_={
            "used_count": sa.func.coalesce(P.c.used_count, 0) + insert.excluded.used_count,
            "last_used_at": insert.excluded.last_used_at,
        },
    )


# Built once per dialect: constructing the ON CONFLICT clause costs more than executing it.
_PROMPT_UPSERTS = {name: prompt_upsert(name) for name in ("postgresql", "sqlite")}


def upsert_prompts(session: Session, counts: Mapping[str, int], now: datetime) -> None:
    """Add ``counts`` to each prompt's ``used_count`` in one atomic upsert per distinct text."""
    stmt = _PROMPT_UPSERTS[session.get_bind().dialect.name]
    # Sorted so concurrent batches take row locks in the same order and cannot deadlock.
    params = [
        {"text": text, "used_count": n, "first_used_at": now, "last_used_at": now}
        for text, n in sorted(counts.items())
    ]
    session.execute(stmt, params)


def get_prompt(session: Session, text: str) -> Prompt | None:
    return session.scalars(sa.select(Prompt).where(Prompt.text == text)).one_or_none()


def get_job(session: Session, job_id: str) -> Generation | None:
    return session.get(Generation, job_id, populate_existing=True)


def job_ids_between(session: Session, lower: str, upper: str | None, limit: int) -> list[str]:
    """Ids in ``[lower, upper)`` in order, at most ``limit``: a prefix search as a range on the
    primary key, so it uses its index and no pattern is built from the caller's text."""
    query = sa.select(G.c.id).where(G.c.id >= lower)
    if upper is not None:
        query = query.where(G.c.id < upper)
    return list(session.scalars(query.order_by(G.c.id).limit(limit)))


def require_job(session: Session, job_id: str) -> Generation:
    job = get_job(session, job_id)
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def list_jobs(
    session: Session, status: GenerationStatus | None, limit: int, offset: int
) -> list[Generation]:
    query = sa.select(Generation)
    if status is not None:
        query = query.where(Generation.status == status.value)
    if status is GenerationStatus.COMPLETED:
        query = query.order_by(Generation.completed_at.desc())
    else:
        query = query.order_by(Generation.created_at.desc())
    return list(session.scalars(query.limit(limit).offset(offset)))


def pending_jobs(session: Session, limit: int) -> list[Generation]:
    """Pending jobs in the order the daemon claims them."""
    query = (
        sa.select(Generation).where(Generation.status == PENDING)
        .order_by(Generation.priority.desc(), Generation.created_at).limit(limit)
    )
    return list(session.scalars(query))


def most_used_prompts(session: Session, limit: int) -> list[Prompt]:
    query = sa.select(Prompt).order_by(Prompt.used_count.desc(), Prompt.last_used_at.desc()).limit(limit)
    return list(session.scalars(query))


def delete_job(session: Session, job_id: str) -> bool:
    result = session.execute(sa.delete(G).where(G.c.id == job_id))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def set_outcome(
    session: Session, job_id: str, status: GenerationStatus, values: Mapping[str, Any]
) -> Generation:
    """The specification's complete/fail: from pending or processing, unfenced (producer side)."""
    result = session.execute(
        sa.update(G)
        .where(G.c.id == job_id, G.c.status.in_((PENDING, PROCESSING)))
        .values(status=status.value, completed_at=utcnow(), worker_id=None, lease_expires_at=None,
                **values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        job = require_job(session, job_id)
        raise InvalidStateError(f"generation {job_id} is already {job.status}; cannot mark it {status}")
    return require_job(session, job_id)


def cancel_job(session: Session, job_id: str) -> Generation:
    """Cancel a pending job: it becomes failed with a 'cancelled' message. Running jobs refuse."""
    result = session.execute(
        sa.update(G).where(G.c.id == job_id, G.c.status == PENDING)
        .values(status=FAILED, error_message=CANCELLED_MESSAGE, completed_at=utcnow())
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        job = require_job(session, job_id)
        raise InvalidStateError(
            f"generation {job_id} is {job.status}; only pending jobs can be cancelled"
            + (" (it is running; wait for it or stop its daemon)" if job.status == PROCESSING else "")
        )
    return require_job(session, job_id)


def retry_job(session: Session, job_id: str, run_after: datetime | None = None) -> Generation:
    """Send a failed job back to pending with a fresh set of attempts."""
    result = session.execute(
        sa.update(G).where(G.c.id == job_id, G.c.status == FAILED)
        .values(status=PENDING, attempts=0, error_message=None, completed_at=None,
                run_after=run_after, worker_id=None, claimed_at=None, lease_expires_at=None,
                generation_time_seconds=None, file_size_bytes=None)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        job = require_job(session, job_id)
        raise InvalidStateError(f"generation {job_id} is {job.status}; only failed jobs can be retried")
    return require_job(session, job_id)


# --- daemon side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    """A job this daemon now holds; ``attempt`` with ``worker_id`` is its fencing token."""

    id: str
    prompt: str
    model_name: str
    duration_seconds: float
    sample_rate: int
    channels: int
    file_path: str
    metadata: dict[str, Any] | None
    attempt: int
    max_attempts: int
    created_at: datetime
    claimed_at: datetime
    #: Why the row cannot run (each bad column named with its value); the daemon fails the job.
    defect: str | None = None
    #: Attempts of this job that ended with its daemon dead or stalled (or the time limit) while
    #: it ran: above 0, the job runs alone.
    lease_losses: int = 0

    @property
    def suspect(self) -> bool:
        """It may be what killed or stalled a daemon: it runs in a backend call of its own."""
        return self.lease_losses > 0


_CLAIM_COLUMNS = (
    G.c.id, G.c.prompt, G.c.model_name, G.c.duration_seconds, G.c.sample_rate, G.c.channels,
    G.c.file_path, G.c.metadata, G.c.attempts, G.c.max_attempts, G.c.created_at, G.c.claimed_at,
    G.c.run_after, G.c.lease_losses,
)

# The start of a time as SQLite stores it ('2025-11-07 10:00:00'): text that sorts as a time.
_TIME_TEXT: sa.ColumnElement[str] = sa.literal_column("'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*'")


def not_a_time(dialect: str, column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """``column`` holds something other than a time: on SQLite a row written by plain SQL can
    (an epoch number, 'tomorrow'), which compares with times as text or numbers do, meaningless;
    PostgreSQL's column holds times only."""
    if dialect != "sqlite":
        return sa.false()
    is_time: sa.ColumnElement[bool] = column.op("GLOB", is_comparison=True)(_TIME_TEXT)
    return sa.not_(is_time)


# A time exactly as UTCDateTime stores it on SQLite: such text compares as the time it names.
_STORED_TIME: sa.ColumnElement[str] = sa.literal_column(
    "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]'")


def comparable_time(dialect: str, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``column`` in a form that compares as the time it names. On SQLite a row written by plain
    SQL may hold another ISO 8601 form ('2026-12-06T10:00:00+02:00', a 'Z'), whose text sorts
    by its separator and ignores its offset: it is rewritten as UTC in the stored form, by
    SQLite's own parser; text that parser cannot read stays as it is."""
    if dialect != "sqlite":
        return column
    normal = sa.func.strftime(_SQLITE_TIME, column, type_=sa.Text).concat("000")
    stored: sa.ColumnElement[bool] = column.op("GLOB", is_comparison=True)(_STORED_TIME)
    return sa.type_coerce(sa.case((stored, column), else_=sa.func.coalesce(normal, column)), UTCDateTime())


def due_condition(dialect: str, now: sa.ColumnElement[Any] | datetime) -> sa.ColumnElement[bool]:
    """A pending row may run now. A ``run_after`` that is not a time counts as due, so that the
    claim fails its job naming the column instead of the job waiting for ever (or running at a
    moment its text happens to sort before)."""
    run_after = G.c.run_after
    return sa.or_(run_after.is_(None), comparable_time(dialect, run_after) <= now, not_a_time(dialect, run_after))


# --- the database's clock -------------------------------------------------------------------
# Leases and due-ness are read from one clock, the database's, never a daemon host's: a lease
# written on one host is judged by another host's rescuer, and a host's clock may be stepped.
# SQLite (one host) reads the same clock as Python, in the text form UTCDateTime stores there
# ('YYYY-MM-DD HH:MM:SS.ffffff', which sorts as text), so stored and computed times compare.

_SQLITE_TIME = "%Y-%m-%d %H:%M:%f"  # %f: seconds with milliseconds; "000" makes microseconds


def db_now(dialect: str) -> sa.ColumnElement[datetime]:
    """The database's current time, as an SQL expression comparable with stored times."""
    if dialect == "postgresql":
        return sa.func.statement_timestamp(type_=UTCDateTime())
    return sa.type_coerce(sa.func.strftime(_SQLITE_TIME, "now", type_=sa.Text).concat("000"), UTCDateTime())


def db_later(dialect: str, seconds: sa.ColumnElement[float]) -> sa.ColumnElement[datetime]:
    """The database's current time plus ``seconds`` (an SQL number)."""
    if dialect == "postgresql":
        return sa.func.statement_timestamp(type_=UTCDateTime()) + sa.func.make_interval(
            0, 0, 0, 0, 0, 0, seconds, type_=sa.Interval())
    shift = sa.func.printf("%+.3f seconds", seconds, type_=sa.Text)
    return sa.type_coerce(sa.func.strftime(_SQLITE_TIME, "now", shift, type_=sa.Text).concat("000"), UTCDateTime())


def lease_seconds(lease: timedelta) -> sa.BindParameter[float]:
    return sa.bindparam("lease_seconds", lease.total_seconds(), type_=sa.Float)


@functools.cache
def claim_statement(dialect: str, n_models: int, start: bool = False) -> sa.Update:
    """The claim, built once per dialect and number of models: constructing it cost more than
    running it on SQLite. One bind parameter per model, not an expanding IN, so the SQL text
    is compiled once instead of re-rendered on every claim.

    ``start``: the claimed jobs are marked started (:func:`started_statement`), for a daemon
    whose next backend call runs them all, so that it needs no statement of its own."""
    served = [sa.bindparam(f"model_{i}", type_=sa.Text) for i in range(n_models)]
    now = db_now(dialect)
    due = due_condition(dialect, now)
    candidates = (
        sa.select(G.c.id)
        .where(IS_PENDING, G.c.model_name.in_(served), due)
        .order_by(G.c.priority.desc(), G.c.created_at)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )
    if dialect == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    # MATERIALIZED: evaluated exactly once. A plain IN (subquery) may be re-run per outer row on
    # PostgreSQL, and with LIMIT ... SKIP LOCKED that claims more rows than asked for.
    chosen = candidates.cte("candidates").prefix_with("MATERIALIZED")
    return (
        sa.update(G)  # UPDATE ... FROM: with "id IN (SELECT ...)" SQLite scanned every pending row
        .where(G.c.id == chosen.c.id, IS_PENDING)
        .values(status=PROCESSING, worker_id=sa.bindparam("worker_id", type_=sa.Text),
                attempts=G.c.attempts + 1, claimed_at=now, started_at=now if start else None,
                lease_expires_at=db_later(dialect, sa.bindparam("lease_seconds", type_=sa.Float)))
        .returning(*_CLAIM_COLUMNS)
    )


def claim(
    session: Session, *, worker_id: str, models: Iterable[str], limit: int, lease: timedelta,
    start: bool = False,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due pending jobs of ``models`` in one UPDATE ... RETURNING; due
    and the lease by the database's clock."""
    served = sorted(models)
    stmt = claim_statement(session.get_bind().dialect.name, len(served), start)
    params = claim_parameters(worker_id=worker_id, models=served, limit=limit, lease=lease)
    return claimed_jobs(session.execute(stmt, params).all())


def claim_parameters(*, worker_id: str, models: Sequence[str], limit: int, lease: timedelta) -> dict[str, Any]:
    """The bind values of :func:`claim_statement` (``models`` sorted)."""
    return {"limit": limit, "lease_seconds": lease.total_seconds(), "worker_id": worker_id,
            **{f"model_{i}": model for i, model in enumerate(models)}}


def claimed_jobs(rows: Iterable[Sequence[Any]]) -> list[ClaimedJob]:
    """Rows of the claim's RETURNING (in :data:`_CLAIM_COLUMNS` order), oldest job first."""
    jobs = [claimed_job(row) for row in rows]
    jobs.sort(key=lambda j: j.created_at)
    return jobs


def claimed_job(row: Sequence[Any]) -> ClaimedJob:
    """One claimed row. A row the daemon cannot use still becomes a job, with its ``defect``
    said and usable stand-ins in the bad fields, so that its failure is recorded like any other
    outcome (fenced) while the rest of the claim runs."""
    if not rowvalues.usable_at_a_glance(row[1], row[3], row[4], row[5], row[6], row[7], row[9], row[10], row[12]):
        defects = _defects(row)
        if defects:
            return _defective_job(row, "; ".join(defects))
    return ClaimedJob(
        id=row[0], prompt=row[1], model_name=row[2], duration_seconds=row[3], sample_rate=row[4],
        channels=row[5], file_path=row[6], metadata=row[7], attempt=row[8], max_attempts=row[9],
        created_at=row[10], claimed_at=row[11], lease_losses=_counter(row[13]),
    )


def _counter(value: Any) -> int:
    """A counter column as written: on SQLite plain SQL can store text there, which counts as 0
    rather than stopping the daemon on a comparison."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _defects(row: Sequence[Any]) -> list[str]:
    values = dict(zip([column.name for column in _CLAIM_COLUMNS], row, strict=True))
    defects = rowvalues.job_defects(values)
    run_after = values["run_after"]
    if run_after is not None and not isinstance(run_after, datetime):
        defects.append(f"run_after must be a time or NULL, not {rowvalues.quote(run_after)}")
    return defects


def _defective_job(row: Sequence[Any], defect: str) -> ClaimedJob:
    claimed_at: datetime = row[11]
    return ClaimedJob(
        id=row[0], prompt=str(row[1] or ""), model_name=row[2], duration_seconds=0.0, sample_rate=1,
        channels=1, file_path=str(row[6] or ""), metadata=None, attempt=row[8],
        max_attempts=row[8],  # no retry: the row itself is the fault
        created_at=row[10] if isinstance(row[10], datetime) else claimed_at, claimed_at=claimed_at,
        defect=defect,
    )


def extend_leases(
    session: Session, *, worker_id: str, jobs: Iterable[tuple[str, int]], lease: timedelta
) -> set[str]:
    """Push the lease of each (id, attempt) still held to ``lease`` from now (the database's
    clock); returns the ids still held.

    One statement per 500 jobs, not one per job: a round trip per held job made a heartbeat of
    a daemon holding a large claim cost more than the work it protects."""
    pairs = list(jobs)
    held: set[str] = set()
    until = db_later(session.get_bind().dialect.name, lease_seconds(lease))
    for start in range(0, len(pairs), 500):  # two binds a job: well under SQLite's limit
        chunk = pairs[start:start + 500]
        held.update(session.execute(
            sa.update(G)
            .where(G.c.status == PROCESSING, G.c.worker_id == worker_id,
                   sa.tuple_(G.c.id, G.c.attempts).in_(chunk))
            .values(lease_expires_at=until)
            .returning(G.c.id)
        ).scalars())
    return held


@functools.lru_cache(maxsize=512)
def finish_rows_statement(dialect: str, keys: tuple[str, ...], n: int) -> sa.Update:
    """``n`` fenced outcome writes setting ``keys`` as one ``UPDATE ... FROM <rows> RETURNING id``.

    PostgreSQL: the rows travel as one JSON document (``jsonb_to_recordset``), so the statement is
    the same for any ``n`` and has two parameters: psycopg caches its parse of a query only up to
    a fixed number of parameters, and dumping one array per column costs far more per job in
    psycopg than one ``json.dumps`` of the batch. SQLite: ``WITH outcome(...) AS (VALUES ...)``,
    one bind per value (SQLite has no ``AS outcome (id, ...)``); built once per shape.
    """
    columns: list[sa.ColumnClause[Any]] = [
        sa.column("id", sa.Text), sa.column("attempt", sa.Integer),
        *(sa.column(key, G.c[key].type) for key in keys),
    ]
    given: sa.FromClause
    if dialect == "postgresql":
        rows = sa.bindparam("rows", type_=postgresql.JSONB)
        given = sa.func.jsonb_to_recordset(rows).table_valued(*columns).render_derived(name="outcome", with_types=True)
    else:
        given = sa.values(*columns, name="outcome").data(
            [tuple(sa.bindparam(f"o{i}_{column.name}", type_=column.type) for column in columns) for i in range(n)]
        ).cte("outcome")
    return (
        sa.update(G)
        .where(G.c.id == given.c.id, G.c.attempts == given.c.attempt, IS_PROCESSING,
               G.c.worker_id == sa.bindparam("h_worker", type_=sa.Text))
        .values(lease_expires_at=None, **{key: given.c[key] for key in keys})
        .returning(G.c.id)
    )


def _as_json(value: Any) -> Any:
    """A column value as ``jsonb_to_recordset`` reads it: times as ISO 8601 in UTC."""
    return as_utc(value).isoformat() if isinstance(value, datetime) else value


def finish_rows_parameters(
    dialect: str, worker_id: str, keys: tuple[str, ...], rows: Sequence[tuple[str, int, Mapping[str, Any]]]
) -> dict[str, Any]:
    """The bind values of :func:`finish_rows_statement` for ``rows`` that all set ``keys``."""
    params: dict[str, Any] = {"h_worker": worker_id}
    if dialect == "postgresql":
        params["rows"] = [
            {"id": job_id, "attempt": attempt, **{key: _as_json(values[key]) for key in keys}}
            for job_id, attempt, values in rows
        ]
        return params
    for i, (job_id, attempt, values) in enumerate(rows):
        params[f"o{i}_id"] = job_id
        params[f"o{i}_attempt"] = attempt
        params.update((f"o{i}_{key}", value) for key, value in values.items())
    return params


def group_by_keys(
    outcomes: Sequence[tuple[str, int, Mapping[str, Any]]],
) -> dict[tuple[str, ...], list[tuple[str, int, Mapping[str, Any]]]]:
    """Outcomes grouped by the columns they set: each group is one statement's shape."""
    groups: dict[tuple[str, ...], list[tuple[str, int, Mapping[str, Any]]]] = {}
    for outcome in outcomes:
        groups.setdefault(tuple(sorted(outcome[2])), []).append(outcome)
    return groups


def completed_values(now: datetime, generation_time: float, file_size: int,
                     metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A completed outcome. ``worker_id`` and ``attempts`` stay as the attempt that made the file
    left them: the sweep publishes a temporary only for exactly that attempt."""
    return {"status": COMPLETED, "completed_at": now, "generation_time_seconds": generation_time,
            "file_size_bytes": file_size, "error_message": None, "metadata": dict(metadata or {})}


MAX_ERROR_MESSAGE = 10_000


def storable_text(text: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """An error message as both engines store it: PostgreSQL refuses NUL in text and neither
    driver encodes a lone surrogate, and a message comes from any exception, so an outcome
    must not fail to write because of its text."""
    text = text[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def failed_values(now: datetime, message: str, generation_time: float | None) -> dict[str, Any]:
    return {"status": FAILED, "completed_at": now, "error_message": storable_text(message),
            "generation_time_seconds": generation_time}


def retry_values(run_after: datetime, message: str) -> dict[str, Any]:
    return {"status": PENDING, "run_after": run_after, "error_message": storable_text(message), "worker_id": None}


def release_values(attempt: int, message: str | None = None) -> dict[str, Any]:
    """Give a job back without spending its attempt (graceful stop). The write is fenced on
    ``attempts == attempt``, so setting ``attempt - 1`` undoes exactly the claim's increment.
    ``message``: why, in ``error_message`` (a machine fault); without it the last error stays."""
    values: dict[str, Any] = {"status": PENDING, "attempts": attempt - 1, "claimed_at": None, "worker_id": None}
    if message is not None:
        values["error_message"] = storable_text(message)
    return values


def error_message_statement() -> sa.Select[tuple[str | None]]:
    """The ``error_message`` of the job whose id is bound to ``id`` (the daemon reads it on the
    connection it holds: after a machine fault a new one may not open)."""
    return sa.select(G.c.error_message).where(G.c.id == sa.bindparam("id"))


@dataclass(frozen=True)
class AttemptState:
    """Where a job stands, as far as a temporary WAV of one of its attempts is concerned."""

    status: str
    worker_id: str | None
    attempts: int
    file_path: str
    file_size_bytes: int | None


def attempt_states(session: Session, ids: Sequence[str], chunk: int = 500) -> dict[str, AttemptState]:
    """The state of each job among ``ids`` that exists, by primary key, in chunks."""
    states: dict[str, AttemptState] = {}
    columns = (G.c.id, G.c.status, G.c.worker_id, G.c.attempts, G.c.file_path, G.c.file_size_bytes)
    for start in range(0, len(ids), chunk):
        for row in session.execute(sa.select(*columns).where(G.c.id.in_(ids[start:start + chunk]))):
            states[row[0]] = AttemptState(*row[1:])
    return states


@functools.lru_cache(maxsize=128)
def started_statement(dialect: str, n: int, started: bool = True) -> sa.Update:
    """Mark the attempts of ``n`` jobs this daemon holds as started by a backend call (binds
    ``h_worker`` and ``ids``, or ``id_0``... on SQLite): the lease rescue refunds the attempt of
    a job that never started, and counts a lost lease against one that did. ``started`` False
    clears the mark (of jobs a claim marked that the next call does not run)."""
    if dialect == "postgresql":  # one statement for any n
        chosen = sa.and_(
            G.c.id == sa.func.any(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text))),
            # Its commit does not wait for the WAL flush (no fsync per backend call): a mark lost
            # to a server crash only makes the rescue refund the attempt, as if it never started.
            sa.func.set_config("synchronous_commit", "off", True).is_not(None),
        )
    else:
        chosen = G.c.id.in_([sa.bindparam(f"id_{i}", type_=sa.Text) for i in range(n)])
    return (
        sa.update(G)
        .where(chosen, IS_PROCESSING, G.c.worker_id == sa.bindparam("h_worker", type_=sa.Text))
        .values(started_at=db_now(dialect) if started else None)
        .returning(G.c.id)
    )


def started_parameters(dialect: str, worker_id: str, ids: Sequence[str]) -> dict[str, Any]:
    """The bind values of :func:`started_statement` for ``ids``."""
    if dialect == "postgresql":
        return {"h_worker": worker_id, "ids": list(ids)}
    return {"h_worker": worker_id, **{f"id_{i}": job_id for i, job_id in enumerate(ids)}}


def mark_started(session: Session, *, worker_id: str, ids: Sequence[str], started: bool = True) -> set[str]:
    """:func:`started_statement` through a Session; returns the ids marked (still held)."""
    dialect = session.get_bind().dialect.name
    statement = started_statement(dialect, len(ids), started)
    return set(session.execute(statement, started_parameters(dialect, worker_id, ids)).scalars())


def _losses_text(prefix: str, suffix: str) -> sa.ColumnElement[str]:
    """``prefix || (lease_losses + 1) || suffix``: a message naming the count this update sets."""
    count = sa.cast(G.c.lease_losses + 1, sa.Text)
    return sa.literal(prefix, sa.Text) + count + sa.literal(suffix, sa.Text)


def rescue_expired(session: Session) -> tuple[list[str], list[str]]:
    """Requeue jobs whose lease expired (by the database's clock), or fail them; returns the ids
    (requeued, failed).

    A job no backend call started gets its attempt back: its daemon died running another job.
    A job that was running is marked (``lease_losses``), so that it runs alone next, and its
    attempt is spent; it is failed only when its attempts are spent and it had already lost a
    lease, so ran alone: a job that shared its last attempt with the job that killed the daemon
    gets that attempt back.

    A processing row without a lease is held by no daemon: written by plain SQL, or left by a
    downgrade to 001 and back, which drops the lease column. It counts as expired."""
    dialect = session.get_bind().dialect.name
    now = db_now(dialect)
    lease = G.c.lease_expires_at  # one that is not a time (plain SQL) holds nothing either
    expired = sa.and_(IS_PROCESSING, sa.or_(comparable_time(dialect, lease) < now, lease.is_(None),
                                            not_a_time(dialect, lease)))
    released = {"status": PENDING, "worker_id": None, "lease_expires_at": None, "run_after": None,
                "claimed_at": None}
    refunded = session.execute(
        sa.update(G).where(expired, G.c.started_at.is_(None))
        .values(attempts=sa.case((G.c.attempts > 0, G.c.attempts - 1), else_=0),
                error_message="lease expired before it started: its daemon died or stalled running "
                              "other jobs; requeued without spending an attempt", **released)
        .returning(G.c.id)
    ).scalars().all()
    spent = G.c.attempts >= G.c.max_attempts
    requeued = session.execute(
        sa.update(G).where(expired, G.c.started_at.is_not(None), sa.or_(~spent, G.c.lease_losses == 0))
        .values(attempts=sa.case((spent, G.c.attempts - 1), else_=G.c.attempts),
                lease_losses=G.c.lease_losses + 1, started_at=None,
                error_message=_losses_text("lease lost while it ran: its daemon died or stalled (",
                                           " time(s)); requeued to run alone"), **released)
        .returning(G.c.id)
    ).scalars().all()
    failed = session.execute(
        sa.update(G).where(expired, G.c.started_at.is_not(None))
        .values(status=FAILED, worker_id=None, lease_expires_at=None, completed_at=now,
                lease_losses=G.c.lease_losses + 1,
                error_message=_losses_text("killed its daemon ", " times: its lease expired while it ran "
                                           "alone, on its last attempt"))
        .returning(G.c.id)
    ).scalars().all()
    return [*refunded, *requeued], list(failed)


def has_work(session: Session, models: Iterable[str]) -> bool:
    """Pending jobs of ``models`` that are due, or retries waiting on their backoff."""
    dialect = session.get_bind().dialect.name
    waiting = sa.or_(due_condition(dialect, db_now(dialect)), G.c.attempts > 0)
    query = sa.select(G.c.id).where(
        G.c.status == PENDING, G.c.model_name.in_(sorted(models)), waiting
    ).limit(1)
    return session.execute(query).first() is not None


def next_due(session: Session, models: Iterable[str]) -> timedelta | None:
    """How long until the earliest not-yet-due pending job of ``models`` is due, by the
    database's clock."""
    dialect = session.get_bind().dialect.name
    now, run_after = db_now(dialect), comparable_time(dialect, G.c.run_after)
    query = sa.select(sa.func.min(run_after, type_=UTCDateTime()), now).where(
        G.c.status == PENDING, G.c.model_name.in_(sorted(models)), run_after > now,
    )
    due, at = session.execute(query).one()
    # Not a time (PostgreSQL's 'infinity', text SQLite sorts after now): nothing to wake up for.
    return as_utc(due) - as_utc(at) if isinstance(due, datetime) and isinstance(at, datetime) else None


# --- reads for stats and metrics ------------------------------------------------------------


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(sa.select(G.c.status, sa.func.count()).group_by(G.c.status)).all()
    counts = {status.value: 0 for status in GenerationStatus}
    counts.update({status: n for status, n in rows})
    return counts


def pending_by_model(session: Session) -> dict[str, int]:
    rows = session.execute(
        sa.select(G.c.model_name, sa.func.count()).where(G.c.status == PENDING).group_by(G.c.model_name)
    ).all()
    return {model: n for model, n in rows}


def oldest_pending_created_at(session: Session) -> datetime | None:
    value = session.execute(
        sa.select(sa.func.min(Generation.created_at)).where(Generation.status == PENDING)
    ).scalar_one_or_none()
    return value


def database_stats(session: Session) -> dict[str, Any]:
    counts = count_by_status(session)
    completed = session.execute(
        sa.select(sa.func.avg(G.c.generation_time_seconds), sa.func.sum(G.c.duration_seconds))
        .where(G.c.status == COMPLETED)
    ).one()
    oldest = oldest_pending_created_at(session)
    return {
        "total_generations": sum(counts.values()),
        "by_status": counts,
        **{f"{status}_generations": n for status, n in counts.items()},
        "total_prompts": session.execute(sa.select(sa.func.count()).select_from(P)).scalar_one(),
        "average_generation_time_seconds": float(completed[0]) if completed[0] is not None else None,
        "total_audio_seconds": float(completed[1] or 0.0),
        # A value that is not a time (plain SQL) is shown as it is stored.
        "oldest_pending_created_at": oldest.isoformat() if isinstance(oldest, datetime) else oldest,
    }


# --- maintenance ---


def finished_jobs_before(
    session: Session, statuses: Iterable[str], before: datetime
) -> list[tuple[str, str]]:
    """(id, file_path) of jobs in ``statuses`` that finished before ``before`` (created, if unset)."""
    finished_at = sa.func.coalesce(G.c.completed_at, G.c.created_at)
    query = (
        sa.select(G.c.id, G.c.file_path)
        .where(G.c.status.in_(sorted(set(statuses) & {COMPLETED, FAILED})), finished_at < before)
        .order_by(finished_at)
    )
    # A path stored as something other than text (plain SQL) is read as text, like every read.
    return [(row.id, row.file_path if isinstance(row.file_path, str) else rowvalues.Unreadable.of(row.file_path))
            for row in session.execute(query)]


def delete_finished(session: Session, ids: Sequence[str], chunk: int = 500) -> list[str]:
    """Delete the finished jobs among ``ids``, in chunks (SQLite limits bound parameters).

    Returns the ids really deleted: a job retried meanwhile is pending again and stays.
    """
    deleted: list[str] = []
    for start in range(0, len(ids), chunk):
        deleted.extend(session.execute(
            sa.delete(G).where(G.c.id.in_(ids[start:start + chunk]), G.c.status.in_((COMPLETED, FAILED)))
            .returning(G.c.id)
        ).scalars())
    return deleted


def delete_jobs(session: Session, ids: Sequence[str], chunk: int = 500) -> int:
    """Delete finished jobs by id, in chunks; returns how many went."""
    return len(delete_finished(session, ids, chunk))


# --- metrics --------------------------------------------------------------------------------
# The queue depth behind /metrics, read at scrape time. Pending rows are counted exactly through
# the partial claim index (one range per model and priority); the oldest pending job comes from a
# skip scan of that index (one seek per model and priority), whatever the backlog. Processing and
# failed rows are counted exactly through the status index. Completed rows are the rest of the
# table: exact on SQLite (count(*) of a table walks pages, not rows), and on PostgreSQL, where
# count(*) reads every row, its planner's estimate (pg_class scaled to the table's current size)
# once that exceeds PG_EXACT_LIMIT rows. benchmarks/bench_metrics.py measures it with 1M rows.

#: Up to this many rows (by estimate) PostgreSQL counts completed jobs exactly.
PG_EXACT_LIMIT = 100_000


@dataclass(frozen=True)
class QueueDepth:
    """Rows per status, pending rows per model, and when the oldest pending job was created."""

    by_status: dict[str, int]
    pending_by_model: dict[str, int]
    oldest_pending_created_at: datetime | None  # of the pending jobs that are due
    completed_is_estimate: bool


def _pending_levels(now: datetime) -> sa.Select[Any]:
    """(model, count, oldest due) for each distinct (model, priority) of pending rows, by skip
    scan. Oldest due: the earliest ``created_at`` among rows that may run now; a scheduled job
    or a retry in its backoff is not waiting yet."""
    g = G.alias("g")
    pending = g.c.status == _inline(PENDING)
    models = (
        sa.select(sa.func.min(g.c.model_name).label("name")).where(pending)
        .cte("models", recursive=True)
    )
    after = sa.select(sa.func.min(g.c.model_name)).where(pending, g.c.model_name > models.c.name)
    models = models.union_all(
        sa.select(after.scalar_subquery()).where(models.c.name.is_not(None))
    )
    top = sa.select(sa.func.max(g.c.priority)).where(pending, g.c.model_name == models.c.name)
    levels = (
        sa.select(models.c.name.label("model_name"), top.scalar_subquery().label("priority"))
        .where(models.c.name.is_not(None))
        .cte("levels", recursive=True)
    )
    below = sa.select(sa.func.max(g.c.priority)).where(
        pending, g.c.model_name == levels.c.model_name, g.c.priority < levels.c.priority
    )
    levels = levels.union_all(
        sa.select(levels.c.model_name, below.scalar_subquery()).where(levels.c.priority.is_not(None))
    )
    here = (pending, g.c.model_name == levels.c.model_name, g.c.priority == levels.c.priority)
    due = sa.or_(g.c.run_after.is_(None), g.c.run_after <= now)
    return sa.select(
        levels.c.model_name,
        sa.select(sa.func.count()).select_from(g).where(*here).scalar_subquery(),
        sa.select(sa.func.min(g.c.created_at)).where(*here, due).scalar_subquery(),
    ).where(levels.c.priority.is_not(None))


def _inline(status: str) -> sa.BindParameter[str]:
    # Rendered into the SQL, so PostgreSQL's generic plans can still prove the partial indexes.
    return sa.literal(status, literal_execute=True)


def _count(status: str | None = None) -> sa.ScalarSelect[int]:
    query = sa.select(sa.func.count()).select_from(G)
    return (query if status is None else query.where(G.c.status == _inline(status))).scalar_subquery()


def _pg_row_estimate(session: Session) -> float:
    """PostgreSQL's estimate of the table's rows, as its planner makes it (0 before ANALYZE)."""
    pg_class = sa.table("pg_class", sa.column("oid"), sa.column("reltuples"), sa.column("relpages"))
    pages_now = sa.func.pg_relation_size(pg_class.c.oid) / sa.cast(
        sa.func.current_setting("block_size"), sa.Integer
    )
    estimate = sa.case(
        (sa.and_(pg_class.c.reltuples > 0, pg_class.c.relpages > 0),
         pg_class.c.reltuples / pg_class.c.relpages * pages_now),
        else_=0,
    )
    oid = sa.cast(sa.literal(G.name), postgresql.REGCLASS)
    value = session.execute(sa.select(estimate).where(pg_class.c.oid == oid)).scalar_one_or_none()
    return float(value or 0)


def queue_depth(session: Session, now: datetime | None = None) -> QueueDepth:
    """The queue's depth from indexed reads; the comment above says what each part costs."""
    by_model: dict[str, int] = {}
    oldest: datetime | None = None
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        # The planner cannot tell how few rows the recursion yields, prices the query high and
        # would JIT-compile it: compiling costs far more than the read itself. A lock held
        # on the table (a migration) makes the read give up rather than wait with a connection.
        session.execute(sa.select(sa.func.set_config("jit", "off", True),
                                  sa.func.set_config("statement_timeout", "5s", True)))
    for model, n, created in session.execute(_pending_levels(now or utcnow())).all():
        by_model[model] = by_model.get(model, 0) + n
        # A created_at that is not a time (plain SQL) says nothing about waiting: skipped.
        if isinstance(created, datetime) and (oldest is None or created < oldest):
            oldest = created
    estimate = _pg_row_estimate(session) if postgres else 0.0
    use_estimate = estimate > PG_EXACT_LIMIT
    total = sa.literal(int(estimate)) if use_estimate else _count()
    row = session.execute(sa.select(total, _count(PROCESSING), _count(FAILED))).one()
    pending = sum(by_model.values())
    counts = {PENDING: pending, PROCESSING: row[1], FAILED: row[2]}
    # The parts come from different statements (and, on PostgreSQL, an estimate): never below 0.
    counts[COMPLETED] = max(0, int(row[0]) - pending - row[1] - row[2])
    return QueueDepth(counts, by_model, oldest, use_estimate)
