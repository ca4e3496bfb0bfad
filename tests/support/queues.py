"""The daemon's queue on each backend, for the conformance suite: a real SQLite file, the real
PostgreSQL, and the in-memory queue, behind one harness that enqueues, lets time pass and reads
rows the same way on all three."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dgxqueue import api
from dgxqueue.daemon.queue_client import QueueClient
from dgxqueue.daemon.queue_protocol import DaemonQueue, JobResult
from dgxqueue.storage import cancel_generation, dispose_engines, init_db, registry, session_scope, validate_job
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import G, UTCDateTime
from dgxqueue.storage.registry import LiveDaemon
from dgxqueue.storage.results import Completed, Failed, Retried
from dgxqueue.testing import ManualClock, MemoryStore
from tests.support.daemons import make_settings

LEASE = timedelta(seconds=30)
MODEL = "scripted"
_TIMES = [column for column in G.columns if isinstance(column.type, UTCDateTime)]
_DAEMON_TIMES = [column for column in registry.D.columns if isinstance(column.type, UTCDateTime)]


class QueueBackend:
    """One backend: its queues, its producer, its clock and its rows."""

    name: str

    def queue(self, worker_id: str = "w", models: Sequence[str] = (MODEL,), lease: timedelta = LEASE) -> DaemonQueue:
        raise NotImplementedError

    def enqueue(self, prompt: str = "a prompt", **fields: Any) -> str:
        """One job, through the producer's door (``model_name`` defaults to :data:`MODEL`)."""
        raise NotImplementedError

    def enqueue_many(self, specs: Sequence[dict[str, Any]]) -> list[str]:
        """Jobs of one batch through the producer's door, all or none (each spec a dict of fields)."""
        raise NotImplementedError

    def count(self) -> int:
        """How many jobs there are."""
        raise NotImplementedError

    def now(self) -> datetime:
        """The queue's clock (the database's)."""
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, as the queue's clock sees it."""
        raise NotImplementedError

    def row(self, job_id: str) -> dict[str, Any]:
        """The job's row, by column name."""
        raise NotImplementedError

    def daemons(self, *, include_stale: bool = False) -> list[LiveDaemon]:
        """The registry of live daemons, as ``dgxqueue workers`` reads it."""
        raise NotImplementedError

    def cancel(self, job_id: str) -> str:
        """Cancel the job as an operator does (``dgxqueue cancel``); its status afterwards."""
        raise NotImplementedError

    def pause(self, model: str = MODEL) -> None:
        """Pause ``model`` as an operator does."""
        raise NotImplementedError

    def resume(self, model: str = MODEL) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {"model_name": MODEL, "duration_seconds": 0.05, "sample_rate": 8000, "channels": 1, **fields}


class DatabaseBackend(QueueBackend):
    """SQLite or PostgreSQL at ``url``, migrated. Time passes by moving every stored time back:
    the database's clock cannot be moved, and to the rules the two are the same."""

    def __init__(self, name: str, url: str, outputs: Path) -> None:
        self.name, self.url = name, url
        self.engine = init_db(url)
        self.settings = make_settings(url, outputs)
        self._queues: list[QueueClient] = []

    def queue(self, worker_id: str = "w", models: Sequence[str] = (MODEL,), lease: timedelta = LEASE) -> DaemonQueue:
        client = QueueClient(self.engine, worker_id=worker_id, models=models, lease=lease)
        self._queues.append(client)
        return client

    def enqueue(self, prompt: str = "a prompt", **fields: Any) -> str:
        return api.enqueue(prompt, database_url=self.url, settings=self.settings, **_fields(fields))

    def enqueue_many(self, specs: Sequence[dict[str, Any]]) -> list[str]:
        return api.enqueue_many([_fields(spec) for spec in specs], database_url=self.url, settings=self.settings)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(G)).scalar_one())

    def now(self) -> datetime:
        with self.engine.connect() as conn:
            now: datetime = conn.execute(sa.select(profile_of(self.engine.dialect).now())).scalar_one()
        return now

    def advance(self, seconds: float) -> None:
        shift = timedelta(seconds=seconds)
        with self.engine.begin() as conn:
            for row in conn.execute(sa.select(G.c.id, *_TIMES)).all():
                moved = {column.name: value - shift for column, value in zip(_TIMES, row[1:], strict=True)
                         if value is not None}
                conn.execute(sa.update(G).where(G.c.id == row[0]).values(**moved))
            for row in conn.execute(sa.select(registry.D.c.id, *_DAEMON_TIMES)).all():
                moved = {column.name: value - shift for column, value in zip(_DAEMON_TIMES, row[1:], strict=True)}
                conn.execute(sa.update(registry.D).where(registry.D.c.id == row[0]).values(**moved))

    def row(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(G).where(G.c.id == job_id)).mappings().one())

    def daemons(self, *, include_stale: bool = False) -> list[LiveDaemon]:
        with session_scope(self.engine) as session:
            return registry.daemons(session, include_stale=include_stale)

    def cancel(self, job_id: str) -> str:
        with session_scope(self.engine) as session:
            return str(cancel_generation(session, job_id).status)

    def pause(self, model: str = MODEL) -> None:
        api.pause(model, database_url=self.url, settings=self.settings)

    def resume(self, model: str = MODEL) -> None:
        api.resume(model, database_url=self.url, settings=self.settings)

    def close(self) -> None:
        for client in self._queues:
            client.close()
        dispose_engines()


class MemoryBackend(QueueBackend):
    """:class:`~dgxqueue.testing.MemoryStore` on a :class:`~dgxqueue.testing.ManualClock`."""

    name = "memory"

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.store = MemoryStore(clock=self.clock)

    def queue(self, worker_id: str = "w", models: Sequence[str] = (MODEL,), lease: timedelta = LEASE) -> DaemonQueue:
        return self.store.client(worker_id=worker_id, models=models, lease=lease)

    def enqueue(self, prompt: str = "a prompt", **fields: Any) -> str:
        return self.store.enqueue(prompt, **_fields(fields))

    def enqueue_many(self, specs: Sequence[dict[str, Any]]) -> list[str]:
        return self.store.insert([validate_job(**_fields(spec)) for spec in specs])

    def count(self) -> int:
        return len(self.store.jobs)

    def now(self) -> datetime:
        return self.clock()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def row(self, job_id: str) -> dict[str, Any]:
        return dict(self.store.jobs[job_id])

    def daemons(self, *, include_stale: bool = False) -> list[LiveDaemon]:
        return self.store.live_daemons(include_stale=include_stale)

    def cancel(self, job_id: str) -> str:
        return str(self.store.cancel(job_id)["status"])

    def pause(self, model: str = MODEL) -> None:
        self.store.pause(model)

    def resume(self, model: str = MODEL) -> None:
        self.store.resume(model)


def open_backend(name: str, tmp_path: Path) -> Iterator[QueueBackend]:
    """The backend ``name`` ("sqlite", "postgres" or "memory"), closed afterwards."""
    from tests.support.db import postgres_database_url, sqlite_url

    backend: QueueBackend
    if name == "memory":
        yield MemoryBackend()
        return
    if name == "sqlite":
        backend = DatabaseBackend(name, sqlite_url(tmp_path), tmp_path / "outputs")
        try:
            yield backend
        finally:
            backend.close()
        return
    with postgres_database_url(at_head=True) as url:
        backend = DatabaseBackend(name, url, tmp_path / "outputs")
        try:
            yield backend
        finally:
            backend.close()


# --- results as the daemon records them ---


def completed(job: ClaimedJob, *, size: int = 1234, metadata: dict[str, Any] | None = None) -> JobResult:
    return job, Completed(job.claimed_at, 0.5, size, metadata)


def failed(job: ClaimedJob, message: str = "it failed") -> JobResult:
    return job, Failed(job.claimed_at, message, 0.5)


def retried(job: ClaimedJob, run_after: datetime, message: str = "try again") -> JobResult:
    return job, Retried(run_after, message)


def ids(jobs: Sequence[ClaimedJob]) -> list[str]:
    return [job.id for job in jobs]
