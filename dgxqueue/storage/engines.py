"""Every difference between the engines dgxqueue runs on, one profile per engine (SQLite, PostgreSQL).

A profile says how its engine connects (pragmas, loaders), locks a claim's rows, reads and
shifts the database's clock, notifies idle daemons, shapes a statement over many rows, commits
(autocommit, pipelining), upserts, estimates a table's rows and serialises migrations. Code
elsewhere asks a profile (:func:`profile_of`, cached per dialect) instead of testing an engine's name.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, Engine
from sqlalchemy.orm import Session

from dgxqueue.config import DatabaseSettings
from dgxqueue.errors import SchemaError
from dgxqueue.storage.rowvalues import read_time, register_postgresql_loaders

_MIGRATION_LOCK_KEY = 0x64677871  # "dgxq": PostgreSQL advisory lock held while migrating
#: Events a PostgreSQL completion payload holds at most, and the longest event (as JSON text)
#: it holds: a payload (``[{"id" : ..., "status" : ...}, ...]``) stays under NOTIFY's 8000 bytes.
EVENTS_PER_NOTIFY = 40
EVENT_MAX_BYTES = 190
_SQLITE_TIME = "%Y-%m-%d %H:%M:%f"  # %f: seconds with milliseconds; "000" makes microseconds
# The start of a time as SQLite stores it ('2025-11-07 10:00:00'): text that sorts as a time.
_TIME_TEXT: sa.ColumnElement[str] = sa.literal_column("'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*'")
# A time exactly as UTCDateTime stores it on SQLite: such text compares as the time it names.
_STORED_TIME: sa.ColumnElement[str] = sa.literal_column(
    "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]'")


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC, timezone-aware; a naive value is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A TIMESTAMP that always holds UTC and always comes back timezone-aware.

    SQLite has no time zones, so values are stored there as naive UTC text (which also sorts
    correctly as text); PostgreSQL stores ``timestamp with time zone``. Which one is the engine
    profile's :attr:`Profile.naive_times`.
    """

    impl = sa.TIMESTAMP(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name in _NAIVE_TIMES else value

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], datetime | None]:
        # Not the dialect's own parser, which raises on a value that is not a time: a row written
        # by plain SQL (an epoch number, 'tomorrow') would then stop every read that touches it.
        # Such a value comes back as rowvalues.Unreadable, its raw text (typed as a datetime for
        # the ORM's sake: code that computes with a time checks its type).
        return cast(Callable[[Any], "datetime | None"], read_time)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return cast("datetime | None", read_time(value))


class Profile:
    """What one engine does its own way. Leases and due-ness are read from one clock, the
    database's, never a daemon host's: a lease written on one host is judged by another host's
    rescuer, and a host's clock may be stepped."""

    name: ClassVar[str]
    #: One statement serves any number of rows (arrays or JSON bound whole); otherwise one
    #: statement per number of rows, built and compiled once each.
    any_count: ClassVar[bool]
    #: A single statement runs in autocommit and several are pipelined with their BEGIN and
    #: COMMIT, so that each call costs one round trip.
    one_round_trip: ClassVar[bool]
    #: What a transaction on a bare driver connection starts with, if anything.
    begin: ClassVar[str | None]
    #: Producers NOTIFY idle daemons, which LISTEN; otherwise daemons poll ``PRAGMA data_version``.
    waker: ClassVar[Literal["listen", "data_version"]]
    #: The daemon writes a batch's results in a transaction of their own behind the next render,
    #: instead of with the next claim (which on SQLite only added a commit).
    writes_behind: ClassVar[bool]
    #: The database is a file this host opens (no server, no user, no network).
    is_file: ClassVar[bool]
    #: Times are stored without a time zone, as naive UTC (:class:`UTCDateTime`).
    naive_times: ClassVar[bool]
    #: The largest value an INTEGER column holds (a copy refuses a row the target cannot hold).
    max_integer: ClassVar[int]

    def driver_name(self, drivername: str) -> str:
        """The SQLAlchemy driver a URL's scheme means here."""
        return drivername

    def url_problem(self, query: Mapping[str, str | tuple[str, ...]]) -> str | None:
        """What is wrong with a URL's query options for this engine's driver, if anything: said
        when the URL is read, not as a driver error at the first connection."""
        return None

    def now(self) -> sa.ColumnElement[datetime]:
        """The database's current time, as an SQL expression comparable with stored times."""
        raise NotImplementedError

    def later(self, seconds: sa.ColumnElement[float]) -> sa.ColumnElement[datetime]:
        """The database's current time plus ``seconds`` (an SQL number)."""
        raise NotImplementedError

    def stamp(self, column: sa.Column[Any]) -> sa.ColumnElement[datetime]:
        """The database's now for a new row's ``column`` (an INSERT's value), later than the one
        the same writer stamped just before it where the clock's resolution would make them
        equal: rows inserted one after another keep their order in a sort by ``column``."""
        return self.now()  # microseconds, and each statement of a batch reads the clock anew

    def comparable_time(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        """``column`` in a form that compares as the time it names."""
        return column

    def not_a_time(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        """``column`` holds something other than a time."""
        return sa.false()

    def stored_time(self, raw: str | int | float | bytes) -> sa.ColumnElement[Any]:
        """A time column's value as a row stored it and a raw read returned it (text, a number),
        as SQL that compares with the column in its stored order: a keyset cursor's edge."""
        return sa.literal(raw)

    def claimable(self, candidates: sa.Select[Any]) -> sa.Select[Any]:
        """The claim's candidate rows, locked as the engine allows concurrent claims."""
        return candidates

    def path_key(self, path: sa.ColumnElement[str]) -> sa.ColumnElement[Any]:
        """What the unique index on ``generations.file_path`` (migration 007) holds for ``path``:
        a lookup by path compares this to use the index."""
        return path

    def notify(self) -> sa.Select[Any] | None:
        """The statement that wakes daemons (binds ``channel`` and ``model``), if the engine has one."""
        return None

    def announce(self, write: sa.Update, channel: str) -> sa.Update | sa.Select[Any]:
        """``write`` (an UPDATE of ``generations`` returning ``id`` and maybe more), publishing each
        row it writes as ``{"id", "status"}`` on ``channel`` when it commits, where the engine has
        events; still returning what ``write`` returns (which must not include ``status``), so
        callers read it as they read ``write``."""
        return write

    def insert(self, table: sa.Table) -> Any:
        """An INSERT that takes ``on_conflict_do_update``."""
        raise NotImplementedError

    def unpooled_reader(self, engine: Engine) -> Any:
        """A DB-API connection of its own, outside ``engine``'s pool, whose reads never wait for
        a lock (where the engine has file locks): for a reader in an event loop, which neither a
        pool checkout nor a busy wait may block. The caller closes it."""
        raise NotImplementedError

    async def async_connection(self, engine: Engine) -> Any:
        """An asyncio driver connection (autocommit) to ``engine``'s database, outside its pool,
        reading values as the engine's connections do; where the driver has one."""
        raise NotImplementedError

    def prompt_matches(self, table: sa.Table, words: Sequence[str]) -> sa.ColumnElement[bool]:
        """``table``'s (``generations``) prompt has, for each of ``words`` (runs of letters and
        digits), a word that starts with it, through migration 006's index
        (:mod:`dgxqueue.storage.search` says the semantics)."""
        raise NotImplementedError

    def rows_of(self, columns: Sequence[sa.ColumnClause[Any]], n: int, name: str) -> sa.FromClause:
        """``n`` rows of ``columns`` given as bind values (see :meth:`rows_parameters`)."""
        raise NotImplementedError

    def rows_parameters(self, names: Sequence[str], rows: Sequence[Sequence[Any]],
                        json_names: Collection[str] = ()) -> dict[str, Any]:
        """The bind values of :meth:`rows_of` for ``rows`` (values in ``names`` order);
        ``json_names``: the columns of a JSON type among ``names``."""
        raise NotImplementedError

    def id_in(self, column: sa.ColumnElement[str], n: int) -> sa.ColumnElement[bool]:
        """``column`` is one of ``n`` ids bound by :meth:`ids_parameters`."""
        raise NotImplementedError

    def ids_parameters(self, ids: Sequence[str]) -> dict[str, Any]:
        raise NotImplementedError

    def configure(self, engine: Engine, settings: DatabaseSettings) -> None:
        """Apply the per-connection settings to a new engine."""

    def engine_options(self, settings: DatabaseSettings) -> dict[str, Any]:
        """``sa.create_engine``'s keyword arguments."""
        raise NotImplementedError

    def prepare_depth_read(self, session: Session) -> None:
        """Session settings for the queue-depth read (metrics)."""

    def prepare_page_read(self, session: Session) -> None:
        """Session settings for a read of the status page (``dgxqueue web``)."""

    def row_estimate(self, session: Session, table: sa.Table) -> float:
        """The engine's own estimate of ``table``'s rows, 0 when it keeps none."""
        return 0.0

    @contextlib.contextmanager
    def migration_lock(self, engine: Engine, path: str | None) -> Iterator[None]:
        """One migrator at a time (``path``: the database file, if it is one)."""
        yield

    def byte_order(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        """``column`` sorting text by its UTF-8 bytes, as every engine can: a copy's checksum reads
        both databases in the same order (SQLite's default collation already compares bytes)."""
        return column

    def follow_ids(self, session: Session, table: sa.Table) -> None:
        """Move the sequence that numbers ``table``'s integer primary key past its highest id, after
        rows were inserted with their ids (a copy). SQLite's AUTOINCREMENT follows by itself."""


class SQLiteProfile(Profile):
    name = "sqlite"
    any_count = False
    one_round_trip = False
    # Explicitly: Python's sqlite3 opens a transaction only before a statement that starts with
    # INSERT/UPDATE/DELETE, so a WITH ... UPDATE would commit on its own. IMMEDIATE takes the
    # write lock now, under the busy timeout, instead of failing with SQLITE_BUSY_SNAPSHOT when
    # a read turns into a write.
    begin = "BEGIN IMMEDIATE"
    waker = "data_version"
    writes_behind = False
    is_file = True
    naive_times = True
    max_integer = 2**63 - 1

    # SQLite (one host) reads the same clock as Python, in the text form UTCDateTime stores there
    # ('YYYY-MM-DD HH:MM:SS.ffffff', which sorts as text), so stored and computed times compare.
    def now(self) -> sa.ColumnElement[datetime]:
        return sa.type_coerce(sa.func.strftime(_SQLITE_TIME, "now", type_=sa.Text).concat("000"), UTCDateTime())

    def later(self, seconds: sa.ColumnElement[float]) -> sa.ColumnElement[datetime]:
        shift = sa.func.printf("%+.3f seconds", seconds, type_=sa.Text)
        return sa.type_coerce(sa.func.strftime(_SQLITE_TIME, "now", shift, type_=sa.Text).concat("000"),
                              UTCDateTime())

    def stamp(self, column: sa.Column[Any]) -> sa.ColumnElement[datetime]:
        # SQLite's clock counts milliseconds: a batch, or calls in a quick loop, got one time for
        # many rows, and sorted in no defined order. A row stamped within the millisecond of the
        # newest one already there (this writer's, as SQLite has one) takes the microsecond after
        # it (up to 999 to a millisecond; after those they share the last one).
        tick = sa.func.strftime(_SQLITE_TIME, "now", type_=sa.Text)
        # The newest row's microsecond digits, padded on the right: one written by plain SQL with
        # fewer than six fraction digits ('...06.8105' is .810500) was read as microsecond 5, and
        # the new row stamped before it. (Text that is no time at all stays unordered.)
        tail = sa.func.substr(sa.func.substr(sa.func.max(column), 24, 3).concat("000"), 1, 3)
        micros = sa.cast(tail, sa.Integer) + 1  # NULL: none yet
        stamped = (sa.select(tick.concat(sa.func.printf("%03d", sa.func.min(999, sa.func.coalesce(micros, 0)),
                                                        type_=sa.Text)))
                   .where(column >= tick.concat("000"), column <= tick.concat("999"))
                   .scalar_subquery())
        return sa.type_coerce(stamped, UTCDateTime())

    def comparable_time(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        """A row written by plain SQL may hold another ISO 8601 form ('2026-12-06T10:00:00+02:00',
        a 'Z'), whose text sorts by its separator and ignores its offset: it is rewritten as UTC in
        the stored form, by SQLite's own parser; text that parser cannot read stays as it is."""
        normal = sa.func.strftime(_SQLITE_TIME, column, type_=sa.Text).concat("000")
        stored: sa.ColumnElement[bool] = column.op("GLOB", is_comparison=True)(_STORED_TIME)
        return sa.type_coerce(sa.case((stored, column), else_=sa.func.coalesce(normal, column)), UTCDateTime())

    def not_a_time(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        """A row written by plain SQL can hold an epoch number or 'tomorrow', which compares with
        times as text or numbers do, meaningless; or text that starts as a time does but names
        none ('2026-13-45 99:99:99'), which SQLite's parser refuses and compared as text (a lease
        of '9999-99-99' held its job for ever)."""
        is_time: sa.ColumnElement[bool] = column.op("GLOB", is_comparison=True)(_TIME_TEXT)
        unparsed = sa.and_(column.is_not(None), sa.func.strftime(_SQLITE_TIME, column, type_=sa.Text).is_(None))
        return sa.or_(sa.not_(is_time), unparsed)

    def insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    def unpooled_reader(self, engine: Engine) -> Any:
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        # Busy timeout 0: a read that meets a lock (rare in WAL mode: a recovery, a checkpoint
        # that truncates) fails at once instead of sleeping on the caller's event loop.
        connect: Any = sqlite3.connect  # the dialect's arguments, typed loosely as it gives them
        connection = connect(*cargs, **{**cparams, "timeout": 0})
        try:
            connection.text_factory = _lenient_text
            connection.execute("PRAGMA query_only = ON")  # a reader: nothing it runs can write
        except BaseException:
            connection.close()
            raise
        return connection

    def prompt_matches(self, table: sa.Table, words: Sequence[str]) -> sa.ColumnElement[bool]:
        # Each word a quoted FTS5 string (a quote inside doubled) with a prefix star, all of them
        # required: no word is read as FTS5 syntax (AND, NEAR, a column filter), and the query
        # travels as one bound value (of a name of its own: the clause joins queries built elsewhere).
        query = " ".join('"' + word.replace('"', '""') + '"*' for word in words)
        rowid: sa.ColumnElement[int] = sa.literal_column(f"{table.name}.rowid", sa.Integer)
        return rowid.in_(sa.select(_FTS.c.rowid).where(
            _FTS.c.generations_search.op("MATCH", is_comparison=True)(sa.bindparam(None, query, type_=sa.Text))))

    def rows_of(self, columns: Sequence[sa.ColumnClause[Any]], n: int, name: str) -> sa.FromClause:
        # WITH name(...) AS (VALUES ...), one bind per value: SQLite has no AS name (id, ...).
        return sa.values(*columns, name=name).data(
            [tuple(sa.bindparam(f"o{i}_{column.name}", type_=column.type) for column in columns) for i in range(n)]
        ).cte(name)

    def rows_parameters(self, names: Sequence[str], rows: Sequence[Sequence[Any]],
                        json_names: Collection[str] = ()) -> dict[str, Any]:
        return dict(zip(_bind_names(tuple(names), len(rows)), itertools.chain.from_iterable(rows), strict=True))

    def id_in(self, column: sa.ColumnElement[str], n: int) -> sa.ColumnElement[bool]:
        return column.in_([sa.bindparam(f"id_{i}", type_=sa.Text) for i in range(n)])

    def ids_parameters(self, ids: Sequence[str]) -> dict[str, Any]:
        return {f"id_{i}": job_id for i, job_id in enumerate(ids)}

    def engine_options(self, settings: DatabaseSettings) -> dict[str, Any]:
        return {"connect_args": {"timeout": settings.sqlite_busy_timeout_ms / 1000}}

    def configure(self, engine: Engine, settings: DatabaseSettings) -> None:
        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Text that is not UTF-8 (stored by plain SQL, CAST(x'ff' AS TEXT)) reads with U+FFFD in
            # place of the bad bytes: the driver's default raises, on every read of the row.
            dbapi_connection.text_factory = _lenient_text
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(settings.sqlite_busy_timeout_ms)}")
            try:
                cursor.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                # A file this process may only read (a backup, which is not in WAL mode, on read-only
                # media) is still readable; a write to it fails on its own, naming the cause.
                if "readonly" not in str(exc):
                    raise
            # Validated against a fixed list in config: no user text reaches this statement.
            cursor.execute(f"PRAGMA synchronous = {settings.sqlite_synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
            # Negative: KiB, not pages. A daemon holds several connections, and with SQLite's default
            # cache on each its memory kept growing over its first jobs; claims touch a few pages.
            cursor.execute(f"PRAGMA cache_size = -{int(settings.sqlite_cache_kib)}")
            cursor.close()

    @contextlib.contextmanager
    def migration_lock(self, engine: Engine, path: str | None) -> Iterator[None]:
        """A file lock beside the database file."""
        if path is None:
            yield
            return
        with open(f"{path}.migrate-lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _require_utf8(connection: Any) -> None:
    """Refuse a PostgreSQL database whose encoding is not UTF8 (SQL_ASCII, LATIN1): prompts and
    error messages are any Unicode text, which such a database garbles or refuses mid-queue."""
    info = getattr(connection, "info", None)  # psycopg 3; psycopg2 has get_parameter_status
    status = getattr(info, "parameter_status", None) or getattr(connection, "get_parameter_status", None)
    encoding = status("server_encoding") if status is not None else None
    if encoding is not None and encoding.upper().replace("-", "") != "UTF8":
        raise SchemaError(f"the PostgreSQL database's encoding is {encoding}: dgxqueue needs a UTF8 one "
                          "(CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)")


@functools.lru_cache(maxsize=1024)
def _bind_names(names: tuple[str, ...], n: int) -> tuple[str, ...]:
    """The bind names of :meth:`SQLiteProfile.rows_of`'s ``n`` rows, row by row (made once per shape)."""
    return tuple(f"o{i}_{name}" for i in range(n) for name in names)


def _lenient_text(data: bytes) -> str:
    return str(data, encoding="utf-8", errors="replace")


class PostgreSQLProfile(Profile):
    name = "postgresql"
    any_count = True
    one_round_trip = True
    begin = None
    waker = "listen"
    writes_behind = True
    is_file = False
    naive_times = False
    max_integer = 2**31 - 1  # INTEGER is 4 bytes here

    def driver_name(self, drivername: str) -> str:
        return "postgresql+psycopg" if drivername == "postgresql" else drivername  # psycopg 3, not psycopg2

    def stored_time(self, raw: str | int | float | bytes) -> sa.ColumnElement[Any]:
        # Raw here is the text of a time Python cannot hold (infinity, a year past 9999).
        return sa.cast(sa.literal(str(raw)), postgresql.TIMESTAMP(timezone=True))

    def url_problem(self, query: Mapping[str, str | tuple[str, ...]]) -> str | None:
        try:
            from psycopg import ProgrammingError
            from psycopg.conninfo import make_conninfo
        except ImportError:  # no driver: check_driver says so
            return None
        options = {key: value[-1] if isinstance(value, tuple) else value for key, value in query.items()}
        try:
            make_conninfo("", **options)  # libpq's own parser: its list of options
        except ProgrammingError as exc:
            return f"a URL whose options libpq knows ({str(exc).strip()})"
        return None

    def now(self) -> sa.ColumnElement[datetime]:
        return sa.func.statement_timestamp(type_=UTCDateTime())

    def later(self, seconds: sa.ColumnElement[float]) -> sa.ColumnElement[datetime]:
        return sa.func.statement_timestamp(type_=UTCDateTime()) + sa.func.make_interval(
            0, 0, 0, 0, 0, 0, seconds, type_=sa.Interval())

    def claimable(self, candidates: sa.Select[Any]) -> sa.Select[Any]:
        return candidates.with_for_update(skip_locked=True)

    def path_key(self, path: sa.ColumnElement[str]) -> sa.ColumnElement[Any]:
        # A b-tree entry holds at most about 2,700 bytes and a path may have 4,095: the index is on md5.
        return sa.func.md5(path)

    def notify(self) -> sa.Select[Any] | None:
        return sa.select(sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text),
                                           sa.bindparam("model", type_=sa.Text)))

    def announce(self, write: sa.Update, channel: str) -> sa.Update | sa.Select[Any]:
        # One statement, so the daemon's autocommit finish stays one round trip; NOTIFY joins the
        # transaction the rows are written in. EVENTS_PER_NOTIFY events to a payload, and an event
        # longer than EVENT_MAX_BYTES (an id written by plain SQL) left out: a payload over the
        # server's 8000 bytes would fail the outcome's write itself.
        table = write.table
        done = write.returning(table.c.status).cte("done")
        event = sa.func.json_build_object(_sql_text("id"), done.c.id, _sql_text("status"), done.c.status,
                                          type_=postgresql.JSON)
        part = (sa.func.row_number().over() - 1) // sa.literal_column(str(EVENTS_PER_NOTIFY), sa.Integer)
        events = sa.select(event.label("event"), part.label("part")).where(
            sa.func.octet_length(sa.cast(event, sa.Text)) <= sa.literal_column(str(EVENT_MAX_BYTES), sa.Integer),
        ).subquery("events")
        sent = sa.select(
            sa.func.pg_notify(_sql_text(channel), sa.cast(sa.func.json_agg(events.c.event), sa.Text))
        ).group_by(events.c.part).cte("sent")
        # A CTE that reads is run only as far as something reads it: the count makes it run whole.
        published = sa.select(sa.func.count()).select_from(sent).scalar_subquery()
        # What ``write`` returns, without the status added above (reading write's own columns here
        # would memoize them on the cached statement, and the next copy would lose the status).
        return sa.select(*list(done.c)[:-1]).where(published >= sa.literal_column("0", sa.Integer))

    def insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    async def async_connection(self, engine: Engine) -> Any:
        import psycopg

        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # UTF-8 as engine_options() asks: a client_encoding the database, role or PGCLIENTENCODING
        # sets (LATIN1, SQL_ASCII) would refuse non-Latin text or read every text column as bytes.
        connection = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10,
                                                           client_encoding="utf8")
        register_postgresql_loaders(connection)  # as configure() does for the engine's connections
        return connection

    def prompt_matches(self, table: sa.Table, words: Sequence[str]) -> sa.ColumnElement[bool]:
        # The indexed expression as migration 006 wrote it, so the planner uses its GIN index.
        terms = sa.bindparam(None, list(words), type_=postgresql.ARRAY(sa.Text))  # a name of its own
        return sa.func.dgxqueue_prompt_words(table.c.prompt, type_=postgresql.TSVECTOR).op(
            "@@", is_comparison=True)(sa.func.dgxqueue_prompt_query(terms, type_=postgresql.TSQUERY))

    def rows_of(self, columns: Sequence[sa.ColumnClause[Any]], n: int, name: str) -> sa.FromClause:
        # The rows travel as one JSON document (jsonb_to_recordset), so the statement is the same
        # for any n and has one parameter: psycopg caches its parse of a query only up to a fixed
        # number of parameters, and dumping one array per column costs far more per row in
        # psycopg than one json.dumps of the batch.
        rows = sa.bindparam("rows", type_=postgresql.JSONB)
        if not any(_is_json(column) for column in columns):
            return sa.func.jsonb_to_recordset(rows).table_valued(*columns).render_derived(name=name, with_types=True)
        # A JSON column's value travels as its text (rows_parameters), which json keeps as
        # written, as the insert's does: read from the jsonb document it would come back
        # normalised (keys sorted, 1e20 an integer, -0.0 as 0.0).
        given = sa.func.jsonb_to_recordset(rows).table_valued(
            *(sa.column(column.name, sa.Text) if _is_json(column) else column for column in columns)
        ).render_derived(name=f"{name}_text", with_types=True)
        return sa.select(*(_json_of(given.c[column.name], column.type).label(column.name) if _is_json(column)
                           else given.c[column.name] for column in columns)).subquery(name)

    def rows_parameters(self, names: Sequence[str], rows: Sequence[Sequence[Any]],
                        json_names: Collection[str] = ()) -> dict[str, Any]:
        return {"rows": [{name: _json_text(value) if name in json_names else _as_json(value)
                          for name, value in zip(names, row, strict=True)} for row in rows]}

    def id_in(self, column: sa.ColumnElement[str], n: int) -> sa.ColumnElement[bool]:
        return column == sa.func.any(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text)))

    def ids_parameters(self, ids: Sequence[str]) -> dict[str, Any]:
        return {"ids": list(ids)}

    def engine_options(self, settings: DatabaseSettings) -> dict[str, Any]:
        # No pre-ping: it costs a round trip per transaction; a dead connection raises instead,
        # and the daemon's calls retry through tenacity (dgxqueue.daemon.queue_client).
        # client_encoding: a SQL_ASCII database would send bytes, which SQLAlchemy's first
        # connect cannot parse; in UTF-8 it gets far enough for the check below to name the fault.
        return {"pool_size": settings.pool_size, "pool_recycle": 3600,
                "connect_args": {"connect_timeout": 10,  # an unreachable host fails in 10 s
                                 "client_encoding": "utf8"}}

    def configure(self, engine: Engine, settings: DatabaseSettings) -> None:
        sa.event.listen(engine, "connect", lambda connection, _: _require_utf8(connection))
        if engine.dialect.driver == "psycopg":
            # A time Python cannot hold ('infinity', written by plain SQL) reads as its text, not an error.
            sa.event.listen(engine, "connect", lambda connection, _: register_postgresql_loaders(connection))

    def prepare_depth_read(self, session: Session) -> None:
        # The planner cannot tell how few rows the recursion yields, prices the query high and
        # would JIT-compile it: compiling costs far more than the read itself. A lock held
        # on the table (a migration) makes the read give up rather than wait with a connection.
        session.execute(sa.select(sa.func.set_config("jit", "off", True),
                                  sa.func.set_config("statement_timeout", "5s", True)))

    def prepare_page_read(self, session: Session) -> None:
        # A lock held on a table (a migration, VACUUM FULL) makes the read give up (503) rather
        # than wait with a connection: the pages poll every 1.5 s, and waiting reads would hold
        # every connection of the pool, so that nothing else is answered until the lock goes.
        session.execute(sa.select(sa.func.set_config("lock_timeout", "2s", True)))

    def row_estimate(self, session: Session, table: sa.Table) -> float:
        """The planner's estimate (pg_class scaled to the table's current size; 0 before ANALYZE)."""
        pg_class = sa.table("pg_class", sa.column("oid"), sa.column("reltuples"), sa.column("relpages"))
        pages_now = sa.func.pg_relation_size(pg_class.c.oid) / sa.cast(
            sa.func.current_setting("block_size"), sa.Integer
        )
        estimate = sa.case(
            (sa.and_(pg_class.c.reltuples > 0, pg_class.c.relpages > 0),
             pg_class.c.reltuples / pg_class.c.relpages * pages_now),
            else_=0,
        )
        oid = sa.cast(sa.literal(table.name), postgresql.REGCLASS)
        value = session.execute(sa.select(estimate).where(pg_class.c.oid == oid)).scalar_one_or_none()
        return float(value or 0)

    def byte_order(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        # The "C" collation compares bytes; the database's default (en_US.UTF-8) does not.
        return column.collate("C") if isinstance(column.type, sa.String) else column

    def follow_ids(self, session: Session, table: sa.Table) -> None:
        (column,) = table.primary_key.columns
        sequence = sa.func.pg_get_serial_sequence(sa.literal(table.name), sa.literal(column.name), type_=sa.Text)
        last = sa.func.pg_sequence_last_value(sa.cast(sequence, postgresql.REGCLASS))
        session.execute(sa.select(sa.func.setval(sequence, sa.func.max(column))).select_from(table)
                        .having(sa.func.max(column) > sa.func.coalesce(last, 0)))

    @contextlib.contextmanager
    def migration_lock(self, engine: Engine, path: str | None) -> Iterator[None]:
        """An advisory lock: concurrent migrators otherwise race on the same CREATE statements."""
        with engine.connect() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_lock(_MIGRATION_LOCK_KEY)))
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(_MIGRATION_LOCK_KEY)))
                conn.commit()


#: Migration 006's FTS5 table (its hidden column of the table's own name takes MATCH).
_FTS = sa.table("generations_search", sa.column("rowid", sa.Integer), sa.column("generations_search", sa.Text))


def _is_json(column: sa.ColumnClause[Any]) -> bool:
    return isinstance(getattr(column.type, "impl_instance", column.type), sa.JSON)


def _json_of(text: sa.ColumnElement[Any], type_: sa.types.TypeEngine[Any]) -> sa.ColumnElement[Any]:
    """JSON text as the column's json, kept as written; refused where the insert's jsonb document
    refused it (a NUL, which json takes but no jsonb or text can hold)."""
    return sa.case((sa.cast(text, postgresql.JSONB).is_(None), sa.null()), else_=sa.cast(text, type_))


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _sql_text(constant: str) -> sa.ColumnElement[str]:
    """A constant of our own (a channel, a JSON key) as an SQL string literal, not a parameter."""
    return sa.literal_column("'" + constant.replace("'", "''") + "'", sa.Text)


def _as_json(value: Any) -> Any:
    """A column value as ``jsonb_to_recordset`` reads it: times as ISO 8601 in UTC."""
    return as_utc(value).isoformat() if isinstance(value, datetime) else value


_PROFILES: dict[str, Profile] = {profile.name: profile for profile in (SQLiteProfile(), PostgreSQLProfile())}
#: The backends a URL may name.
BACKENDS = tuple(_PROFILES)
#: The engines whose profile stores naive times: a set by name, as cheap per bind as testing
#: the name; a dialect without a profile (compiling for display) binds aware times.
_NAIVE_TIMES = frozenset(name for name, profile in _PROFILES.items() if profile.naive_times)


@functools.cache
def profile_of(dialect: Dialect) -> Profile:
    """The profile of ``dialect``'s engine (looked up once per dialect)."""
    return _PROFILES[dialect.name]


def profile_for(url: URL) -> Profile:
    """The profile of the engine a parsed URL names."""
    return _PROFILES[url.get_backend_name()]
