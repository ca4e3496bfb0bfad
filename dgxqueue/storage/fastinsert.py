"""The producers' one insert: validated jobs become pending rows and their prompts are counted.

Every producer path calls :func:`insert_jobs`: ``enqueue`` and ``enqueue_many`` (through
:func:`insert_committed`), the specification's ``create_generation(s)`` on their session's
connection, the CLI and the demo. The statements are the repository's own Core constructs (the
generation INSERT, the prompt upsert, ``pg_notify``), compiled once per dialect by :mod:`driver`
and run on the connection's DB-API cursor, inside the connection's transaction: one job costs the
driver's work plus a few dict operations, not a Core execution context per statement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

from dgxqueue.storage import repository
from dgxqueue.storage.driver import Compiled, Cursor, _as_sqlalchemy
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.validation import JobSpec

_SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(JobSpec))
#: What every new row holds besides its specification's fields.
_NEW_ROW = {"status": repository.PENDING, "attempts": 0, "lease_losses": 0}
#: The columns the INSERT sets: the specification's fields, then the new-row values and ``created_at``.
JOB_COLUMNS = (*_SPEC_FIELDS, *_NEW_ROW, "created_at")
_PROMPT_COLUMNS = ("text", "used_count", "first_used_at", "last_used_at")


def job_row(job: JobSpec, now: datetime) -> dict[str, Any]:
    """The ``generations`` row ``job`` becomes, created at ``now``."""
    row = {name: getattr(job, name) for name in _SPEC_FIELDS}
    row.update(_NEW_ROW)
    row["created_at"] = now
    return row


@dataclasses.dataclass(frozen=True)
class _Statements:
    insert_job: Compiled
    upsert_prompt: Compiled
    notify: Compiled | None


_cache: weakref.WeakKeyDictionary[Dialect, _Statements] = weakref.WeakKeyDictionary()


def _statements(dialect: Dialect) -> _Statements:
    found = _cache.get(dialect)
    if found is None:
        notify = None
        if dialect.name == "postgresql":
            call = sa.select(sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text),
                                               sa.bindparam("model", type_=sa.Text)))
            notify = Compiled.of(call, dialect, ("channel", "model"))
        found = _cache[dialect] = _Statements(
            insert_job=Compiled.of(sa.insert(repository.G), dialect, JOB_COLUMNS),
            # inline(): no RETURNING of the prompt's id, which nobody reads here.
            upsert_prompt=Compiled.of(
                repository.prompt_upsert(dialect.name).inline(), dialect, _PROMPT_COLUMNS
            ),
            notify=notify,
        )
    return found


def insert_jobs(connection: sa.Connection, jobs: Sequence[JobSpec], now: datetime) -> None:
    """Insert ``jobs`` as pending rows created at ``now`` and add their prompts' uses, in the
    connection's transaction: the caller commits (or rolls back: then nothing was written).

    Prompts are upserted in one order, so concurrent producers neither deadlock nor lose a count.
    A driver error comes out as SQLAlchemy's ``DBAPIError`` subclass, with ``before_first_write``
    saying whether any statement had completed; a lost connection is invalidated.
    """
    if not jobs:
        return
    statements = _statements(connection.dialect)
    rows = [job_row(job, now) for job in jobs]
    counts = Counter(job.prompt for job in jobs) if len(jobs) > 1 else {jobs[0].prompt: 1}
    prompt_rows = [
        {"text": text, "used_count": n, "first_used_at": now, "last_used_at": now}
        for text, n in sorted(counts.items())  # sorted: concurrent batches lock in one order
    ]
    with _cursor(connection) as cursor:
        cursor.executemany(statements.insert_job, rows)
        cursor.executemany(statements.upsert_prompt, prompt_rows)
        if statements.notify is not None:  # delivered when the transaction commits
            models = sorted({job.model_name for job in jobs})
            cursor.executemany(statements.notify,
                               [{"channel": repository.NOTIFY_CHANNEL, "model": m} for m in models])


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


def insert_committed(engine: Engine, jobs: Sequence[JobSpec]) -> None:
    """:func:`insert_jobs` in a transaction of its own, committed on return.

    A pooled connection found dead on the first statement (the server restarted, or ended it
    while idle) is replaced once: nothing can have been written on it.
    """
    try:
        _insert_committed(engine, jobs)
    except sa.exc.DBAPIError as exc:
        if not (exc.connection_invalidated and getattr(exc, "before_first_write", False)):
            raise
        _insert_committed(engine, jobs)


def _insert_committed(engine: Engine, jobs: Sequence[JobSpec]) -> None:
    with engine.begin() as connection:
        insert_jobs(connection, jobs, utcnow())
