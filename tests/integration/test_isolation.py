"""Job isolation in-process, on real SQLite and PostgreSQL: what the lease rescue charges, and
how the daemon runs a job suspected of killing daemons."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.generators import GenerationOutcome, GenerationRequest
from dgxqueue.storage import Generation, cancel_generation, create_generation, get_engine, queue, session_scope
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.models import utcnow
from tests.integration.test_db_clock import row
from tests.support import queue_calls
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.generators import ScriptedGenerator
from tests.support.processes import wait_until


def enqueue(url: str, prompt: str, **columns: Any) -> str:
    """A job; ``columns`` are then set by plain SQL, as any writer could."""
    with session_scope(get_engine(url)) as s:
        job_id = create_generation(s, prompt=prompt, model_name="scripted", duration_seconds=0.05,
                                   sample_rate=8000, channels=1).id
    if columns:
        with get_engine(url).begin() as conn:
            conn.execute(sa.update(Generation).where(Generation.id == job_id).values(**columns))
    return job_id


def test_rescue__refunds_jobs_never_started_and_fails_only_a_lone_repeat(engine: sa.Engine, db_url: str) -> None:
    """Expired leases of a dead daemon's claim: a job no backend call started gets its attempt
    back; a started one is marked and requeued; one that shared its last attempt gets it back
    to run alone; one that had already lost a lease (so ran alone) fails, naming the count."""
    unstarted = enqueue(db_url, "fine")
    started = enqueue(db_url, "fine")
    shared_last = enqueue(db_url, "fine", attempts=2)
    lone_repeat = enqueue(db_url, "fine", attempts=2, lease_losses=1)
    claimed = queue_calls.claim(engine, worker_id="dead", models=["scripted"], limit=4, lease=timedelta(seconds=30))
    assert {job.id for job in claimed} == {unstarted, started, shared_last, lone_repeat}
    queue_calls.mark_started(engine, worker_id="dead", ids=[started, shared_last, lone_repeat])
    with engine.begin() as conn:  # the daemon died long ago
        conn.execute(sa.update(Generation).values(lease_expires_at=utcnow() - timedelta(hours=1)))
    with session_scope(engine) as s:
        requeued, failed = queue.rescue_expired(s)
    assert set(requeued) == {unstarted, started, shared_last} and failed == [lone_repeat]
    state = {job_id: (row(db_url, job_id).status, row(db_url, job_id).attempts, row(db_url, job_id).lease_losses)
             for job_id in (unstarted, started, shared_last, lone_repeat)}
    assert state == {unstarted: ("pending", 0, 0), started: ("pending", 1, 1), shared_last: ("pending", 2, 1),
                     lone_repeat: ("failed", 3, 2)}
    assert "without spending an attempt" in (row(db_url, unstarted).error_message or "")
    assert "killed its daemon 2 times" in (row(db_url, lone_repeat).error_message or "")


class Observing(ScriptedGenerator):
    """Notes, at each call, which of the jobs ``ids`` are marked started."""

    def __init__(self, url: str, ids: Sequence[str]) -> None:
        super().__init__()
        self.url, self.ids = url, ids
        self.marked: list[set[str]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        self.marked.append({job_id for job_id in self.ids if row(self.url, job_id).started_at is not None})
        return super().generate(requests)


class Events(RecordingHooks):
    """The main loop's events in order: backend calls started, outcomes written."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def on_batch(self, size: int) -> None:
        self.events.append("call")

    def on_job_finished(self, job: ClaimedJob, outcome: str, *, generation_seconds: float | None,
                        audio_seconds: float | None, error: str | None) -> None:
        super().on_job_finished(job, outcome, generation_seconds=generation_seconds,
                                audio_seconds=audio_seconds, error=error)
        self.events.append(outcome)


def test_daemon__suspects_run_alone_after_the_rest_with_nothing_in_flight(engine: sa.Engine, db_url: str,
                                                                          tmp_path: Path) -> None:
    """A claim holding jobs that lost leases before: the others share a backend call, then each
    suspect runs in a call of its own, least suspect first, once every earlier outcome is
    written; each call's jobs, and only those and earlier ones, are marked started when it runs."""
    worst = enqueue(db_url, "fine", lease_losses=2)
    suspect = enqueue(db_url, "fine", lease_losses=1)
    trusted = [enqueue(db_url, "fine"), enqueue(db_url, "fine")]
    gen, hooks = Observing(db_url, [worst, suspect, *trusted]), Events()
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, hooks=hooks, batch_size=8)
    try:
        assert daemon.run_once() == 4
    finally:
        daemon.shutdown()
    assert gen.batches == [trusted, [suspect], [worst]]
    assert gen.marked == [set(trusted), {*trusted, suspect}, {*trusted, suspect, worst}]
    assert hooks.events == ["call", "completed", "completed", "call", "completed", "call", "completed"]
    assert {row(db_url, j).status for j in (worst, suspect, *trusted)} == {"completed"}


def test_daemon__time_limit_marks_the_job_to_run_alone(engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """A job past its time limit is retried, marked as a job that may stall its daemon: its next
    claim says it runs alone."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, job_timeout_seconds=0.3)
    job_id = enqueue(db_url, "block")
    try:
        assert daemon.run_once() == 1
    finally:
        gen.gate.set()
        daemon.shutdown()
    job = row(db_url, job_id)
    assert (job.status, job.lease_losses) == ("pending", 1) and "time limit" in (job.error_message or "")
    [again] = queue_calls.claim(engine, worker_id="w", models=["scripted"], limit=1, lease=timedelta(seconds=30))
    assert again.suspect and again.lease_losses == 1


def test_daemon__claims_mark_what_the_next_call_runs(engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """A claim made while no call runs marks its jobs started (no statement of its own per
    call), also when made with the last outcomes; and with calls smaller than the claim, each
    call marks its own jobs: either way a job is marked when its call runs, never before."""
    ids = [enqueue(db_url, "fine") for _ in range(4)]
    gen = Observing(db_url, ids)
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, batch_size=1)
    assert daemon.run(burst=True) == 0
    assert gen.batches == [[job_id] for job_id in ids]
    assert gen.marked == [set(ids[:k]) for k in range(1, 5)]
    more = [enqueue(db_url, "fine") for _ in range(4)]
    gen = Observing(db_url, more)
    gen.max_batch_size = 2
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, batch_size=4)
    assert daemon.run(burst=True) == 0
    assert gen.batches == [more[:2], more[2:]] and gen.marked == [set(more[:2]), set(more)]


class ValidateObserving(ScriptedGenerator):
    """Notes, at each validate, whether its job is marked started; calls of 2 jobs at most."""

    def __init__(self, url: str) -> None:
        super().__init__(max_batch_size=2)
        self.url = url
        self.marked: dict[str, list[bool]] = {}  # job id -> at each of its validates

    def validate(self, request: GenerationRequest) -> None:
        self.marked.setdefault(request.job_id, []).append(row(self.url, request.job_id).started_at is not None)
        super().validate(request)


class SecondClaimReleases(RecordingHooks):
    """Releases the ``block`` job once a second claim is made: that claim is made while its call runs."""

    def __init__(self, gen: ScriptedGenerator) -> None:
        super().__init__()
        self.gen = gen

    def on_claimed(self, jobs: Sequence[ClaimedJob], now: datetime) -> None:
        super().on_claimed(jobs, now)
        if len(self.claimed) > len(jobs):
            self.gen.gate.set()


@pytest.mark.parametrize(("batch_size", "prefetch"), [(4, False), (2, True)],
                         ids=["claim-larger-than-a-call", "claimed-while-a-call-runs"])
def test_daemon__a_job_is_validated_once_and_only_once_marked_started(
        engine: sa.Engine, db_url: str, tmp_path: Path, batch_size: int, prefetch: bool) -> None:
    """A claim that marks no job started (larger than a backend call, or made while one runs):
    each job is validated once, only when a call has marked it started, so a validate that
    kills the daemon is charged to its job; an invalid job still fails alone, with its message."""
    ids = [enqueue(db_url, prompt) for prompt in ["block" if prefetch else "fine", "fine", "invalid", "fine", "fine"]]
    gen = ValidateObserving(db_url)
    hooks = SecondClaimReleases(gen)
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, hooks=hooks, batch_size=batch_size, prefetch=prefetch)
    try:
        assert daemon.run(burst=True) == 0
    finally:
        gen.gate.set()
    assert gen.marked == {job_id: [True] for job_id in ids}
    invalid = row(db_url, ids[2])
    assert (invalid.status, invalid.error_message) == ("failed", "prompt 'invalid' is refused by the scripted backend")
    assert {row(db_url, j).status for j in ids[:2] + ids[3:]} == {"completed"}


class KeyRefusing(ScriptedGenerator):
    """Calls of 2 jobs at most, and no batch key for a request its validate refuses."""

    def batch_key(self, request: GenerationRequest) -> Hashable:
        if request.prompt == "invalid":
            raise ValueError("no key for an invalid request")
        return super().batch_key(request)


def test_daemon__a_job_not_validated_yet_that_the_backend_cannot_key_fails_alone(
        engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """A claim larger than a call is batched before its validates run: a request the backend
    cannot key runs in a call of its own, whose validate fails it; the daemon and the rest go on."""
    ids = [enqueue(db_url, prompt) for prompt in ["fine", "invalid", "fine", "fine"]]
    gen = KeyRefusing(max_batch_size=2)
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, batch_size=4)
    assert daemon.run(burst=True) == 0
    invalid = row(db_url, ids[1])
    assert (invalid.status, invalid.error_message) == ("failed", "prompt 'invalid' is refused by the scripted backend")
    assert {row(db_url, j).status for j in ids[:1] + ids[2:]} == {"completed"}
    assert gen.batches == [[ids[0], ids[2]], [ids[3]]]


class KeyCrashing(ScriptedGenerator):
    """No batch key for the ``key-crash`` prompt, which its validate accepts: a bug in the backend."""

    def batch_key(self, request: GenerationRequest) -> Hashable:
        if request.prompt == "key-crash":
            raise RuntimeError("scripted: batch_key crashed")
        return super().batch_key(request)


@pytest.mark.parametrize("max_batch_size", [4, 2], ids=["claim-fits-a-call", "claim-larger-than-a-call"])
def test_daemon__a_batch_key_that_raises_on_a_validated_job_is_that_jobs_error(
        engine: sa.Engine, db_url: str, tmp_path: Path, max_batch_size: int) -> None:
    """A claim validated together, one job's batch_key() raising an unexpected error: that job's
    error by validate()'s rule (retried, then failed), not the daemon's; the rest complete at their
    first attempt and the daemon goes on. Raised out of the claim's plan, it ended the daemon with
    the claim given back unspent, and the next daemon claimed the same job and ended again."""
    ids = [enqueue(db_url, prompt, max_attempts=2) for prompt in ["fine", "key-crash", "fine", "fine"]]
    daemon = make_daemon(db_url, tmp_path / "outputs", KeyCrashing(max_batch_size=max_batch_size), batch_size=4)
    assert daemon.run(burst=True) == 0
    crashed = row(db_url, ids[1])
    assert (crashed.status, crashed.attempts, crashed.error_message) == (
        "failed", 2, "RuntimeError: scripted: batch_key crashed (gave up after 2 attempts)")
    assert {(row(db_url, j).status, row(db_url, j).attempts) for j in ids if j != ids[1]} == {("completed", 1)}


class SlowToValidate(ScriptedGenerator):
    """``validate`` of a ``work:S`` prompt takes S seconds too (simulated work, as its render's),
    and of a ``validate:S`` prompt, which renders at once, S seconds."""

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt.startswith(("work:", "validate:")):
            threading.Event().wait(float(request.prompt.split(":")[1]))
        super().validate(request)


@pytest.mark.parametrize("prefetch", [False, True], ids=["plan-then-render", "prefetch"])
def test_daemon__a_claims_validate_and_its_render_each_get_the_time_limit(
        engine: sa.Engine, db_url: str, tmp_path: Path, prefetch: bool) -> None:
    """A claim that fits one call, planned and rendered in one hand-off to the runner (the loop
    told of the plan after the render, or before it, with ``worker.prefetch``): its validate() and
    its generate() each take less than the time limit, together more. The render is given the
    limit from its own start, as a call of its own is: the job completes at its first attempt.
    Timed from the plan's start, the render was given up on (exit 124) and the job charged a time
    limit that neither method overran."""
    job_id = enqueue(db_url, "work:1.2")
    daemon = make_daemon(db_url, tmp_path / "outputs", SlowToValidate(), batch_size=1, job_timeout_seconds=2.0,
                         prefetch=prefetch)
    assert daemon.run(burst=True) == 0
    assert (row(db_url, job_id).status, row(db_url, job_id).attempts) == ("completed", 1)


def test_daemon__each_validate_of_a_claim_gets_the_time_limit(engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """A claim of three validated together, each validate() taking less than the time limit and
    the three more: none is a method that did not return, so none is charged and all complete at
    their first attempt. Timed as one call, the third was charged a time limit (exit 124), logged
    as a validate() that did not return, and marked to run alone."""
    ids = [enqueue(db_url, "validate:0.4") for _ in range(3)]
    daemon = make_daemon(db_url, tmp_path / "outputs", SlowToValidate(), batch_size=3, job_timeout_seconds=1.0)
    assert daemon.run(burst=True) == 0
    assert {(row(db_url, j).status, row(db_url, j).attempts, row(db_url, j).lease_losses) for j in ids} == {
        ("completed", 1, 0)}


class ValidateGated(ScriptedGenerator):
    """``validate`` of the ``gated`` prompt waits until the test opens ``validate_gate``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.validating, self.validate_gate = threading.Event(), threading.Event()

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt == "gated":
            self.validating.set()
            self.validate_gate.wait(30)
        super().validate(request)


def test_daemon__the_loop_heartbeats_while_a_claim_is_validated_and_a_job_cancelled_meanwhile_never_runs(
        engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """A claim's validate() runs on the runner's thread, the loop heartbeating meanwhile: a job of
    the claim cancelled while another's validate() is slow is recorded cancelled within a
    heartbeat, and never reaches the backend once the validate returns (the cancel dropped its
    control: a fresh one would have let it render in full). On the main loop, the validate
    stalled the loop: no heartbeat, no cancel, no lease refreshed, until it returned."""
    gen, hooks = ValidateGated(), RecordingHooks()
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, hooks=hooks, heartbeat_seconds=0.2)
    gated, other = enqueue(db_url, "gated"), enqueue(db_url, "fine")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        assert gen.validating.wait(10)
        with session_scope(get_engine(db_url)) as s:
            assert cancel_generation(s, other).status == "processing"
        wait_until(lambda: row(db_url, other).status == "failed", 10, "the cancel to be recorded meanwhile")
    finally:
        gen.validate_gate.set()
        thread.join(20)
    assert not thread.is_alive()
    assert row(db_url, other).cancelled_at is not None and gen.executions[other] == 0
    assert row(db_url, gated).status == "completed" and gen.batches == [[gated]]
    assert hooks.outcomes(other) == ["cancelled"] and hooks.outcomes(gated) == ["completed"]
    assert daemon.held.controls == {} and daemon.held.ended == {}


def test_rescue__a_lease_that_expires_while_it_runs_is_sorted_by_its_row(engine: sa.Engine, db_url: str) -> None:
    """The rescue's statements each read the database's clock when they run, so a lease can
    expire between two of them (its daemon was killed a moment before). Such a job must still go
    where its row says, at this rescue or the next: a started job on its first attempt is
    requeued, never failed as one that killed its daemon alone; a job whose cancel was asked is
    failed cancelled, never requeued. (A fresh daemon waited 30 s in CI for a killed daemon's
    job that its rescue had failed this way.)"""
    started = enqueue(db_url, "fine")
    asked = enqueue(db_url, "fine")
    queue_calls.claim(engine, worker_id="dying", models=["scripted"], limit=2, lease=timedelta(seconds=30))
    queue_calls.mark_started(engine, worker_id="dying", ids=[started, asked])
    with engine.begin() as conn:
        conn.execute(sa.update(Generation).where(Generation.id == asked).values(cancel_requested_at=utcnow()))
    # Each lease expires just before the statement after the one that takes its job: plain SQL on
    # the rescue's own connection, in its transaction, as time passing between the statements.
    late = {"lease expired before it started": asked, "killed its daemon": started}

    def expire_midway(conn: sa.Connection, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        values = parameters.values() if isinstance(parameters, dict) else parameters or ()
        for marker, job_id in late.items():
            if any(isinstance(value, str) and marker in value for value in values):
                raw = cursor.connection.cursor()
                raw.execute(f"UPDATE generations SET lease_expires_at = '2000-01-01 00:00:00' WHERE id = '{job_id}'")
                raw.close()

    sa.event.listen(engine, "before_cursor_execute", expire_midway)
    try:
        with session_scope(engine) as s:
            first = queue.rescue_expired(s)
    finally:
        sa.event.remove(engine, "before_cursor_execute", expire_midway)
    # Neither taken by another statement: the cancelled one not requeued, the other not failed.
    assert (row(db_url, asked).status, row(db_url, started).status) == ("processing", "processing")
    with session_scope(engine) as s:  # the next rescue, a rescue interval later
        second = queue.rescue_expired(s)
    assert sorted(first[0] + second[0]) == [started] and sorted(first[1] + second[1]) == [asked]
    assert (row(db_url, started).status, row(db_url, started).attempts, row(db_url, started).lease_losses) \
        == ("pending", 1, 1)
    assert row(db_url, asked).status == "failed" and row(db_url, asked).cancelled_at is not None


def test_rescue__counters_at_the_integer_limits_never_stop_it(engine: sa.Engine, db_url: str) -> None:
    """Plain SQL can leave ``lease_losses`` at PostgreSQL's largest integer, or ``attempts`` and
    ``max_attempts`` at its smallest: the rescue's ``lease_losses + 1`` and ``attempts - 1`` then
    raised "integer out of range", rolling back every row of the rescue, and the daemon exited 70
    at each start, so no expired lease of any job was ever rescued. Such a row is sorted as any
    other (its counter kept where it cannot move), and the rows beside it are rescued too."""
    most, least = 2**31 - 1, -(2**31)
    gone = {"status": "processing", "worker_id": "dead", "started_at": utcnow() - timedelta(hours=2),
            "lease_expires_at": utcnow() - timedelta(hours=1)}
    spent_most = enqueue(db_url, "fine", **gone, attempts=3, lease_losses=most)
    live_most = enqueue(db_url, "fine", **gone, attempts=1, lease_losses=most)
    spent_least = enqueue(db_url, "fine", **gone, attempts=least, max_attempts=least)
    beside = enqueue(db_url, "fine", **gone, attempts=1)
    with session_scope(engine) as s:
        requeued, failed = queue.rescue_expired(s)
    assert sorted(requeued) == sorted([live_most, spent_least, beside]) and failed == [spent_most]
    state = {job_id: (row(db_url, job_id).status, row(db_url, job_id).attempts, row(db_url, job_id).lease_losses)
             for job_id in (spent_most, live_most, spent_least, beside)}
    assert state == {spent_most: ("failed", 3, most), live_most: ("pending", 1, most),
                     spent_least: ("pending", least, 1), beside: ("pending", 1, 1)}
    assert f"killed its daemon {most} times" in (row(db_url, spent_most).error_message or "")


class BatchSizes(RecordingHooks):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def on_batch(self, size: int) -> None:
        self.sizes.append(size)


def test_daemon__on_batch_counts_the_requests_that_reach_the_backend(
        engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """A claim larger than a call, validated in its calls: ``on_batch`` (dgxqueue_batch_size)
    counts each generate() call with the requests it got, not the jobs its validate refused."""
    ids = [enqueue(db_url, prompt) for prompt in ["invalid", "invalid", "invalid", "fine"]]
    gen, hooks = ScriptedGenerator(max_batch_size=2), BatchSizes()
    daemon = make_daemon(db_url, tmp_path / "outputs", gen, hooks=hooks, batch_size=4)
    assert daemon.run(burst=True) == 0
    assert gen.batches == [[ids[3]]]
    assert hooks.sizes == [1]
