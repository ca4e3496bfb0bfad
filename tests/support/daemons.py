"""Helpers to build in-process daemons on a test database."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dgxqueue.config import Settings, load_settings
from dgxqueue.daemon import Daemon, Hooks
from dgxqueue.generators import Generator
from dgxqueue.storage import get_engine, init_db
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.models import utcnow


def make_settings(url: str, outputs: Path, **worker: Any) -> Settings:
    """Settings for tests: fast heartbeats and no backoff unless a test asks for them."""
    worker_overrides = {
        "lease_seconds": 30.0, "heartbeat_seconds": 0.2, "backoff_base_seconds": 0.0,
        "rescue_interval_seconds": 3600.0, "poll_interval_seconds": 0.2, **worker,
    }
    return load_settings(env={}, overrides={
        "database": {"url": url},
        "outputs": {"dir": str(outputs)},
        "worker": worker_overrides,
        "metrics": {"enabled": False},
    })


class RecordingHooks(Hooks):
    """Remembers every finished attempt and rescue."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, str, str | None]] = []
        self.rescued: list[tuple[Sequence[str], Sequence[str]]] = []
        self.claimed: list[str] = []

    def on_claimed(self, jobs: Sequence[ClaimedJob], now: datetime) -> None:
        self.claimed.extend(job.id for job in jobs)

    def on_job_finished(self, job: ClaimedJob, outcome: str, *, generation_seconds: float | None,
                        audio_seconds: float | None, error: str | None) -> None:
        self.finished.append((job.id, outcome, error))

    def on_rescued(self, requeued: Sequence[str], failed: Sequence[str]) -> None:
        self.rescued.append((requeued, failed))

    def outcomes(self, job_id: str) -> list[str]:
        return [outcome for jid, outcome, _ in self.finished if jid == job_id]


def make_daemon(url: str, outputs: Path, generator: Generator, *, hooks: Hooks | None = None,
                worker_id: str | None = None, clock: Callable[[], datetime] = utcnow, **worker: Any) -> Daemon:
    settings = make_settings(url, outputs, **worker)
    init_db(url)
    return Daemon(settings, engine=get_engine(url), generator=generator, hooks=hooks,
                  worker_id=worker_id, clock=clock)
