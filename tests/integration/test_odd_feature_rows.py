"""Rows written by plain SQL with values of the wrong type in issue 17's columns (SQLite keeps
what it is given): the job handle and ``dgxqueue workers --json`` read them without failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest

from dgxqueue import api
from dgxqueue.config import load_settings
from dgxqueue.hooks import DaemonInfo
from dgxqueue.jobs import get_job
from dgxqueue.metrics import DaemonMetrics
from dgxqueue.storage import get_engine, init_db, session_scope
from dgxqueue.storage.reads import database_stats
from dgxqueue.storage.registry import daemons, live_per_model
from tests.support.db import sqlite_url


def _url(tmp_path: Path) -> str:
    url = sqlite_url(tmp_path)
    init_db(url)
    return url


def test_job_handle__progress_that_is_not_a_pair_of_integers_is_no_progress(tmp_path: Path) -> None:
    url = _url(tmp_path)
    settings = load_settings(env={}, overrides={"outputs": {"dir": str(tmp_path / "out")}})
    text_id = api.enqueue("text", database_url=url, settings=settings)
    huge_id = api.enqueue("huge", database_url=url, settings=settings)
    with get_engine(url).begin() as connection:
        connection.execute(sa.text("UPDATE generations SET progress_done = 'abc', progress_total = 'x' WHERE id = :i"),
                           {"i": text_id})
        connection.execute(sa.text("UPDATE generations SET progress_done = 3, progress_total = 1e20 WHERE id = :i"),
                           {"i": huge_id})
    for job_id in (text_id, huge_id):
        job = get_job(job_id, database_url=url, settings=settings)
        assert job.progress is None


def test_workers_json__a_registry_row_with_times_that_are_not_times(tmp_path: Path) -> None:
    url = _url(tmp_path)
    with get_engine(url).begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO daemons (id, host, pid, generator, models, version, started_at, heartbeat_at, expires_at,"
            " holding) VALUES ('odd', 'h', 1, 'g', '[\"m\"]', 'v', 'notatime', 'bad', '2099-01-01 00:00:00', '[]')"))
    with session_scope(get_engine(url)) as session:
        [found] = daemons(session)
    document = json.loads(json.dumps(found.as_dict()))
    assert (document["started_at"], document["heartbeat_at"]) == ("notatime", "bad")


def _odd_registry_and_pauses(url: str) -> None:
    with get_engine(url).begin() as connection:
        # A list nested past the JSON decoder's recursion limit, and names stored as BLOBs.
        connection.execute(sa.text(
            "INSERT INTO daemons (id, host, pid, generator, models, version, started_at, heartbeat_at, expires_at,"
            " holding) VALUES ('deep', 'h', 1, 'g', :deep, 'v', '2026-01-01 00:00:00', '2026-01-01 00:00:00',"
            " '2099-01-01 00:00:00', :deep)"), {"deep": "[" * 100_000 + "]" * 100_000})
        connection.execute(sa.text(
            "INSERT INTO paused_models (model_name, paused_at, reason)"
            " VALUES (x'626c6f62', '2026-01-01 00:00:00', x'ff'), ('synth', 'notatime', 42)"))


def test_registry__json_nested_too_deep_reads_as_its_text(tmp_path: Path) -> None:
    """A ``models``/``holding`` value the JSON decoder gives up on (RecursionError, not a
    ValueError) stopped every read of the registry: ``stats``, ``workers``, the depth metrics."""
    url = _url(tmp_path)
    _odd_registry_and_pauses(url)
    with session_scope(get_engine(url)) as session:
        [found] = daemons(session)
        assert live_per_model(session) == {found.models[0]: 1}
    assert found.models[0].startswith("[[[") and found.holding == found.models


def test_metrics_and_stats__a_paused_model_name_stored_as_a_blob(tmp_path: Path) -> None:
    """A paused model whose name (or reason) plain SQL stored as a BLOB is shown as text: the
    metrics sorted it with the text names and the whole scrape failed; ``stats --json`` could
    not encode it."""
    url = _url(tmp_path)
    _odd_registry_and_pauses(url)
    api.enqueue("x", model_name="synth", database_url=url,
                settings=load_settings(env={}, overrides={"outputs": {"dir": str(tmp_path / "outputs")}}))
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry, get_engine(url), depth_cache_seconds=0)
    metrics.on_start(DaemonInfo("w", "synth", ("synth",), "x", "0"))
    scraped = generate_latest(registry).decode()
    assert 'dgxqueue_model_paused{model="blob"} 1.0' in scraped
    assert 'dgxqueue_model_paused{model="synth"} 1.0' in scraped
    with session_scope(get_engine(url)) as session:
        shown = json.loads(json.dumps(database_stats(session)))
    assert shown["paused_models"] == {"blob": "\ufffd", "synth": "42"}


@pytest.mark.parametrize(("done", "total", "shown"), [
    (-5, 10, (0, 10)), (15, 10, (10, 10)), (0, -3, None), (7, 0, None), (5, None, None), (None, 10, None),
])
def test_job_handle__progress_written_by_plain_sql_out_of_range(
    db_url: str, tmp_path: Path, done: int | None, total: int | None, shown: tuple[int, int] | None,
) -> None:
    """The handle's progress follows the CLI's reading of the same row (``show``, ``wait``): a
    total that is not positive is no progress, and ``done`` stays within 0..total."""
    init_db(db_url)
    settings = load_settings(env={}, overrides={"outputs": {"dir": str(tmp_path / "outputs")}})
    job_id = api.enqueue("odd", database_url=db_url, settings=settings)
    with get_engine(db_url).begin() as connection:
        connection.execute(sa.text("UPDATE generations SET status = 'processing', progress_done = :d,"
                                   " progress_total = :t WHERE id = :i"), {"d": done, "t": total, "i": job_id})
    progress = get_job(job_id, database_url=db_url, settings=settings).progress
    assert (None if progress is None else (progress.done, progress.total)) == shown
