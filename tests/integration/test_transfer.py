"""storage.transfer in-process: rows compared and hashed alike on both engines, identical rows
left, different or unwritable ones refused, a verification that notices a change."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.errors import TransferError
from dgxqueue.storage import create_engine, dispose_engines, ensure_schema, session_scope
from dgxqueue.storage.models import G
from dgxqueue.storage.transfer import copy_queue, put_rows, verify
from tests.support.db import postgres_database_url, sqlite_url
from tests.support.transfer import fill_queue

#: Ids that a collation orders otherwise than bytes do (case, accents, punctuation).
ODD_IDS = ("a-1", "B-2", "é-3", "_4", "Z", "e-5", "ä")


def _job(job_id: str, **values: Any) -> dict[str, Any]:
    return {"id": job_id, "prompt": "hand written", "model_name": "synth", "duration_seconds": 1.0,
            "sample_rate": 32000, "channels": 2, "file_path": f"outputs/{job_id}.wav", "status": "pending",
            "created_at": datetime(2025, 11, 7, 10, 0, tzinfo=UTC), "metadata": None, **values}


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """A SQLite queue holding every state and jobs written by plain SQL with odd ids, and an
    empty target at head: one SQLite file, one PostgreSQL database."""
    (tmp_path / "source").mkdir()
    url = sqlite_url(tmp_path / "source")
    fill_queue(url)
    source = create_engine(url)
    with source.begin() as conn:
        conn.execute(sa.insert(G), [_job(job_id) for job_id in ODD_IDS])
    with postgres_database_url() as target_url:
        target = create_engine(target_url)
        ensure_schema(target)
        yield source, target
        target.dispose()
        source.dispose()
        dispose_engines()


def test_copy_queue__odd_ids_and_every_state_verify_on_postgres(engines: tuple[sa.Engine, sa.Engine]) -> None:
    """Both sides hash their rows in the same (bytewise) order, whatever PostgreSQL's collation."""
    source, target = engines
    seen: list[tuple[str, int, int, int]] = []
    digests = copy_queue(source, target, batch_size=2, progress=lambda *report: seen.append(report))
    assert digests["generations"].rows == 8 + len(ODD_IDS)
    assert sum(new for table, _, _, new in seen if table == "generations") == digests["generations"].rows
    assert verify(source, target) == digests


def test_verify__a_row_changed_at_the_target_fails_naming_the_table(engines: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = engines
    copy_queue(source, target, batch_size=50, progress=lambda *_: None)
    with target.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == "Z").values(attempts=2))
    with pytest.raises(TransferError, match="verification failed for generations"):
        verify(source, target)
    with pytest.raises(TransferError, match=r"differs from the source's .*attempts"):  # and a rerun refuses
        copy_queue(source, target, batch_size=50, progress=lambda *_: None)


def test_put_rows__identical_left_different_and_unreadable_refused(engines: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = engines
    with source.begin() as conn:  # plain SQL: a time that is no time
        conn.execute(sa.text("UPDATE generations SET completed_at = 'tomorrow' WHERE id = 'e-5'"))
    with session_scope(source) as session:
        rows = [tuple(row) for row in session.execute(sa.select(*G.columns).where(G.c.id.in_(ODD_IDS)))]
    with session_scope(target) as session:
        new, refused = put_rows(session, G, rows)
    assert len(new) == len(ODD_IDS) - 1
    assert "completed_at" in refused["e-5"] and "tomorrow" in refused["e-5"]
    with target.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == "a-1").values(error_message="changed"))
    with session_scope(target) as session:
        new, refused = put_rows(session, G, rows)
    assert new == []
    assert set(refused) == {"e-5", "a-1"} and "error_message" in refused["a-1"]
