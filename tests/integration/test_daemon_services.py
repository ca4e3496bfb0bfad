"""The daemon's services, each built without a Daemon and driven by its ``run_once`` step, on a real SQLite file."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from dgxqueue.daemon.claimer import Claimer
from dgxqueue.daemon.completer import Completer
from dgxqueue.daemon.diskcheck import OutputsCheck
from dgxqueue.daemon.executor import Attempt
from dgxqueue.daemon.leases import Heartbeat, Held, Rescuer, Sweeper
from dgxqueue.daemon.queue_client import QueueClient
from dgxqueue.daemon.runner import Runner
from dgxqueue.errors import PermanentGeneratorError
from dgxqueue.storage import Generation, create_generation, get_engine, get_generation, init_db, session_scope
from dgxqueue.storage.models import utcnow
from dgxqueue.systemd import Notifier
from tests.support.daemons import RecordingHooks, make_settings

LEASE = timedelta(seconds=30)


class PauseHooks(RecordingHooks):
    def __init__(self) -> None:
        super().__init__()
        self.paused: list[str | None] = []

    def on_claims_paused(self, reason: str | None) -> None:
        self.paused.append(reason)


@dataclass
class Services:
    """One daemon's services, wired as the Daemon wires them."""

    store: QueueClient
    held: Held
    heartbeat: Heartbeat
    rescuer: Rescuer
    claimer: Claimer
    completer: Completer
    outputs_check: OutputsCheck
    hooks: PauseHooks

    def close(self) -> None:
        self.store.close()


def services(url: str, outputs: Path, *, worker_id: str = "ours", batch_size: int = 2,
             writes_behind: bool = False, max_call_size: int = 2) -> Services:
    init_db(url)
    settings = make_settings(url, outputs, batch_size=batch_size)
    store = QueueClient(get_engine(url), worker_id=worker_id, models=["scripted"], lease=LEASE)
    hooks, held = PauseHooks(), Held()
    log = structlog.get_logger("dgxqueue.daemon").bind(worker_id=worker_id)
    heartbeat = Heartbeat(store, held, interval=settings.worker.heartbeat_seconds, log=log)
    sweeper = Sweeper(store, outputs, interval=settings.worker.lease_seconds, log=log)
    rescuer = Rescuer(store, heartbeat, sweeper, hooks, interval=settings.worker.rescue_interval_seconds, log=log)
    outputs_check = OutputsCheck(outputs, 0, interval=0.0)
    claimer = Claimer(store, held, heartbeat, batch_size=batch_size, max_call_size=lambda: max_call_size,
                      runner=Runner(), stopping=lambda: False, outputs_check=outputs_check, hooks=hooks,
                      notifier=Notifier({}), clock=utcnow, log=log)
    completer = Completer(store, held, claimer, settings=settings.worker, writes_behind=writes_behind, hooks=hooks,
                          clock=utcnow, rng=random.Random(0), log=log)
    return Services(store, held, heartbeat, rescuer, claimer, completer, outputs_check, hooks)


def enqueue(url: str, prompt: str = "fine") -> str:
    with session_scope(get_engine(url)) as s:
        return create_generation(s, prompt=prompt, model_name="scripted", duration_seconds=0.05,
                                 sample_rate=8000, channels=1).id


def row(url: str, job_id: str) -> Generation:
    with session_scope(get_engine(url)) as s:
        job = get_generation(s, job_id)
        assert job is not None
        return job


def set_lease(url: str, job_id: str, seconds: float) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(sa.update(Generation).where(Generation.id == job_id)
                     .values(lease_expires_at=utcnow() + timedelta(seconds=seconds)))


def failed(services: Services, job_id: str) -> Attempt:
    """A permanent failure of the held job ``job_id``: recorded failed, never retried."""
    [job] = [job for job in services.held.jobs if job.id == job_id]
    return Attempt(job, PermanentGeneratorError("refused"), 0.01)


def test_claimer__run_once_claims_a_batch_and_holds_it_for_the_next_round(sqlite_db_url: str, tmp_path: Path) -> None:
    """A claim of up to a batch: held, waiting to start, marked started by the claim (a call takes
    them all), their leases' heartbeat counted from now, and the hooks told."""
    s = services(sqlite_db_url, tmp_path / "outputs", batch_size=2, max_call_size=2)
    ids = [enqueue(sqlite_db_url) for _ in range(3)]
    try:
        claimed = s.claimer.run_once()
        assert [job.id for job in claimed] == ids[:2]
        assert s.held.jobs == claimed and s.held.next == claimed and s.held.premarked == set(ids[:2])
        assert s.heartbeat.due > 0 and s.hooks.claimed == ids[:2]
        assert row(sqlite_db_url, ids[0]).status == "processing" and row(sqlite_db_url, ids[2]).status == "pending"
    finally:
        s.close()


def test_claimer__a_claim_larger_than_a_call_does_not_mark_its_jobs_started(sqlite_db_url: str,
                                                                            tmp_path: Path) -> None:
    """When the backend takes fewer jobs a call than a claim holds, the claim marks none started:
    the daemon marks each call's jobs as it starts them."""
    s = services(sqlite_db_url, tmp_path / "outputs", batch_size=2, max_call_size=1)
    enqueue(sqlite_db_url), enqueue(sqlite_db_url)
    try:
        assert len(s.claimer.run_once()) == 2 and s.held.premarked == set()
    finally:
        s.close()


def test_claimer__the_outputs_pause_is_said_once_and_lifts_by_itself(sqlite_db_url: str, tmp_path: Path) -> None:
    """While the outputs folder is short of space the claimer may not claim, and says so once;
    once it has room again claims resume, said once too."""
    s = services(sqlite_db_url, tmp_path / "outputs")
    try:
        s.outputs_check.min_free_mb = 2**40  # more than any disk has
        assert not s.claimer.may_claim() and not s.claimer.may_claim()
        assert s.claimer.paused is not None and s.hooks.paused == ["disk_low"]
        s.outputs_check.min_free_mb = 0
        assert s.claimer.may_claim() and s.claimer.may_claim()
        assert s.claimer.paused is None and s.hooks.paused == ["disk_low", None]
    finally:
        s.close()


def test_heartbeat__run_once_extends_held_leases_and_warns_of_a_lost_one(sqlite_db_url: str, tmp_path: Path) -> None:
    """A heartbeat pushes the lease of each held job a lease period ahead; a job another daemon
    took over meanwhile is warned about as lost, and its row left alone."""
    s = services(sqlite_db_url, tmp_path / "outputs")
    kept, lost = enqueue(sqlite_db_url), enqueue(sqlite_db_url)
    try:
        s.claimer.run_once()
        set_lease(sqlite_db_url, kept, 1)
        with get_engine(sqlite_db_url).begin() as conn:
            conn.execute(sa.update(Generation).where(Generation.id == lost).values(worker_id="other"))
        with capture_logs() as logs:
            s.heartbeat.run_once()
        lease = row(sqlite_db_url, kept).lease_expires_at
        assert lease is not None and lease > utcnow() + LEASE - timedelta(seconds=5)
        assert [e["job_id"] for e in logs if e["event"].startswith("lease lost")] == [lost]
        assert row(sqlite_db_url, lost).worker_id == "other"
    finally:
        s.close()


def test_heartbeat__run_if_due_waits_for_its_due_time(sqlite_db_url: str, tmp_path: Path) -> None:
    """Before its due time the heartbeat writes nothing; at it, it extends and sets the next one."""
    s = services(sqlite_db_url, tmp_path / "outputs")
    job_id = enqueue(sqlite_db_url)
    try:
        s.claimer.run_once()
        set_lease(sqlite_db_url, job_id, 1)
        s.heartbeat.run_if_due(s.heartbeat.due - 0.1)
        before = row(sqlite_db_url, job_id).lease_expires_at
        assert before is not None and before < utcnow() + timedelta(seconds=5)
        s.heartbeat.run_if_due(s.heartbeat.due)
        after = row(sqlite_db_url, job_id).lease_expires_at
        assert after is not None and after > utcnow() + timedelta(seconds=20)
    finally:
        s.close()


def test_rescuer__run_once_requeues_a_dead_daemons_job_and_refreshes_ours_first(sqlite_db_url: str,
                                                                                 tmp_path: Path) -> None:
    """An expired lease of another daemon goes back to pending; this daemon's own held job, whose
    lease also ran out (an outage longer than a lease), is refreshed first and stays ours."""
    ours = services(sqlite_db_url, tmp_path / "outputs", batch_size=1)
    dead = services(sqlite_db_url, tmp_path / "outputs", worker_id="dead", batch_size=1)
    theirs, mine = enqueue(sqlite_db_url), enqueue(sqlite_db_url)
    try:
        assert [job.id for job in dead.claimer.run_once()] == [theirs]
        assert [job.id for job in ours.claimer.run_once()] == [mine]
        set_lease(sqlite_db_url, theirs, -60)
        set_lease(sqlite_db_url, mine, -60)
        ours.rescuer.run_once()
        assert ours.hooks.rescued == [([theirs], [])]
        assert row(sqlite_db_url, theirs).status == "pending"
        assert (row(sqlite_db_url, mine).status, row(sqlite_db_url, mine).worker_id) == ("processing", "ours")
    finally:
        ours.close()
        dead.close()


@pytest.mark.parametrize("writes_behind, render_seconds", [(False, 10.0), (True, 0.0)],
                         ids=["sqlite", "a-call-shorter-than-a-transaction"])
def test_completer__claim_next_round_writes_with_the_claim(sqlite_db_url: str, tmp_path: Path,
                                                           writes_behind: bool, render_seconds: float) -> None:
    """Write-with-claim: the pending outcome is written in the transaction that claims the next
    job, on an engine that never writes behind, or after a call too short to hide a write."""
    s = services(sqlite_db_url, tmp_path / "outputs", batch_size=1, writes_behind=writes_behind)
    first, second = enqueue(sqlite_db_url), enqueue(sqlite_db_url)
    try:
        s.claimer.run_once()
        s.held.next = []  # started
        s.completer.pending.append(failed(s, first))
        s.completer.claim_next_round(render_seconds)
        assert s.completer.pending == [] and row(sqlite_db_url, first).status == "failed"
        assert [job.id for job in s.held.next] == [second] and [job.id for job in s.held.jobs] == [second]
        assert s.hooks.outcomes(first) == ["failed"]
    finally:
        s.close()


def test_completer__claim_next_round_claims_alone_and_writes_behind(sqlite_db_url: str, tmp_path: Path) -> None:
    """Write-behind: after a call long enough to hide a write, the next job is claimed alone and
    the outcome stays pending until the next flush, which writes it in a transaction of its own."""
    s = services(sqlite_db_url, tmp_path / "outputs", batch_size=1, writes_behind=True)
    first, second = enqueue(sqlite_db_url), enqueue(sqlite_db_url)
    try:
        s.claimer.run_once()
        s.held.next = []  # started
        s.completer.pending.append(failed(s, first))
        s.completer.claim_next_round(1.0)
        assert [o.job.id for o in s.completer.pending] == [first] and row(sqlite_db_url, first).status == "processing"
        assert [job.id for job in s.held.next] == [second]
        s.completer.flush(claim_next=False)
        assert s.completer.pending == [] and row(sqlite_db_url, first).status == "failed"
        assert [job.id for job in s.held.jobs] == [second]
    finally:
        s.close()


def test_completer__release_gives_back_all_but_the_kept_with_their_marks(sqlite_db_url: str, tmp_path: Path) -> None:
    """Giving back: every held job but those kept goes back to pending, its attempt refunded and
    the given mark left as its error message; the kept one stays held."""
    s = services(sqlite_db_url, tmp_path / "outputs", batch_size=2)
    given, kept = enqueue(sqlite_db_url), enqueue(sqlite_db_url)
    try:
        s.claimer.run_once()
        s.completer.release(keep={kept}, marks={given: "machine fault (disk_full): given back"})
        job = row(sqlite_db_url, given)
        assert (job.status, job.attempts, job.error_message) == ("pending", 0, "machine fault (disk_full): given back")
        assert [job.id for job in s.held.jobs] == [kept] and s.hooks.outcomes(given) == ["released"]
        assert row(sqlite_db_url, kept).status == "processing"
    finally:
        s.close()
