"""The daemon's registry entry (:mod:`dgxqueue.daemon.registration`) on the in-memory queue: it is
written at start, refreshed with what the daemon holds, removed on a clean stop, and a registry
that fails never stops the job work."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import structlog

import dgxqueue
from dgxqueue.daemon.leases import Held
from dgxqueue.daemon.registration import Registration
from dgxqueue.generators import GenerationRequest
from dgxqueue.storage.registry import DaemonEntry, LiveDaemon
from dgxqueue.testing import MemoryQueue
from tests.unit.test_daemon_loop import LEASE, CallingGenerator, Harness


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "outputs")


class BrokenRegistry(MemoryQueue):
    """A queue whose registry calls all fail; its job calls work."""

    def register(self, entry: DaemonEntry) -> None:
        raise RuntimeError("registry down")

    def refresh_registration(self, holding: Sequence[str]) -> bool:
        raise RuntimeError("registry down")

    def unregister(self) -> None:
        raise RuntimeError("registry down")

    def forget_dead_daemons(self) -> list[str]:
        raise RuntimeError("registry down")


def test_daemon__registers_with_its_fields_and_what_it_holds_then_leaves(harness: Harness) -> None:
    """While it runs a job the daemon is listed live with its fields and that job held; a clean
    stop (the burst's end) removes its entry."""
    job_id = harness.enqueue()
    seen: list[LiveDaemon] = []

    def look(requests: Sequence[GenerationRequest]) -> None:
        daemon.registration.run_once()  # the heartbeat's refresh, as the loop runs it when due
        seen.extend(harness.store.live_daemons())

    harness.generator = CallingGenerator(look)
    daemon = harness.daemon("w1")
    assert daemon.run(burst=True) == 0
    [entry] = seen
    assert (entry.id, entry.pid, entry.generator, entry.models, entry.version) == (
        "w1", os.getpid(), harness.generator.name, ("scripted",), dgxqueue.__version__)
    assert entry.holding == (job_id,) and not entry.stale
    assert harness.store.live_daemons(include_stale=True) == []


def test_daemon__a_failing_registry_never_stops_the_job_work(harness: Harness) -> None:
    """Every registry call failing: every job still completes, and the failure is logged once."""
    job_ids = [harness.enqueue() for _ in range(3)]
    queue = BrokenRegistry(harness.store, worker_id="w", models=["scripted"], lease=LEASE)
    with structlog.testing.capture_logs() as logs:
        daemon = harness.daemon(queue=queue)
        daemon.registration.log = structlog.get_logger()  # the daemon's logger is bound before capture
        assert daemon.run(burst=True) == 0
    assert [harness.status(job_id) for job_id in job_ids] == [("completed", 1)] * 3
    warnings = [entry for entry in logs if "registry" in entry["event"] and entry["log_level"] == "warning"]
    assert len(warnings) == 1 and "registry down" in warnings[0]["error"]


def test_registration__refreshes_while_idle_and_registers_again_once_forgotten(harness: Harness) -> None:
    """The entry is refreshed with nothing held (an idle daemon is live too), and an entry another
    daemon forgot (a long outage) is written again at the next refresh."""
    queue = harness.queue("w1")
    entry = DaemonEntry(id="w1", host="h", pid=1, generator="g", models=("scripted",), version="v")
    registration = Registration(queue, Held(), entry, interval=1.0, log=structlog.get_logger())
    registration.start(now=0.0)
    harness.clock.advance(LEASE.total_seconds() - 1)
    registration.run_if_due(now=0.5)  # not due: the entry ages
    registration.run_if_due(now=1.0)
    [live] = harness.store.live_daemons()
    assert live.heartbeat_at == harness.clock()
    harness.store.daemons.clear()
    registration.run_once()
    assert [d.id for d in harness.store.live_daemons()] == ["w1"]
    registration.stop()
    assert harness.store.daemons == {}
