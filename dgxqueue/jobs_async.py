"""Waiting for jobs inside an event loop, without a thread and without blocking the loop.

:func:`wait_all_async` is :func:`~dgxqueue.jobs.wait_all` for a producer in an event loop (a web
app). It waits the same way, through connections of its own outside the engine's pool (a pool
checkout can block for its whole timeout when the pool is spent):

- on PostgreSQL, a psycopg ``AsyncConnection`` LISTENs on the completion events channel and reads
  the rows an event names; every wait is on the loop's selector, so the loop keeps running;
- on SQLite, a connection with a busy timeout of 0 reads ``PRAGMA data_version`` (a read of a few
  bytes, no lock) between ``asyncio.sleep`` pauses that grow from :data:`SQLITE_CHECK_SECONDS` to
  :data:`SQLITE_MAX_PAUSE_SECONDS` while nothing changes, and reads the rows when it changed. Each
  read takes microseconds; one that meets a lock fails at once and is tried again after a pause,
  instead of sleeping on the loop (up to :data:`LOCK_GRACE_SECONDS` past the wait's timeout: a
  lock held longer raises its error). An in-memory database is read on the pool's connection, the
  only one that holds it (its count of changed rows stands in for ``data_version``).

Either way the rows are read every :data:`~dgxqueue.jobs.RECHECK_SECONDS` whatever was heard.
Cancelling the awaiting task ends the wait at once and closes its connection: nothing is left
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

from dgxqueue.jobs import (
    _CHUNK,
    _COLUMNS,
    FINISHED,
    RECONNECT_PAUSE_SECONDS,
    SQLITE_CHECK_SECONDS,
    ReadRows,
    _engine_of,
    _State,
    deadline_of,
    reconnecting,
    wait_steps,
)
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import G
from dgxqueue.storage.precompiled import Compiled, _as_sqlalchemy
from dgxqueue.storage.queue import EVENTS_CHANNEL

if TYPE_CHECKING:
    from dgxqueue.jobs import Job

__all__ = ["LOCK_GRACE_SECONDS", "SQLITE_MAX_PAUSE_SECONDS", "wait_all_async"]

#: The longest pause between two SQLite change checks of one waiter: its latency once idle.
SQLITE_MAX_PAUSE_SECONDS = 0.1
#: How long after its timeout a wait still retries a SQLite read that meets a lock (the last
#: read, which refreshes the handles, may meet a brief one) before it raises the lock's error.
LOCK_GRACE_SECONDS = 0.5
_T = TypeVar("_T")


@functools.lru_cache(maxsize=64)
def _select(dialect: Dialect, n: int, ended_only: bool) -> Compiled:
    """The read of ``n`` jobs' rows (any number where the engine binds a list whole)."""
    query = sa.select(*_COLUMNS).where(profile_of(dialect).id_in(G.c.id, n))
    if ended_only:  # one bind per status: an IN list would expand at execution, which Compiled skips
        query = query.where(sa.or_(*(G.c.status == status for status in sorted(FINISHED))))
    return Compiled.of(query, dialect)


def _states(rows: Sequence[Sequence[Any]]) -> dict[str, _State]:
    return {row[0]: _State(*row[1:]) for row in rows}


class _SQLiteChanges:
    """Change checks and reads on a SQLite connection that never waits for a lock."""

    def __init__(self, engine: Engine, deadline: float | None = None) -> None:
        self._dialect = engine.dialect
        self._profile = profile_of(engine.dialect)
        #: The wait's deadline (monotonic) plus LOCK_GRACE_SECONDS: a read still meeting a lock
        #: then raises its error.
        self._deadline = deadline
        self._pooled: Any = None
        if engine.url.database in (None, "", ":memory:"):
            # An in-memory database lives in its connection: a connection of our own would be
            # another, empty database. The pool's (one per thread for these, so its checkout never
            # waits, and no file lock can meet a read) is read instead, and its own commits leave
            # data_version alone, so its count of changed rows tells what changed.
            self._pooled = engine.raw_connection()
            self._connection = self._pooled.driver_connection
        else:
            self._connection = self._profile.unpooled_reader(engine)
        self._version: int | None = None
        self._pause = SQLITE_CHECK_SECONDS

    async def start(self) -> None:
        self._version = await self._unlocked(self._data_version)

    async def _unlocked(self, read: Callable[[], _T]) -> _T:
        """``read()``, tried again after a pause while it meets a lock, until the wait's deadline:
        a lock held past it (another process's EXCLUSIVE locking mode) raises its error, as wait's
        busy timeout does, instead of keeping the caller waiting past its timeout for ever."""
        while True:
            try:
                return read()
            except sqlite3.OperationalError as exc:
                locked = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not locked or (self._deadline is not None and time.monotonic() >= self._deadline):
                    raise _as_sqlalchemy(self._dialect, exc, None, False, before_first_write=True) from exc
            except sqlite3.Error as exc:
                raise _as_sqlalchemy(self._dialect, exc, None, False, before_first_write=True) from exc
            await asyncio.sleep(SQLITE_CHECK_SECONDS)

    def _data_version(self) -> int:
        if self._pooled is not None:
            return int(self._connection.total_changes)
        return int(self._connection.execute("PRAGMA data_version").fetchone()[0])

    async def read(self, ids: Collection[str], ended_only: bool = False) -> dict[str, _State]:
        return await self._unlocked(lambda: self._read(list(ids), ended_only))

    def _read(self, wanted: list[str], ended_only: bool) -> dict[str, _State]:
        found: dict[str, _State] = {}
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start:start + _CHUNK]
            statement = _select(self._dialect, len(chunk), ended_only)
            cursor = self._connection.cursor()
            try:
                cursor.execute(statement.sql, statement.parameters(self._profile.ids_parameters(chunk)))
                found.update(_states(statement.rows(cursor)))
            finally:
                cursor.close()
        return found

    async def changed(self, timeout: float) -> set[str] | None:
        """None once the database changed; an empty set after ``timeout`` seconds without."""
        deadline = time.monotonic() + timeout
        while True:
            version = await self._unlocked(self._data_version)
            if version != self._version:
                self._version = version
                self._pause = SQLITE_CHECK_SECONDS
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return set()
            await asyncio.sleep(min(self._pause, remaining))
            self._pause = min(self._pause * 2, SQLITE_MAX_PAUSE_SECONDS)

    async def aclose(self) -> None:
        if self._pooled is not None:
            self._pooled.close()  # back to the pool: closing the connection would end the database
        else:
            self._connection.close()


class _PostgreSQLChanges:
    """Completion events and reads on one psycopg ``AsyncConnection``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = engine.dialect
        self._profile = profile_of(engine.dialect)
        self._connection: Any = None

    async def start(self) -> None:
        import psycopg

        try:
            await self._connect()
        except psycopg.Error:  # a restart as the wait begins: the first read connects and listens
            await self._drop()  # again, within the reconnect window, or raises what will not pass

    async def _connect(self) -> None:
        from psycopg import sql

        connection = await self._profile.async_connection(self._engine)
        try:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(EVENTS_CHANNEL)))
        except BaseException:
            await connection.close()
            raise
        self._connection = connection

    async def read(self, ids: Collection[str], ended_only: bool = False) -> dict[str, _State]:
        import psycopg

        statement = _select(self._dialect, 0, ended_only)
        until: float | None = None  # a lost connection is made anew as the blocking wait's is
        while True:
            try:
                if self._connection is None:
                    await self._connect()
                async with self._connection.cursor() as cursor:
                    await cursor.execute(statement.sql, statement.parameters(self._profile.ids_parameters(list(ids))))
                    return _states(statement.processed(cursor.description, await cursor.fetchall()))
            except psycopg.Error as exc:
                connection = self._connection
                lost = connection is None or connection.closed or connection.broken
                await self._drop()  # the next try connects and listens anew, whatever failed
                error = _as_sqlalchemy(self._dialect, exc, statement.sql, lost, before_first_write=True)
                first = until is None
                if not isinstance(error, sa.exc.DBAPIError):
                    raise error from exc
                try:
                    until = reconnecting(error, until)
                except sa.exc.DBAPIError:
                    raise error from exc
                if not first:
                    await asyncio.sleep(RECONNECT_PAUSE_SECONDS)

    async def changed(self, timeout: float) -> set[str] | None:
        """The ids the events announced (empty after ``timeout`` seconds without one), or None
        when events may have been missed (the connection was lost and made anew)."""
        import psycopg

        try:
            if self._connection is None:
                await self._connect()
                return None
            announced: set[str] = set()
            # The first event (or the timeout), then every one already queued behind it: under a
            # storm of other jobs' events, one a pass would leave ours behind the rest.
            wait: float | None = timeout
            while wait is not None:
                got = False
                async for notify in self._connection.notifies(timeout=wait, stop_after=1 if wait else None):
                    got = True
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        announced.update(str(event["id"]) for event in json.loads(notify.payload))
                wait = 0.0 if got else None  # again while a pass still finds some
            return announced
        except psycopg.Error:  # the server went away: listen again next time, pausing meanwhile
            await self._drop()
            await asyncio.sleep(min(timeout, 1.0))
            return None

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def aclose(self) -> None:
        await self._drop()


async def wait_all_async(jobs: Sequence[Job], timeout: float | None = None) -> list[str]:
    """:func:`~dgxqueue.jobs.wait_all` for a caller in an event loop: the same answers and errors,
    awaited without blocking the loop or starting a thread. Cancelling the awaiting task ends
    the wait and closes its connection."""
    deadline = deadline_of(timeout)
    if not jobs:
        return []
    engine = _engine_of(jobs)
    changes: _SQLiteChanges | _PostgreSQLChanges = (
        _PostgreSQLChanges(engine) if profile_of(engine.dialect).waker == "listen"
        else _SQLiteChanges(engine, None if deadline is None else deadline + LOCK_GRACE_SECONDS))
    steps = wait_steps(jobs, deadline, timeout)
    try:
        await changes.start()  # listening before the first read: nothing is missed
        answer: Any = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration as done:
                statuses: list[str] = done.value
                return statuses
            if isinstance(step, ReadRows):
                answer = await changes.read(step.ids, ended_only=step.ended_only)
            else:
                answer = await changes.changed(step.seconds)
    finally:
        await changes.aclose()
