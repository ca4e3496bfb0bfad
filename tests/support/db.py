"""Real databases for tests: a temporary SQLite file, or a database of its own on the PostgreSQL server.

A database at head is a copy of a template migrated once: a SQLite file copied per test, and on
PostgreSQL ``CREATE DATABASE ... TEMPLATE``. The PostgreSQL template is named for a hash of the
migrations and the models, so a changed migration builds a new one, and it is built under an
advisory lock, so several pytest processes (xdist workers, other checkouts) starting at once build
it once. Migration tests still migrate from an empty database.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get("DGXQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
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


@contextlib.contextmanager
def postgres_database_url(*, at_head: bool = False, sql_ascii: bool = False) -> Iterator[str]:
    """A URL of a new database of its own, empty or at head (cloned from the template); dropped
    afterwards, with any connection a test left open. ``sql_ascii``: empty, encoded SQL_ASCII."""
    require_postgres()
    template = postgres_template() if at_head else "template0"
    name = f"{TEST_DATABASE_PREFIX}{uuid.uuid4().hex[:16]}"
    encoding = " ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'" if sql_ascii else ""
    admin = _admin()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{encoding}'))
    try:
        yield _database_url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


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
