"""Lifecycle hooks: how logs and metrics learn what the daemon does, without the loop knowing them.

The daemon calls one :class:`Hooks` object; :class:`HookChain` fans out to several. Every method
has a no-op default so an observer overrides only what it needs. Hooks run on the daemon's main
thread and must be quick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from dgxqueue.storage.claimed import ClaimedJob

#: Outcomes a finished attempt can have.
#: ``abandoned``: a give-back that a database outage prevented; the lease rescue returns the job.
#: ``cancelled``: failed because its cancel was asked while it ran; counted apart from ``failed``.
OUTCOMES = ("completed", "failed", "retried", "released", "fenced", "abandoned", "cancelled")


@dataclass(frozen=True)
class DaemonInfo:
    worker_id: str
    generator: str
    models: tuple[str, ...]
    engine: str  # "sqlite" or "postgresql"
    version: str


class Hooks:
    """Observer of the daemon's lifecycle. Subclass and override what you need."""

    def on_start(self, info: DaemonInfo) -> None:
        """The daemon is starting (before the model loads)."""

    def on_model_loaded(self, seconds: float) -> None:
        """The generator finished loading after ``seconds``."""

    def on_loop(self, monotonic: float) -> None:
        """The main loop went round (a claim, an idle poll or a heartbeat): it is alive."""

    def on_claimed(self, jobs: Sequence[ClaimedJob], now: datetime) -> None:
        """Jobs were claimed; ``now - job.created_at`` is each one's queue wait."""

    def on_batch(self, size: int) -> None:
        """A batch of ``size`` requests went to the generator in one call."""

    def on_job_finished(
        self,
        job: ClaimedJob,
        outcome: str,
        *,
        generation_seconds: float | None,
        audio_seconds: float | None,
        error: str | None,
    ) -> None:
        """An attempt ended with one of :data:`OUTCOMES`."""

    def on_progress(self, progress: Mapping[str, tuple[int, int]]) -> None:
        """The heartbeat wrote progress: the latest (done, total) of each held job that reported."""

    def on_rescued(self, requeued: Sequence[str], failed: Sequence[str]) -> None:
        """The rescuer returned expired jobs to the queue or failed them."""

    def on_expired(self, jobs: Sequence[tuple[str, str]]) -> None:
        """The rescuer failed pending jobs (id, model) that were past their ``expires_at``."""

    def on_claims_paused(self, reason: str | None) -> None:
        """The outputs check stopped claims for ``reason`` (see ``diskcheck``); None: they resume."""

    def on_machine_fault(self, reason: str) -> None:
        """A machine fault (see ``dgxqueue.machine_faults.machine_fault``): held jobs go back and the daemon exits."""

    def on_stop(self) -> None:
        """The daemon is exiting."""


class HookChain(Hooks):
    """Calls every hook in order."""

    def __init__(self, hooks: Sequence[Hooks]) -> None:
        self.hooks = tuple(hooks)

    def on_start(self, info: DaemonInfo) -> None:
        for hook in self.hooks:
            hook.on_start(info)

    def on_model_loaded(self, seconds: float) -> None:
        for hook in self.hooks:
            hook.on_model_loaded(seconds)

    def on_loop(self, monotonic: float) -> None:
        for hook in self.hooks:
            hook.on_loop(monotonic)

    def on_claimed(self, jobs: Sequence[ClaimedJob], now: datetime) -> None:
        for hook in self.hooks:
            hook.on_claimed(jobs, now)

    def on_batch(self, size: int) -> None:
        for hook in self.hooks:
            hook.on_batch(size)

    def on_job_finished(
        self, job: ClaimedJob, outcome: str, *, generation_seconds: float | None,
        audio_seconds: float | None, error: str | None,
    ) -> None:
        for hook in self.hooks:
            hook.on_job_finished(job, outcome, generation_seconds=generation_seconds,
                                 audio_seconds=audio_seconds, error=error)

    def on_progress(self, progress: Mapping[str, tuple[int, int]]) -> None:
        for hook in self.hooks:
            hook.on_progress(progress)

    def on_rescued(self, requeued: Sequence[str], failed: Sequence[str]) -> None:
        for hook in self.hooks:
            hook.on_rescued(requeued, failed)

    def on_expired(self, jobs: Sequence[tuple[str, str]]) -> None:
        for hook in self.hooks:
            hook.on_expired(jobs)

    def on_claims_paused(self, reason: str | None) -> None:
        for hook in self.hooks:
            hook.on_claims_paused(reason)

    def on_machine_fault(self, reason: str) -> None:
        for hook in self.hooks:
            hook.on_machine_fault(reason)

    def on_stop(self) -> None:
        for hook in self.hooks:
            hook.on_stop()
