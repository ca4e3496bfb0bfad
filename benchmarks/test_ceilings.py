"""The benchmark's ceilings do the work they stand for: each job claimed and completed through the
daemon's own statements (benchmarks run by hand; nothing is timed here). It lives beside the
benchmark it checks and runs with the suite (``testpaths``): ``tests/`` never imports ``benchmarks/``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import bench_daemon  # pytest puts this folder on sys.path (it has no __init__.py)
import pytest
import sqlalchemy as sa

from dgxqueue.storage import dispose_engines, get_engine, init_db
from tests.support.db import sqlite_url

CEILINGS = {
    "SQL": lambda url: bench_daemon.sqlite_ceiling(url, 1, wav=False),
    "SQL + WAVs": lambda url: bench_daemon.sqlite_ceiling(url, 1, wav=True),
    "SQL + WAVs, 2nd thread": lambda url: bench_daemon.sqlite_ceiling(url, 1, wav=True, thread=True),
    "steps inline": lambda url: bench_daemon.steps_ceiling(url, 1),
}


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> Iterator[str]:
    yield sqlite_url(tmp_path)
    dispose_engines()


@pytest.mark.parametrize("ceiling", list(CEILINGS))
def test_sqlite_ceiling__completes_every_job_once(sqlite_db_url: str, ceiling: str) -> None:
    init_db(sqlite_db_url)
    bench_daemon.fill(sqlite_db_url, 25)
    assert CEILINGS[ceiling](sqlite_db_url) > 0
    with get_engine(sqlite_db_url).connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT status, attempts, worker_id IS NOT NULL, completed_at IS NOT NULL, file_size_bytes FROM generations"
        )).all()
    assert len(rows) == 25
    assert set(rows) == {("completed", 1, 1, 1, 204)}
