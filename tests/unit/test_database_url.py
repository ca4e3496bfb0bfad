"""Database URLs: which engines are accepted, how they are normalised, and the in-memory case."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgxqueue.errors import ConfigError
from dgxqueue.storage import create_engine, create_generation, get_database_stats, init_db, session_scope
from dgxqueue.storage.database import dispose_engines, resolve_url, sqlite_path


@pytest.mark.parametrize("url", ["not a url", "mysql://user@host/db", "://nothing"])
def test_create_engine__refuses_other_urls(url: str) -> None:
    """A URL that is not SQLite or PostgreSQL raises ConfigError on database.url saying what is allowed."""
    with pytest.raises(ConfigError) as caught:
        create_engine(url)
    assert caught.value.key == "database.url" and "sqlite:///" in caught.value.allowed


def test_create_engine__postgresql_means_psycopg3() -> None:
    """A plain postgresql:// URL is driven by psycopg 3, not psycopg2."""
    engine = create_engine("postgresql://postgres@127.0.0.1:5432/test")
    try:
        assert engine.url.drivername == "postgresql+psycopg" and engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_create_engine__refuses_an_option_libpq_does_not_know() -> None:
    """A PostgreSQL URL with an option libpq has not got (a typo: sslmod=) is a ConfigError on
    database.url when it is read, password hidden, not an internal error at the first connection;
    options libpq knows pass."""
    with pytest.raises(ConfigError) as caught:
        create_engine("postgresql://postgres:s3cret@127.0.0.1:5432/test?sslmod=require")
    assert caught.value.key == "database.url" and "sslmod" in caught.value.allowed
    assert "s3cret" not in str(caught.value)
    engine = create_engine("postgresql://postgres@127.0.0.1:5432/test?sslmode=disable&application_name=dgxq")
    engine.dispose()


def test_resolve_url__argument_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit URL wins over $DATABASE_URL, which wins over sqlite:///data/generations.db."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert resolve_url() == "sqlite:///data/generations.db"
    monkeypatch.setenv("DATABASE_URL", "sqlite:////tmp/env.db")
    assert resolve_url() == "sqlite:////tmp/env.db"
    assert resolve_url("sqlite:////tmp/arg.db") == "sqlite:////tmp/arg.db"


def test_sqlite_path__files_only() -> None:
    """sqlite_path names the file of a SQLite URL, and nothing for memory or PostgreSQL."""
    assert sqlite_path("sqlite:///data/generations.db") == Path("data/generations.db")
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql+psycopg://postgres@localhost/test") is None


def test_init_db__in_memory_sqlite_works() -> None:
    """An in-memory SQLite database can be initialised and used within its process."""
    try:
        engine = init_db("sqlite://")
        with session_scope(engine) as session:
            create_generation(session, "beat")
            assert get_database_stats(session)["total_generations"] == 1
    finally:
        dispose_engines()
