"""Progress and cancel with a real daemon process on the synth backend, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from dgxqueue.storage import cancel_generation, create_generations, get_engine, init_db, session_scope
from tests.support.processes import start_worker, stop, wait_until, write_config

HEARTBEAT = 0.2


def _config(tmp: Path, url: str) -> Path:
    return write_config(tmp / "config.toml", {
        "database": {"url": url},
        "outputs": {"dir": str(tmp / "outputs")},
        "generator": {"name": "synth"},
        "generator.options": {"max_duration_seconds": 3600.0},
        "worker": {"lease_seconds": 30.0, "heartbeat_seconds": HEARTBEAT, "rescue_interval_seconds": 1.0,
                   "poll_interval_seconds": 0.5},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    })


def _row(url: str, job_id: str) -> sa.RowMapping:
    with get_engine(url).connect() as conn:
        return conn.execute(sa.text(
            "SELECT status, progress_done, progress_total, cancelled_at, completed_at, error_message, attempts "
            "FROM generations WHERE id = :id"), {"id": job_id}).mappings().one()


def test_daemon_process__cancels_a_long_synth_job_mid_run(db_url: str, tmp_path: Path) -> None:
    """Four long synth jobs in one backend call: progress shows in the first one's row while it
    renders; the last one, cancelled then, ends failed with cancelled_at within a heartbeat or
    so, before the call is over, and leaves no file; the others complete."""
    init_db(db_url)
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": f"lofi hip hop {i}", "model_name": "synth", "duration_seconds": 300.0,
                                      "sample_rate": 96000, "channels": 1} for i in range(4)])
    worker = start_worker(_config(tmp_path, db_url), tmp_path / "worker.log")
    try:
        first, last = ids[0], ids[-1]
        moved = wait_until(lambda: (r := _row(db_url, first))["progress_done"] and r, 120,
                           "progress in the first job's row", alive=worker)
        assert moved["status"] == "processing" and 0 < moved["progress_done"] <= moved["progress_total"]
        with session_scope(get_engine(db_url)) as s:
            assert cancel_generation(s, last).status == "processing"
        asked = time.monotonic()
        wait_until(lambda: _row(db_url, last)["status"] == "failed", 30, "the cancelled job to end", alive=worker)
        took = time.monotonic() - asked
        wait_until(lambda: all(_row(db_url, j)["status"] == "completed" for j in ids[:3]), 120,
                   "the other three to complete", alive=worker)
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    cancelled = _row(db_url, last)
    assert cancelled["cancelled_at"] is not None and cancelled["attempts"] == 1
    assert cancelled["error_message"] == "cancelled by request while it ran"
    assert took < HEARTBEAT + 2.0, took
    assert cancelled["completed_at"] < _row(db_url, ids[2])["completed_at"]  # before the call was over
    outputs = tmp_path / "outputs"
    assert not list(outputs.rglob(f"*{last}*"))
    assert all((outputs / f"{j}.wav").is_file() for j in ids[:3])
    log = (tmp_path / "worker.log").read_text()
    assert '"outcome": "cancelled"' in log or '"outcome":"cancelled"' in log
