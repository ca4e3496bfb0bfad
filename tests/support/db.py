"""Real databases for tests: a temporary SQLite file, or a database of its own on the PostgreSQL server.

A database at head is a copy of a template migrated once: a SQLite file copied per test, and on
PostgreSQL ``CREATE DATABASE ... TEMPLATE``. The PostgreSQL template is named for a hash of the
migrations and the models, so a changed migration builds a new one, and it is built under an
advisory lock, so several pytest processes (xdist workers, other checkouts) starting at once build
it once. Migration tests still migrate from an empty database.

A PostgreSQL database a test has finished with is reset to a fresh clone's state and handed to the
next test under a new name, instead of being dropped and cloned again: a clone and a drop cost the
server about a quarter of a CPU-second, mostly in the kernel, a reset a twentieth
(``docs/results/2026-12-07-suite-time.md``). What the reset cannot put back exactly (a changed
schema, a setting, a prepared transaction, ...) is read from the catalogs, and such a database is
dropped instead.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql as psql

PG_ADMIN_URL = os.environ.get("DGXQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_ADMIN_DATABASE = sa.engine.make_url(PG_ADMIN_URL).database or "postgres"
#: Every database a test makes is named with this prefix (templates: ``dgxq_tpl_``).
TEST_DATABASE_PREFIX = "dgxq_t_"


def postgres_available() -> bool:
    try:
        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return True
    except sa.exc.OperationalError:
        return False


@functools.cache
def _postgres_answered() -> bool:
    """Asked once per process: a server that answered is not asked again before each test."""
    return postgres_available()


def require_postgres() -> None:
    """Skip without a server only outside CI; under CI a missing server is a failure."""
    if _postgres_answered():
        return
    _postgres_answered.cache_clear()  # it may come up later in the session
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL does not answer at {PG_ADMIN_URL}, and CI must run the PostgreSQL tests")
    pytest.skip(f"PostgreSQL does not answer at {PG_ADMIN_URL} (CI unset, so this may skip)")


def schema_fingerprint() -> str:
    """A hash of what decides the migrated schema: the alembic scripts and the models module."""
    from dgxqueue.storage import models
    from dgxqueue.storage.database import migrations_dir

    folder = migrations_dir()
    files = sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)
    digest = hashlib.sha256()
    for path in [*files, Path(models.__file__)]:
        name = path.relative_to(folder) if path.is_relative_to(folder) else Path(path.name)
        digest.update(f"{name}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _admin() -> sa.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def _database_url(name: str) -> str:
    return sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _migrate(url: str) -> None:
    """Bring ``url`` to head on an engine of its own (the tests' cached engines stay untouched)."""
    from dgxqueue.storage.database import create_engine, ensure_schema

    engine = create_engine(url)
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()


@functools.cache
def postgres_template() -> str:
    """The name of the migrated template database, built by the first process that needs it."""
    fingerprint = schema_fingerprint()
    name = f"dgxq_tpl_{fingerprint[:16]}"
    building = f"{name}_new"
    lock_key = int.from_bytes(bytes.fromhex(fingerprint[:16]), "big", signed=True)
    admin = _admin()
    try:
        with admin.connect() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_lock(lock_key)))
            try:
                exists = sa.text("SELECT 1 FROM pg_database WHERE datname = :name")
                if conn.execute(exists, {"name": name}).first() is None:
                    # Left by a builder that died: nobody else builds this template while we hold the lock.
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)'))
                    conn.execute(sa.text(f'CREATE DATABASE "{building}" TEMPLATE template0'))
                    _migrate(_database_url(building))
                    # Clones need a template nobody is connected to: refuse connections from now on.
                    conn.execute(sa.text(f'ALTER DATABASE "{building}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false'))
                    conn.execute(sa.text(f'ALTER DATABASE "{building}" RENAME TO "{name}"'))
            finally:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(lock_key)))
    finally:
        admin.dispose()
    return name


#: What a test could change in a database besides its rows, read from the catalogs: schemas,
#: relations, columns, constraints, indexes, triggers, functions, types, sequences, extensions,
#: policies, rules, statistics objects, publications, large objects, default privileges, the
#: database's settings and grants, prepared transactions and replication slots. A database whose
#: facts differ from a fresh clone's is dropped, never reused.
_FACTS = """
SELECT md5(string_agg(x, E'\\n' ORDER BY x)) FROM (
  SELECT concat_ws(' ', 'ns', nspname, nspowner::regrole, nspacl, obj_description(oid, 'pg_namespace'))
    FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
  UNION ALL
  SELECT concat_ws(' ', 'rel', c.oid::regclass, c.relkind, c.relpersistence, c.relowner::regrole, c.relacl,
                   c.reloptions, c.relrowsecurity, c.relforcerowsecurity, c.relreplident, c.relispartition,
                   pg_get_indexdef(c.oid), i.indisvalid, i.indisclustered, i.indisreplident)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_index i ON i.indexrelid = c.oid
   WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  UNION ALL
  SELECT concat_ws(' ', 'att', a.attrelid::regclass, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
                   a.attnotnull, a.attidentity, a.attgenerated, a.attisdropped, pg_get_expr(d.adbin, d.adrelid),
                   a.attstattarget, a.attcollation, a.attstorage, a.attcompression, a.attoptions, a.attacl)
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' AND a.attnum > 0
  UNION ALL
  SELECT concat_ws(' ', 'con', conrelid::regclass, contypid::regtype, conname, pg_get_constraintdef(oid), convalidated,
                   condeferrable, condeferred)
    FROM pg_constraint WHERE connamespace IN (SELECT oid FROM pg_namespace
                                              WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema')
  UNION ALL SELECT concat_ws(' ', 'trg', pg_get_triggerdef(oid), tgenabled) FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL
  SELECT concat_ws(' ', 'fn', p.oid::regprocedure, p.prokind, p.provolatile, md5(p.prosrc), p.proacl)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  UNION ALL
  SELECT concat_ws(' ', 'typ', t.oid::regtype, t.typtype,
                   (SELECT string_agg(enumlabel::text, ',' ORDER BY enumsortorder)
                    FROM pg_enum WHERE enumtypid = t.oid))
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
   WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  UNION ALL
  SELECT concat_ws(' ', 'seq', seqrelid::regclass, seqtypid::regtype, seqstart, seqincrement, seqmax, seqmin, seqcache,
                   seqcycle) FROM pg_sequence
  UNION ALL SELECT concat_ws(' ', 'ext', extname, extversion, extnamespace::regnamespace) FROM pg_extension
  UNION ALL SELECT concat_ws(' ', 'evt', evtname, evtevent, evtenabled) FROM pg_event_trigger
  UNION ALL SELECT concat_ws(' ', 'pol', polname, polrelid::regclass, pg_get_expr(polqual, polrelid)) FROM pg_policy
  UNION ALL
  SELECT concat_ws(' ', 'rule', r.rulename, r.ev_class::regclass) FROM pg_rewrite r
    JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' AND r.rulename <> '_RETURN'
  UNION ALL SELECT concat_ws(' ', 'stx', stxname) FROM pg_statistic_ext
  UNION ALL SELECT concat_ws(' ', 'pub', pubname) FROM pg_publication
  UNION ALL SELECT concat_ws(' ', 'lo', count(*)) FROM pg_largeobject_metadata
  UNION ALL
  SELECT concat_ws(' ', 'acl', defaclrole::regrole, defaclnamespace, defaclobjtype, defaclacl) FROM pg_default_acl
  UNION ALL
  SELECT concat_ws(' ', 'set', setrole, setconfig) FROM pg_db_role_setting
   WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
  UNION ALL
  SELECT concat_ws(' ', 'db', datallowconn, datconnlimit, datistemplate, datacl, datdba::regrole, encoding, datcollate,
                   datctype, dattablespace) FROM pg_database WHERE datname = current_database()
  UNION ALL SELECT concat_ws(' ', 'prep', gid) FROM pg_prepared_xacts WHERE database = current_database()
  UNION ALL SELECT concat_ws(' ', 'slot', slot_name) FROM pg_replication_slots WHERE database = current_database()
) AS facts(x)
"""
_TABLES = """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
             ORDER BY 1, 2"""


@dataclasses.dataclass
class _Pristine:
    """What a fresh clone of one template looks like, and the clones of it ready to be handed out."""

    facts: str
    rows: dict[tuple[str, str], str]  # (schema, table) -> its rows as JSON, for the tables holding any
    free: list[str] = dataclasses.field(default_factory=list)


#: By template: a fresh clone's facts and the databases given back in that state. Per process (each
#: xdist worker has its own), dropped when the process that built them exits.
_POOL: dict[str, _Pristine] = {}


def _new_name() -> str:
    """A database name no test has had: every database a test gets, or a reset one is renamed to."""
    return f"{TEST_DATABASE_PREFIX}{uuid.uuid4().hex[:16]}"


def _conninfo(name: str) -> str:
    return sa.engine.make_url(_database_url(name)).set(drivername="postgresql").render_as_string(hide_password=False)


def _connect(name: str) -> psycopg.Connection[Any]:
    return psycopg.connect(_conninfo(name), autocommit=True)


def _facts(conn: psycopg.Connection[Any]) -> str:
    found = conn.execute(_FACTS).fetchone()
    assert found is not None
    return str(found[0])


def _tables(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [(schema, table) for schema, table in conn.execute(_TABLES).fetchall()]


def _read_pristine(name: str) -> _Pristine:
    with _connect(name) as conn:
        facts = _facts(conn)
        rows = {}
        for schema, table in _tables(conn):
            found = conn.execute(psql.SQL("SELECT json_agg(t)::text FROM {} AS t").format(
                psql.Identifier(schema, table))).fetchone()
            if found is not None and found[0] is not None:
                rows[(schema, table)] = found[0]
    return _Pristine(facts, rows)


def _take(template: str) -> str:
    """A database that is a clone of ``template`` as it was made: one given back, or a new clone."""
    pristine = _POOL.get(template)
    if pristine is not None and pristine.free:
        return pristine.free.pop()
    name = _new_name()
    with _connect(PG_ADMIN_DATABASE) as admin:
        admin.execute(psql.SQL("CREATE DATABASE {} TEMPLATE {}").format(psql.Identifier(name),
                                                                         psql.Identifier(template)))
    if pristine is None:
        if not _POOL:
            atexit.register(_drop_pool, os.getpid())
        _POOL[template] = _read_pristine(name)
    return name


def _drop(admin: psycopg.Connection[Any], name: str) -> None:
    admin.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(name)))


def _give_back(template: str, name: str) -> None:
    """Put a database a test has finished with back into the state of a fresh clone, under a new
    name, or drop it when that cannot be done exactly (the test changed its schema or settings).
    The rename is what a drop would do to anything the test left running: its connections are
    ended, and one that reconnects finds no database of that name."""
    pristine = _POOL[template]
    fresh = _new_name()
    with _connect(PG_ADMIN_DATABASE) as admin:
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            # Waits (up to 5 s, as DROP DATABASE does) for the ended sessions to leave.
            admin.execute(psql.SQL("ALTER DATABASE {} RENAME TO {}").format(psql.Identifier(name),
                                                                             psql.Identifier(fresh)))
            with _connect(fresh) as conn:
                if _facts(conn) != pristine.facts:
                    if template != "template0":
                        raise _Changed
                    # An empty database the test migrated: its public schema made again as
                    # template0 has it; anything else it changed still stops the reuse below.
                    with conn.transaction():
                        conn.execute("DROP SCHEMA public CASCADE")
                        conn.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner")
                        conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
                        conn.execute("COMMENT ON SCHEMA public IS 'standard public schema'")
                    if _facts(conn) != pristine.facts:
                        raise _Changed
                tables = _tables(conn)
                with conn.transaction():
                    if tables:
                        conn.execute(psql.SQL("TRUNCATE {} RESTART IDENTITY").format(
                            psql.SQL(", ").join(psql.Identifier(*table) for table in tables)))
                    for (schema, table), rows in pristine.rows.items():
                        conn.execute(psql.SQL("INSERT INTO {0} SELECT * FROM json_populate_recordset(NULL::{0}, %s)")
                                     .format(psql.Identifier(schema, table)), (rows,))
                    # A fresh clone has no planner statistics: ANALYZE's, left, would steer a later test's plans.
                    conn.execute("DELETE FROM pg_statistic WHERE starelid IN (SELECT c.oid FROM pg_class c "
                                 "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT LIKE 'pg\\_%' "
                                 "AND n.nspname <> 'information_schema')")
                conn.execute("SELECT pg_stat_reset()")  # the tables' counters (dead rows, vacuums) start at zero
        except (_Changed, psycopg.Error):
            _drop(admin, name)
            _drop(admin, fresh)
            return
    pristine.free.append(fresh)


class _Changed(Exception):
    """The test changed what a reset cannot put back."""


def _drop_pool(owner: int) -> None:
    if os.getpid() != owner:  # a fork of the process that built them
        return
    with contextlib.suppress(psycopg.Error), _connect(PG_ADMIN_DATABASE) as admin:
        for pristine in _POOL.values():
            while pristine.free:
                _drop(admin, pristine.free.pop())


@contextlib.contextmanager
def postgres_database_url(*, at_head: bool = False, sql_ascii: bool = False) -> Iterator[str]:
    """A URL of a database of its own, empty or at head (cloned from the template), that nothing
    else uses while the test runs; any connection a test left open is ended afterwards, and the name
    is never used again. ``sql_ascii``: empty, encoded SQL_ASCII, never reused."""
    require_postgres()
    if sql_ascii:
        name = _new_name()
        with _connect(PG_ADMIN_DATABASE) as admin:
            admin.execute(psql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' "
                                   "LC_CTYPE 'C'").format(psql.Identifier(name)))
        try:
            yield _database_url(name)
        finally:
            with _connect(PG_ADMIN_DATABASE) as admin:
                _drop(admin, name)
        return
    template = postgres_template() if at_head else "template0"
    name = _take(template)
    try:
        yield _database_url(name)
    finally:
        _give_back(template, name)


@contextlib.contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections live in a fresh schema of their own in the admin database, dropped
    afterwards (the benchmarks' database: what they measured on from the start)."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    url = sa.engine.make_url(PG_ADMIN_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'generations.db'}"


def build_sqlite_template(folder: Path) -> Path:
    """A SQLite file at head in ``folder``, its write-ahead log folded in, ready to be copied."""
    _migrate(sqlite_url(folder))
    path = folder / "generations.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def sqlite_url_at_head(folder: Path, template: Path) -> str:
    """A SQLite URL in ``folder`` whose file is a copy of ``template``."""
    shutil.copyfile(template, folder / "generations.db")
    return sqlite_url(folder)
