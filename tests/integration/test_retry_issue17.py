"""Retrying a failed job meets issue 17's columns: an expired job retried is run, not expired
again; one whose dedupe key another unfinished job now holds is refused, not a database error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue import api
from dgxqueue.config import load_settings
from dgxqueue.errors import InvalidStateError
from dgxqueue.storage import cancel_generation, retry_generation, session_scope
from dgxqueue.storage.queue import expire_pending


def _enqueue(db_url: str, tmp_path: Path, prompt: str, **spec: Any) -> str:
    settings = load_settings(env={}, overrides={"outputs": {"dir": str(tmp_path / "out")}})
    return api.enqueue(prompt, database_url=db_url, settings=settings, **spec)


def test_retry__an_expired_job_runs_instead_of_expiring_again(engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    job_id = _enqueue(db_url, tmp_path, "late", expires_at=datetime.now(UTC) + timedelta(seconds=30))
    with engine.begin() as connection:  # its expiry has passed, by the database's clock
        connection.execute(sa.text("UPDATE generations SET expires_at = :t WHERE id = :i"),
                           {"t": datetime(2020, 1, 1), "i": job_id})
    with session_scope(engine) as session:
        assert expire_pending(session) == [(job_id, "synth")]
    with session_scope(engine) as session:
        assert session.execute(sa.text("SELECT status FROM generations WHERE id = :i"), {"i": job_id}).scalar() \
            == "failed"
        retry_generation(session, job_id)
    with session_scope(engine) as session:
        assert expire_pending(session) == []
        status, expired_at = session.execute(sa.text("SELECT status, expired_at FROM generations WHERE id = :i"),
                                             {"i": job_id}).one()
    assert (status, expired_at) == ("pending", None)


def test_retry__refused_while_another_unfinished_job_holds_its_dedupe_key(
        engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    first = _enqueue(db_url, tmp_path, "first", dedupe_key="K")
    with session_scope(engine) as session:
        cancel_generation(session, first)
    second = _enqueue(db_url, tmp_path, "second", dedupe_key="K")
    assert second != first
    with session_scope(engine) as session, pytest.raises(InvalidStateError, match=second):
        retry_generation(session, first)
    with session_scope(engine) as session:
        cancel_generation(session, second)
    with session_scope(engine) as session:  # the key is free again: the retry goes through
        assert retry_generation(session, first).status == "pending"
