"""The benchmark's ceilings do the work they stand for: each job claimed and completed through the
daemon's own statements (benchmarks run by hand; nothing is timed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.storage import get_engine, init_db

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_daemon


@pytest.mark.parametrize(("wav", "thread"), [(False, False), (True, False), (True, True)])
def test_sqlite_ceiling__completes_every_job_once(sqlite_db_url: str, wav: bool, thread: bool) -> None:
    init_db(sqlite_db_url)
    bench_daemon.fill(sqlite_db_url, 25)
    assert bench_daemon.sqlite_ceiling(sqlite_db_url, 1, wav=wav, thread=thread) > 0
    with get_engine(sqlite_db_url).connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT status, attempts, worker_id, completed_at IS NOT NULL, file_size_bytes FROM generations"
        )).all()
    assert len(rows) == 25
    assert set(rows) == {("completed", 1, None, 1, 204)}
