"""``dgxqueue_live_daemons``: live daemons per model, read from the registry with the queue depth."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from dgxqueue.hooks import DaemonInfo
from dgxqueue.metrics import DaemonMetrics
from dgxqueue.storage import create_generation, init_db, session_scope
from dgxqueue.storage.registry import D, DaemonEntry, register

LEASE = timedelta(seconds=30)


def entry(worker_id: str, *models: str) -> DaemonEntry:
    return DaemonEntry(id=worker_id, host="h", pid=1, generator="g", models=models, version="v")


def test_live_daemons__per_model_zero_where_jobs_wait_for_none(sqlite_db_url: str) -> None:
    """Each model served by live daemons reads their count; a model with pending jobs and no live
    daemon (or only a stale one) reads 0, and one with neither has no series."""
    engine = init_db(sqlite_db_url)
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, engine, depth_cache_seconds=0)
    metrics.on_start(DaemonInfo("a", "g", ("a-model",), "sqlite", "v"))
    with session_scope(engine) as session:
        register(session, entry("a", "a-model", "shared"), lease=LEASE)
        register(session, entry("b", "shared"), lease=LEASE)
        register(session, entry("dead", "orphan"), lease=LEASE)
        session.execute(sa.update(D).where(D.c.id == "dead").values(expires_at=datetime(2000, 1, 1, tzinfo=UTC)))
        create_generation(session, "p", model_name="orphan")
    assert registry.get_sample_value("dgxqueue_live_daemons", {"model": "a-model"}) == 1
    assert registry.get_sample_value("dgxqueue_live_daemons", {"model": "shared"}) == 2
    assert registry.get_sample_value("dgxqueue_live_daemons", {"model": "orphan"}) == 0
    assert registry.get_sample_value("dgxqueue_live_daemons", {"model": "elsewhere"}) is None
