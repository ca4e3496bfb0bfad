"""The daemon's entry in the registry of live daemons (:mod:`dgxqueue.storage.registry`).

:class:`Registration` registers the daemon when it starts, refreshes its entry (heartbeat, expiry
and the job ids it holds) at the lease heartbeat's cadence whether or not it holds jobs, forgets
dead daemons' entries when the rescuer runs, and removes its own on a clean stop. Like the
lease services, ``run_if_due(now)`` runs ``run_once`` when due; there is no thread.

The registry is for operators, not for the jobs: a registry call that fails (after the queue
client's short retries) is logged and the daemon goes on; the next heartbeat tries again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from structlog.typing import FilteringBoundLogger

from dgxqueue.daemon.leases import Held
from dgxqueue.daemon.queue_protocol import DaemonQueue
from dgxqueue.storage.registry import DaemonEntry


def entry_for(store: DaemonQueue, generator: str, version: str) -> DaemonEntry:
    """This process's registry entry for a daemon on ``store``."""
    return DaemonEntry(id=store.worker_id, host=socket.gethostname(), pid=os.getpid(), generator=generator,
                       models=store.models, version=version)


class Registration:
    """Keeps this daemon's registry entry live while it runs."""

    def __init__(self, store: DaemonQueue, held: Held, entry: DaemonEntry, *, interval: float,
                 log: FilteringBoundLogger) -> None:
        self.store = store
        self.held = held
        self.entry = entry
        self.interval = interval
        self.log = log
        self.due = 0.0
        self.registered = False
        self.started = False  # start() was called: stop() has an entry to remove
        self._failing = False  # warn once per run of failures, not on every heartbeat

    def start(self, now: float) -> None:
        """Register, and refresh one interval from ``now``."""
        self.due, self.started = now + self.interval, True
        self._try("register", self._register)

    def run_if_due(self, now: float) -> None:
        if self.started and now >= self.due:  # not before start(): a daemon still loading is not serving
            self.due = now + self.interval
            self.run_once()

    def run_once(self) -> None:
        """Refresh the entry (registering it again if it was forgotten or never written)."""
        self._try("refresh", self._refresh)

    def forget_dead(self) -> None:
        """Delete the entries of daemons dead long enough (the rescuer's round)."""
        forgotten: list[str] = []

        def forget() -> None:
            forgotten.extend(self.store.forget_dead_daemons())

        if self._try("forget dead daemons", forget) and forgotten:
            self.log.info("forgot dead daemons' registry entries", daemons=forgotten)

    def stop(self) -> None:
        """Remove the entry (a clean stop)."""
        if self.started and self._try("unregister", self.store.unregister):
            self.registered = False

    def _register(self) -> None:
        self.store.register(self.entry)
        self.registered = True
        if self.held.jobs:
            self.store.refresh_registration([job.id for job in self.held.jobs])

    def _refresh(self) -> None:
        if not self.registered or not self.store.refresh_registration([job.id for job in self.held.jobs]):
            self._register()

    def _try(self, what: str, call: Callable[[], None]) -> bool:
        try:
            call()
        except Exception as exc:  # any failure: the registry must never stop the job work
            if not self._failing:
                self.log.warning(f"registry {what} failed; the daemon goes on and tries again at the next "
                                 "heartbeat", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            self._failing = True
            return False
        if self._failing:
            self.log.info("registry writes work again")
            self._failing = False
        return True
