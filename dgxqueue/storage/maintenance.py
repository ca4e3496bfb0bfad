"""Database upkeep: an integrity check and a vacuum that gives back space, on either engine.

SQLite (the README's "Maintaining the database" says why these and not others):

- :func:`check_database` opens the file read-only (``mode=ro``: it writes nothing, never switches
  a file to WAL) and runs ``PRAGMA quick_check``, or ``integrity_check`` with ``full`` (which
  also compares every index with its table, and the search index's entries with the rows they
  name and its words with their prompts, indexed afresh into a temporary table); it reports
  the page size, page and free-page counts and the write-ahead log's size.
- :func:`vacuum_database` merges the search index (FTS5 ``optimize``: deleted rows' entries
  go), runs a plain ``VACUUM``, then ``PRAGMA wal_checkpoint(TRUNCATE)``.
  ``VACUUM`` is one transaction under the write lock: readers go on reading (WAL), and the
  daemons' writes wait for it (their busy timeout, then their retries), so it is safe while they
  run; it keeps rowids (which the search index is keyed by). ``incremental_vacuum`` would not
  do: it needs ``auto_vacuum=INCREMENTAL``, which a database gets only from a ``VACUUM`` anyway,
  and it leaves pages half empty. ``VACUUM INTO`` plus a swap cannot be done while a daemon
  holds the old file open.

PostgreSQL: the check says what it looks at (the server answers, the schema revision, row
counts, every index of the two tables valid per ``pg_index.indisvalid``; with ``full`` every
row read); the vacuum is ``VACUUM (ANALYZE)`` of the two tables, outside a transaction, which
takes no lock that stops the daemons (``VACUUM FULL`` would, so it is not offered). It waits at
most its lock timeout for a table another session holds locked (an open transaction that ran
``LOCK TABLE`` or ``ALTER TABLE``), then gives up with :class:`~dgxqueue.errors.LockTimeoutError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from dgxqueue.config import DatabaseSettings
from dgxqueue.errors import LockTimeoutError, SchemaError, ValidationError
from dgxqueue.storage.database import HEAD_REVISION, create_engine, describe_url, sqlite_path
from dgxqueue.storage.engines import profile_for

#: The tables checked and vacuumed.
TABLES = ("generations", "prompts")
#: At most this many problems are listed (SQLite's integrity_check stops there too).
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_database` looked at (``checked``, in words), what it read (``facts``) and
    what is wrong (``problems``: empty when healthy)."""

    where: str
    checked: list[str]
    facts: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VacuumReport:
    """Sizes before and after, in bytes (SQLite: the file and its write-ahead log; PostgreSQL:
    the two tables with their indexes and TOAST), and what was done."""

    where: str
    before_bytes: int
    after_bytes: int
    done: list[str]
    skipped: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


def _readonly(path: Path, settings: DatabaseSettings) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=settings.sqlite_busy_timeout_ms / 1000)
    conn.text_factory = lambda data: str(data, "utf-8", "replace")
    return conn


def _wal(path: Path) -> Path:
    """The write-ahead log beside a SQLite file."""
    return Path(os.fspath(path) + "-wal")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sqlite_facts(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {
        name: conn.execute(f"PRAGMA {name}").fetchone()[0]  # names from this fixed list only
        for name in ("page_size", "page_count", "freelist_count", "auto_vacuum", "journal_mode")
    }
    facts["file_bytes"] = _file_size(path)
    facts["wal_bytes"] = _file_size(_wal(path))
    has_version = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone()
    version = conn.execute("SELECT version_num FROM alembic_version").fetchone() if has_version else None
    facts["revision"] = version[0] if version is not None else None
    return facts


def _no_tables(where: str) -> SchemaError:
    """The database holds no dgxqueue schema: a mistyped path or URL, not damage (exit 69)."""
    return SchemaError(f"the database at {where} has no dgxqueue tables (check DATABASE_URL "
                       "or database.url; 'dgxqueue db upgrade' creates them there)")


#: The search index's tokenizer, as migration 006 made it (a test compares them).
SEARCH_TOKENIZER = "unicode61 remove_diacritics 0 categories 'L* Nd'"


def _search_words_differing(conn: sqlite3.Connection) -> int:
    """How many (word, rowid, position) entries the search index and the rows' prompts disagree
    on: the prompts indexed afresh into a temporary FTS5 table (the temp schema is writable on a
    read-only connection), both read through fts5vocab. Rowid counts alone miss a stale entry whose
    rowid a new row took; FTS5's own 'integrity-check' is an INSERT, refused read-only."""
    # One read transaction: the prompts and the index read from the same snapshot, so a daemon's
    # commit in between is not taken for a difference.
    conn.execute("BEGIN")
    for statement in (
        f"CREATE VIRTUAL TABLE temp.dgxqueue_fresh USING fts5(prompt, content='', tokenize=\"{SEARCH_TOKENIZER}\")",
        "INSERT INTO temp.dgxqueue_fresh(rowid, prompt) SELECT rowid, prompt FROM main.generations",
        "CREATE VIRTUAL TABLE temp.dgxqueue_kept_words USING fts5vocab(main, generations_search, 'instance')",
        "CREATE VIRTUAL TABLE temp.dgxqueue_fresh_words USING fts5vocab(temp, dgxqueue_fresh, 'instance')",
    ):  # fixed text: no user input in any of them
        conn.execute(statement)
    count = ("SELECT count(*) FROM (SELECT term, doc, offset FROM temp.{0} "
             "EXCEPT SELECT term, doc, offset FROM temp.{1})")
    differing = sum(conn.execute(count.format(*names)).fetchone()[0]
                    for names in (("dgxqueue_kept_words", "dgxqueue_fresh_words"),
                                  ("dgxqueue_fresh_words", "dgxqueue_kept_words")))
    conn.rollback()  # the temporary tables go with it
    return int(differing)


def _search_index_problems(conn: sqlite3.Connection) -> list[str]:
    """Rows the search index misses, or entries it keeps for rows that are gone (its docsize
    table holds one row per indexed generation, by rowid): read-only, unlike FTS5's own
    'integrity-check' command, which is an INSERT."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'generations_search_docsize'").fetchone() is None:
        return []
    missing = conn.execute("SELECT count(*) FROM generations WHERE rowid NOT IN "
                           "(SELECT id FROM generations_search_docsize)").fetchone()[0]
    stale = conn.execute("SELECT count(*) FROM generations_search_docsize WHERE id NOT IN "
                         "(SELECT rowid FROM generations)").fetchone()[0]
    problems = []
    if missing:
        problems.append(f"search index: {missing} generation(s) not indexed")
    if stale:
        problems.append(f"search index: {stale} entr(y/ies) for generations that no longer exist")
    differing = _search_words_differing(conn)
    if differing:
        problems.append(f"search index: {differing} word(s) indexed that the rows' prompts do not hold, or held "
                        "but not indexed (an INSERT OR REPLACE by plain SQL fires no delete trigger and leaves "
                        "the old row's words, which name another row once its rowid is used again)")
    if problems:  # derived data: rebuilt from the rows, nothing lost
        problems.append("rebuild the search index from the rows: sqlite3 FILE \"INSERT INTO "
                        "generations_search(generations_search) VALUES ('rebuild')\"")
    return problems


def _check_sqlite(path: Path, full: bool, settings: DatabaseSettings) -> CheckReport:
    where = str(path.absolute())
    pragma = "integrity_check" if full else "quick_check"
    checked = [f"PRAGMA {pragma} (read-only)", "page and free-page counts, write-ahead log size"]
    if full:
        checked.append("search index entries against the rows they name, and its words against their prompts")
    if not path.is_file():
        raise SchemaError(f"no database file at {where}")
    facts: dict[str, Any] = {"file_bytes": _file_size(path), "wal_bytes": _file_size(_wal(path))}
    problems: list[str] = []
    try:
        with contextlib.closing(_readonly(path, settings)) as conn:
            facts = _sqlite_facts(conn, path)
            if facts["revision"] is None:  # an empty file or another program's: nothing of ours to judge
                raise _no_tables(where)
            problems = [row[0] for row in conn.execute(f"PRAGMA {pragma}({MAX_PROBLEMS})") if row[0] != "ok"]
            if full and not problems:
                problems = _search_index_problems(conn)
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise  # busy, no permission, I/O: unavailable, not a verdict on the file
        problems = [f"SQLite: {exc}"]
    return CheckReport(where, checked, _with_head(facts), problems)


@contextlib.contextmanager
def _server(url: str, settings: DatabaseSettings) -> Iterator[sa.Engine]:
    engine = create_engine(url, settings)  # its own: no pooled connection stays behind
    try:
        yield engine
    finally:
        engine.dispose()


def _check_postgres(url: str, full: bool, settings: DatabaseSettings) -> CheckReport:
    checked = ["the server answers", "schema revision (an older one is not damage)", "row counts",
               "every index of generations and prompts valid (pg_index.indisvalid)"]
    if full:
        checked.append("every row of generations and prompts read (a damaged page raises)")
    problems: list[str] = []
    facts: dict[str, Any] = {}
    pg_index = sa.table("pg_index", sa.column("indexrelid"), sa.column("indrelid"), sa.column("indisvalid"))
    with _server(url, settings) as engine, engine.connect() as conn:
        facts["server"] = conn.execute(sa.select(sa.func.version())).scalar_one()
        version = sa.table("alembic_version", sa.column("version_num", sa.Text))
        has_version = conn.execute(sa.select(sa.func.to_regclass("alembic_version"))).scalar_one() is not None
        facts["revision"] = conn.execute(sa.select(version.c.version_num)).scalar() if has_version else None
        for table in TABLES:
            oid = conn.execute(sa.select(sa.func.to_regclass(table))).scalar_one()
            if oid is None:
                problems.append(f"table {table} does not exist")
                continue
            facts[f"{table}_rows"] = conn.execute(
                sa.select(sa.func.count()).select_from(sa.table(table))).scalar_one()
            invalid = conn.execute(
                sa.select(sa.cast(sa.cast(pg_index.c.indexrelid, postgresql.REGCLASS), sa.Text)).where(
                    pg_index.c.indrelid == sa.func.to_regclass(table), pg_index.c.indisvalid.is_(False))
            ).scalars().all()
            problems += [f"index {name} of {table} is invalid (a failed CREATE INDEX CONCURRENTLY?): "
                         "rebuild it with REINDEX" for name in invalid]
            if full:
                # The whole row as text: every page of the table and its TOAST read, and decoded.
                row: sa.ColumnElement[Any] = sa.literal_column(table)  # a name from TABLES, not user text
                conn.execute(sa.select(sa.func.count(sa.func.length(sa.cast(row, sa.Text)))).select_from(
                    sa.table(table)))
    if facts["revision"] is None:
        raise _no_tables(describe_url(url))
    return CheckReport(describe_url(url), checked, _with_head(facts), problems)


def _with_head(facts: dict[str, Any]) -> dict[str, Any]:
    """An older or newer schema is not damage: said beside the revision, for the operator."""
    if facts.get("revision") not in (None, HEAD_REVISION):
        facts["revision"] = f"{facts['revision']} (this dgxqueue's is {HEAD_REVISION}: see 'dgxqueue db upgrade')"
    return facts


def _file_of(url: str) -> Path | None:
    """The SQLite file of ``url``; None for a server. An in-memory SQLite database has nothing to keep."""
    path = sqlite_path(url)
    if path is None and profile_for(sa.engine.make_url(url)).is_file:
        raise SchemaError(f"{describe_url(url)} lives only in one process: nothing to check or vacuum")
    return path


def check_database(url: str, *, full: bool = False, settings: DatabaseSettings | None = None) -> CheckReport:
    """Check the database at ``url`` (what is checked: the module docstring and the report's
    ``checked``). A damaged SQLite file is a report with problems, not an error; a database that
    cannot be reached raises as any access does."""
    settings = settings or DatabaseSettings()
    path = _file_of(url)
    if path is not None:
        return _check_sqlite(path, full, settings)
    return _check_postgres(url, full, settings)


def _sqlite_bytes(path: Path) -> int:
    return _file_size(path) + _file_size(_wal(path))


#: How long ``db vacuum`` keeps trying to fold the write-ahead log back into the file.
CHECKPOINT_SECONDS = 30.0


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` until no reader holds it back, for up to
    :data:`CHECKPOINT_SECONDS`: until it completes, the VACUUM's new pages sit in the log and the
    file keeps its old size. A daemon's reads are short, but one may start at any moment; each
    try already waits the busy timeout for the readers present."""
    deadline = time.monotonic() + CHECKPOINT_SECONDS
    pause = 0.05
    while True:
        busy, log_frames, done_frames = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy or time.monotonic() + pause > deadline:
            return busy, log_frames, done_frames
        threading.Event().wait(pause)  # a retry's pause: nothing signals a reader's end
        pause = min(2 * pause, 1.0)


def _sqlite_temp_dir() -> str:
    """The folder where SQLite's unix VFS puts its temporary files (VACUUM's copy of the database):
    the first writable folder of these, as os_unix.c's unixTempFileDir looks."""
    # Only named in a message, never written to here (S108).
    fixed = ("/var/tmp", "/usr/tmp", "/tmp")  # noqa: S108
    for folder in (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"), *fixed):
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            return folder
    return "."


def _vacuum_full(path: Path) -> OSError:
    """A full disk during VACUUM: not the database being unavailable (the daemons go on), but
    a folder without room, often the temporary one, which is not the database's disk."""
    return OSError(errno.ENOSPC, (
        f"VACUUM ran out of disk space (the file is unharmed): it needs free space about the database's size "
        f"({_file_size(path)} bytes) both in SQLite's temporary folder {_sqlite_temp_dir()} and beside the "
        f"database in {path.absolute().parent} (SQLITE_TMPDIR names another temporary folder)"))


def _vacuum_sqlite(path: Path, min_free: float, settings: DatabaseSettings) -> VacuumReport:
    where = str(path.absolute())
    if not path.is_file():
        raise SchemaError(f"no database file at {where}")
    before = _sqlite_bytes(path)
    # Autocommit (VACUUM cannot run in a transaction); the busy timeout lets it wait for a
    # daemon's write in progress instead of failing at once.
    conn = sqlite3.connect(path, timeout=settings.sqlite_busy_timeout_ms / 1000, isolation_level=None)
    try:
        # Not another program's file (nor an empty one, which a VACUUM would make a database).
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone() is None:
            raise _no_tables(where)
        pages, free = (conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "freelist_count"))
        facts: dict[str, Any] = {"pages_before": pages, "free_pages_before": free}
        if pages and free / pages < min_free:
            return VacuumReport(where, before, before, [], skipped=(
                f"{free} of {pages} pages free ({free / pages:.1%}), under --min-free {min_free:.0%}"), facts=facts)
        done = []
        started = time.monotonic()
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'generations_search'").fetchone():
            # FTS5 keeps a deleted row's entries (as tombstones) until its segments merge: after a
            # large prune most of the index. 'optimize' merges them all, dropping those entries
            # (0.3 s for 300,000 prompts), so the VACUUM below gives their pages back too.
            conn.execute("INSERT INTO generations_search(generations_search) VALUES ('optimize')")
            done.append("search index: FTS5 'optimize'")
        try:
            conn.execute("VACUUM")
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_FULL:
                raise
            raise _vacuum_full(path) from exc
        facts["vacuum_seconds"] = round(time.monotonic() - started, 3)
        busy, log_frames, done_frames = _checkpoint(conn)
        done += ["VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"]
        if busy:  # readers kept old snapshots throughout: a later checkpoint folds the log in
            done[-1] += f" (not truncated: readers active; {done_frames} of {log_frames} frames copied)"
        facts["pages_after"], facts["free_pages_after"] = (
            conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "freelist_count"))
    finally:
        conn.close()
    return VacuumReport(where, before, _sqlite_bytes(path), done, facts=facts)


_TOTAL_SIZE = sa.func.coalesce(sa.func.pg_total_relation_size(sa.func.to_regclass(sa.bindparam("table"))), 0)


#: How long ``db vacuum`` waits for a lock on a table by default: another session's open
#: transaction that locked or altered the table would otherwise keep it waiting for ever.
DEFAULT_LOCK_TIMEOUT = 10.0
#: The longest lock timeout taken (a day; PostgreSQL's own limit is about 24 days).
MAX_LOCK_TIMEOUT = 86400.0
#: Lock not available: PostgreSQL's lock_timeout ran out.
_LOCK_NOT_AVAILABLE = "55P03"
#: The other sessions holding a lock on the table, as the server knows them.
_HOLDERS = sa.text(
    "SELECT DISTINCT l.pid, l.mode, a.state FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'relation' AND l.relation = to_regclass(:table) AND l.granted "
    "AND l.pid <> pg_backend_pid() ORDER BY l.pid, l.mode")


def _holders(conn: sa.Connection, table: str) -> list[str]:
    """Who holds a lock on ``table`` now, in words (pid, mode and, where visible, state)."""
    return [f"pid {pid} holds {mode}" + (f" ({state})" if state else "")
            for pid, mode, state in conn.execute(_HOLDERS, {"table": table})]


def _vacuum_postgres(url: str, settings: DatabaseSettings, lock_timeout: float) -> VacuumReport:
    with _server(url, settings) as engine, engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # VACUUM refuses a transaction
        if conn.execute(sa.select(sa.func.to_regclass("alembic_version"))).scalar_one() is None:
            raise _no_tables(describe_url(url))
        # For this session only: the sizes' reads and each VACUUM give up instead of waiting.
        conn.execute(sa.select(sa.func.set_config("lock_timeout", f"{max(1, round(lock_timeout * 1000))}ms", False)))
        done: list[str] = []
        waiting_on = TABLES[0]

        def size() -> int:
            nonlocal waiting_on
            total = 0
            for table in TABLES:
                waiting_on = table
                total += int(conn.execute(sa.select(_TOTAL_SIZE), {"table": table}).scalar_one())
            return total

        try:
            before = size()
            for table in TABLES:  # names from TABLES, quoted by the dialect: no user text
                waiting_on = table
                statement = f"VACUUM (ANALYZE) {conn.dialect.identifier_preparer.quote(table)}"
                conn.exec_driver_sql(statement)
                done.append(statement)
            return VacuumReport(describe_url(url), before, size(), done)
        except sa.exc.DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            raise LockTimeoutError(waiting_on, lock_timeout, _holders(conn, waiting_on), done) from None


def vacuum_database(url: str, *, min_free: float = 0.0, settings: DatabaseSettings | None = None,
                    lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> VacuumReport:
    """Give back the space deleted rows left (the module docstring says how, per engine).

    ``min_free``: on SQLite, vacuum only when at least this share of the file's pages are free
    (0 to 1; 0: always); PostgreSQL's VACUUM costs little and always runs. ``lock_timeout``
    (PostgreSQL; seconds): how long to wait for a lock on a table another session holds before
    :class:`~dgxqueue.errors.LockTimeoutError` (SQLite waits its busy timeout)."""
    if not 0 < lock_timeout <= MAX_LOCK_TIMEOUT:  # also false for nan
        raise ValidationError("lock_timeout", lock_timeout, f"seconds above 0, at most {MAX_LOCK_TIMEOUT:g}")
    settings = settings or DatabaseSettings()
    path = _file_of(url)
    if path is not None:
        return _vacuum_sqlite(path, min_free, settings)
    return _vacuum_postgres(url, settings, lock_timeout)
