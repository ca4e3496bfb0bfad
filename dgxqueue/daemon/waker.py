"""Idle waiting that wakes as soon as work may have arrived, without burning CPU.

PostgreSQL: ``LISTEN`` on the channel producers ``NOTIFY`` on enqueue, selected together with a
self-pipe so a stop request wakes it at once. SQLite: ``PRAGMA data_version`` changes whenever
another connection commits; reading it is a cheap read that takes no lock. Between reads it
sleeps on the same kind of self-pipe, which a signal handler can write to without taking a lock.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from dgxqueue.storage.admin import CANCEL_CHANNEL
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.queue import NOTIFY_CHANNEL


class Waker(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if something may have changed."""

    def wake(self) -> None:
        """Make a current or the next :meth:`wait` return at once. Safe from a signal handler: it
        takes no lock."""

    def cancels(self) -> set[str]:
        """Without blocking: the ids of jobs whose cancel was notified since the last call (empty
        where the engine has no notifications; the heartbeat reads cancels anyway)."""

    def close(self) -> None: ...


class _SelfPipe:
    """A pipe a signal handler can write to: ``os.write`` takes no lock, so it cannot deadlock on
    one that the interrupted main thread holds (``threading.Event.set`` can, and did)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway
            os.write(self.write_fd, b"x")

    def drain(self) -> bool:
        """True if the pipe held a wake-up (now consumed)."""
        try:
            return bool(os.read(self.read_fd, 4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class SQLiteWaker:
    """Polls ``PRAGMA data_version`` on a connection of its own every ``interval`` seconds."""

    def __init__(self, engine: Engine, interval: float) -> None:
        self._engine = engine
        self._interval = interval
        self._pipe = _SelfPipe()
        self._connection: Any = None
        self._execute: Callable[[str], sqlite3.Cursor] | None = None
        self._version: int | None = None

    def _data_version(self) -> int | None:
        try:
            if self._execute is None:
                self._connection = self._engine.raw_connection()
                # The driver's own connection: an idle daemon reads this hundreds of times a second,
                # and the pool's wrapper and a cursor of our own cost more than the read itself.
                self._execute = self._connection.driver_connection.execute
            row = self._execute("PRAGMA data_version").fetchone()
            return int(row[0])
        except Exception:  # a broken connection: drop it, and let the caller poll the queue
            self._drop()
            return None

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._version is None:
            self._version = self._data_version()
        woken = self._pipe.drain()  # a wake-up before this wait; later ones, select reports
        while True:
            if woken:
                return True
            version = self._data_version()
            if version is None or version != self._version:
                self._version = version
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            readable, _, _ = select.select([self._pipe.read_fd], [], [], min(self._interval, remaining))
            woken = bool(readable) and self._pipe.drain()

    def wake(self) -> None:
        self._pipe.poke()

    def cancels(self) -> set[str]:
        return set()

    def _drop(self) -> None:
        self._execute = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        self._drop()
        self._pipe.close()


class PostgresWaker:
    """LISTENs on a dedicated autocommit connection; reconnects after a server restart. Also
    listens on :data:`~dgxqueue.storage.admin.CANCEL_CHANNEL`: a cancel is kept for
    :meth:`cancels`, not taken as work."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pipe = _SelfPipe()
        self._connection: Any = None
        self._cancels: set[str] = set()
        self._woken = False  # a job notification read by cancels(): the next wait returns at once

    def _sort(self, notifies: Any) -> bool:
        """Keep the cancels among ``notifies``; True if any other (work) came."""
        work = False
        for notify in notifies:
            if notify.channel == CANCEL_CHANNEL:
                self._cancels.add(notify.payload)
            else:
                work = True
        return work

    def cancels(self) -> set[str]:
        # Never connects: called on every round of the loop while a job runs, where a connect
        # to a server that is down would stall the heartbeat; the next idle wait reconnects.
        if self._connection is None:
            found, self._cancels = self._cancels, set()
            return found
        try:
            if self._sort(self._connection.notifies(timeout=0)):
                self._woken = True
        except Exception:  # the server went away: the heartbeat still reads cancels
            self._drop()
        found, self._cancels = self._cancels, set()
        return found

    def _listen(self) -> Any:
        if self._connection is None:
            import psycopg
            from psycopg import sql

            url = self._engine.url.set(drivername="postgresql")
            dsn = url.render_as_string(hide_password=False)
            # UTF-8 as the engine's connections: a client_encoding the database, role or
            # PGCLIENTENCODING sets would end or fail this connection on a non-Latin model's payload.
            connection = psycopg.connect(dsn, autocommit=True, connect_timeout=5, client_encoding="utf8")
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CANCEL_CHANNEL)))
            self._connection = connection
        return self._connection

    def wait(self, timeout: float) -> bool:
        try:
            connection = self._listen()
            if self._woken or self._sort(connection.notifies(timeout=0)):
                self._woken = False
                return True
            with selectors.DefaultSelector() as selector:
                selector.register(connection.fileno(), selectors.EVENT_READ)
                selector.register(self._pipe.read_fd, selectors.EVENT_READ)
                ready = selector.select(timeout)
            if not ready:
                return False
            self._pipe.drain()
            self._sort(connection.notifies(timeout=0))
            return True
        except Exception:  # the server went away: reconnect next time; meanwhile poll the queue
            self._drop()
            select.select([self._pipe.read_fd], [], [], min(timeout, 1.0))  # pause, but wake on stop
            return True

    def wake(self) -> None:
        self._pipe.poke()

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        self._drop()
        self._pipe.close()


def make_waker(engine: Engine, sqlite_interval: float) -> Waker:
    """The waker the engine's profile names: LISTEN, or polling ``PRAGMA data_version``."""
    if profile_of(engine.dialect).waker == "listen":
        return PostgresWaker(engine)
    return SQLiteWaker(engine, sqlite_interval)
