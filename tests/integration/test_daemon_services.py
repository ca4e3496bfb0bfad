"""The daemon's services, each built without a Daemon and driven by its ``run_once`` step.

Most run on the in-memory queue (:mod:`dgxqueue.testing`, held to the same rules as the
databases by ``tests/conformance/``), where time passes when a test says so; each service keeps
at least one test on a real SQLite file."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from dgxqueue.daemon.claimer import Claimer
from dgxqueue.daemon.completer import Completer
from dgxqueue.daemon.diskcheck import OutputsCheck
from dgxqueue.daemon.executor import Attempt
from dgxqueue.daemon.leases import Heartbeat, Held, Rescuer, Sweeper
from dgxqueue.daemon.queue_protocol import DaemonQueue
from dgxqueue.daemon.runner import Runner
from dgxqueue.errors import PermanentGeneratorError
from dgxqueue.storage.models import G
from dgxqueue.systemd import Notifier
from tests.support.daemons import RecordingHooks, make_settings
from tests.support.db import sqlite_url
from tests.support.queues import DatabaseBackend, MemoryBackend, QueueBackend

LEASE = timedelta(seconds=30)


class PauseHooks(RecordingHooks):
    def __init__(self) -> None:
        super().__init__()
        self.paused: list[str | None] = []

    def on_claims_paused(self, reason: str | None) -> None:
        self.paused.append(reason)


@dataclass
class Services:
    """One daemon's services, wired as the Daemon wires them, on ``backend``'s queue."""

    backend: QueueBackend
    store: DaemonQueue
    held: Held
    heartbeat: Heartbeat
    rescuer: Rescuer
    claimer: Claimer
    completer: Completer
    outputs_check: OutputsCheck
    hooks: PauseHooks

    def enqueue(self) -> str:
        return self.backend.enqueue("fine")

    def row(self, job_id: str) -> dict[str, Any]:
        return self.backend.row(job_id)


def services(backend: QueueBackend, outputs: Path, *, worker_id: str = "ours", batch_size: int = 2,
             writes_behind: bool = False) -> Services:
    settings = make_settings("sqlite:///unused.db", outputs, batch_size=batch_size)
    store = backend.queue(worker_id, lease=LEASE)
    hooks, held = PauseHooks(), Held()
    log = structlog.get_logger("dgxqueue.daemon").bind(worker_id=worker_id)
    heartbeat = Heartbeat(store, held, interval=settings.worker.heartbeat_seconds, log=log)
    sweeper = Sweeper(store, outputs, interval=settings.worker.lease_seconds, log=log)
    rescuer = Rescuer(store, heartbeat, sweeper, hooks, interval=settings.worker.rescue_interval_seconds, log=log)
    outputs_check = OutputsCheck(outputs, 0, interval=0.0)
    claimer = Claimer(store, held, heartbeat, batch_size=batch_size,
                      runner=Runner(), stopping=lambda: False, outputs_check=outputs_check, hooks=hooks,
                      notifier=Notifier({}), clock=backend.now, log=log)
    completer = Completer(store, held, claimer, settings=settings.worker, writes_behind=writes_behind, hooks=hooks,
                          clock=backend.now, rng=random.Random(0), log=log)
    return Services(backend, store, held, heartbeat, rescuer, claimer, completer, outputs_check, hooks)


@pytest.fixture
def memory() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[DatabaseBackend]:
    backend = DatabaseBackend("sqlite", sqlite_url(tmp_path), tmp_path / "outputs")
    try:
        yield backend
    finally:
        backend.close()


def set_lease(backend: DatabaseBackend, job_id: str, seconds: float) -> None:
    """The job's lease ends ``seconds`` from now, by the database's clock."""
    with backend.engine.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == job_id).values(lease_expires_at=backend.now()
                                                                 + timedelta(seconds=seconds)))


def record_calls(store: DaemonQueue, *names: str) -> list[str]:
    """The names of ``store``'s methods among ``names`` as they are called, in order."""
    calls: list[str] = []

    def recorded(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return method(*args, **kwargs)
        return call

    for name in names:
        setattr(store, name, recorded(name, getattr(store, name)))
    return calls


def failed(services: Services, job_id: str) -> Attempt:
    """A permanent failure of the held job ``job_id``: recorded failed, never retried."""
    [job] = [job for job in services.held.jobs if job.id == job_id]
    return Attempt(job, PermanentGeneratorError("refused"), 0.01)


def test_claimer__run_once_claims_a_batch_and_holds_it_for_the_next_round(sqlite: DatabaseBackend,
                                                                          tmp_path: Path) -> None:
    """A claim of up to a batch: held, waiting to start, marked started by the claim (a call takes
    them all), their leases' heartbeat counted from now, and the hooks told."""
    s = services(sqlite, tmp_path / "outputs", batch_size=2)
    ids = [s.enqueue() for _ in range(3)]
    claimed = s.claimer.run_once()
    assert [job.id for job in claimed] == ids[:2]
    assert s.held.jobs == claimed and s.held.next == claimed and s.held.premarked == set(ids[:2])
    assert s.heartbeat.due > 0 and s.hooks.claimed == ids[:2]
    assert s.row(ids[0])["status"] == "processing" and s.row(ids[0])["started_at"] is not None
    assert s.row(ids[2])["status"] == "pending"


def test_claimer__a_claim_marks_its_jobs_started_unless_a_call_is_running(memory: MemoryBackend,
                                                                          tmp_path: Path) -> None:
    """A claim made while no backend call runs marks every job started, however many a call takes
    (the backend's validate and batch_key see them all before the first call: one that kills the
    daemon is charged, not refunded for ever); one made while a call runs (prefetch) marks none."""
    s = services(memory, tmp_path / "outputs", batch_size=2)
    ids = [s.enqueue(), s.enqueue()]
    assert len(s.claimer.run_once()) == 2 and s.held.premarked == set(ids)
    assert all(s.row(job_id)["started_at"] is not None for job_id in ids)
    busy = threading.Event()
    s.claimer.runner.submit(busy.wait)
    try:
        later = [s.enqueue(), s.enqueue()]
        assert len(s.claimer.run_once()) == 2 and s.held.premarked == set(ids)
        assert [s.row(job_id)["started_at"] for job_id in later] == [None, None]
    finally:
        busy.set()


def test_claimer__the_outputs_pause_is_said_once_and_lifts_by_itself(memory: MemoryBackend, tmp_path: Path) -> None:
    """While the outputs folder is short of space the claimer may not claim, and says so once;
    once it has room again claims resume, said once too."""
    s = services(memory, tmp_path / "outputs")
    s.outputs_check.min_free_mb = 2**40  # more than any disk has
    assert not s.claimer.may_claim() and not s.claimer.may_claim()
    assert s.claimer.paused is not None and s.hooks.paused == ["disk_low"]
    s.outputs_check.min_free_mb = 0
    assert s.claimer.may_claim() and s.claimer.may_claim()
    assert s.claimer.paused is None and s.hooks.paused == ["disk_low", None]


def test_claimer__a_disk_low_pause_is_said_once_while_the_free_space_moves(memory: MemoryBackend,
                                                                          tmp_path: Path) -> None:
    """The free space in the problem's message changes with every file any process writes; the
    pause is still one pause, said once (the claims-paused hook and the log), not once per check."""
    s = services(memory, tmp_path / "outputs")
    s.outputs_check.min_free_mb = 2**40
    assert not s.claimer.may_claim()
    first = s.claimer.paused
    (tmp_path / "ballast").write_bytes(os.urandom(4 * 2**20))  # 4 MiB fewer free, whatever else runs
    os.sync()
    assert not s.claimer.may_claim()
    assert first is not None and s.claimer.paused is not None and s.claimer.paused.message != first.message
    assert s.hooks.paused == ["disk_low"]


def test_heartbeat__run_once_extends_held_leases_and_warns_of_a_lost_one(sqlite: DatabaseBackend,
                                                                         tmp_path: Path) -> None:
    """A heartbeat pushes the lease of each held job a lease period ahead; a job another daemon
    took over meanwhile is warned about as lost, and its row left alone."""
    s = services(sqlite, tmp_path / "outputs")
    kept, lost = s.enqueue(), s.enqueue()
    s.claimer.run_once()
    set_lease(sqlite, kept, 1)
    with sqlite.engine.begin() as conn:
        conn.execute(sa.update(G).where(G.c.id == lost).values(worker_id="other"))
    with capture_logs() as logs:
        s.heartbeat.run_once()
    assert s.row(kept)["lease_expires_at"] > sqlite.now() + LEASE - timedelta(seconds=5)
    assert [e["job_id"] for e in logs if e["event"].startswith("lease lost")] == [lost]
    assert s.row(lost)["worker_id"] == "other"


def test_heartbeat__run_if_due_waits_for_its_due_time(memory: MemoryBackend, tmp_path: Path) -> None:
    """Before its due time the heartbeat writes nothing; at it, it extends and sets the next one."""
    s = services(memory, tmp_path / "outputs")
    job_id = s.enqueue()
    s.claimer.run_once()
    memory.advance(LEASE.total_seconds() - 1)  # one second of the lease left
    due = s.heartbeat.due
    s.heartbeat.run_if_due(due - 0.1)
    assert s.row(job_id)["lease_expires_at"] < memory.now() + timedelta(seconds=5) and s.heartbeat.due == due
    s.heartbeat.run_if_due(due)
    assert s.row(job_id)["lease_expires_at"] > memory.now() + timedelta(seconds=20)
    assert s.heartbeat.due == due + s.heartbeat.interval


def test_rescuer__run_once_requeues_a_dead_daemons_job_and_refreshes_ours_first(sqlite: DatabaseBackend,
                                                                                 tmp_path: Path) -> None:
    """An expired lease of another daemon goes back to pending; this daemon's own held job, whose
    lease also ran out (an outage longer than a lease), is refreshed first and stays ours."""
    ours = services(sqlite, tmp_path / "outputs", batch_size=1)
    dead = services(sqlite, tmp_path / "outputs", worker_id="dead", batch_size=1)
    theirs, mine = ours.enqueue(), ours.enqueue()
    assert [job.id for job in dead.claimer.run_once()] == [theirs]
    assert [job.id for job in ours.claimer.run_once()] == [mine]
    set_lease(sqlite, theirs, -60)
    set_lease(sqlite, mine, -60)
    ours.rescuer.run_once()
    assert ours.hooks.rescued == [([theirs], [])]
    assert ours.row(theirs)["status"] == "pending"
    assert (ours.row(mine)["status"], ours.row(mine)["worker_id"]) == ("processing", "ours")


@pytest.mark.parametrize("writes_behind, render_seconds", [(False, 10.0), (True, 0.0)],
                         ids=["never-behind", "a-call-shorter-than-a-transaction"])
def test_completer__claim_next_round_writes_with_the_claim(memory: MemoryBackend, tmp_path: Path,
                                                           writes_behind: bool, render_seconds: float) -> None:
    """Write-with-claim: the pending outcome is written in the transaction that claims the next
    job, on an engine that never writes behind (SQLite), or after a call too short to hide a write."""
    s = services(memory, tmp_path / "outputs", batch_size=1, writes_behind=writes_behind)
    first, second = s.enqueue(), s.enqueue()
    s.claimer.run_once()
    s.held.next = []  # started
    s.completer.pending.append(failed(s, first))
    calls = record_calls(s.store, "finish", "finish_and_claim", "claim")
    s.completer.claim_next_round(render_seconds)
    assert calls == ["finish_and_claim"]
    assert s.completer.pending == [] and s.row(first)["status"] == "failed"
    assert [job.id for job in s.held.next] == [second] and [job.id for job in s.held.jobs] == [second]
    assert s.hooks.outcomes(first) == ["failed"]


def test_completer__claim_next_round_claims_alone_and_writes_behind(sqlite: DatabaseBackend, tmp_path: Path) -> None:
    """Write-behind: after a call long enough to hide a write, the next job is claimed alone and
    the outcome stays pending until the next flush, which writes it in a transaction of its own."""
    s = services(sqlite, tmp_path / "outputs", batch_size=1, writes_behind=True)
    first, second = s.enqueue(), s.enqueue()
    s.claimer.run_once()
    s.held.next = []  # started
    s.completer.pending.append(failed(s, first))
    calls = record_calls(s.store, "finish", "finish_and_claim", "claim")
    s.completer.claim_next_round(1.0)
    assert calls == ["claim"]
    assert [o.job.id for o in s.completer.pending] == [first] and s.row(first)["status"] == "processing"
    assert [job.id for job in s.held.next] == [second]
    s.completer.flush(claim_next=False)
    assert calls == ["claim", "finish"]
    assert s.completer.pending == [] and s.row(first)["status"] == "failed"
    assert [job.id for job in s.held.jobs] == [second]


def test_completer__release_gives_back_all_but_the_kept_with_their_marks(memory: MemoryBackend,
                                                                          tmp_path: Path) -> None:
    """Giving back: every held job but those kept goes back to pending, its attempt refunded and
    the given mark left as its error message; the kept one stays held."""
    s = services(memory, tmp_path / "outputs", batch_size=2)
    given, kept = s.enqueue(), s.enqueue()
    s.claimer.run_once()
    s.completer.release(keep={kept}, marks={given: "machine fault (disk_full): given back"})
    job = s.row(given)
    assert (job["status"], job["attempts"], job["error_message"]) == ("pending", 0,
                                                                      "machine fault (disk_full): given back")
    assert [job.id for job in s.held.jobs] == [kept] and s.hooks.outcomes(given) == ["released"]
    assert s.row(kept)["status"] == "processing"
