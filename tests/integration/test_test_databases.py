"""The tests' own PostgreSQL databases (``tests/support/db.py``): a database handed to a test after
another test used it is indistinguishable from a fresh clone of its template, and one the reset
cannot put back exactly is dropped, not handed out."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from tests.support import db


def _conn(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                           autocommit=True)


def _name(url: str) -> str:
    return str(sa.engine.make_url(url).database)


def _exists(name: str) -> bool:
    with db._connect(db.PG_ADMIN_DATABASE) as admin:
        return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _state(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[object, ...]:
    return (conn.execute("SELECT version_num FROM alembic_version").fetchall(),
            conn.execute("SELECT count(*) FROM generations").fetchone(),
            conn.execute("SELECT count(*) FROM prompts").fetchone(),
            conn.execute("SELECT count(*) FROM pg_statistic s JOIN pg_class c ON c.oid = s.starelid "
                         "WHERE c.relname = 'prompts'").fetchone(),
            conn.execute("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'prompts'").fetchone(),
            conn.execute("SELECT relpages, reltuples FROM pg_class WHERE relname = 'prompts'").fetchone())


def test_test_database__reused_at_head_reads_as_a_fresh_clone() -> None:
    """Rows, a sequence's position, planner statistics and table counters a test left are gone;
    the template's own rows (alembic_version) are back; a session the test left open is ended and
    the old name no longer exists, so it cannot reconnect into the next test's database."""
    db.require_postgres()
    with db.postgres_database_url(at_head=True) as first, _conn(first) as conn:
        fresh = _state(conn)
        conn.execute("INSERT INTO prompts (text, first_used_at, last_used_at) "
                     "SELECT 'p' || g, now(), now() FROM generate_series(1, 500) AS g")
        conn.execute("ANALYZE prompts")
        conn.execute("UPDATE alembic_version SET version_num = '001'")
        left_open = _conn(first)
        left_open.execute("SELECT 1")
    free = db._POOL[db.postgres_template()].free
    assert free, "the database went back to the pool"
    with db.postgres_database_url(at_head=True) as second, _conn(second) as conn:
        assert _name(second) != _name(first) and not _exists(_name(first))
        assert _state(conn) == fresh
        assert conn.execute("INSERT INTO prompts (text, first_used_at, last_used_at) VALUES ('x', now(), now()) "
                            "RETURNING id").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        left_open.execute("SELECT 1")


@pytest.mark.parametrize("change", [
    "ALTER TABLE generations ADD COLUMN extra integer",
    "CREATE INDEX extra_idx ON prompts (used_count)",
    "CREATE TABLE extra (id integer)",
    "ALTER SEQUENCE prompts_id_seq INCREMENT BY 5",
    "CREATE FUNCTION extra() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
    "ALTER DATABASE {db} SET statement_timeout = '1s'",
])
def test_test_database__a_change_no_reset_puts_back_is_dropped(change: str) -> None:
    db.require_postgres()
    with db.postgres_database_url(at_head=True) as url, _conn(url) as conn:
        name = _name(url)
        conn.execute(change.format(db=name))
        pooled = list(db._POOL[db.postgres_template()].free)
    assert db._POOL[db.postgres_template()].free == pooled, "nothing went back to the pool"
    assert not _exists(name)


def test_test_database__an_empty_one_a_test_migrated_comes_back_empty() -> None:
    """An empty database (a clone of template0) that a test migrated goes back with its public
    schema as template0 has it: no table, the same owner, grants and comment."""
    db.require_postgres()
    with db.postgres_database_url() as url, _conn(url) as conn:
        fresh = db._facts(conn)
        db._migrate(url)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() != (0,)
    with db.postgres_database_url() as url, _conn(url) as conn:
        assert db._facts(conn) == fresh
        assert conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE n.nspname = 'public'").fetchone() == (0,)
