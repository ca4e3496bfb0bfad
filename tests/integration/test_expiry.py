"""Expiry at the door and in the sweep, on SQLite and PostgreSQL: typed refusals, rows written by
plain SQL, the rescuer's hook and the metric."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
import structlog
from prometheus_client import CollectorRegistry

from dgxqueue import api
from dgxqueue.daemon.leases import Heartbeat, Held, Rescuer, Sweeper
from dgxqueue.daemon.queue_client import QueueClient
from dgxqueue.errors import ValidationError
from dgxqueue.hooks import DaemonInfo
from dgxqueue.metrics import DaemonMetrics
from dgxqueue.storage import get_engine, init_db, queue, session_scope, validate_job
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import G
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.testing import ManualClock, MemoryStore
from tests.support import poison
from tests.support.daemons import make_settings
from tests.support.processes import REPO
from tests.support.skew import SKEW_PRELUDE

LEASE = timedelta(seconds=30)


@pytest.mark.parametrize(("fields", "field"), [
    ({"expires_at": datetime(2030, 1, 1)}, "expires_at"),  # naive: which zone is meant?
    ({"expires_at": "2030-01-01T00:00Z"}, "expires_at"),
    ({"ttl": 0}, "ttl"),
    ({"ttl": -5}, "ttl"),
    ({"ttl": float("nan")}, "ttl"),
    ({"ttl": True}, "ttl"),
    ({"ttl": 60, "expires_at": datetime(2030, 1, 1, tzinfo=UTC)}, "ttl"),
])
def test_door__a_bad_expiry_is_refused_naming_its_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_job("beat", **fields)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_door__expires_at_becomes_utc_and_ttl_stays_seconds() -> None:
    """The door keeps a ttl as seconds: only the insert, on the database's clock, makes it a time."""
    zone = datetime(2030, 1, 1, 12, tzinfo=UTC).astimezone(ZoneInfo("Europe/Paris"))
    assert validate_job("beat", expires_at=zone).expires_at == datetime(2030, 1, 1, 12, tzinfo=UTC)
    job = validate_job("beat", ttl=90)
    assert (job.expires_at, job.ttl) == (None, 90.0)


_SKEWED_PRODUCER = SKEW_PRELUDE + """
import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.storage import create_generations, get_engine, session_scope
url, settings = sys.argv[1], load_settings(env={})
ids = [dgxqueue.enqueue("late", ttl=600, database_url=url, settings=settings)]
ids += dgxqueue.enqueue_many([{"prompt": "late", "ttl": 600}, {"prompt": "keyed", "ttl": 600, "dedupe_key": "k"}],
                            database_url=url, settings=settings)
with session_scope(get_engine(url)) as session:
    ids += create_generations(session, [{"prompt": "late", "ttl": 600}])
print(" ".join(ids))
"""


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["hour-fast", "hour-slow"])
def test_ttl__counts_from_the_database_clock_not_a_skewed_producers(db_url: str, skew: float) -> None:
    """A producer process whose clock is an hour off enqueues with ttl=600 (through enqueue,
    enqueue_many with and without a dedupe key, create_generations): each expires_at is the
    database's now at the insert plus 600 s, not the producer's now plus 600 s."""
    init_db(db_url)
    engine = get_engine(db_url)
    profile = profile_of(engine.dialect)

    def db_now() -> datetime:
        with engine.connect() as conn:
            now = conn.execute(sa.select(profile.now())).scalar_one()
        assert isinstance(now, datetime)
        return now

    before = db_now()
    done = subprocess.run([sys.executable, "-c", _SKEWED_PRODUCER, db_url, str(skew)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
    after = db_now()
    ids = done.stdout.split()
    with engine.connect() as conn:
        expiries = conn.execute(sa.select(G.c.expires_at).where(G.c.id.in_(ids))).scalars().all()
    assert len(ids) == len(expiries) == 4
    for expires in expiries:
        assert before + timedelta(seconds=599) <= expires <= after + timedelta(seconds=601), (expires, before)


def test_ttl__the_memory_store_counts_from_its_clock() -> None:
    """The in-memory queue stands in for the database: a ttl counts from its clock."""
    clock = ManualClock(datetime(2031, 5, 1, tzinfo=UTC))
    store = MemoryStore(clock=clock)
    job_id = store.enqueue("beat", ttl=60)
    assert store.jobs[job_id]["expires_at"] == datetime(2031, 5, 1, 0, 1, tzinfo=UTC)


def test_sweep__an_unreadable_expires_at_stops_nothing(sqlite_db_url: str) -> None:
    """A row written by plain SQL whose expires_at is not a time is neither expired nor skipped:
    the sweep passes it by and the claim runs it, as it would without an expiry."""
    init_db(sqlite_db_url)
    engine = get_engine(sqlite_db_url)
    poison.insert(sqlite_db_url, [poison.row("words", expires_at="tomorrow"), poison.row("number", expires_at=12345),
                                  poison.row("past", expires_at="2020-01-01 00:00:00.000000")])
    with session_scope(engine) as s:
        assert queue.expire_pending(s) == [("past", "synth")]
    claimed = queue.claim(HeldConnection(engine), worker_id="w", models=["synth"], limit=10, lease=LEASE)
    assert sorted(job.id for job in claimed) == ["number", "words"]


def test_rescuer__expires_jobs_and_counts_them_apart(db_url: str, tmp_path: Path) -> None:
    """The rescuer's run fails expired jobs of any model and dgxqueue_jobs_expired_total counts
    them by model, not as finished attempts."""
    init_db(db_url)
    engine = get_engine(db_url)
    settings = make_settings(db_url, tmp_path / "outputs")
    ids = [api.enqueue("gone", model_name=model, expires_at=datetime.now(UTC) + timedelta(seconds=30),
                       database_url=db_url, settings=settings) for model in ("synth", "synth", "other")]
    with engine.begin() as conn:  # as if 31 seconds had passed
        conn.execute(sa.text("UPDATE generations SET expires_at = :t"), {"t": datetime(2020, 1, 1)})
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, engine, depth_cache_seconds=0)
    metrics.on_start(DaemonInfo("w", "synth", ("synth",), "x", "0"))
    client = QueueClient(engine, worker_id="w", models=["synth"], lease=LEASE)
    try:
        log = structlog.get_logger("dgxqueue.daemon")
        heartbeat = Heartbeat(client, Held(), interval=1.0, log=log)
        sweeper = Sweeper(client, tmp_path / "outputs", interval=3600.0, log=log)
        Rescuer(client, heartbeat, sweeper, metrics, interval=1.0, log=log).run_once()
    finally:
        client.close()
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, expired_at IS NOT NULL FROM generations")).all()
    assert sorted(rows) == [("failed", True)] * 3 and len(ids) == 3
    assert registry.get_sample_value("dgxqueue_jobs_expired_total", {"model": "synth"}) == 2
    assert registry.get_sample_value("dgxqueue_jobs_expired_total", {"model": "other"}) == 1
    assert registry.get_sample_value("dgxqueue_jobs_finished_total", {"model": "synth", "outcome": "failed"}) == 0
