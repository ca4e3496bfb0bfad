"""Shared fixtures: ``db_url`` runs a test on a real SQLite file and on real PostgreSQL."""

from __future__ import annotations

import os

# No model hub is reachable: huggingface_hub reads these once, at its first import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from dgxqueue.storage import dispose_engines, get_engine, init_db
from tests.support.db import postgres_schema_url, sqlite_url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL, once per engine."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with postgres_schema_url() as url:
            yield url
            dispose_engines()
            return
    dispose_engines()


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> Iterator[str]:
    yield sqlite_url(tmp_path)
    dispose_engines()


@pytest.fixture
def pg_db_url() -> Iterator[str]:
    with postgres_schema_url() as url:
        yield url
        dispose_engines()


@pytest.fixture
def engine(db_url: str) -> Engine:
    """A migrated database on each engine."""
    init_db(db_url)
    return get_engine(db_url)
