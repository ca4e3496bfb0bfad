"""The queue's hot calls on an engine, for tests that act as a daemon would (each on a HeldConnection of its own)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa

from dgxqueue.storage import queue
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.precompiled import HeldConnection


def claim(engine: sa.Engine, *, worker_id: str, models: Sequence[str], limit: int, lease: timedelta,
          start: bool = False) -> list[ClaimedJob]:
    link = HeldConnection(engine)
    try:
        return queue.claim(link, worker_id=worker_id, models=models, limit=limit, lease=lease, start=start)
    finally:
        link.close()


def mark_started(engine: sa.Engine, *, worker_id: str, ids: Sequence[str], started: bool = True) -> set[str]:
    link = HeldConnection(engine)
    try:
        return queue.mark_started(link, worker_id=worker_id, ids=ids, started=started)
    finally:
        link.close()
