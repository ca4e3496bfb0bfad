"""Leases: the jobs this daemon holds, the heartbeat that keeps them, the rescue of dead daemons' jobs.

Each service here has the same shape: ``run_once()`` is one step, which tests call directly;
``run_if_due(now)`` runs it when its due time (``due``, on ``time.monotonic()``) has come and
sets the next one. The daemon's loop calls ``run_if_due`` on every round; none of them has a
thread, so there is nothing to start or stop.

- :class:`Held`: the jobs claimed and not yet recorded, shared by the claimer (which adds them),
  the completer (which removes them as their outcomes are written) and the heartbeat.
- :class:`Heartbeat`: extends the held jobs' leases, and warns of a lease another daemon took.
- :class:`Rescuer`: returns expired leases of any daemon to ``pending`` (refreshing ours first),
  forgets dead daemons' registry entries, then, once a lease period, the :class:`Sweeper`
  settles the temporary WAVs dead attempts left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from dgxqueue.daemon import staging
from dgxqueue.daemon.outages import outage_skips
from dgxqueue.daemon.queue_protocol import DaemonQueue
from dgxqueue.hooks import Hooks
from dgxqueue.storage.claimed import ClaimedJob


@dataclass
class Held:
    """The jobs this daemon holds: claimed, their outcome not yet written."""

    jobs: list[ClaimedJob] = field(default_factory=list)  # every one held (includes ``next``)
    next: list[ClaimedJob] = field(default_factory=list)  # claimed, not yet started: run_once starts them
    premarked: set[str] = field(default_factory=set)  # of ``next``: marked started by their claim
    # Attempts superseded by a later claim of the same job by this daemon, by object identity:
    # a refund (rescue of a job that never started) lets the claim hand back the same
    # (worker, attempt) token, so only this daemon can tell its two attempts apart.
    superseded: dict[int, ClaimedJob] = field(default_factory=dict)

    def forget(self, ids: set[str]) -> None:
        """These jobs' outcomes are written: this daemon holds them no more."""
        self.jobs = [job for job in self.jobs if job.id not in ids]


class Heartbeat:
    """Extends the leases of every held job, one deadline for all of them: a round of many short
    backend calls must still refresh the leases of the jobs waiting."""

    def __init__(self, store: DaemonQueue, held: Held, *, interval: float, log: FilteringBoundLogger) -> None:
        self.store = store
        self.held = held
        self.interval = interval
        self.log = log
        self.due = 0.0

    def restart(self, now: float) -> None:
        """The first jobs held since none were: their leases run from ``now``."""
        self.due = now + self.interval

    def run_if_due(self, now: float) -> None:
        if self.held.jobs and now >= self.due:
            self.due = now + self.interval
            self.run_once()

    def run_once(self) -> None:
        if not self.held.jobs:
            return
        with outage_skips(self.log, "heartbeat failed: database unavailable"):
            self.refresh()

    def refresh(self) -> None:
        """Extend the leases now; warn of each one lost (the database's error passes)."""
        held = self.store.extend(self.held.jobs)
        for job in self.held.jobs:
            if job.id not in held:
                self.log.warning("lease lost: another daemon may run this job; our outcome will be refused",
                                 job_id=job.id, model=job.model_name, attempt=job.attempt)


class Sweeper:
    """Settles the temporary WAVs crashes left in the outputs folder (:func:`staging.sweep`): at
    start and once a lease period, the time after which a dead attempt's row is rescued."""

    def __init__(self, store: DaemonQueue, outputs: Path, *, interval: float, log: FilteringBoundLogger) -> None:
        self.store = store
        self.outputs = outputs
        self.interval = interval
        self.log = log
        self.due = 0.0

    def run_if_due(self, now: float) -> None:
        if now >= self.due:
            self.run_once()

    def run_once(self) -> None:
        self.due = time.monotonic() + self.interval
        with outage_skips(self.log, "sweep of temporary files skipped: database unavailable"):
            swept = staging.sweep(self.outputs, self.store.attempts)
            if swept.published or swept.deleted:
                self.log.info("swept temporary files", published=len(swept.published), deleted=len(swept.deleted),
                              kept=swept.kept)


class Rescuer:
    """Returns the jobs whose lease expired, any daemon's, to ``pending`` (or fails them once their
    attempts are spent), then sweeps when that is due."""

    def __init__(self, store: DaemonQueue, heartbeat: Heartbeat, sweeper: Sweeper, hooks: Hooks, *,
                 interval: float, log: FilteringBoundLogger, forget_dead: Callable[[], None] | None = None) -> None:
        """``forget_dead``: deletes dead daemons' registry entries (it logs its own failures)."""
        self.store = store
        self.heartbeat = heartbeat
        self.forget_dead = forget_dead
        self.sweeper = sweeper
        self.hooks = hooks
        self.interval = interval
        self.log = log
        self.due = 0.0

    def run_if_due(self, now: float) -> None:
        if now >= self.due:
            self.due = now + self.interval
            self.run_once()

    def run_once(self) -> None:
        with outage_skips(self.log, "rescue skipped: database unavailable"):
            if self.heartbeat.held.jobs:  # ours first: after an outage longer than a lease, it would take them back
                self.heartbeat.refresh()
            requeued, failed = self.store.rescue()
            if requeued or failed:
                self.hooks.on_rescued(requeued, failed)
        if self.forget_dead is not None:
            self.forget_dead()
        self.sweeper.run_if_due(time.monotonic())
