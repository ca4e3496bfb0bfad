"""Pausing and resuming a model through the library, on SQLite and PostgreSQL: the stored
pause, stats, the metric and the wake-up on resume."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from dgxqueue import api
from dgxqueue.config import Settings
from dgxqueue.errors import ValidationError
from dgxqueue.hooks import DaemonInfo
from dgxqueue.metrics import DaemonMetrics
from dgxqueue.storage import get_database_stats, init_db, queue, session_scope
from dgxqueue.storage.queue import NOTIFY_CHANNEL
from tests.support.daemons import make_settings


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    init_db(db_url)
    return make_settings(db_url, tmp_path / "outputs")


def test_pause__stored_once_with_its_latest_reason(db_url: str, settings: Settings) -> None:
    """Pausing twice keeps one pause with the newer reason; resuming twice resumes once."""
    assert api.pause("synth", "GPU swap", database_url=db_url, settings=settings) is True
    assert api.pause("synth", "still swapping", database_url=db_url, settings=settings) is False
    assert api.paused_models(database_url=db_url, settings=settings) == {"synth": "still swapping"}
    assert api.resume("synth", database_url=db_url, settings=settings) is True
    assert api.resume("synth", database_url=db_url, settings=settings) is False
    assert api.paused_models(database_url=db_url, settings=settings) == {}


def test_pause__listed_in_stats_and_in_the_metric(db_url: str, settings: Settings, engine: Engine) -> None:
    """stats lists the paused models; dgxqueue_model_paused is 1 for them, 0 for the others."""
    api.enqueue("p", model_name="synth", database_url=db_url, settings=settings)
    api.enqueue("p", model_name="other", database_url=db_url, settings=settings)
    api.pause("synth", None, database_url=db_url, settings=settings)
    with session_scope(engine) as session:
        assert get_database_stats(session)["paused_models"] == {"synth": None}
    registry = CollectorRegistry()
    DaemonMetrics(registry, engine, depth_cache_seconds=0).on_start(
        DaemonInfo("w", "synth", ("synth", "served"), "x", "0"))
    assert registry.get_sample_value("dgxqueue_model_paused", {"model": "synth"}) == 1
    assert registry.get_sample_value("dgxqueue_model_paused", {"model": "other"}) == 0
    assert registry.get_sample_value("dgxqueue_model_paused", {"model": "served"}) == 0
    api.resume("synth", database_url=db_url, settings=settings)
    assert registry.get_sample_value("dgxqueue_model_paused", {"model": "synth"}) == 0


def test_resume__notifies_idle_daemons(pg_db_url: str, tmp_path: Path) -> None:
    """On PostgreSQL a resume NOTIFYs the daemons' channel with the model when it commits."""
    init_db(pg_db_url)
    settings = make_settings(pg_db_url, tmp_path / "outputs")
    model = f"m-{uuid.uuid4().hex}"  # the channel is the server's, shared with other tests
    api.pause(model, database_url=pg_db_url, settings=settings)
    dsn = pg_db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        api.resume(model, database_url=pg_db_url, settings=settings)
        deadline = time.monotonic() + 10
        payloads: list[str] = []
        while model not in payloads and time.monotonic() < deadline:
            payloads += [n.payload for n in listener.notifies(timeout=deadline - time.monotonic(), stop_after=1)]
    assert model in payloads


def test_pause__a_model_name_is_read_as_enqueue_reads_it(db_url: str, settings: Settings, engine: Engine) -> None:
    """``pause("synth ")`` pauses the jobs enqueued as ``model_name="synth "`` (stored stripped),
    instead of storing a name no job has and reporting it paused; resume reads it the same way."""
    api.enqueue("p", model_name="synth ", database_url=db_url, settings=settings)
    assert api.pause(" synth\t", "typed with spaces", database_url=db_url, settings=settings) is True
    assert api.paused_models(database_url=db_url, settings=settings) == {"synth": "typed with spaces"}
    with session_scope(engine) as session:
        assert not queue.has_work(session, ["synth"])
    assert api.resume("synth ", database_url=db_url, settings=settings) is True
    assert api.paused_models(database_url=db_url, settings=settings) == {}


@pytest.mark.parametrize(("model", "reason", "field"), [
    ("", None, "model_name"), ("   ", None, "model_name"), (None, None, "model_name"), (123, None, "model_name"),
    ("x" * 5000, None, "model_name"), ("a\x00b", None, "model_name"), ("synth", "a\x00b", "reason"),
    ("synth", 42, "reason"),
])
def test_pause__bad_input_is_refused_naming_its_field(db_url: str, settings: Settings, model: Any, reason: Any,
                                                      field: str) -> None:
    """Bad input raises ValidationError naming the field, and nothing is stored (it was stored
    as given, or failed with the driver's error: NOT NULL, a NUL byte on PostgreSQL)."""
    with pytest.raises(ValidationError) as caught:
        api.pause(model, reason, database_url=db_url, settings=settings)
    assert caught.value.field == field
    if field == "model_name":
        with pytest.raises(ValidationError) as caught:
            api.resume(model, database_url=db_url, settings=settings)
        assert caught.value.field == field
    assert api.paused_models(database_url=db_url, settings=settings) == {}
