"""Claiming: take the next jobs from the queue and hold them, unless the daemon may not claim.

What River calls the producer. :meth:`Claimer.run_once` claims up to a batch in a transaction of
its own and holds the jobs (:class:`~dgxqueue.daemon.leases.Held`) for the next round to start;
the completer claims through :meth:`Claimer.take` too, when its write shares the claim's
transaction. It has no thread and nothing to start or stop: the daemon's loop asks it to claim.

It claims nothing while the daemon stops, while a backend call is stuck, or while the outputs
folder cannot take files (:mod:`~dgxqueue.daemon.diskcheck`): that pause is said once when it
starts and once when it ends, and lifts by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime

from structlog.typing import FilteringBoundLogger

from dgxqueue.daemon.diskcheck import OutputsCheck, Problem
from dgxqueue.daemon.executor import Work
from dgxqueue.daemon.leases import Heartbeat, Held
from dgxqueue.daemon.outages import outage_skips
from dgxqueue.daemon.queue_protocol import DaemonQueue
from dgxqueue.daemon.runner import Runner
from dgxqueue.hooks import Hooks
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.systemd import Notifier


class Claimer:
    """Claims up to ``batch_size`` jobs of this daemon's models at a time and holds them."""

    def __init__(
        self,
        store: DaemonQueue,
        held: Held,
        heartbeat: Heartbeat,
        *,
        batch_size: int,
        runner: Runner,
        stopping: Callable[[], bool],
        outputs_check: OutputsCheck,
        hooks: Hooks,
        notifier: Notifier,
        clock: Callable[[], datetime],
        log: FilteringBoundLogger,
    ) -> None:
        self.store = store
        self.held = held
        self.heartbeat = heartbeat
        self.batch_size = batch_size
        self.runner = runner
        self.stopping = stopping
        self.outputs_check = outputs_check
        self.hooks = hooks
        self.notifier = notifier
        self.clock = clock
        self.log = log
        self.paused: Problem | None = None  # the outputs check's last problem, while it lasts

    def may_claim(self) -> bool:
        return not self.stopping() and not self.runner.stuck and self._outputs_ok()

    def _outputs_ok(self) -> bool:
        """The outputs check passes; its problem is said once when it starts and once when it ends."""
        problem = self.outputs_check.problem()
        # Compared by reason: the message's free space moves with every file written, the pause doesn't.
        if (problem and problem.reason) != (self.paused and self.paused.reason):
            if problem is not None:
                self.log.error("not claiming: the outputs folder cannot take files", reason=problem.reason,
                               problem=problem.message)
                self.notifier.status(f"paused: {problem.message}")
            else:
                self.log.info("outputs folder usable again; claiming", was=self.paused and self.paused.reason)
                self.notifier.status(f"serving {', '.join(self.store.models)}")
            self.hooks.on_claims_paused(problem.reason if problem else None)
        self.paused = problem
        return problem is None

    def run_once(self) -> list[ClaimedJob]:
        """Claim up to a batch, alone, and hold it for the next round; the caller has asked
        :meth:`may_claim`. Returns the jobs claimed."""
        now, start = self.clock(), self.starts()
        jobs = self.store.claim(self.batch_size, start=start)
        self.take(jobs, now, premarked=start)
        return jobs

    def starts(self) -> bool:
        """Whether a claim now marks its jobs started: one made while no backend call runs. The
        jobs the next call does not run are cleared before it starts (:meth:`unmark_not_first`).
        A claim larger than a call is marked too: the backend's ``validate`` and ``batch_key``
        run on all its jobs before the first call, and one that kills the daemon must be charged
        to the claim's jobs (which then run alone), not refunded to all for ever."""
        return not self.runner.busy

    def unmark_not_first(self, jobs: Sequence[ClaimedJob], premarked: set[str], batches: list[list[Work]]) -> None:
        """Clear the claim's start marks of the jobs the first call will not run (refused, of
        another batch key, suspects), before it starts."""
        first = {w.job.id for w in batches[0]} if batches else set()
        stale = [job for job in jobs if job.id in premarked and job.id not in first]
        if stale:
            with outage_skips(self.log, "could not clear start marks; if the next call kills the daemon these are "
                              "charged too", jobs=[job.id for job in stale]):
                self.store.mark_started(stale, started=False)

    def take(self, jobs: list[ClaimedJob], now: datetime, *, premarked: bool = False) -> None:
        """Hold claimed jobs; the next round starts them."""
        held = self.held
        if premarked:
            held.premarked.update(job.id for job in jobs)
        claimed = {job.id for job in jobs}
        for stale in [job for job in held.jobs if job.id in claimed]:
            self._supersede(stale)
        if jobs:
            if not held.jobs:  # their leases run from now
                self.heartbeat.restart(time.monotonic())
            held.next.extend(jobs)
            held.jobs.extend(jobs)
            self.hooks.on_claimed(jobs, now)

    def _supersede(self, stale: ClaimedJob) -> None:
        """This daemon claimed ``stale``'s job again: its lease was lost and the job requeued
        meanwhile. The older attempt is dead: its outcome must never be written (it would carry
        the same fencing token as the new claim) and its file never published."""
        self.log.warning("claimed again after its lease was lost: the earlier attempt is dropped",
                         job_id=stale.id, attempt=stale.attempt)
        held = self.held
        held.jobs = [job for job in held.jobs if job is not stale]
        if any(job is stale for job in held.next):  # never started: no outcome will come
            held.next = [job for job in held.next if job is not stale]
            self.hooks.on_job_finished(stale, "fenced", generation_seconds=None, audio_seconds=None, error=None)
        else:  # started: the completer drops its outcome when it arrives
            held.superseded[id(stale)] = stale
