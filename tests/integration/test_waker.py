"""The idle wakers: a wake-up is safe from a signal handler, wherever it interrupts a wait."""

from __future__ import annotations

import sys
import threading
from types import FrameType
from typing import Any

import sqlalchemy as sa

import dgxqueue
from dgxqueue.daemon.waker import make_waker
from dgxqueue.storage import get_engine, init_db
from tests.support.processes import wait_until


def test_waker__wake_between_any_two_lines_of_wait_does_not_block(engine: sa.Engine) -> None:
    """The daemon's SIGTERM handler calls ``wake()``, and Python runs a handler on the main thread
    between any two bytecodes, inside ``wait()`` too. A trace function calling ``wake()`` on every
    line ``wait()`` runs does the same, deterministically. The SQLite waker once slept on a
    ``threading.Event``, whose ``set()`` then blocked on the lock its own ``wait()`` held: a stop
    that hung the daemon for good."""
    waker = make_waker(engine, 0.002)
    returned = threading.Event()

    def interrupted_wait() -> None:
        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            waker.wake()
            return trace

        sys.settrace(trace)
        try:
            waker.wait(0.05)
        finally:
            sys.settrace(None)
        returned.set()

    threading.Thread(target=interrupted_wait, daemon=True).start()
    try:
        assert returned.wait(20), "wake() blocked inside wait(): a signal handler calling it would hang"
    finally:
        waker.close()


def test_waker__wakes_on_wake_and_on_a_commit(sqlite_db_url: str) -> None:
    """An idle SQLite waker returns at once after ``wake()``, and soon after another connection
    commits; with neither it waits out its timeout."""
    init_db(sqlite_db_url)
    engine = get_engine(sqlite_db_url)
    waker = make_waker(engine, 0.002)
    try:
        assert waker.wait(0.0) is False  # reads the version it will compare against
        waker.wake()
        assert waker.wait(10.0) is True
        assert waker.wait(0.01) is False
        results: list[bool] = []
        thread = threading.Thread(target=lambda: results.append(waker.wait(10.0)))
        thread.start()
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS waker_probe (x INTEGER)"))
        wait_until(lambda: results, 10, "the waker to notice the commit")
        thread.join(10)
        assert results == [True]
    finally:
        waker.close()


def test_waker__postgres_keeps_listening_through_a_non_latin_model_whatever_client_encoding_is_set(
        pg_db_url: str) -> None:
    """The database (or PGCLIENTENCODING) sets another client_encoding for new connections: the
    idle daemon's LISTEN connection still reads in UTF-8, as the engine's do, so a job for a
    model named 'música ✓' wakes it and its connection stays. Under SQL_ASCII the payload failed
    to decode, so each such enqueue dropped the listener (a reconnect, a paused wait, cancels left
    to the heartbeat); under LATIN1 the server sent an error in its place, at times ending the
    connection."""
    init_db(pg_db_url)
    engine = get_engine(pg_db_url)
    with engine.connect() as conn:
        name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET client_encoding = 'SQL_ASCII'"))
        conn.commit()
    waker = make_waker(engine, 0.002)
    try:
        assert waker.wait(0.0) is False  # connects and listens
        listening = waker._connection  # type: ignore[attr-defined]
        dgxqueue.enqueue("a beat", model_name="música ✓", database_url=pg_db_url)
        assert waker.wait(10.0) is True
        assert waker._connection is listening  # type: ignore[attr-defined]
    finally:
        waker.close()
