"""The library under `dgxqueue db check` and `db vacuum` (dgxqueue.storage.maintenance), called in
this process on real SQLite files and the real PostgreSQL: what a report holds, damage found,
space given back. tests/acceptance/test_db_maintenance.py runs the commands as an operator does."""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import shutil
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.errors import LockTimeoutError, SchemaError, ValidationError
from dgxqueue.storage import get_engine, init_db
from dgxqueue.storage.database import HEAD_REVISION
from dgxqueue.storage.maintenance import DEFAULT_LOCK_TIMEOUT, check_database, vacuum_database
from dgxqueue.storage.models import G


def _fill(url: str, n: int) -> None:
    """``n`` completed generations with prompts of their own, in one transaction."""
    old = datetime.now(UTC) - timedelta(days=40)
    rng = random.Random(n)
    rows = [{"id": f"job-{i:06d}", "model_name": "old", "duration_seconds": 1.0,
             "prompt": " ".join(f"word{rng.randrange(5000)}" for _ in range(40)), "sample_rate": 32000,
             "channels": 1, "file_path": f"outputs/{i}.wav", "status": "completed", "created_at": old,
             "completed_at": old} for i in range(n)]
    with init_db(url).begin() as conn:
        conn.execute(sa.insert(G), rows)


def _path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


@pytest.mark.parametrize("full", [False, True])
def test_check__a_sound_database_is_healthy_and_says_what_it_read(db_url: str, full: bool) -> None:
    """Both engines: a populated database at head is healthy; the report names its checks and its
    facts (SQLite: page counts and the log's size; PostgreSQL: row counts), and the revision."""
    _fill(db_url, 300)
    report = check_database(db_url, full=full)
    assert report.healthy and report.problems == [] and report.checked
    assert report.facts["revision"] == HEAD_REVISION
    if db_url.startswith("sqlite"):
        assert report.facts["page_count"] > 10 and report.facts["page_size"] > 0 and "wal_bytes" in report.facts
    else:
        assert report.facts["generations_rows"] == 300


def test_check__overwritten_pages_are_problems_not_an_error(sqlite_db_url: str, tmp_path: Path) -> None:
    """A copy of a populated file with leaf pages of the generations table overwritten: the full
    check returns a report with problems (not an exception), and leaves the file's bytes alone."""
    _fill(sqlite_db_url, 1500)
    get_engine(sqlite_db_url).dispose()
    with contextlib.closing(sqlite3.connect(_path(sqlite_db_url))) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    copy = tmp_path / "copy.db"
    shutil.copyfile(_path(sqlite_db_url), copy)
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [row[0] for row in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'generations' AND pagetype = 'leaf' ORDER BY pageno")]
    with copy.open("r+b") as file:
        for page in pages[len(pages) // 2: len(pages) // 2 + 3]:
            file.seek((page - 1) * page_size + page_size // 4)
            file.write(b"\xa5" * (page_size // 2))
    damaged = copy.read_bytes()
    report = check_database(f"sqlite:///{copy}", full=True)
    assert not report.healthy and report.problems
    assert copy.read_bytes() == damaged


def test_check__a_file_without_dgxqueue_tables_is_unavailable_and_stays_as_it_was(tmp_path: Path) -> None:
    """Another program's SQLite file (or a mistyped path's empty one) is no dgxqueue database:
    SchemaError, nothing written."""
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.commit()
    before = other.read_bytes()
    with pytest.raises(SchemaError):
        check_database(f"sqlite:///{other}")
    with pytest.raises(SchemaError):
        vacuum_database(f"sqlite:///{other}")
    assert other.read_bytes() == before


def test_vacuum__gives_back_the_space_of_deleted_rows(sqlite_db_url: str) -> None:
    """SQLite: after most rows are deleted the vacuum shrinks the file (and its log) and says what
    it did; with min_free above the file's free share it skips, reporting why."""
    _fill(sqlite_db_url, 3000)
    with get_engine(sqlite_db_url).begin() as conn:
        conn.execute(sa.delete(G).where(G.c.id >= "job-000300"))
    report = vacuum_database(sqlite_db_url)
    assert report.skipped is None and report.done
    assert report.after_bytes < report.before_bytes / 2
    again = vacuum_database(sqlite_db_url, min_free=0.5)
    assert again.skipped and again.after_bytes == again.before_bytes
    assert check_database(sqlite_db_url, full=True).healthy
    with get_engine(sqlite_db_url).connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(G)).scalar_one() == 300


def test_vacuum__postgresql_vacuums_both_tables(pg_db_url: str) -> None:
    """PostgreSQL: VACUUM (ANALYZE) of both tables, outside a transaction, with their sizes."""
    _fill(pg_db_url, 200)
    with get_engine(pg_db_url).begin() as conn:
        conn.execute(sa.delete(G))
    report = vacuum_database(pg_db_url)
    assert report.done == ["VACUUM (ANALYZE) generations", "VACUUM (ANALYZE) prompts"]
    assert report.before_bytes > 0 and report.after_bytes > 0


def test_vacuum__postgresql_gives_up_on_a_table_another_session_holds(pg_db_url: str) -> None:
    """Another session holds ``generations`` in ACCESS EXCLUSIVE mode in an open transaction: the
    vacuum (at a lock timeout of 1 s) returns within a bounded time with LockTimeoutError naming
    the table and the holder's pid, having vacuumed nothing; the holder's transaction is untouched
    and a vacuum after it ends works. The default timeout is the same bounded setting, 10 s (waited
    out here it only made the test 10 s long)."""
    assert inspect.signature(vacuum_database).parameters["lock_timeout"].default == DEFAULT_LOCK_TIMEOUT
    assert 0 < DEFAULT_LOCK_TIMEOUT <= 60
    seconds = 1.0
    _fill(pg_db_url, 20)
    holder = sa.create_engine(pg_db_url, poolclass=sa.pool.NullPool)
    outcome: list[BaseException | object] = []
    with holder.connect() as lock:
        lock.exec_driver_sql("LOCK TABLE generations IN ACCESS EXCLUSIVE MODE")
        pid = lock.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()

        def vacuum() -> None:
            try:
                outcome.append(vacuum_database(pg_db_url, lock_timeout=seconds))
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)

        thread = threading.Thread(target=vacuum, daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(DEFAULT_LOCK_TIMEOUT + 20)
        waited = time.monotonic() - started
        still_waiting = thread.is_alive()
        assert lock.execute(sa.select(sa.func.count()).select_from(G)).scalar_one() == 20  # still its own
        lock.rollback()  # lets a vacuum that never gave up finish, so the thread ends
    thread.join(30)
    holder.dispose()
    assert not still_waiting, f"the vacuum still waited for the lock after {waited:.0f} s"
    [error] = outcome
    assert isinstance(error, LockTimeoutError), error
    assert (error.table, error.seconds, error.done) == ("generations", seconds, [])
    assert waited < DEFAULT_LOCK_TIMEOUT, f"gave up after {waited:.1f} s at a {seconds:g} s lock timeout"
    assert any(f"pid {pid} holds AccessExclusiveLock" in who for who in error.holders), error.holders
    assert "generations" in str(error) and "\n" not in str(error)
    assert vacuum_database(pg_db_url, lock_timeout=5).done == ["VACUUM (ANALYZE) generations",
                                                               "VACUUM (ANALYZE) prompts"]


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan, math.inf, 86401.0])
def test_vacuum__a_lock_timeout_out_of_range_names_the_field(pg_db_url: str, seconds: float) -> None:
    """A lock timeout that is not above 0 and at most a day is refused before anything is opened."""
    with pytest.raises(ValidationError, match="lock_timeout"):
        vacuum_database(pg_db_url, lock_timeout=seconds)
