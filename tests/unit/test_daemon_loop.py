"""The daemon's loop and completer rules on the in-memory queue (:mod:`dgxqueue.testing`): the
same daemon as in production, with the database's clock a :class:`ManualClock` that idle waits
move, so a retry's backoff or an expired lease costs no real time."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dgxqueue.daemon import EXIT_JOB_TIMEOUT, EXIT_MACHINE_FAULT, Daemon
from dgxqueue.daemon.faults import tally
from dgxqueue.generators import GenerationOutcome, GenerationRequest
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.testing import ManualClock, MemoryQueue, MemoryStore, MemoryWaker
from tests.support.daemons import RecordingHooks, make_settings
from tests.support.generators import ScriptedGenerator

LEASE = timedelta(seconds=30)


class Harness:
    """A daemon on an in-memory queue, with its store, clock, generator and hooks at hand."""

    def __init__(self, outputs: Path) -> None:
        self.outputs = outputs
        self.clock = ManualClock()
        self.store = MemoryStore(clock=self.clock)
        self.generator = ScriptedGenerator()
        self.hooks = RecordingHooks()

    def enqueue(self, prompt: str = "silence", **fields: Any) -> str:
        return self.store.enqueue(prompt, **{"model_name": "scripted", "duration_seconds": 0.05,
                                             "sample_rate": 8000, "channels": 1, **fields})

    def queue(self, worker_id: str = "w") -> MemoryQueue:
        return self.store.client(worker_id=worker_id, models=["scripted"], lease=LEASE)

    def daemon(self, worker_id: str = "w", queue: MemoryQueue | None = None, **worker: Any) -> Daemon:
        settings = make_settings("sqlite:///unused.db", self.outputs, lease_seconds=LEASE.total_seconds(), **worker)
        queue = queue or self.queue(worker_id)
        return Daemon(settings, queue=queue, generator=self.generator, hooks=self.hooks,
                      waker=MemoryWaker(self.store), clock=self.clock, rng=random.Random(7))

    def status(self, job_id: str) -> tuple[str, int]:
        row = self.store.jobs[job_id]
        return row["status"], row["attempts"]

    def wav(self, job_id: str) -> Path:
        return self.outputs.parent / str(self.store.jobs[job_id]["file_path"])


class CallingGenerator(ScriptedGenerator):
    """:class:`ScriptedGenerator` that calls ``during`` inside each backend call, before rendering."""

    def __init__(self, during: Callable[[Sequence[GenerationRequest]], None], **kw: Any) -> None:
        super().__init__(**kw)
        self.during = during

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        self.during(requests)
        return super().generate(requests)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "outputs")


def test_daemon__burst_drains_the_queue_and_exits(harness: Harness) -> None:
    """A burst run completes every job, writes each WAV at its path and exits 0 once drained."""
    job_ids = [harness.enqueue() for _ in range(5)]
    assert harness.daemon().run(burst=True) == 0
    for job_id in job_ids:
        assert harness.status(job_id) == ("completed", 1)
        assert harness.wav(job_id).stat().st_size > 44
        assert harness.hooks.outcomes(job_id) == ["completed"]


def test_daemon__a_fenced_outcome_is_not_reported_written(harness: Harness) -> None:
    """An outcome whose lease was taken over meanwhile is refused, reported fenced, and its file
    never published; the row stays the new holder's."""
    job_id = harness.enqueue()
    other = harness.queue("other")

    def take_over(requests: Sequence[GenerationRequest]) -> None:  # this daemon stalls past its lease
        harness.clock.advance(LEASE.total_seconds() + 1)
        other.rescue()
        assert [job.id for job in other.claim(1)] == [job_id]

    harness.generator = CallingGenerator(take_over)
    assert harness.daemon().run(burst=True) == 0
    assert harness.hooks.outcomes(job_id) == ["fenced"]
    assert (harness.store.jobs[job_id]["status"], harness.store.jobs[job_id]["worker_id"]) == ("processing", "other")
    assert not harness.wav(job_id).exists()
    assert list(harness.outputs.iterdir()) == []  # the temporary is deleted too


def test_daemon__graceful_stop_gives_claimed_jobs_back_unspent(harness: Harness) -> None:
    """A stop lets the running call finish and record its job; jobs claimed but not started go
    back pending with their attempt refunded."""
    job_ids = [harness.enqueue() for _ in range(3)]
    harness.generator = CallingGenerator(lambda requests: daemon.request_stop(), max_batch_size=1)
    daemon = harness.daemon(batch_size=3, grace_seconds=60.0)
    assert daemon.run() == 0
    first, *rest = job_ids
    assert harness.status(first) == ("completed", 1)
    for job_id in rest:
        assert harness.status(job_id) == ("pending", 0)
        assert harness.hooks.outcomes(job_id) == ["released"]
    assert harness.generator.batches == [[first]]


def test_daemon__a_transient_error_is_retried_after_its_backoff(harness: Harness) -> None:
    """A transient error sends the job back with a backoff, and the next attempt runs only once
    the queue's clock has passed it."""
    job_id = harness.enqueue("transient:1")
    started = harness.clock()
    daemon = harness.daemon(backoff_base_seconds=40.0, backoff_max_seconds=40.0)  # 20 s to 40 s
    assert daemon.run(burst=True) == 0
    assert harness.status(job_id) == ("completed", 2)
    assert harness.hooks.outcomes(job_id) == ["retried", "completed"]
    second_claim = harness.store.jobs[job_id]["claimed_at"] - started
    assert timedelta(seconds=20) <= second_claim <= timedelta(seconds=41)


def test_daemon__attempts_spent_fail_the_job(harness: Harness) -> None:
    """A job that keeps failing transiently is failed once its attempts are spent, naming the count."""
    job_id = harness.enqueue("transient:9", max_attempts=2)
    assert harness.daemon().run(burst=True) == 0
    assert harness.status(job_id) == ("failed", 2)
    assert harness.store.jobs[job_id]["error_message"].endswith("(gave up after 2 attempts)")
    assert harness.hooks.outcomes(job_id) == ["retried", "failed"]


def test_daemon__a_permanent_error_fails_at_once(harness: Harness) -> None:
    """A permanent error fails its job on the first attempt; its batch-mate completes."""
    bad, good = harness.enqueue("permanent"), harness.enqueue()
    assert harness.daemon().run(burst=True) == 0
    assert harness.status(bad) == ("failed", 1) and harness.status(good) == ("completed", 1)


def test_daemon__a_suspect_job_runs_alone_after_the_rest(harness: Harness) -> None:
    """A job that lost a lease while running runs in a backend call of its own, after its claim's
    other jobs, whose outcomes are written before it starts (nothing else in flight)."""
    suspect = harness.enqueue()
    harness.queue("dead").claim(1, start=True)  # its daemon dies running it
    harness.clock.advance(LEASE.total_seconds() + 1)
    trusted = [harness.enqueue() for _ in range(2)]
    unwritten_at_mark: list[tuple[list[str], list[str]]] = []
    queue = harness.queue()
    mark_started = queue.mark_started

    def watch(jobs: Sequence[ClaimedJob], *, started: bool = True) -> set[str]:
        if started:
            unwritten = [job_id for job_id in trusted if harness.status(job_id)[0] != "completed"]
            unwritten_at_mark.append(([job.id for job in jobs], unwritten))
        return mark_started(jobs, started=started)

    queue.mark_started = watch  # type: ignore[method-assign]
    assert harness.daemon(queue=queue).run(burst=True) == 0
    assert harness.generator.batches == [trusted, [suspect]]
    assert unwritten_at_mark == [([suspect], [])]
    assert harness.status(suspect) == ("completed", 2)
    assert harness.store.jobs[suspect]["lease_losses"] == 1


def test_daemon__rescues_a_dead_daemons_jobs_that_never_started(harness: Harness) -> None:
    """Jobs a dead daemon claimed but never started come back with their attempt refunded and run."""
    job_ids = [harness.enqueue() for _ in range(2)]
    harness.queue("dead").claim(2)
    harness.clock.advance(LEASE.total_seconds() + 1)
    assert harness.daemon().run(burst=True) == 0
    assert {job_id: harness.status(job_id) for job_id in job_ids} == dict.fromkeys(job_ids, ("completed", 1))
    assert [set(requeued) for requeued, _ in harness.hooks.rescued] == [set(job_ids)]


def test_daemon__a_machine_fault_gives_every_held_job_back_and_exits(harness: Harness) -> None:
    """Memory running out in a call is the machine's fault: the call's jobs and the rest go back
    unspent, the faulted one with its refund counted, and the daemon exits 75."""
    oom, mate = harness.enqueue("oom"), harness.enqueue()
    harness.generator = ScriptedGenerator(max_batch_size=1)
    assert harness.daemon(batch_size=2).run(burst=True) == EXIT_MACHINE_FAULT
    assert harness.status(oom) == ("pending", 0) and harness.status(mate) == ("pending", 0)
    assert tally(harness.store.jobs[oom]["error_message"]) == 1
    assert harness.generator.batches == [[oom]]


def test_daemon__takes_its_worker_id_from_the_queue(harness: Harness) -> None:
    """A daemon given a queue signs its attempts with the queue's worker id."""
    job_id = harness.enqueue()
    daemon = harness.daemon(worker_id="gpu-3")
    assert daemon.worker_id == "gpu-3"
    daemon.run(burst=True)
    assert harness.store.jobs[job_id]["worker_id"] == "gpu-3"


def test_daemon__refuses_a_worker_id_other_than_its_queues(harness: Harness) -> None:
    """The daemon names its temporaries after its own worker id and the queue signs the rows with
    its own: with two ids, every sweep would take this daemon's temporaries, in flight or
    committed, for a dead attempt's and delete them. A daemon given the queue's id, or none, is built."""
    settings = make_settings("sqlite:///unused.db", harness.outputs)
    with pytest.raises(ValueError, match="worker_id"):
        Daemon(settings, worker_id="a", queue=harness.queue("b"), generator=harness.generator,
               waker=MemoryWaker(harness.store))
    for worker_id in ("b", None):
        daemon = Daemon(settings, worker_id=worker_id, queue=harness.queue("b"), generator=harness.generator,
                        waker=MemoryWaker(harness.store))
        assert daemon.worker_id == "b"


def test_daemon__a_retry_after_a_thousand_attempts_backs_off_at_the_cap(harness: Harness) -> None:
    """A row written by plain SQL with attempts and max_attempts past a thousand (nothing but the
    producer's validation bounds them) is retried after the capped backoff: 2**attempt past
    float range raised OverflowError out of the retry decision, and the daemon died on the job."""
    job_id = harness.enqueue("transient:1")
    harness.store.jobs[job_id].update(attempts=1100, max_attempts=5000)  # as plain SQL would
    daemon = harness.daemon(backoff_base_seconds=2.0, backoff_max_seconds=40.0)
    assert daemon.run(burst=True) == 0
    assert harness.status(job_id) == ("completed", 1102)
    assert harness.hooks.outcomes(job_id) == ["retried", "completed"]


class ValidateBlocking(ScriptedGenerator):
    """``validate`` of the ``hang`` prompt does not return until the test sets ``gate``."""

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt == "hang":
            self.gate.wait(30)
        super().validate(request)


def test_daemon__a_claims_validate_past_the_time_limit_is_charged_to_its_job_alone(harness: Harness) -> None:
    """A claim of three validated together, one validate() never returning: at the time limit
    the daemon gives up on it (exit 124), charging that job alone (a transient timeout, marked
    to run alone); its claim-mates go back unspent, unmarked."""
    ids = [harness.enqueue("fine"), harness.enqueue("hang"), harness.enqueue("fine")]
    harness.generator = generator = ValidateBlocking()
    try:
        assert harness.daemon(batch_size=3, job_timeout_seconds=0.3).run() == EXIT_JOB_TIMEOUT
    finally:
        generator.gate.set()
    rows = harness.store.jobs
    hung = rows[ids[1]]
    assert (hung["status"], hung["attempts"], hung["lease_losses"]) == ("pending", 1, 1)
    assert "time limit of 0.3 s" in str(hung["error_message"])
    assert {(rows[j]["status"], rows[j]["attempts"], rows[j]["lease_losses"]) for j in (ids[0], ids[2])} == {
        ("pending", 0, 0)}
    assert generator.batches == []


@pytest.mark.parametrize(("calls_of", "hand_offs"), [(3, 1), (1, 4)], ids=["one-call", "three-calls"])
def test_daemon__a_claim_that_fits_one_call_is_planned_and_rendered_in_one_hand_off(
        harness: Harness, calls_of: int, hand_offs: int) -> None:
    """The claim's validate() and batch_key() run on the runner's thread; when the claim fits one
    call, that call renders it too: one hand-off to the runner a round, as when they ran on the
    main loop. A claim of several calls hands its plan back first (its marks are set and cleared
    between), then each call."""
    ids = [harness.enqueue() for _ in range(3)]
    harness.generator = ScriptedGenerator(max_batch_size=calls_of)
    daemon = harness.daemon(batch_size=3)
    submitted: list[object] = []
    submit = daemon.runner.submit

    def counting(fn: Callable[[], Any]) -> Any:
        submitted.append(fn)
        return submit(fn)

    daemon.runner.submit = counting  # type: ignore[method-assign]
    assert daemon.run(burst=True) == 0
    assert len(submitted) == 1 + hand_offs  # the generator's load, then the round
    assert {harness.status(j) for j in ids} == {("completed", 1)}
