"""Engines, sessions and schema set-up (``init_db``).

One engine per database URL per process, configured by its engine's profile
(:mod:`~dgxqueue.storage.engines`: SQLite's pragmas, PostgreSQL's pool). ``init_db`` leaves any
database at the newest migration, refusing one that is newer than this code.

Who may create a database is decided in one place, :func:`open_queue`: migrations and ``demo``
always; a producer only at the built-in default location; the worker never. So a mistyped
``DATABASE_URL`` is reported (:class:`~dgxqueue.errors.SchemaError`) instead of becoming a second,
empty queue.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from dgxqueue.config import DEFAULT_DATABASE_URL, DatabaseSettings
from dgxqueue.errors import ConfigError, SchemaError
from dgxqueue.storage.engines import BACKENDS, profile_for, profile_of

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

_engines: dict[tuple[str, DatabaseSettings], Engine] = {}
_engines_lock = threading.Lock()


def resolve_url(url: str | None = None) -> str:
    """``url`` if given, else ``$DATABASE_URL``, else ``sqlite:///data/generations.db``."""
    return url or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


_URL_RULE = "an SQLAlchemy URL such as sqlite:///data/generations.db or postgresql://user@host:5432/dbname"


# libpq takes a password in the query too (``?password=...``); SQLAlchemy's hide_password does not hide it.
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)


def hide_password(url: str) -> str:
    """``url`` with its password replaced by ``***``, even when the URL does not parse."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    head, at, host = url.rpartition("@")
    if not at:
        return url
    scheme, sep, userinfo = head.partition("://")  # the first: a password may hold '://' itself
    if not sep:
        scheme, userinfo = "", head
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}{sep}{user}{colon}{'***' if colon else ''}@{host}"


_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg")


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError("database.url", hide_password(url), _URL_RULE) from None
    if parsed.get_backend_name() not in BACKENDS:
        raise ConfigError("database.url", hide_password(url), "a sqlite:/// or postgresql:// URL")
    if parsed.host is not None and "@" in parsed.host:
        # An '@' left in the password: the rest of the password would be taken for the host name,
        # and shown as such (hidden passwords, driver errors) in every message.
        raise ConfigError("database.url", hide_password(url),
                          "a URL whose user name and password write '@' as %40 (and ':' as %3A, '/' as %2F)")
    profile = profile_for(parsed)
    parsed = parsed.set(drivername=profile.driver_name(parsed.drivername))
    if problem := profile.url_problem(parsed.query):
        raise ConfigError("database.url", hide_password(url), problem)
    if parsed.drivername not in _DRIVERS:  # the waker and the row loaders are psycopg 3's
        raise ConfigError("database.url", hide_password(url),
                          "a URL for a supported driver: " + ", ".join(f"{d}://" for d in _DRIVERS))
    return parsed


def describe_url(url: str) -> str:
    """Where ``url`` points, for messages: the absolute SQLite path, or the server and database
    with the password hidden."""
    parsed = _parse(url)
    if profile_for(parsed).is_file:
        path = sqlite_path(url)
        return str(path.absolute()) if path is not None else "an in-memory SQLite database"
    shown = parsed.set(drivername="postgresql", port=parsed.port or 5432)
    return _QUERY_PASSWORD.sub(r"\1***", shown.render_as_string(hide_password=True))


def display_url(url: str) -> str:
    """``url`` as settings show it: its password hidden, in the user part and in the query."""
    _parse(url)  # a URL that does not parse is a config error
    return _QUERY_PASSWORD.sub(r"\1***", make_url(url).render_as_string(hide_password=True))


def check_driver(url: str) -> None:
    """Raise :class:`ConfigError` when the driver ``url`` needs is not installed."""
    if profile_for(_parse(url)).is_file:
        return
    try:
        import psycopg  # noqa: F401  (only whether it imports)
    except ImportError as exc:
        raise ConfigError(
            "database.url", hide_password(url),
            f"a database whose driver is installed: PostgreSQL needs pip install 'dgxqueue[postgres]' ({exc})",
        ) from None


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL (None for in-memory or another engine)."""
    parsed = _parse(url)
    if not profile_for(parsed).is_file or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def create_engine(url: str | None = None, settings: DatabaseSettings | None = None) -> Engine:
    """A new engine for ``url`` with its engine's per-connection settings applied."""
    settings = settings or DatabaseSettings()
    text_url = resolve_url(url)
    parsed = _parse(text_url)
    check_driver(text_url)  # otherwise SQLAlchemy's first connect fails with a bare ImportError
    profile = profile_for(parsed)
    engine = sa.create_engine(parsed, **profile.engine_options(settings))
    profile.configure(engine, settings)
    return engine


def get_engine(url: str | None = None, settings: DatabaseSettings | None = None) -> Engine:
    """The process-wide engine for ``url`` (created on first use)."""
    key = (resolve_url(url), settings or DatabaseSettings())
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = create_engine(key[0], key[1])
        return engine


def dispose_engines() -> None:
    """Close every cached engine (tests, and after fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _session_factories.clear()


_session_factories: dict[Engine, sessionmaker[Session]] = {}


def _session_factory(engine: Engine) -> sessionmaker[Session]:
    # A sessionmaker builds a Session subclass and its event dispatch: once per engine, not per call.
    factory = _session_factories.get(engine)
    if factory is None:
        factory = _session_factories[engine] = sessionmaker(engine, expire_on_commit=False)
    return factory


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    with _session_factory(engine)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextlib.contextmanager
def get_session(url: str | None = None) -> Iterator[Session]:
    """The specification's ``get_session()``: commit on success, roll back on error."""
    with session_scope(get_engine(url)) as session:
        yield session


# --- migrations ----------------------------------------------------------------------------


def migrations_dir() -> Path:
    """The alembic scripts: inside the installed wheel, or ``alembic/`` in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_alembic", here.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(f"alembic migrations not found next to {here}")


def alembic_config(url: str | None = None, connection: sa.Connection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = resolve_url(url)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


#: The newest migration. Checked against alembic's script directory by the migration tests, so
#: that a daemon whose database is already at head never loads alembic (and never holds its memory).
HEAD_REVISION = "007"


def stored_revision(connection: sa.Connection) -> str | None:
    """``alembic_version.version_num`` by plain SQL, None when the table does not exist yet."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    version = sa.table("alembic_version", sa.column("version_num", sa.Text))
    return connection.execute(sa.select(version.c.version_num)).scalar_one_or_none()


@functools.cache
def migration_scripts() -> ScriptDirectory:
    """alembic's script directory, read once per process: its revision map loads every migration
    script, which each check of the head and of known revisions did again (the scripts are part of
    the installed package, as :data:`HEAD_REVISION` is)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def known_revisions() -> set[str]:
    """Every revision id among the migration scripts."""
    return {script.revision for script in migration_scripts().walk_revisions()}


def head_revision() -> str:
    head = migration_scripts().get_current_head()
    assert head is not None
    return head


def current_revision(connection: sa.Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _migration_lock(engine: Engine) -> contextlib.AbstractContextManager[None]:
    """One migrator at a time (the engine's own lock)."""
    path = sqlite_path(str(engine.url))
    return profile_of(engine.dialect).migration_lock(engine, None if path is None else str(path))


def _make_sqlite_folder(engine: Engine) -> None:
    path = sqlite_path(str(engine.url))
    if path is not None:  # creating the database creates its folder; nothing else does
        path.parent.mkdir(parents=True, exist_ok=True)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to ``revision`` under the migration lock: concurrent migrators on PostgreSQL
    otherwise race on the same CREATE statements."""
    from alembic import command

    _make_sqlite_folder(engine)
    with _migration_lock(engine), engine.begin() as conn:
        command.upgrade(alembic_config(str(engine.url), conn), revision)


def downgrade_losses(engine: Engine, revision: str) -> list[str]:
    """The migrations a downgrade to ``revision`` would undo whose undoing drops tables or columns,
    and the data in them (read from each script's ``downgrade``: ``drop_table``, ``drop_column``).

    ``revision``: an id such as ``001``, ``base`` (before the first), or ``-N`` steps back. An id
    that is not below the current one undoes nothing here; alembic reports it.
    """
    import inspect

    scripts = migration_scripts()
    with engine.connect() as conn:
        current = current_revision(conn)
    chain = []
    while current is not None:
        script = scripts.get_revision(current)
        if script is None:
            break
        chain.append(script)
        current = script.down_revision if isinstance(script.down_revision, str) else None
    if revision == "base":
        undone = chain
    elif revision.startswith("-") and revision[1:].isdigit():
        undone = chain[: int(revision[1:])]
    else:
        ids = [script.revision for script in chain]
        undone = chain[: ids.index(revision)] if revision in ids else []
    return [script.revision for script in undone
            if any(word in inspect.getsource(script.module.downgrade) for word in ("drop_table", "drop_column"))]


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with _migration_lock(engine), engine.begin() as conn:
        command.downgrade(alembic_config(str(engine.url), conn), revision)


#: The columns of the specification's ``generations`` table (migration 001), which a database made
#: by the original schema script has and which dgxqueue adopts.
_SPEC_COLUMNS = ("id", "prompt", "model_name", "model_version", "duration_seconds", "sample_rate", "channels",
                 "file_path", "file_size_bytes", "status", "created_at", "completed_at",
                 "generation_time_seconds", "error_message", "metadata")


def ensure_schema(engine: Engine) -> str:
    """Bring the database to head; refuse one newer than this code. Returns the revision."""
    _make_sqlite_folder(engine)
    path = sqlite_path(str(engine.url))
    if path is None or path.exists():  # a new SQLite file: its first connection switches it to WAL,
        with engine.connect() as conn:  # which races other first connections; take the lock below
            if stored_revision(conn) == HEAD_REVISION:
                return HEAD_REVISION
    from alembic import command

    head = head_revision()
    with _migration_lock(engine), engine.begin() as conn:
        current = current_revision(conn)
        if current == head:
            return head
        config = alembic_config(str(engine.url), conn)
        if current is not None and current not in known_revisions():
            raise SchemaError(
                f"the database is at schema revision {current!r}, which this dgxqueue does not know "
                f"(its newest is {head!r}): it was migrated by a newer dgxqueue; upgrade dgxqueue"
            )
        if current is None and sa.inspect(conn).has_table("generations"):
            # A database made by the original schema script: adopt it as revision 001. Another
            # application's table of that name is refused before anything is written to it.
            columns = {column["name"] for column in sa.inspect(conn).get_columns("generations")}
            missing = [name for name in _SPEC_COLUMNS if name not in columns]
            if missing:
                raise SchemaError(
                    f"the database at {describe_url(str(engine.url))} has a table 'generations' that is not "
                    f"dgxqueue's (no column {', '.join(missing)}): check DATABASE_URL or database.url")
            command.stamp(config, "001")
        command.upgrade(config, "head")
    return head


def init_db(url: str | None = None) -> Engine:
    """The specification's ``init_db()``: create or upgrade the database to the newest schema."""
    engine = get_engine(url)
    ensure_schema(engine)
    return engine


CreatePolicy = Literal["always", "default", "never"]


def peek_sqlite(path: Path, where: str, settings: DatabaseSettings) -> tuple[str | None, bool]:
    """The revision of the SQLite file at ``path`` and whether it has dgxqueue's tables, read
    without the engine: its first connection switches the file to WAL for good, which must not
    happen to another application's database that a mistyped URL points at."""
    if path.is_dir():
        raise SchemaError(f"the database path {where} is a folder, not a SQLite file (check DATABASE_URL "
                          "or database.url)")
    try:
        conn = sqlite3.connect(path, timeout=settings.sqlite_busy_timeout_ms / 1000)
    except sqlite3.Error as exc:
        raise SchemaError(f"cannot open the database at {where}: {exc}") from None
    try:
        names = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('alembic_version', 'generations')")}
        current = None
        if "alembic_version" in names:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            current = row[0] if row is not None else None
        return current, bool(names)
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise  # unavailable for now, reported as such (69)
        raise SchemaError(f"cannot read the database at {where}: {exc} (check DATABASE_URL or database.url)"
                          ) from None
    finally:
        conn.close()


def open_queue(url: str | None = None, settings: DatabaseSettings | None = None, *,
               create: CreatePolicy) -> Engine:
    """The engine of a database at the newest schema, created or migrated only as ``create`` allows.

    ``"always"``: create or upgrade it (``init_db``, ``db upgrade``, ``demo``). ``"default"``, the
    producer's rule: only the built-in default location (``sqlite:///data/generations.db``) is
    created on first use. ``"never"``, the worker's rule. A database that may not be created or
    migrated and is missing, empty or at another revision raises :class:`SchemaError` naming its
    location and ``dgxqueue db upgrade``; nothing is written.
    """
    text_url = resolve_url(url)
    if create == "always" or (create == "default" and text_url == DEFAULT_DATABASE_URL):
        engine = get_engine(text_url, settings)
        ensure_schema(engine)
        return engine
    where = describe_url(text_url)
    path = sqlite_path(text_url)
    if path is None and profile_for(_parse(text_url)).is_file:
        # 'db upgrade creates them there' would be false: each process gets its own, empty one.
        raise SchemaError(f"{where} is empty in every process and shared with none: set DATABASE_URL "
                          "or database.url to a SQLite file (sqlite:///data/generations.db) or PostgreSQL")
    if path is not None and not path.exists():
        raise SchemaError(f"no database at {where} (check DATABASE_URL or database.url; "
                          "'dgxqueue db upgrade' creates it there)")
    if path is not None:
        current, has_tables = peek_sqlite(path, where, settings or DatabaseSettings())
        if current == HEAD_REVISION:
            return get_engine(text_url, settings)
    else:
        engine = get_engine(text_url, settings)
        with engine.connect() as conn:
            current = stored_revision(conn)
            if current == HEAD_REVISION:
                return engine
            has_tables = current is not None or sa.inspect(conn).has_table("generations")
    if not has_tables:
        raise SchemaError(f"the database at {where} has no dgxqueue tables (check DATABASE_URL or "
                          "database.url; 'dgxqueue db upgrade' creates them there)")
    if current is not None and current not in known_revisions():
        raise SchemaError(f"the database at {where} is at schema revision {current!r}, newer than this "
                          f"dgxqueue knows ({HEAD_REVISION!r}): upgrade dgxqueue")
    raise SchemaError(f"the database at {where} is at schema revision {current or 'none'}, this dgxqueue "
                      f"needs {HEAD_REVISION}: run 'dgxqueue db upgrade'")
