"""Leases: the jobs this daemon holds, the heartbeat that keeps them, the rescue of dead daemons' jobs.

Each service here has the same shape: ``run_once()`` is one step, which tests call directly;
``run_if_due(now)`` runs it when its due time (``due``, on ``time.monotonic()``) has come and
sets the next one. The daemon's loop calls ``run_if_due`` on every round; none of them has a
thread, so there is nothing to start or stop.

- :class:`Held`: the jobs claimed and not yet recorded, shared by the claimer (which adds them),
  the completer (which removes them as their outcomes are written) and the heartbeat.
- :class:`Heartbeat`: extends the held jobs' leases, and warns of a lease another daemon took; the
  same statement writes the jobs' latest progress and reads which have a cancel asked. Besides
  its lease period it beats about once a second while some progress changed
  (:data:`PROGRESS_INTERVAL`), so a row's progress is at most that old.
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
from dgxqueue.generators import JobControl
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
    # Each held job's progress and cancel flag, shared with the backend's requests by job id.
    controls: dict[str, JobControl] = field(default_factory=dict)
    # Attempts recorded cancelled while their backend call ran, by object identity: the call's
    # outcome for them, when it comes, is dropped and its file deleted (the job is kept, so its
    # identity cannot be reused).
    ended: dict[int, ClaimedJob] = field(default_factory=dict)

    def control(self, job_id: str) -> JobControl:
        """The job's control, made on first use (setdefault: atomic, whichever thread asks first)."""
        found = self.controls.get(job_id)
        return found if found is not None else self.controls.setdefault(job_id, JobControl())

    def cancelled(self, job_id: str) -> bool:
        found = self.controls.get(job_id)
        return found is not None and found.cancelled

    def forget(self, ids: set[str]) -> None:
        """These jobs' outcomes are written: this daemon holds them no more."""
        self.jobs = [job for job in self.jobs if job.id not in ids]
        for job_id in ids:
            self.controls.pop(job_id, None)


#: How often, at most, the heartbeat writes progress that changed (seconds).
PROGRESS_INTERVAL = 1.0


class Heartbeat:
    """Extends the leases of every held job, one deadline for all of them: a round of many short
    backend calls must still refresh the leases of the jobs waiting. Each beat also writes the
    held jobs' progress that changed and asks the backend to stop the jobs whose cancel was asked."""

    def __init__(self, store: DaemonQueue, held: Held, *, interval: float, log: FilteringBoundLogger,
                 progress_interval: float = PROGRESS_INTERVAL, hooks: Hooks | None = None) -> None:
        self.store = store
        self.held = held
        self.interval = interval
        self.progress_interval = progress_interval
        self.log = log
        self.hooks = hooks or Hooks()
        self.due = 0.0
        self.progress_due = 0.0
        self._written: dict[str, tuple[int, int]] = {}  # the progress last written, by job id
        #: Called with the ids of held jobs whose cancel was just noticed.
        self.on_cancel: Callable[[set[str]], None] | None = None
        #: The held attempts, as (job id, attempt), that the last beat found this daemon no longer
        #: holds (rescued, taken by another daemon): their outcomes are sure to be fenced off.
        self.lost: set[tuple[str, int]] = set()

    def restart(self, now: float) -> None:
        """The first jobs held since none were: their leases run from ``now``."""
        self.due = now + self.interval

    def run_if_due(self, now: float) -> None:
        if not self.held.jobs:
            return
        if now >= self.due:
            self.due = now + self.interval
            self.run_once()
        elif now >= self.progress_due:
            self.progress_due = now + self.progress_interval
            if self._changed():
                self.run_once()

    def _changed(self) -> dict[str, tuple[int, int]]:
        """The held jobs' progress that differs from what was last written."""
        controls, written = self.held.controls, self._written
        changed: dict[str, tuple[int, int]] = {}
        for job in self.held.jobs:
            control = controls.get(job.id)
            value = control.progress if control is not None else None
            if value is not None and written.get(job.id) != value:
                changed[job.id] = value
        return changed

    def run_once(self) -> None:
        if not self.held.jobs:
            return
        with outage_skips(self.log, "heartbeat failed: database unavailable"):
            self.refresh()

    def refresh(self) -> None:
        """Extend the leases now, write progress, notice cancels; warn of each lease lost (the
        database's error passes)."""
        changed = self._changed()
        beat = self.store.extend(self.held.jobs, changed or None)
        held_ids = {job.id for job in self.held.jobs}
        self._written = {k: v for k, v in {**self._written, **changed}.items() if k in held_ids}
        if changed:
            self.hooks.on_progress({job_id: value for job_id in held_ids
                                    if (value := self._written.get(job_id)) is not None})
        lost = {(job.id, job.attempt) for job in self.held.jobs if job.id not in beat.held}
        for job in self.held.jobs:
            if (job.id, job.attempt) in lost - self.lost:  # once an attempt: a lost lease stays lost
                self.log.warning("lease lost: another daemon may run this job; our outcome will be refused",
                                 job_id=job.id, model=job.model_name, attempt=job.attempt)
        self.lost = lost
        fresh = {job_id for job_id in beat.cancel_requested if not self.held.cancelled(job_id)}
        for job_id in fresh:
            self.held.control(job_id).cancel()
            self.log.info("cancel requested: stopping the job", job_id=job_id)
        if fresh and self.on_cancel is not None:
            self.on_cancel(fresh)


class Sweeper:
    """Settles the temporary WAVs crashes left in the outputs folder (:func:`staging.sweep`): at
    start and once a lease period, the time after which a dead attempt's row is rescued."""

    def __init__(self, store: DaemonQueue, outputs: Path, *, interval: float, log: FilteringBoundLogger) -> None:
        self.store = store
        self.outputs = outputs
        self.interval = interval
        self.log = log
        self.due = 0.0
        self.warned: staging.Warned = set()  # each temporary's warnings, given once by this daemon

    def run_if_due(self, now: float) -> None:
        if now >= self.due:
            self.run_once()

    def run_once(self) -> None:
        self.due = time.monotonic() + self.interval
        with outage_skips(self.log, "sweep of temporary files skipped: database unavailable"):
            swept = staging.sweep(self.outputs, self.store.attempts, self.warned)
            if swept.published or swept.deleted:
                self.log.info("swept temporary files", published=len(swept.published), deleted=len(swept.deleted),
                              kept=swept.kept)


class Rescuer:
    """Returns the jobs whose lease expired, any daemon's, to ``pending`` (or fails them once their
    attempts are spent), fails the pending jobs past their ``expires_at``, then sweeps when that is due."""

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
            expired = self.store.expire()
            if expired:
                self.hooks.on_expired(expired)
        if self.forget_dead is not None:
            self.forget_dead()
        self.sweeper.run_if_due(time.monotonic())
