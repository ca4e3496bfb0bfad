"""The queue's operations: insert, claim, mark started, heartbeat, finish, rescue, and the
daemon's small reads, each statement next to the call that runs it.

The hot calls (insert, claim, mark started, finish) run on a bare driver connection
(:mod:`~dgxqueue.storage.precompiled`), their statements compiled once per engine and shape; on
PostgreSQL each of them is one round trip (autocommit, or a pipeline with its BEGIN and COMMIT).
The rare ones (heartbeat, rescue, the reads) take the caller's Session. Engine differences come
from :mod:`~dgxqueue.storage.engines`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import Session

from dgxqueue.storage.claimed import CLAIM_COLUMNS, ClaimedJob, claimed_jobs
from dgxqueue.storage.dberrors import is_data_error, violates_unique
from dgxqueue.storage.engines import Profile, profile_of
from dgxqueue.storage.models import (
    COMPLETED_SQL,
    DEDUPE_HELD_SQL,
    FAILED,
    HOLDS_ITS_FILE_SQL,
    INT_MAX,
    INT_MIN,
    IS_PENDING,
    IS_PROCESSING,
    PAUSED,
    PENDING,
    PROCESSING,
    G,
    P,
    UTCDateTime,
    as_utc,
    uses_after,
)
from dgxqueue.storage.precompiled import Compiled, Cursor, HeldConnection, Pending, _as_sqlalchemy
from dgxqueue.storage.results import BACKOFF_SECONDS, STAMPED_AT_WRITE, Failed, Result, row_values
from dgxqueue.storage.validation import JobSpec, path_taken

#: PostgreSQL channel a producer notifies (payload: the model name) so idle daemons wake at once.
NOTIFY_CHANNEL = "dgxqueue_jobs"
#: PostgreSQL channel every recorded outcome is published on, with the write (README: "Completion
#: events"); payload: a JSON array of ``{"id": ..., "status": ...}``.
EVENTS_CHANNEL = "dgxqueue_events"


def due_condition(profile: Profile, now: sa.ColumnElement[Any] | datetime) -> sa.ColumnElement[bool]:
    """A pending row may run now. A ``run_after`` that is not a time counts as due, so that the
    claim fails its job naming the column instead of the job waiting for ever (or running at a
    moment its text happens to sort before)."""
    run_after = G.c.run_after
    return sa.or_(run_after.is_(None), profile.comparable_time(run_after) <= now, profile.not_a_time(run_after))


def not_paused() -> sa.ColumnElement[bool]:
    """The row's model is not paused (``paused_models``), checked in the statement that reads it,
    so a pause takes effect at every daemon's next claim and a resume the same way."""
    return ~sa.exists().where(PAUSED.c.model_name == G.c.model_name)


def not_expired(profile: Profile, now: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """A pending row is still wanted: no ``expires_at``, or one still ahead by the database's
    clock. One that is not a time (plain SQL) expires nothing: the job runs, as it would without."""
    expires_at = G.c.expires_at
    return sa.or_(expires_at.is_(None), profile.comparable_time(expires_at) > now, profile.not_a_time(expires_at))


# --- insert ---------------------------------------------------------------------------------

#: The JobSpec fields that are columns as they stand; ``expires_at`` is computed by the insert.
_SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(JobSpec)
                     if field.name not in ("expires_at", "ttl", "run_after", "run_after_delay"))
#: What every new row holds besides its specification's fields.
_NEW_ROW = {"status": PENDING, "attempts": 0, "lease_losses": 0}
#: The columns the INSERT sets from parameters: the specification's fields, then the new-row
#: values; ``created_at`` is the database's now and ``expires_at`` comes from :func:`_expiry`'s
#: expression, both computed by the insert (:func:`_stamped`).
JOB_COLUMNS = (*_SPEC_FIELDS, *_NEW_ROW)
_PROMPT_COLUMNS = ("text", "used_count")
#: The parameters of :func:`_expiry`: an ``expires_at`` given as a time, or a ``ttl`` in seconds.
EXPIRY_GIVEN, EXPIRY_TTL = "expiry_given", "expiry_ttl"
#: Likewise for ``run_after``: a time given, or a delay in seconds from the insert.
RUN_AFTER_GIVEN, RUN_AFTER_DELAY = "run_after_given", "run_after_delay"


def job_row(job: JobSpec) -> dict[str, Any]:
    """The ``generations`` row ``job`` becomes, with the parameters of its ``expires_at``
    (:data:`EXPIRY_GIVEN`, :data:`EXPIRY_TTL`); its ``expires_at`` is the one given (None for a
    ``ttl``, which only the database's clock turns into a time). No ``created_at``: only the
    database's clock at the insert sets it."""
    row = {name: getattr(job, name) for name in _SPEC_FIELDS}
    row.update(_NEW_ROW)
    row["expires_at"] = job.expires_at
    row[EXPIRY_GIVEN] = job.expires_at
    row[EXPIRY_TTL] = job.ttl
    row["run_after"] = job.run_after
    row[RUN_AFTER_GIVEN] = job.run_after
    row[RUN_AFTER_DELAY] = job.run_after_delay
    return row


def _expiry(profile: Profile) -> sa.ColumnElement[Any]:
    """The new row's ``expires_at``: the time given, or the database's now plus the ``ttl``, so
    that a producer whose clock is off by an hour expires nothing an hour early or late."""
    return _given_or_later(profile, EXPIRY_GIVEN, EXPIRY_TTL)


def _given_or_later(profile: Profile, given_name: str, delay_name: str) -> sa.ColumnElement[Any]:
    """The time bound as ``given_name``, or the database's now plus the seconds bound as ``delay_name``."""
    delay = sa.cast(sa.bindparam(delay_name, type_=sa.Float), sa.Float)  # typed: PostgreSQL cannot infer a NULL's
    given = sa.bindparam(given_name, type_=UTCDateTime())
    return sa.case((delay.is_(None), given), else_=profile.later(delay))


def _stamped(profile: Profile, insert: Any) -> Any:
    """``insert`` (of ``generations``) with its times computed by the database at the insert:
    ``created_at`` its now, so that a producer whose clock is an hour slow neither jumps the queue
    (claims order by it) nor skews the oldest pending job's age; ``expires_at`` by :func:`_expiry`."""
    return insert.values(created_at=profile.stamp(G.c.created_at), expires_at=_expiry(profile),
                         run_after=_given_or_later(profile, RUN_AFTER_GIVEN, RUN_AFTER_DELAY))


#: What a :func:`insert_job` gives back: the times the database stamped on the row.
STAMPED = (G.c.created_at, G.c.expires_at)


@functools.cache
def prompt_upsert(profile: Profile) -> sa.Insert:
    """``INSERT INTO prompts ... ON CONFLICT (text) DO UPDATE`` adding to ``used_count`` (built
    once per engine: constructing the ON CONFLICT clause costs more than executing it). Its times
    are the database's now, as the job's ``created_at`` is, not the producer's clock."""
    insert = profile.insert(P).values(first_used_at=profile.now(), last_used_at=profile.now())
    upsert: sa.Insert = insert.on_conflict_do_update(
        index_elements=[P.c.text],
        set_={
            "used_count": uses_after(P.c.used_count, insert.excluded.used_count),
            "last_used_at": insert.excluded.last_used_at,
        },
    )
    return upsert


def _prompt_rows(counts: Mapping[str, int]) -> list[dict[str, Any]]:
    # Sorted so concurrent batches take row locks in the same order and cannot deadlock.
    return [{"text": text, "used_count": n} for text, n in sorted(counts.items())]


#: The unique partial index's predicate, as literals: the ON CONFLICT must name it to infer the
#: index, and neither engine can prove a predicate with bind parameters implies it.
DEDUPE_HELD = sa.text(DEDUPE_HELD_SQL)
#: Inserts of a keyed job tried while its holder keeps finishing between our two statements.
_DEDUPE_TRIES = 5


@dataclass(frozen=True)
class _Insert:
    job: Compiled
    stamped_job: Compiled
    keyed_job: Compiled
    holder: Compiled
    expire_holder: Compiled
    upsert_prompt: Compiled
    notify: Compiled | None


@functools.lru_cache(maxsize=8)
def _insert(dialect: Dialect) -> _Insert:
    profile = profile_of(dialect)
    notify = profile.notify()
    keyed = (_stamped(profile, profile.insert(G))
             .on_conflict_do_nothing(index_elements=[G.c.dedupe_key], index_where=DEDUPE_HELD)
             .returning(G.c.id))
    holder = sa.select(G.c.id).where(G.c.dedupe_key == sa.bindparam("dedupe_key", type_=sa.Text), DEDUPE_HELD)
    expire_holder = profile.announce(
        _expire(profile).where(G.c.dedupe_key == sa.bindparam("dedupe_key", type_=sa.Text)).returning(G.c.id),
        EVENTS_CHANNEL)
    return _Insert(
        job=Compiled.of(_stamped(profile, sa.insert(G)), dialect, JOB_COLUMNS),
        stamped_job=Compiled.of(_stamped(profile, sa.insert(G)).returning(*STAMPED), dialect, JOB_COLUMNS),
        keyed_job=Compiled.of(keyed, dialect, JOB_COLUMNS),
        holder=Compiled.of(holder, dialect),
        expire_holder=Compiled.of(expire_holder, dialect),
        # inline(): no RETURNING of the prompt's id, which nobody reads here.
        upsert_prompt=Compiled.of(prompt_upsert(profile).inline(), dialect, _PROMPT_COLUMNS),
        notify=None if notify is None else Compiled.of(notify, dialect, ("channel", "model")),
    )


def insert_jobs(connection: sa.Connection, jobs: Sequence[JobSpec], *, own_transaction: bool = False) -> list[str]:
    """Insert ``jobs`` as pending rows created at the database's now, add their prompts' uses and
    wake the daemons serving them, in the connection's transaction: the caller commits (or rolls
    back: then nothing was written). Every producer path calls it (or :func:`insert_job`). Returns
    each job's id, in order.

    A job with a ``dedupe_key`` that an unfinished job holds is not inserted (nor its prompt
    counted): its place in the answer holds the holder's id (:func:`_insert_keyed`).

    Prompts are upserted in one order, so concurrent producers neither deadlock nor lose a count.
    A driver error comes out as SQLAlchemy's ``DBAPIError`` subclass, with ``before_first_write``
    saying whether any statement had completed; a lost connection is invalidated.
    ``own_transaction``: the caller rolls the transaction back on any error, so a refused batch
    needs no savepoint (:func:`insert_committed`).
    """
    if not jobs:
        return []
    with _nothing_written_yet():
        refuse_taken_paths(connection, jobs)
        undone_if_refused = contextlib.nullcontext() if own_transaction else _undone_if_refused(connection, jobs)
    with _index_refusal(jobs), undone_if_refused:
        return _insert_jobs(connection, jobs)


#: Migration 007's unique index: one job per file_path, among the rows that hold theirs.
PATH_INDEX = "uq_generations_file_path"
HOLDS_ITS_FILE = sa.text(HOLDS_ITS_FILE_SQL)
_PATHS_PER_READ = 500  # bound parameters per read (SQLite's limit is 32766, older ones' 999)


@contextlib.contextmanager
def _index_refusal(jobs: Sequence[JobSpec]) -> Iterator[None]:
    """The unique index's refusal of one of ``jobs``' paths as the door's: a ValidationError naming
    file_path (:func:`refused_paths`)."""
    try:
        yield
    except sa.exc.IntegrityError as exc:
        if violates_unique(exc, PATH_INDEX, "generations.file_path"):
            raise path_taken(refused_paths(jobs)) from exc
        raise


def refused_paths(jobs: Sequence[JobSpec]) -> str | list[str]:
    """The paths of ``jobs`` that the unique index can have refused, the driver not saying which
    row: those a producer chose (a default one holds its job's new id, which no other row names);
    the one path alone when there is one."""
    paths = [job.file_path for job in jobs if _chosen(job)] or [job.file_path for job in jobs]
    return paths[0] if len(paths) == 1 else paths


@contextlib.contextmanager
def _nothing_written_yet() -> Iterator[None]:
    """The statements an insert runs before its first write (the door's lookup, a savepoint): a
    driver error from one of them says ``before_first_write``, as :func:`_cursor` does for the
    insert's own, so :func:`insert_committed` replaces a connection the server ended meanwhile
    instead of failing the enqueue (a producer-chosen path made the lookup the first statement)."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        exc.before_first_write = True  # type: ignore[attr-defined]
        raise


def _chosen(job: JobSpec) -> bool:
    """Whether ``job``'s path was a producer's choice (a default one holds the job's new id). A
    suffix test, not ``PurePosixPath(...).name``: the door gives paths in normal form, and this runs
    for every job of a batch (parsing each path cost a fifth of validating the job)."""
    return not job.file_path.endswith(f"/{job.id}.wav")


def _undone_if_refused(connection: sa.Connection, jobs: Sequence[JobSpec]) -> Any:
    """A savepoint around the insert of a batch that names a file of its own choosing: the unique
    index may refuse one of its rows (a keyed job, which the door does not look up, or a producer
    that raced ours), and the ValidationError says nothing was written, so a caller may go on in
    its transaction. Without it SQLite kept the rows inserted before the refused one, to be
    committed with the caller's work, and PostgreSQL aborted the caller's transaction. Default
    paths (the usual insert) take none: they hold the job's new id, which no other row names."""
    if not any(_chosen(job) for job in jobs):
        return contextlib.nullcontext()
    begin = profile_of(connection.dialect).begin
    if begin is not None and not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        # SQLite: a SAVEPOINT outside a transaction begins a deferred one, whose insert then read
        # the search index's config before taking the write lock, and failed at once ("database
        # is locked") when another producer had committed meanwhile. BEGIN IMMEDIATE waits for it.
        connection.exec_driver_sql(begin)
    return connection.begin_nested()


def refuse_taken_paths(connection: sa.Connection, jobs: Sequence[JobSpec]) -> None:
    """Refuse, naming the path and its holder, a batch in which a job without a ``dedupe_key``
    names a file another job writes to: one of the batch, or one in the database. Only paths a
    producer chose are looked up (a default one holds the job's new id); the unique index refuses
    the rest, and a keyed job whose holder may take its place, when they are inserted."""
    seen: set[str] = set()
    chosen = []
    for job in jobs:
        if job.dedupe_key is not None:
            continue
        if job.file_path in seen:
            raise path_taken(job.file_path, "another job of this batch writes to it too")
        seen.add(job.file_path)
        if _chosen(job):
            chosen.append(job.file_path)
    key = profile_of(connection.dialect).path_key
    for start in range(0, len(chosen), _PATHS_PER_READ):
        paths = chosen[start:start + _PATHS_PER_READ]
        held = connection.execute(
            sa.select(G.c.file_path, G.c.id, G.c.status)
            .where(key(G.c.file_path).in_([key(sa.literal(path, sa.Text)) for path in paths]),
                   G.c.file_path.in_(paths), HOLDS_ITS_FILE)
            .order_by(G.c.file_path).limit(1)).first()
        if held is not None:
            raise path_taken(held.file_path, f"job {held.id} ({held.status}) writes to it")


def _insert_jobs(connection: sa.Connection, jobs: Sequence[JobSpec]) -> list[str]:
    statements = _insert(connection.dialect)
    ids = [job.id for job in jobs]
    inserted: Sequence[JobSpec] = jobs
    with _cursor(connection) as cursor:
        if any(job.dedupe_key is not None for job in jobs):
            plain = [job for job in jobs if job.dedupe_key is None]
            if plain:
                cursor.executemany(statements.job, [job_row(job) for job in plain])
            # In key order, as the prompts are upserted: on PostgreSQL a keyed insert waits for a
            # concurrent transaction's uncommitted holder of its key, so two batches holding the
            # same keys in opposite orders deadlocked.
            keyed = sorted((job.dedupe_key, i) for i, job in enumerate(jobs) if job.dedupe_key is not None)
            for _, i in keyed:
                ids[i] = _insert_keyed(cursor, statements, jobs[i])
            inserted = [job for i, job in enumerate(jobs) if ids[i] == job.id]
            if not inserted:
                return ids
        else:
            cursor.executemany(statements.job, [job_row(job) for job in jobs])
        _count_and_wake(cursor, statements, inserted)
    return ids


def insert_job(connection: sa.Connection, job: JobSpec) -> dict[str, Any]:
    """:func:`insert_jobs` of one job without a ``dedupe_key``; its row as inserted, with the
    times the database stamped on it (RETURNING, in the same round trip), for the caller that
    hands the row back (``create_generation``)."""
    if job.dedupe_key is not None:
        raise ValueError("insert_job takes no dedupe_key: insert_jobs returns the holder's id")
    with _nothing_written_yet():
        refuse_taken_paths(connection, [job])
        undone_if_refused = _undone_if_refused(connection, [job])
    statements = _insert(connection.dialect)
    row = job_row(job)
    with _index_refusal([job]), undone_if_refused, _cursor(connection) as cursor:
        [(created_at, expires_at)] = cursor.submit(statements.stamped_job, row).rows
        _count_and_wake(cursor, statements, [job])
    row.update(created_at=created_at, expires_at=expires_at)
    return row


def _count_and_wake(cursor: Cursor, statements: _Insert, inserted: Sequence[JobSpec]) -> None:
    counts = Counter(job.prompt for job in inserted) if len(inserted) > 1 else {inserted[0].prompt: 1}
    cursor.executemany(statements.upsert_prompt, _prompt_rows(counts))
    if statements.notify is not None:  # delivered when the transaction commits
        models = sorted({job.model_name for job in inserted})
        cursor.executemany(statements.notify, [{"channel": NOTIFY_CHANNEL, "model": m} for m in models])


def _insert_keyed(cursor: Cursor, statements: _Insert, job: JobSpec) -> str:
    """Insert ``job`` unless an unfinished job holds its key; the id of the one that holds it then.

    ``INSERT ... ON CONFLICT (dedupe_key) WHERE <held> DO NOTHING`` is atomic against concurrent
    producers on both engines (PostgreSQL waits for a concurrent insert of the key to commit or
    roll back; SQLite has one writer). Should the holder finish between the insert and the read
    of it, the key is free again and the insert is tried anew."""
    row = job_row(job)
    for _ in range(_DEDUPE_TRIES):
        if cursor.submit(statements.keyed_job, row).rows:
            return job.id
        # A pending holder past its expires_at will never run: handing it back would give the
        # caller a job that can only fail as expired. It is expired now (as the sweep would),
        # which frees the key for this insert.
        if cursor.submit(statements.expire_holder, {"dedupe_key": job.dedupe_key}).rows:
            continue
        held = cursor.submit(statements.holder, {"dedupe_key": job.dedupe_key}).rows
        if held:
            return str(held[0][0])
    raise RuntimeError(f"dedupe_key {job.dedupe_key!r}: its holder kept finishing; {_DEDUPE_TRIES} inserts failed")


@contextlib.contextmanager
def _cursor(connection: sa.Connection) -> Iterator[Cursor]:
    """The connection's DB-API cursor; a driver error raised as SQLAlchemy raises it."""
    dialect = connection.dialect
    proxied = connection.connection  # begins nothing: the caller's transaction holds the connection
    cursor = Cursor(proxied)
    try:
        yield cursor
    except dialect.loaded_dbapi.Error as exc:
        disconnected = dialect.is_disconnect(exc, proxied.dbapi_connection, cursor.raw)
        if disconnected:
            # As SQLAlchemy does on a disconnect: every pooled connection of that age is recycled,
            # since a server restart ended all of them, not just this one.
            connection.engine.pool._invalidate(proxied, exc, _checkin=False)
            connection.invalidate(exc)
        statement = cursor.current.sql if cursor.current else None
        raise _as_sqlalchemy(dialect, exc, statement, disconnected, before_first_write=not cursor.wrote) from exc
    finally:
        cursor.raw.close()


def insert_committed(engine: Engine, jobs: Sequence[JobSpec]) -> list[str]:
    """:func:`insert_jobs` in a transaction of its own, committed on return; the ids it gives.

    A pooled connection found dead on the first statement (the server restarted, or ended it
    while idle) is replaced once: nothing can have been written on it.
    """
    try:
        return _insert_committed(engine, jobs)
    except sa.exc.DBAPIError as exc:
        if not (exc.connection_invalidated and getattr(exc, "before_first_write", False)):
            raise
        return _insert_committed(engine, jobs)


def _insert_committed(engine: Engine, jobs: Sequence[JobSpec]) -> list[str]:
    with engine.begin() as connection:
        return insert_jobs(connection, jobs, own_transaction=True)


def upsert_prompts(session: Session, counts: Mapping[str, int]) -> None:
    """Add ``counts`` to each prompt's ``used_count`` in one atomic upsert per distinct text."""
    session.execute(prompt_upsert(profile_of(session.get_bind().dialect)), _prompt_rows(counts))


def notify(session: Session, models: Iterable[str]) -> None:
    """Wake daemons serving ``models`` when the transaction commits (where the engine notifies;
    SQLite daemons notice commits by themselves)."""
    statement = profile_of(session.get_bind().dialect).notify()
    if statement is not None:
        for model in sorted(models):
            session.execute(statement, {"channel": NOTIFY_CHANNEL, "model": model})


# --- claim ----------------------------------------------------------------------------------


@functools.cache
def claim_statement(profile: Profile, n_models: int, start: bool = False) -> sa.Update:
    """The claim, one statement built once per engine and number of models (constructing it
    cost more than running it on SQLite). One bind parameter per model, not an expanding IN, so
    the SQL text is compiled once. ``start``: the claimed jobs are marked started as well
    (:func:`mark_started`), for a daemon whose next backend call runs them all."""
    served = [sa.bindparam(f"model_{i}", type_=sa.Text) for i in range(n_models)]
    now = profile.now()
    candidates = profile.claimable(
        sa.select(G.c.id)
        .where(IS_PENDING, G.c.model_name.in_(served), due_condition(profile, now), not_paused(),
               not_expired(profile, now))
        .order_by(G.c.priority.desc(), G.c.created_at)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )
    # MATERIALIZED: evaluated exactly once. A plain IN (subquery) may be re-run per outer row on
    # PostgreSQL, and with LIMIT ... SKIP LOCKED that claims more rows than asked for.
    chosen = candidates.cte("candidates").prefix_with("MATERIALIZED")
    return (
        sa.update(G)  # UPDATE ... FROM: with "id IN (SELECT ...)" SQLite scanned every pending row
        .where(G.c.id == chosen.c.id, IS_PENDING)
        .values(status=PROCESSING, worker_id=sa.bindparam("worker_id", type_=sa.Text),
                attempts=sa.case((G.c.attempts == INT_MAX, G.c.attempts), else_=G.c.attempts + 1),
                claimed_at=now, started_at=now if start else None,
                lease_expires_at=profile.later(sa.bindparam("lease_seconds", type_=sa.Float)))
        .returning(*CLAIM_COLUMNS)
    )


def claim_parameters(*, worker_id: str, models: Sequence[str], limit: int, lease: timedelta) -> dict[str, Any]:
    """The bind values of :func:`claim_statement` (``models`` sorted)."""
    return {"limit": limit, "lease_seconds": lease.total_seconds(), "worker_id": worker_id,
            **{f"model_{i}": model for i, model in enumerate(models)}}


@functools.lru_cache(maxsize=64)
def _claim(dialect: Dialect, n_models: int, start: bool = False) -> Compiled:
    return Compiled.of(claim_statement(profile_of(dialect), n_models, start), dialect)


def claim(
    link: HeldConnection, *, worker_id: str, models: Sequence[str], limit: int, lease: timedelta, start: bool = False,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due pending jobs of ``models`` in one UPDATE ... RETURNING, oldest
    first; due and the lease by the database's clock."""
    served = sorted(models)
    params = claim_parameters(worker_id=worker_id, models=served, limit=limit, lease=lease)
    with link.transaction(autocommit=True) as cursor:
        claimed = cursor.submit(_claim(link.dialect, len(served), start), params)
    return claimed_jobs(claimed.rows)


# --- mark started ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def _started(dialect: Dialect, n: int, started: bool = True) -> Compiled:
    """Mark the attempts of ``n`` held jobs as started by a backend call (binds ``h_worker`` and
    the ids): the lease rescue refunds the attempt of a job that never started, and counts a
    lost lease against one that did. ``started`` False clears the mark."""
    profile = profile_of(dialect)
    chosen = profile.id_in(G.c.id, n)
    if profile.one_round_trip:
        # Its commit does not wait for the WAL flush (no fsync per backend call): a mark lost
        # to a server crash only makes the rescue refund the attempt, as if it never started.
        chosen = sa.and_(chosen, sa.func.set_config("synchronous_commit", "off", True).is_not(None))
    statement = (
        sa.update(G)
        .where(chosen, IS_PROCESSING, G.c.worker_id == sa.bindparam("h_worker", type_=sa.Text))
        .values(started_at=profile.now() if started else None)
        .returning(G.c.id)
    )
    return Compiled.of(statement, dialect)


def mark_started(link: HeldConnection, *, worker_id: str, ids: Sequence[str], started: bool = True) -> set[str]:
    """Record that a backend call starts the held jobs ``ids``, before it does; returns the ids
    marked. ``started`` False clears the marks (jobs a claim marked that the next call does not run)."""
    if not ids:
        return set()
    profile = profile_of(link.dialect)
    statement = _started(link.dialect, 0 if profile.any_count else len(ids), started)
    with link.transaction(autocommit=True) as cursor:
        marked = cursor.submit(statement, {"h_worker": worker_id, **profile.ids_parameters(ids)})
    return {row[0] for row in marked.rows}


# --- heartbeat ------------------------------------------------------------------------------


#: The latest progress of some held jobs, by id: (steps done, steps total).
Progress = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class Beat:
    """What a heartbeat found: the ids still held, and of those the ones whose cancel was asked."""

    held: set[str]
    cancel_requested: set[str] = dataclasses.field(default_factory=set)


def _progress_column(column: sa.Column[Any], values: Mapping[str, int]) -> sa.ColumnElement[Any]:
    """``CASE id WHEN ... THEN <value> ELSE <column> END``: each job's own value, in one statement."""
    return sa.case({job_id: sa.literal(value, sa.Integer) for job_id, value in values.items()},
                   value=G.c.id, else_=column)


def extend(session: Session, *, worker_id: str, jobs: Iterable[tuple[str, int]], lease: timedelta,
           progress: Progress | None = None) -> Beat:
    """Push the lease of each (id, attempt) still held to ``lease`` from now (the database's
    clock), write the ``progress`` given for some of them, and read which have a cancel asked;
    returns the ids still held and those. One statement per 500 jobs, not one per job: a round
    trip per held job made a heartbeat of a large claim cost more than the work it protects."""
    pairs = list(jobs)
    beat = Beat(set())
    until = profile_of(session.get_bind().dialect).later(
        sa.bindparam("lease_seconds", lease.total_seconds(), type_=sa.Float))
    progress = progress or {}
    for start in range(0, len(pairs), 500):  # a few binds a job: well under SQLite's limit
        chunk = pairs[start:start + 500]
        values: dict[str, Any] = {"lease_expires_at": until}
        given = {job_id: progress[job_id] for job_id, _ in chunk if job_id in progress}
        if given:
            values["progress_done"] = _progress_column(G.c.progress_done, {k: v[0] for k, v in given.items()})
            values["progress_total"] = _progress_column(G.c.progress_total, {k: v[1] for k, v in given.items()})
        for job_id, asked in session.execute(
            sa.update(G)
            .where(G.c.status == PROCESSING, G.c.worker_id == worker_id, sa.tuple_(G.c.id, G.c.attempts).in_(chunk))
            .values(**values)
            .returning(G.c.id, G.c.cancel_requested_at)
        ):
            beat.held.add(job_id)
            if asked is not None:
                beat.cancel_requested.add(job_id)
    return beat


# --- finish ---------------------------------------------------------------------------------

#: A result as its row's write: (job id, attempt, the columns the result sets).
Row = tuple[str, int, Mapping[str, Any]]


#: ``progress_done`` as a completion writes it: the known total, or as it was where none is known
#: (NULL). Progress is written with the heartbeats, so a job that finished between two would show
#: its last report (40/50) for ever; a failed or cancelled job keeps where it stopped. It only
#: copies a column, so whatever plain SQL stored there (text, a negative) never makes the
#: outcome's write fail.
DONE_AT_COMPLETION = sa.func.coalesce(G.c.progress_total, G.c.progress_done, type_=G.c.progress_done.type)


@functools.cache
def finish_rows_statement(profile: Profile, keys: tuple[str, ...], n: int) -> sa.Update:
    """``n`` fenced writes setting ``keys`` as one ``UPDATE ... FROM <rows> RETURNING id``, each
    only where its attempt is still held; ``n`` matters only where the engine needs one
    statement per number of rows (built once per shape)."""
    columns: list[sa.ColumnClause[Any]] = [
        sa.column("id", sa.Text), sa.column("attempt", sa.Integer),
        *(sa.column(key, sa.Float() if key == BACKOFF_SECONDS else G.c[key].type) for key in keys),
    ]
    given = profile.rows_of(columns, 0 if profile.any_count else n, "outcome")
    fence = [G.c.id == given.c.id, G.c.attempts == given.c.attempt, IS_PROCESSING,
             G.c.worker_id == sa.bindparam("h_worker", type_=sa.Text)]
    if "status" in keys:
        # A job whose cancel was asked is never sent back to pending (a release or a retry): it
        # would be run again. Left processing, its lease's rescue fails it as cancelled.
        fence.append(sa.or_(given.c.status != PENDING, G.c.cancel_requested_at.is_(None)))
    values: dict[str, Any] = {key: given.c[key] for key in keys if key != BACKOFF_SECONDS}
    if "status" in keys:
        # A CASE on each row's own status: one statement for a batch of any outcomes, as before.
        values["progress_done"] = sa.case((given.c.status == COMPLETED_SQL, DONE_AT_COMPLETION),
                                          else_=G.c.progress_done)
    if BACKOFF_SECONDS in keys:  # a backoff from the database's clock, as a lease is
        values["run_after"] = profile.later(given.c[BACKOFF_SECONDS])
    for key in (key for key in keys if key in STAMPED_AT_WRITE):  # a time left to the write: the database's now
        values[key] = sa.func.coalesce(given.c[key], profile.now(), type_=G.c[key].type)
    return sa.update(G).where(*fence).values(lease_expires_at=None, **values).returning(G.c.id)


def finish_rows_parameters(profile: Profile, worker_id: str, keys: tuple[str, ...],
                           rows: Sequence[Row]) -> dict[str, Any]:
    """The bind values of :func:`finish_rows_statement` for ``rows`` that all set ``keys``."""
    given = [(job_id, attempt, *[values[key] for key in keys]) for job_id, attempt, values in rows]
    return {"h_worker": worker_id, **profile.rows_parameters(("id", "attempt", *keys), given, _json_keys(keys))}


@functools.cache
def _json_keys(keys: tuple[str, ...]) -> frozenset[str]:
    """The columns among ``keys`` of a JSON type, whose values the engine may send as text."""
    return frozenset(key for key in keys
                     if key in G.c and isinstance(getattr(G.c[key].type, "impl_instance", None), sa.JSON))


@functools.lru_cache(maxsize=512)
def _finish_rows(dialect: Dialect, keys: tuple[str, ...], n: int) -> Compiled:
    profile = profile_of(dialect)
    write = finish_rows_statement(profile, keys, 0 if profile.any_count else n)
    return Compiled.of(profile.announce(write, EVENTS_CHANNEL), dialect)


def group_rows(rows: Sequence[Row]) -> dict[tuple[str, ...], list[Row]]:
    """Rows grouped by the columns they set: each group is one statement's shape."""
    groups: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row[2])), []).append(row)
    return groups


def _submit_rows(cursor: Cursor, dialect: Dialect, worker_id: str,
                 groups: Mapping[tuple[str, ...], Sequence[Row]]) -> list[Pending]:
    """One ``UPDATE ... FROM <rows> RETURNING id`` per group."""
    profile = profile_of(dialect)
    return [cursor.submit(_finish_rows(dialect, keys, len(group)),
                          finish_rows_parameters(profile, worker_id, keys, group))
            for keys, group in groups.items()]


def rows_of(results: Sequence[tuple[ClaimedJob, Result]]) -> list[Row]:
    """Each job's result as its row's write."""
    return [(job.id, job.attempt, row_values(job, result)) for job, result in results]


def _write(link: HeldConnection, worker_id: str, rows: Sequence[Row]) -> set[str]:
    groups = group_rows(rows)
    # One statement (the usual case: every result a completion) runs in autocommit.
    with link.transaction(autocommit=len(groups) == 1, pipeline=len(groups) > 1) as cursor:
        done = _submit_rows(cursor, link.dialect, worker_id, groups)
    return {row[0] for pending in done for row in pending.rows}


def finish(link: HeldConnection, *, worker_id: str, results: Sequence[tuple[ClaimedJob, Result]]) -> set[str]:
    """Record each job's result, only where its attempt is still held; returns the ids written.

    The values are checked before (the executor refuses metadata the column cannot hold);
    should the database still refuse a value, each result is written alone and the one refused
    is recorded failed instead, naming the error (:func:`_finish_one_by_one`)."""
    if not results:
        return set()
    rows = rows_of(results)
    try:
        return _write(link, worker_id, rows)
    except Exception as exc:
        if not is_data_error(exc):
            raise
        return _finish_one_by_one(link, worker_id, results, rows, exc)


def _finish_one_by_one(link: HeldConnection, worker_id: str, results: Sequence[tuple[ClaimedJob, Result]],
                       rows: Sequence[Row], error: Exception) -> set[str]:
    """Each result in a transaction of its own; one the database refuses is recorded failed with
    a message it can store. Only if that write fails too (not the data: the schema, say) does
    the error pass, the batch's error first.

    Returns the ids written as given: a job recorded failed instead is left out, so the caller
    treats its result as not recorded (and never publishes its file) and finds the row failed by
    its own attempt."""
    written: set[str] = set()
    for (job, _), row in zip(results, rows, strict=True):
        try:
            written |= _write(link, worker_id, [row])
            continue
        except Exception as exc:
            if not is_data_error(exc):
                raise
            refused = exc
        message = f"the outcome could not be stored: {type(refused).__name__}: {refused}"
        import structlog  # here: a producer importing storage never loads the logging stack

        structlog.get_logger("dgxqueue.store").error(
            "outcome refused by the database; job recorded failed", job_id=job.id, error=message[:300])
        try:
            _write(link, worker_id, rows_of([(job, Failed(None, message))]))
        except Exception as exc:
            raise exc from error
    return written


def finish_and_claim(
    link: HeldConnection, *, worker_id: str, results: Sequence[tuple[ClaimedJob, Result]], models: Sequence[str],
    limit: int, lease: timedelta, start: bool = False,
) -> tuple[set[str], list[ClaimedJob]]:
    """:func:`finish` then :func:`claim`, in one transaction: a daemon that has just finished
    its jobs asks for the next ones with the same commit (on PostgreSQL, the same round trip)."""
    served = sorted(models)
    params = claim_parameters(worker_id=worker_id, models=served, limit=limit, lease=lease)
    rows = rows_of(results)
    try:
        with link.transaction(pipeline=True) as cursor:
            done = _submit_rows(cursor, link.dialect, worker_id, group_rows(rows))
            claimed = cursor.submit(_claim(link.dialect, len(served), start), params)
    except Exception as exc:
        if not is_data_error(exc):
            raise
        # Rolled back, claim included: the results alone, and the next round claims.
        return _finish_one_by_one(link, worker_id, results, rows, exc), []
    return {row[0] for pending in done for row in pending.rows}, claimed_jobs(claimed.rows)


# --- rescue ---------------------------------------------------------------------------------


#: ``lease_losses + 1``, kept at the integer's end.
_LOSSES_AFTER = sa.case((G.c.lease_losses == INT_MAX, G.c.lease_losses), else_=G.c.lease_losses + 1)


def _losses_text(prefix: str, suffix: str) -> sa.ColumnElement[str]:
    """``prefix || (lease_losses + 1) || suffix``: a message naming the count this update sets."""
    count = sa.cast(_LOSSES_AFTER, sa.Text)
    return sa.literal(prefix, sa.Text) + count + sa.literal(suffix, sa.Text)


#: Why the rescue failed a running job whose cancel was asked: its daemon died before stopping it.
RESCUED_CANCEL_MESSAGE = "cancelled by request while it ran (its daemon died before stopping it)"


def rescue_expired(session: Session) -> tuple[list[str], list[str]]:
    """Requeue jobs whose lease expired (by the database's clock), or fail them; returns the ids
    (requeued, failed).

    A job no backend call started gets its attempt back: its daemon died running another job.
    A job that was running is marked (``lease_losses``), so that it runs alone next, and its
    attempt is spent; it is failed only when its attempts are spent and it had already lost a
    lease, so ran alone: a job that shared its last attempt with the job that killed the daemon
    gets that attempt back. A job whose cancel was asked is failed as cancelled, whatever its attempts.

    A processing row without a lease is held by no daemon: written by plain SQL, or left by a
    downgrade to 001 and back, which drops the lease column. It counts as expired.

    Each row written is published as a completion event, as a daemon's finish is.

    Each statement reads the database's clock when it runs, so a lease may expire between two
    of them: each one therefore names its rows by their own columns, the clock only saying which
    have expired. A row that expires after the statement meant for it has run is left for the
    next rescue, never taken by a later statement meant for others (a job killed once, failed as
    one that killed its daemon alone; a job whose cancel was asked, requeued)."""
    cancel, refund, requeue, fail = _rescue_statements(profile_of(session.get_bind().dialect))

    def run(write: sa.Update | sa.Select[Any]) -> list[str]:
        return list(session.execute(write).scalars())

    # A cancel was asked and its daemon died before acting on it: requeued, the job would run again.
    cancelled = run(cancel)
    refunded = run(refund)
    requeued = run(requeue)
    failed = run(fail)
    return [*refunded, *requeued], [*cancelled, *failed]


@functools.cache
def _rescue_statements(profile: Profile) -> tuple[sa.Update | sa.Select[Any], ...]:
    """:func:`rescue_expired`'s four writes, in order, each announced; built once per engine: the
    rescuer runs them every ``rescue_interval_seconds``, and constructing them cost several times
    more than running them on SQLite."""
    now = profile.now()
    lease = G.c.lease_expires_at  # one that is not a time (plain SQL) holds nothing either
    expired = sa.and_(IS_PROCESSING, sa.or_(profile.comparable_time(lease) < now, lease.is_(None),
                                            profile.not_a_time(lease)))
    released = {"status": PENDING, "worker_id": None, "lease_expires_at": None, "run_after": None,
                "claimed_at": None}
    asked = G.c.cancel_requested_at.is_not(None)
    live = sa.and_(expired, ~asked)  # no cancel asked
    cancelled = (
        sa.update(G).where(expired, asked)
        .values(status=FAILED, worker_id=None, lease_expires_at=None, completed_at=now, cancelled_at=now,
                error_message=RESCUED_CANCEL_MESSAGE)
        .returning(G.c.id)
    )
    refunded = (
        sa.update(G).where(live, G.c.started_at.is_(None))
        .values(attempts=sa.case((G.c.attempts > 0, G.c.attempts - 1), else_=0),
                error_message="lease expired before it started: its daemon died or stalled running "
                              "other jobs; requeued without spending an attempt", **released)
        .returning(G.c.id)
    )
    spent = G.c.attempts >= G.c.max_attempts
    requeued = (
        sa.update(G).where(live, G.c.started_at.is_not(None), sa.or_(~spent, G.c.lease_losses == 0))
        .values(attempts=sa.case((sa.and_(spent, G.c.attempts != INT_MIN), G.c.attempts - 1), else_=G.c.attempts),
                lease_losses=_LOSSES_AFTER, started_at=None,
                error_message=_losses_text("lease lost while it ran: its daemon died or stalled (",
                                           " time(s)); requeued to run alone"), **released)
        .returning(G.c.id)
    )
    failed = (
        sa.update(G).where(live, G.c.started_at.is_not(None), spent, G.c.lease_losses != 0)
        .values(status=FAILED, worker_id=None, lease_expires_at=None, completed_at=now,
                lease_losses=_LOSSES_AFTER,
                error_message=_losses_text("killed its daemon ", " times: its lease expired while it ran "
                                           "alone, on its last attempt"))
        .returning(G.c.id)
    )
    return tuple(profile.announce(write, EVENTS_CHANNEL) for write in (cancelled, refunded, requeued, failed))


# --- expiry ---------------------------------------------------------------------------------

EXPIRED_MESSAGE = "expired: still pending at its expires_at, so it was not run"


def expire_pending(session: Session) -> list[tuple[str, str]]:
    """Fail every pending job whose ``expires_at`` has passed (by the database's clock), without
    running it, in one UPDATE over ``idx_generations_expires_at``; returns (id, model) of each.
    An ``expires_at`` that is not a time (plain SQL) is left alone, as the claim leaves it."""
    rows = session.execute(_expire_pending_statement(profile_of(session.get_bind().dialect))).all()
    return [(row[0], row[1]) for row in rows]


@functools.cache
def _expire_pending_statement(profile: Profile) -> sa.Update | sa.Select[Any]:
    """:func:`expire_pending`'s write, built once per engine (the rescuer runs it every round)."""
    # A completion event each, as a daemon's outcome.
    return profile.announce(_expire(profile).returning(G.c.id, G.c.model_name), EVENTS_CHANNEL)


def _expire(profile: Profile) -> sa.Update:
    """Fail the pending jobs whose ``expires_at`` has passed by the database's clock (one that
    is not a time, from plain SQL, is left alone, as the claim leaves it)."""
    now = profile.now()
    expires_at = G.c.expires_at
    return (sa.update(G)
            .where(IS_PENDING, expires_at.is_not(None), profile.comparable_time(expires_at) <= now,
                   sa.not_(profile.not_a_time(expires_at)))
            .values(status=FAILED, expired_at=now, completed_at=now, error_message=EXPIRED_MESSAGE))


# --- the daemon's reads ---------------------------------------------------------------------


def has_work(session: Session, models: Iterable[str]) -> bool:
    """Pending jobs of ``models`` that are due, or retries waiting on their backoff; a paused
    model's jobs are not work (a burst worker whose only jobs are paused exits)."""
    query = _has_work_query(profile_of(session.get_bind().dialect), tuple(sorted(models)))
    return session.execute(query).first() is not None


@functools.lru_cache(maxsize=64)
def _has_work_query(profile: Profile, models: tuple[str, ...]) -> sa.Select[Any]:
    """:func:`has_work`'s query, built once per engine and models (a burst daemon asks after every round)."""
    now = profile.now()
    waiting = sa.or_(due_condition(profile, now), G.c.attempts > 0)
    return sa.select(G.c.id).where(
        G.c.status == PENDING, G.c.model_name.in_(models), waiting, not_paused(), not_expired(profile, now),
    ).limit(1)


def next_due(session: Session, models: Iterable[str]) -> timedelta | None:
    """How long until the earliest not-yet-due pending job of ``models`` is due, by the
    database's clock (paused models left out)."""
    due, at = session.execute(_next_due_query(profile_of(session.get_bind().dialect), tuple(sorted(models)))).one()
    # Not a time (PostgreSQL's 'infinity', text SQLite sorts after now): nothing to wake up for.
    return as_utc(due) - as_utc(at) if isinstance(due, datetime) and isinstance(at, datetime) else None


@functools.lru_cache(maxsize=64)
def _next_due_query(profile: Profile, models: tuple[str, ...]) -> sa.Select[Any, datetime]:
    """:func:`next_due`'s query, built once per engine and models: an idle daemon asks before
    every wait, and constructing it cost several times more than running it on SQLite."""
    now, run_after = profile.now(), profile.comparable_time(G.c.run_after)
    return sa.select(sa.func.min(run_after, type_=UTCDateTime()), now).where(
        G.c.status == PENDING, G.c.model_name.in_(models), run_after > now, not_paused(),
    )


@functools.lru_cache(maxsize=8)
def _error_message(dialect: Dialect) -> Compiled:
    return Compiled.of(sa.select(G.c.error_message).where(G.c.id == sa.bindparam("id")), dialect)


def error_messages(link: HeldConnection, ids: Sequence[str]) -> dict[str, str | None]:
    """The ``error_message`` of each of ``ids`` that exists, read on the link's own connection
    (after a machine fault, such as no file descriptors left, a new one may not open)."""
    statement = _error_message(link.dialect)
    with link.transaction(autocommit=True) as cursor:
        found = [(job_id, cursor.submit(statement, {"id": job_id})) for job_id in ids]
    return {job_id: pending.rows[0][0] for job_id, pending in found if pending.rows}


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
    columns = [G.c[f.name] for f in dataclasses.fields(AttemptState)]
    for start in range(0, len(ids), chunk):
        for row in session.execute(sa.select(G.c.id, *columns).where(G.c.id.in_(ids[start:start + chunk]))):
            states[row[0]] = AttemptState(*row[1:])
    return states
