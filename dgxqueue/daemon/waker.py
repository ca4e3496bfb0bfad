"""Idle waiting that wakes as soon as work may have arrived, without burning CPU.

PostgreSQL: ``LISTEN`` on the channel producers ``NOTIFY`` on enqueue, selected together with a
self-pipe so a stop request wakes it at once. SQLite: ``PRAGMA data_version`` changes whenever
another connection commits; reading it costs microseconds and touches no lock.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import time
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from dgxqueue.storage.repository import NOTIFY_CHANNEL


class Waker(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if something may have changed."""

    def wake(self) -> None:
        """Make a current or the next :meth:`wait` return at once (safe from a signal handler)."""

    def close(self) -> None: ...


class SQLiteWaker:
    """Polls ``PRAGMA data_version`` on a connection of its own every ``interval`` seconds."""

    def __init__(self, engine: Engine, interval: float) -> None:
        self._engine = engine
        self._interval = interval
        self._event = threading.Event()
        self._connection: Any = None
        self._version: int | None = None

    def _data_version(self) -> int | None:
        try:
            if self._connection is None:
                self._connection = self._engine.raw_connection()
            cursor = self._connection.cursor()
            cursor.execute("PRAGMA data_version")
            value = int(cursor.fetchone()[0])
            cursor.close()
            return value
        except Exception:  # a broken connection: drop it, and let the caller poll the queue
            self.close()
            return None

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._version is None:
            self._version = self._data_version()
        while True:
            if self._event.is_set():
                self._event.clear()
                return True
            version = self._data_version()
            if version is None or version != self._version:
                self._version = version
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._event.wait(min(self._interval, remaining))

    def wake(self) -> None:
        self._event.set()

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None


class PostgresWaker:
    """LISTENs on a dedicated autocommit connection; reconnects after a server restart."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._connection: Any = None

    def _listen(self) -> Any:
        if self._connection is None:
            import psycopg
            from psycopg import sql

            url = self._engine.url.set(drivername="postgresql")
            dsn = url.render_as_string(hide_password=False)
            connection = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
            self._connection = connection
        return self._connection

    def wait(self, timeout: float) -> bool:
        try:
            connection = self._listen()
            if list(connection.notifies(timeout=0)):
                return True
            with selectors.DefaultSelector() as selector:
                selector.register(connection.fileno(), selectors.EVENT_READ)
                selector.register(self._read_fd, selectors.EVENT_READ)
                ready = selector.select(timeout)
            if not ready:
                return False
            with contextlib.suppress(BlockingIOError):
                os.read(self._read_fd, 4096)
            list(connection.notifies(timeout=0))
            return True
        except Exception:  # the server went away: reconnect next time; meanwhile poll the queue
            self._drop()
            with selectors.DefaultSelector() as selector:  # pause, but still wake on stop
                selector.register(self._read_fd, selectors.EVENT_READ)
                selector.select(min(timeout, 1.0))
            return True

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"x")

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        self._drop()
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def make_waker(engine: Engine, sqlite_interval: float) -> Waker:
    if engine.dialect.name == "postgresql":
        return PostgresWaker(engine)
    return SQLiteWaker(engine, sqlite_interval)
