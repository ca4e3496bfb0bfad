"""Queues to copy and archive, and what the tests read back: every row of a table in normal form."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dgxqueue.storage import (
    admin,
    cancel_generation,
    complete_generation,
    create_engine,
    create_generations,
    fail_generation,
    init_db,
    registry,
    session_scope,
)
from dgxqueue.storage.models import G, utcnow
from dgxqueue.storage.transfer import loaded, normal, stored_columns
from tests.support import zygote

REPO = Path(__file__).resolve().parents[2]
#: The states a copy must carry over, one job each (``fill_queue``'s keys).
ROLES = ("pending", "retrying", "leased", "cancelled", "completed", "failed", "expired", "late")


def table_rows(url: str, table: sa.Table) -> dict[Any, tuple[Any, ...]]:
    """Every row of ``table`` at ``url``, by key, in normal form (on an engine of its own)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            (key,) = table.primary_key.columns
            index = list(table.columns).index(key)
            return {row[index]: normal(table, loaded(table, row))
                    for row in conn.execute(sa.select(*stored_columns(table)))}
    finally:
        engine.dispose()


def fill_queue(url: str, *, extra: int = 0) -> dict[str, str]:
    """A queue holding every state: ``ROLES`` (one job each, by role) plus ``extra`` pending jobs.

    The running job's daemon is gone (its lease ran out a while ago, no registry entry); the
    retrying one failed an attempt and waits out its backoff (``run_after`` 2 s ahead).
    """
    init_db(url)
    engine = create_engine(url)
    now = utcnow()
    try:
        with session_scope(engine) as session:
            specs = [{"prompt": f"lofi piano {i % 3} ✓", "model_name": "synth", "duration_seconds": 0.5,
                      "metadata": {"bpm": 90 + i, "tags": ["b", "a"], "energy": 0.25, "key": "Am"}}
                     for i in range(len(ROLES) + extra)]
            ids = create_generations(session, specs)
            roles = dict(zip(ROLES, ids, strict=False))
            complete_generation(session, roles["completed"], 1.25, 4321, metadata={"bpm": 91, "note": "é"})
            fail_generation(session, roles["failed"], "the backend broke")
            cancel_generation(session, roles["cancelled"])
            session.execute(sa.update(G).where(G.c.id == roles["retrying"]).values(
                attempts=1, error_message="try again", run_after=now + timedelta(seconds=2), priority=5))
            session.execute(sa.update(G).where(G.c.id == roles["leased"]).values(
                status="processing", attempts=1, worker_id="gone-host:4242", claimed_at=now - timedelta(minutes=5),
                started_at=now - timedelta(minutes=5), lease_expires_at=now - timedelta(minutes=4),
                progress_done=3, progress_total=10))
            session.execute(sa.update(G).where(G.c.id == roles["expired"]).values(
                status="failed", expires_at=now - timedelta(hours=1), expired_at=now - timedelta(minutes=59),
                completed_at=now - timedelta(minutes=59), error_message="expired before it ran"))
            session.execute(sa.update(G).where(G.c.id == roles["late"]).values(
                dedupe_key="nightly-mix", expires_at=now + timedelta(days=1), max_attempts=5))
            admin.pause_model(session, "musicgen-large", "waiting for a GPU")
        return roles
    finally:
        engine.dispose()


def register_daemon(url: str, worker_id: str) -> None:
    """A live registry entry, as a running daemon keeps it."""
    engine = create_engine(url)
    try:
        with session_scope(engine) as session:
            registry.register(session, registry.DaemonEntry(
                id=worker_id, host="gpu-host", pid=4242, generator="synth", models=("synth",), version="test"),
                lease=timedelta(minutes=10))
    finally:
        engine.dispose()


def dgxqueue_env(source_url: str, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DGXQUEUE_") and k != "DATABASE_URL"}
    return {**clean, "DATABASE_URL": source_url, "PYTHONPATH": str(REPO), **extra}


def run_dgxqueue(source_url: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m dgxqueue ARGS`` against the queue at ``source_url``."""
    return zygote.run([sys.executable, "-m", "dgxqueue", *args], cwd=REPO, env=dgxqueue_env(source_url, **env),
                      capture_output=True, text=True, timeout=timeout, check=False)


def popen_dgxqueue(source_url: str, *args: str, **env: str) -> subprocess.Popen[str]:
    """The same, started: its output read line by line from ``stdout`` (stderr joined to it)."""
    return zygote.popen([sys.executable, "-m", "dgxqueue", *args], cwd=REPO, env=dgxqueue_env(source_url, **env),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
