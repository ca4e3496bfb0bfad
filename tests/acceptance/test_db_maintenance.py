"""`dgxqueue db check` and `db vacuum` as an operator runs them: on a populated SQLite file, one
whose pages were overwritten on purpose, a real PostgreSQL database, and while a real daemon
process works on the file being vacuumed."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

import dgxqueue
from dgxqueue.cli.dbmaint import EXIT_DAMAGED
from dgxqueue.config import load_settings
from dgxqueue.storage import get_engine, init_db, session_scope
from dgxqueue.storage.database import HEAD_REVISION
from dgxqueue.storage.maintenance import SEARCH_TOKENIZER
from dgxqueue.storage.models import G
from dgxqueue.storage.search import search_ids
from tests.support import zygote
from tests.support.processes import start_worker, stop, wait_until, worker_config

REPO = Path(__file__).resolve().parents[2]


def _cli(url: str, *args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(REPO), **extra_env}
    env.pop("DGXQUEUE_CONFIG", None)
    return zygote.run([sys.executable, "-m", "dgxqueue", *args], capture_output=True, text=True, env=env,
                      cwd=REPO, timeout=timeout, check=False)


def _fill_finished(url: str, n: int, *, prompt_chars: int = 400) -> None:
    """``n`` completed generations finished 40 days ago, each with its own long prompt."""
    old = datetime.now(UTC) - timedelta(days=40)
    rng = random.Random(n)
    words = ["lofi", "piano", "trap", "808", "ambient", "strings", "drone", "jazz", "night", "rain"]
    numbers, k = [str(d) for d in range(1000)], prompt_chars // 8
    # random.choices draws k at once: a word and a number per call of choice/randrange cost seconds for 20,000 rows.
    rows = [{"id": f"{i:08d}-0000-4000-8000-{i:012d}", "model_name": "old", "duration_seconds": 1.0,
             "prompt": " ".join(map(str.__add__, rng.choices(words, k=k), rng.choices(numbers, k=k))),
             "sample_rate": 32000, "channels": 1, "file_path": f"outputs/{i}.wav", "status": "completed",
             "created_at": old, "completed_at": old} for i in range(n)]
    engine = init_db(url)
    with engine.begin() as conn:
        conn.execute(sa.insert(G), rows)


def _checkpoint(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_db_check__healthy_sqlite_exits_0(sqlite_db_url: str) -> None:
    """A populated, sound file: quick and full checks exit 0, say healthy, show the page counts."""
    _fill_finished(sqlite_db_url, 500)
    for flags in ([], ["--full"]):
        done = _cli(sqlite_db_url, "db", "check", *flags, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["healthy"] and report["problems"] == [] and report["revision"] == HEAD_REVISION
        assert report["page_count"] > 10 and report["page_size"] == 4096 and "wal_bytes" in report


@pytest.mark.parametrize("full", [False, True])
def test_db_check__overwritten_pages_exit_damaged(sqlite_db_url: str, tmp_path: Path, full: bool) -> None:
    """A copy of a real populated file with the middle of some of the generations table's pages
    overwritten: the check exits 5 and says DAMAGED; the file is opened read-only (its bytes stay
    as they were, nothing goes to its write-ahead log)."""
    _fill_finished(sqlite_db_url, 2000)
    source = Path(sqlite_db_url.removeprefix("sqlite:///"))
    get_engine(sqlite_db_url).dispose()
    _checkpoint(source)
    copy = tmp_path / "copy" / "generations.db"
    copy.parent.mkdir()
    shutil.copyfile(source, copy)
    copy_url = f"sqlite:///{copy}"
    assert _cli(copy_url, "db", "check").returncode == 0  # sound before the damage
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [row[0] for row in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'generations' AND pagetype = 'leaf' ORDER BY pageno")]
    assert len(pages) > 20
    rng = random.Random(7)
    with copy.open("r+b") as file:
        for page in pages[len(pages) // 2: len(pages) // 2 + 3]:
            file.seek((page - 1) * page_size + page_size // 4)
            file.write(bytes(rng.randrange(256) for _ in range(page_size // 2)))
    damaged = copy.read_bytes()
    done = _cli(copy_url, "db", "check", *(["--full"] if full else []))
    assert done.returncode == EXIT_DAMAGED, done.stdout + done.stderr
    assert "DAMAGED" in done.stdout and "backup" in done.stdout
    # Read-only: the file's bytes are as they were; a WAL file's reader may create an empty -wal
    # and the -shm index beside it (as any reader does), never write to the file through them.
    assert copy.read_bytes() == damaged
    assert not Path(f"{copy}-wal").exists() or Path(f"{copy}-wal").stat().st_size == 0


def test_db_check__a_file_that_is_not_a_database_is_damaged(tmp_path: Path) -> None:
    """Garbage where the database should be: damaged (5), not a crash."""
    path = tmp_path / "generations.db"
    path.write_bytes(os.urandom(8192))
    done = _cli(f"sqlite:///{path}", "db", "check")
    assert done.returncode == EXIT_DAMAGED, done.stdout + done.stderr
    assert "DAMAGED" in done.stdout


def test_db_check__postgresql_says_what_it_checked_and_finds_an_invalid_index(pg_db_url: str) -> None:
    """PostgreSQL: healthy at head (exit 0, the checks named, row counts); an index marked invalid
    (as a failed CREATE INDEX CONCURRENTLY leaves it) exits 5 naming it."""
    _fill_finished(pg_db_url, 50)
    done = _cli(pg_db_url, "db", "check", "--full", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["generations_rows"] == 50 and report["revision"] == HEAD_REVISION
    assert any("indisvalid" in check for check in report["checked"])
    with get_engine(pg_db_url).begin() as conn:
        conn.exec_driver_sql("UPDATE pg_index SET indisvalid = false "
                             "WHERE indexrelid = 'idx_generations_model_name'::regclass")
    done = _cli(pg_db_url, "db", "check")
    assert done.returncode == EXIT_DAMAGED and "idx_generations_model_name" in done.stdout


def test_db_vacuum__postgresql_reports_bytes(pg_db_url: str) -> None:
    """VACUUM (ANALYZE) of both tables runs outside a transaction and reports sizes."""
    _fill_finished(pg_db_url, 200)
    with get_engine(pg_db_url).begin() as conn:
        conn.execute(sa.delete(G))
    done = _cli(pg_db_url, "db", "vacuum", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["before_bytes"] > 0 and report["done"] == ['VACUUM (ANALYZE) generations',
                                                            'VACUUM (ANALYZE) prompts']


def test_db_vacuum__min_free_skips_a_full_file(sqlite_db_url: str) -> None:
    """--min-free 20%: a file with no free pages is left alone; a bad share exits 65 naming it."""
    _fill_finished(sqlite_db_url, 100)
    done = _cli(sqlite_db_url, "db", "vacuum", "--min-free", "20%", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["skipped"], done.stdout + done.stderr
    done = _cli(sqlite_db_url, "db", "vacuum", "--min-free", "120%")
    assert done.returncode == 65 and "min_free" in done.stderr


def test_db_vacuum__shrinks_the_file_while_a_daemon_works(sqlite_db_url: str, tmp_path: Path) -> None:
    """After a prune deleted most rows, `db vacuum` shrinks the file while a real daemon process
    claims and finishes jobs and a producer keeps enqueueing: the vacuum succeeds, every job
    completes, the daemon logs no error and exits 0 on SIGTERM."""
    url = sqlite_db_url
    _fill_finished(url, 20_000)
    settings = load_settings(env={}, overrides={"database": {"url": url}})
    path = Path(url.removeprefix("sqlite:///"))
    process = start_worker(worker_config(tmp_path, url), tmp_path / "worker.log")
    ids: list[str] = []
    try:
        ids += dgxqueue.enqueue_many([{"prompt": f"job {i}", "model_name": "scripted"} for i in range(50)],
                                     database_url=url, settings=settings)
        done = _cli(url, "prune", "--older-than", "30d", "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["generations"] == 20_000, done.stderr
        vacuumed = threading.Event()
        during: list[str] = []

        def produce() -> None:  # enqueues until the vacuum is over, a job at a time
            while not vacuumed.is_set():
                during.append(dgxqueue.enqueue("during the vacuum", model_name="scripted", database_url=url,
                                               settings=settings))
                # Paced: a write is still tried every few tens of ms, throughout the vacuum, but the
                # hundreds of jobs an unpaced loop queued took the daemon most of the test to drain.
                vacuumed.wait(0.02)

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            done = _cli(url, "db", "vacuum", "--json")
        finally:
            vacuumed.set()
            producer.join(60)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["after_bytes"] < report["before_bytes"] / 3, report
        assert report["done"] == ["search index: FTS5 'optimize'", "VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"]
        assert path.stat().st_size < report["before_bytes"] / 3  # the file itself, not only the sum
        ids += during
        assert len(during) > 1
        engine = get_engine(url)

        def all_completed() -> bool:
            with engine.connect() as conn:
                counted = conn.execute(sa.select(G.c.status, sa.func.count()).group_by(G.c.status)).all()
            statuses: dict[str, int] = dict(counted)
            return statuses == {"completed": len(ids)}

        wait_until(all_completed, 60, "every job to complete", alive=process)
    finally:
        code = stop(process)
    assert code == 0
    log = (tmp_path / "worker.log").read_text()
    assert '"level": "error"' not in log and "Traceback" not in log, log[-3000:]
    assert _cli(url, "db", "check", "--full").returncode == 0
    # The VACUUM kept the rowids the search index is keyed by: its entries still name their rows.
    with session_scope(get_engine(url)) as session:
        assert sorted(search_ids(session, "during the VACUUM", limit=10_000)) == sorted(during)
        assert len(search_ids(session, "job", limit=10_000)) == 50


def test_db_check__older_schema_is_not_damage_and_an_empty_server_is_unavailable(
        sqlite_db_url: str, pg_db_url: str) -> None:
    """A database at an older revision is healthy (the revision says 'db upgrade'); a PostgreSQL
    database without dgxqueue's tables exits 69, not 5."""
    from dgxqueue.storage.database import upgrade

    upgrade(get_engine(sqlite_db_url), "005")
    done = _cli(sqlite_db_url, "db", "check", "--full")
    assert done.returncode == 0 and f"005 (this dgxqueue's is {HEAD_REVISION}" in done.stdout, done.stdout + done.stderr
    done = _cli(pg_db_url, "db", "check")
    assert done.returncode == 69 and "no dgxqueue tables" in done.stderr, done.stdout + done.stderr


def test_db_check__full_finds_rows_the_search_index_misses(sqlite_db_url: str) -> None:
    """A row written while the index's trigger was missing: the quick check passes, the full one
    exits 5 naming the search index and how to rebuild it; after that rebuild it is healthy."""
    _fill_finished(sqlite_db_url, 10)
    path = Path(sqlite_db_url.removeprefix("sqlite:///"))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TRIGGER generations_search_insert")
        conn.execute("INSERT INTO generations (id, prompt, model_name, duration_seconds, sample_rate, channels, "
                     "file_path, status, created_at) VALUES ('x', 'unindexed words', 'm', 1, 32000, 1, 'o.wav', "
                     "'pending', '2026-01-01 00:00:00')")
        conn.commit()
    assert _cli(sqlite_db_url, "db", "check").returncode == 0
    done = _cli(sqlite_db_url, "db", "check", "--full")
    assert done.returncode == EXIT_DAMAGED and "1 generation(s) not indexed" in done.stdout, done.stdout
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO generations_search(generations_search) VALUES ('rebuild')")
        conn.commit()
    assert _cli(sqlite_db_url, "db", "check", "--full").returncode == 0


@pytest.mark.parametrize("content", [b"", None], ids=["empty-file", "another-apps-database"])
def test_db_check_and_vacuum__a_sqlite_file_without_dgxqueue_tables_is_unavailable(
        tmp_path: Path, content: bytes | None) -> None:
    """A file that holds no dgxqueue tables (a mistyped path's empty file, another program's
    database) is unavailable (69) as on PostgreSQL: not 'healthy', and the vacuum leaves it as it was."""
    path = tmp_path / "other.db"
    if content is None:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
            conn.execute("INSERT INTO notes VALUES ('keep me')")
            conn.commit()
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    for command in (["db", "check"], ["db", "check", "--full"], ["db", "vacuum"]):
        done = _cli(f"sqlite:///{path}", *command)
        assert done.returncode == 69 and "no dgxqueue tables" in done.stderr, (command, done.stdout + done.stderr)
    assert path.read_bytes() == before


def test_db_vacuum__a_postgresql_database_without_dgxqueue_tables_is_unavailable(pg_db_url: str) -> None:
    """PostgreSQL without dgxqueue's tables: 69 naming the cause, as `db check` says, not an
    internal error about a missing relation."""
    done = _cli(pg_db_url, "db", "vacuum")
    assert done.returncode == 69 and "no dgxqueue tables" in done.stderr, done.stdout + done.stderr


def test_db_vacuum__a_table_locked_by_an_open_transaction_exits_75_in_one_line(pg_db_url: str) -> None:
    """Another session's open transaction holds ``generations`` in ACCESS EXCLUSIVE mode (as a
    LOCK TABLE or an unfinished ALTER TABLE does): ``db vacuum --lock-timeout 1`` exits 75 within
    the test's bound with one line naming the table and the holder's pid, and prints no report;
    a bad ``--lock-timeout`` is refused naming the option."""
    _fill_finished(pg_db_url, 20)
    holder = sa.create_engine(pg_db_url, poolclass=sa.pool.NullPool)
    with holder.connect() as lock:
        lock.exec_driver_sql("LOCK TABLE generations IN ACCESS EXCLUSIVE MODE")
        pid = lock.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
        try:
            done = _cli(pg_db_url, "db", "vacuum", "--lock-timeout", "1", timeout=60)
        finally:
            lock.rollback()
    holder.dispose()
    assert done.returncode == 75, done.stdout + done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert "table generations" in done.stderr and f"pid {pid} holds AccessExclusiveLock" in done.stderr
    assert "nothing was vacuumed" in done.stderr
    bad = _cli(pg_db_url, "db", "vacuum", "--lock-timeout", "soon")
    assert bad.returncode == 65 and "lock_timeout" in bad.stderr, bad.stderr


def test_db_vacuum__a_full_temporary_folder_is_named_not_called_database_unavailable(
        sqlite_db_url: str, tiny_disk: Path) -> None:
    """VACUUM builds the new file in SQLite's temporary folder first: when that folder (here a
    64 KiB tmpfs as SQLITE_TMPDIR) fills, the error names it and exits 74 (I/O), not 69 "database
    unavailable" while the database's own disk has room; the file stays sound and searchable."""
    _fill_finished(sqlite_db_url, 2000, prompt_chars=2000)  # past SQLite's 2 MiB page cache, which holds a smaller one
    with get_engine(sqlite_db_url).begin() as conn:
        conn.execute(sa.delete(G).where(G.c.id < "00001000"))
    done = _cli(sqlite_db_url, "db", "vacuum", SQLITE_TMPDIR=str(tiny_disk))
    assert done.returncode == 74, done.stdout + done.stderr
    assert str(tiny_disk) in done.stderr and "SQLITE_TMPDIR" in done.stderr, done.stderr
    assert _cli(sqlite_db_url, "db", "check", "--full").returncode == 0
    with session_scope(get_engine(sqlite_db_url)) as session:
        assert len(search_ids(session, "lofi", limit=10_000)) == 1000


def test_db_check__full_finds_words_left_behind_by_insert_or_replace(sqlite_db_url: str) -> None:
    """INSERT OR REPLACE by plain SQL deletes the old row without its delete trigger (SQLite fires
    none unless recursive_triggers is on), so the index keeps its words; once the rowid is used
    again they name another row ('beta' finds 'gamma'). The full check compares the index's words
    with the rows' prompts: exit 5 naming the search index; healthy again after the rebuild."""
    init_db(sqlite_db_url)
    path = Path(sqlite_db_url.removeprefix("sqlite:///"))
    with contextlib.closing(sqlite3.connect(path)) as conn:  # the check indexes afresh as the migration did
        made = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'generations_search'").fetchone()[0]
    assert f'tokenize="{SEARCH_TOKENIZER}"' in made
    insert = ("INSERT {} INTO generations (id, prompt, model_name, duration_seconds, sample_rate, channels, "
              "file_path, status, created_at) VALUES (?, ?, 'm', 1, 32000, 1, ? || '.wav', 'completed', '2026-01-01')")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(insert.format(""), ("a", "alpha", "a"))
        conn.execute(insert.format(""), ("b", "beta", "b"))
        conn.execute(insert.format("OR REPLACE"), ("b", "beta two", "b"))
        conn.execute("DELETE FROM generations WHERE id = 'b'")
        conn.execute(insert.format(""), ("c", "gamma", "c"))  # takes the replaced row's rowid again
        conn.commit()
    with session_scope(get_engine(sqlite_db_url)) as session:
        assert search_ids(session, "beta") == ["c"]  # the damage: a row without the word
    done = _cli(sqlite_db_url, "db", "check", "--full")
    assert done.returncode == EXIT_DAMAGED and "search index" in done.stdout, done.stdout + done.stderr
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO generations_search(generations_search) VALUES ('rebuild')")
        conn.commit()
    assert _cli(sqlite_db_url, "db", "check", "--full").returncode == 0
    with session_scope(get_engine(sqlite_db_url)) as session:
        assert search_ids(session, "beta") == []


def test_db_check__full_while_rows_are_written_finds_no_damage(sqlite_db_url: str) -> None:
    """Rows inserted, reworded and deleted (the index's triggers at work) throughout: the full check
    reads the prompts and the index from one snapshot, so each run is healthy, not a false DAMAGED."""
    _fill_finished(sqlite_db_url, 200, prompt_chars=80)
    path = Path(sqlite_db_url.removeprefix("sqlite:///"))
    stop_writing = threading.Event()
    written = [0]

    def write() -> None:
        with contextlib.closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as conn:
            while not stop_writing.is_set():
                n = written[0]
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO generations (id, prompt, model_name, duration_seconds, sample_rate, "
                             "channels, file_path, status, created_at) VALUES (?, ?, 'm', 1, 32000, 1, ?, "
                             "'pending', '2026-01-01')", (f"w{n}", f"written {n} piano", f"w{n}.wav"))
                conn.execute("UPDATE generations SET prompt = prompt || ' again' WHERE id = ?", (f"w{n // 2}",))
                conn.execute("DELETE FROM generations WHERE id = ?", (f"w{n // 3}",))
                conn.execute("COMMIT")
                written[0] = n + 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_until(lambda: written[0] > 10, 30, "the writer to commit")
        for _ in range(4):
            before = written[0]
            done = _cli(sqlite_db_url, "db", "check", "--full")
            assert done.returncode == 0, done.stdout + done.stderr
            assert written[0] > before  # the rows did change while it checked
    finally:
        stop_writing.set()
        writer.join()
