"""Real databases for tests: a temporary SQLite file, or a private schema on the PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get("DGXQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_available() -> bool:
    try:
        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return True
    except sa.exc.OperationalError:
        return False


def require_postgres() -> None:
    """Skip without a server only outside CI; under CI a missing server is a failure."""
    if postgres_available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL does not answer at {PG_ADMIN_URL}, and CI must run the PostgreSQL tests")
    pytest.skip(f"PostgreSQL does not answer at {PG_ADMIN_URL} (CI unset, so this may skip)")


@contextlib.contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections live in a fresh schema of their own, dropped afterwards."""
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
