"""Rows written by plain SQL with values of the wrong type in issue 17's columns (SQLite keeps
what it is given): the job handle and ``dgxqueue workers --json`` read them without failing."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from dgxqueue import api
from dgxqueue.config import load_settings
from dgxqueue.jobs import get_job
from dgxqueue.storage import get_engine, init_db, session_scope
from dgxqueue.storage.registry import daemons
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
