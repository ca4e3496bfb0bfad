"""Daemon processes run one after another as systemd restarts them, for the tests of jobs that kill
or stall their daemon; and the rows they leave."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import sqlalchemy as sa

from dgxqueue.storage import Generation, get_engine, session_scope
from dgxqueue.storage.models import utcnow
from tests.support.processes import start_worker, wait_until


def rows(url: str) -> dict[str, Generation]:
    """Every job's row, by id, detached from its session."""
    with session_scope(get_engine(url)) as s:
        jobs = s.scalars(sa.select(Generation)).all()
        s.expunge_all()
        return {job.id: job for job in jobs}


def leases_ran_out(url: str) -> bool:
    """No running job is under a live lease (a dead daemon's leases have expired)."""
    now = utcnow()  # the database's clock on this one host
    return all(job.lease_expires_at is None or job.lease_expires_at < now
               for job in rows(url).values() if job.status == "processing")


def supervise(config: Path, url: str, tmp_path: Path, runs: int, *, watchdog: float | None = None) -> list[int]:
    """Run ``--burst`` daemons one after another, each once the one before's leases ran out, until
    every job has ended or ``runs`` have run; with ``watchdog``, one whose loop stalls that long is
    killed as systemd's watchdog would. Returns their exit codes (0, 124 or -SIGKILL)."""
    codes: list[int] = []
    for run in range(runs):
        wait_until(lambda: leases_ran_out(url), 30, "the dead daemon's leases to run out")
        log = tmp_path / f"worker{run}.log"
        worker = start_worker(config, log, "--burst")
        try:
            codes.append(worker.wait(watchdog or 60))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(worker.wait(10))
            assert watchdog is not None, log.read_text()[-3000:]
        assert codes[-1] in (0, 124, -signal.SIGKILL), log.read_text()[-3000:]
        if all(job.status in ("completed", "failed") for job in rows(url).values()):
            break
    return codes
