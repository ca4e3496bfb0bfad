"""The daemon's queue (:class:`~dgxqueue.daemon.queue_protocol.DaemonQueue`) keeps the same rules
on a real SQLite file, the real PostgreSQL and in memory. Every test goes through the Protocol, the
producer's door and the harness of ``tests/support/queues.py`` only, and runs on all three."""

from __future__ import annotations

from datetime import timedelta, timezone

import pytest

from dgxqueue.daemon.executor import Attempt
from dgxqueue.daemon.faults import UNCONFIRMED_REFUNDS, tally
from dgxqueue.daemon.isolation import timed_out
from dgxqueue.daemon.queue_protocol import JobResult
from dgxqueue.daemon.retry import MACHINE_FAULT_MARK
from dgxqueue.errors import JobTimeoutError
from dgxqueue.storage.queue import AttemptState
from dgxqueue.storage.results import Cancelled, Completed, Failed, Retried
from tests.support.queues import LEASE, MODEL, QueueBackend, completed, failed, ids, retried

PAST_LEASE = LEASE.total_seconds() + 5


def close_to(actual: timedelta | None, expected: timedelta, slack: float = 5.0) -> bool:
    return actual is not None and abs((actual - expected).total_seconds()) < slack


# --- claim ---


def test_claim__highest_priority_first_then_oldest(backend: QueueBackend) -> None:
    """A claim takes the highest priority first and, within a priority, the oldest job first."""
    old_low = backend.enqueue("old low", priority=0)
    high = backend.enqueue("high", priority=5)
    new_low = backend.enqueue("new low", priority=0)
    mid = backend.enqueue("mid", priority=2)
    queue = backend.queue()
    assert set(ids(queue.claim(2))) == {high, mid}
    assert ids(queue.claim(1)) == [old_low]
    assert ids(queue.claim(5)) == [new_low]
    assert queue.claim(5) == []


def test_claim__returns_its_jobs_oldest_first(backend: QueueBackend) -> None:
    """The claimed jobs come back in the order they were enqueued, whatever their priority."""
    first = backend.enqueue("first", priority=0)
    second = backend.enqueue("second", priority=9)
    third = backend.enqueue("third", priority=3)
    assert ids(backend.queue().claim(3)) == [first, second, third]


def test_claim__counts_an_attempt_and_holds_a_lease(backend: QueueBackend) -> None:
    """A claim hands out the job as enqueued, counts attempt 1 and holds a lease from the queue's clock."""
    job_id = backend.enqueue("a tune", metadata={"seed": 7, "tags": ["a", "b"]}, max_attempts=4)
    queue = backend.queue("me")
    [job] = queue.claim(1)
    assert (job.id, job.prompt, job.model_name, job.attempt, job.max_attempts) == (job_id, "a tune", MODEL, 1, 4)
    assert (job.duration_seconds, job.sample_rate, job.channels) == (0.05, 8000, 1)
    assert job.metadata == {"seed": 7, "tags": ["a", "b"]}
    assert job.file_path.endswith(f"/{job_id}.wav")
    assert (job.defect, job.lease_losses, job.suspect) == (None, 0, False)
    assert job.created_at.utcoffset() == timedelta(0) and job.claimed_at.utcoffset() == timedelta(0)
    row = backend.row(job_id)
    assert (row["status"], row["worker_id"], row["attempts"], row["started_at"]) == ("processing", "me", 1, None)
    assert close_to(row["lease_expires_at"] - backend.now(), LEASE)


def test_claim__only_the_models_it_serves(backend: QueueBackend) -> None:
    """A daemon claims only jobs of its own models; another daemon serves the rest."""
    mine = backend.enqueue("mine")
    other = backend.enqueue("other", model_name="other")
    assert ids(backend.queue("a").claim(10)) == [mine]
    assert ids(backend.queue("b", models=["other", "third"]).claim(10)) == [other]


def test_claim__not_before_its_run_after(backend: QueueBackend) -> None:
    """A job scheduled for later is not claimed until the queue's clock reaches its run_after."""
    job_id = backend.enqueue("later", run_after=backend.now() + timedelta(seconds=60))
    queue = backend.queue()
    assert queue.claim(5) == []
    backend.advance(61)
    assert ids(queue.claim(5)) == [job_id]


def test_claim__a_run_after_in_another_zone_compares_as_the_time_it_names(backend: QueueBackend) -> None:
    """A run_after given with a UTC offset is due at that instant, not at its wall-clock reading."""
    plus_two = timezone(timedelta(hours=2))
    backend.enqueue("later", run_after=(backend.now() + timedelta(minutes=30)).astimezone(plus_two))
    queue = backend.queue()
    assert queue.claim(1) == []
    assert close_to(queue.next_due(), timedelta(minutes=30))


def test_claim__two_daemons_never_share_a_job(backend: QueueBackend) -> None:
    """Jobs claimed by one daemon are not claimed by another."""
    enqueued = {backend.enqueue(f"job {i}") for i in range(5)}
    first, second = backend.queue("a").claim(3), backend.queue("b").claim(10)
    assert len(first) == 3 and len(second) == 2
    assert set(ids(first)) | set(ids(second)) == enqueued


def test_claim__start_marks_its_jobs_started(backend: QueueBackend) -> None:
    """A claim with start marks its jobs started, as a backend call would."""
    job_id = backend.enqueue()
    backend.queue().claim(1, start=True)
    assert backend.row(job_id)["started_at"] is not None


# --- heartbeat ---


def test_extend__refreshes_the_leases_it_still_holds(backend: QueueBackend) -> None:
    """A heartbeat pushes the lease a full lease from now, so the rescue leaves the job alone."""
    job_id = backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1)
    backend.advance(20)
    assert queue.extend([job]).held == {job_id}
    backend.advance(20)  # past the first lease, within the second
    assert queue.rescue() == ([], [])
    assert backend.row(job_id)["status"] == "processing"


def test_extend__not_an_attempt_it_no_longer_holds(backend: QueueBackend) -> None:
    """A heartbeat leaves alone a finished job, a job another daemon took over and an older attempt."""
    backend.enqueue("done")
    taken_id, retried_id = backend.enqueue("taken"), backend.enqueue("retried")
    queue = backend.queue("a")
    done, taken, old = queue.claim(3)
    assert queue.finish([completed(done), retried(old, backend.now())]) == [True, True]
    [again] = queue.claim(1)
    assert (again.id, again.attempt) == (retried_id, 2)
    backend.advance(PAST_LEASE)  # every lease, "taken"'s and the retry's, runs out
    queue.rescue()
    assert set(ids(backend.queue("b").claim(5))) == {taken_id, retried_id}
    assert queue.extend([done, taken, old, again]).held == set()


# --- start marks ---


def test_mark_started__only_jobs_this_daemon_holds(backend: QueueBackend) -> None:
    """A daemon marks started only the jobs it holds, not another daemon's."""
    a_id, b_id = backend.enqueue("a"), backend.enqueue("b")
    first, second = backend.queue("one"), backend.queue("two")
    [a], [b] = first.claim(1), second.claim(1)
    assert first.mark_started([a, b]) == {a_id}
    assert backend.row(a_id)["started_at"] is not None and backend.row(b_id)["started_at"] is None


def test_mark_started__a_cleared_mark_gets_the_attempt_back(backend: QueueBackend) -> None:
    """A start mark taken back (the call did not run the job) means its lost lease costs it nothing."""
    job_id = backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1, start=True)
    assert queue.mark_started([job], started=False) == {job_id}
    backend.advance(PAST_LEASE)
    assert queue.rescue() == ([job_id], [])
    assert (backend.row(job_id)["attempts"], backend.row(job_id)["lease_losses"]) == (0, 0)


# --- outcomes ---


def test_finish__records_each_outcome_of_a_batch(backend: QueueBackend) -> None:
    """One call records a completion, a failure and a retry, each on its own row."""
    done_id, bad_id, again_id = backend.enqueue("done"), backend.enqueue("bad"), backend.enqueue("again")
    queue = backend.queue("me")
    done, bad, again = queue.claim(3)
    later = backend.now() + timedelta(minutes=5)
    written = queue.finish([completed(done, size=4321, metadata={"bpm": 120}), failed(bad, "no good"),
                            retried(again, later, "once more")])
    assert written == [True, True, True]
    row = backend.row(done_id)
    # A completion keeps the attempt's token: the sweep publishes that attempt's file only.
    assert (row["status"], row["worker_id"], row["attempts"], row["file_size_bytes"]) == ("completed", "me", 1, 4321)
    assert (row["metadata"], row["error_message"], row["lease_expires_at"]) == ({"bpm": 120}, None, None)
    assert row["completed_at"] is not None
    row = backend.row(bad_id)
    assert (row["status"], row["error_message"], row["lease_expires_at"]) == ("failed", "no good", None)
    row = backend.row(again_id)
    assert (row["status"], row["worker_id"], row["error_message"], row["attempts"]) == ("pending", None, "once more", 1)
    assert close_to(row["run_after"] - backend.now(), timedelta(minutes=5))


def test_finish__a_daemon_that_lost_its_lease_writes_nothing(backend: QueueBackend) -> None:
    """The fencing token: after a rescue and a new claim, the old attempt's outcome is refused."""
    job_id = backend.enqueue()
    stalled, healthy = backend.queue("stalled"), backend.queue("healthy")
    [old] = stalled.claim(1)
    backend.advance(PAST_LEASE)
    stalled.rescue()
    [new] = healthy.claim(1)
    assert stalled.finish([completed(old)]) == [False]
    assert (backend.row(job_id)["status"], backend.row(job_id)["worker_id"]) == ("processing", "healthy")
    assert healthy.finish([completed(new)]) == [True]


def test_finish__the_same_daemons_next_attempt_refuses_the_older_one(backend: QueueBackend) -> None:
    """The attempt is part of the token: this daemon's outcome for attempt 1 cannot land on attempt 2."""
    job_id = backend.enqueue(max_attempts=3)
    queue = backend.queue()
    [first] = queue.claim(1, start=True)
    backend.advance(PAST_LEASE)
    queue.rescue()  # started: the attempt is spent
    [second] = queue.claim(1)
    assert second.attempt == 2
    assert queue.finish([failed(first)]) == [False]
    assert backend.row(job_id)["status"] == "processing"


def test_finish__an_outcome_is_written_once(backend: QueueBackend) -> None:
    """A second write of a recorded outcome is refused: the job is no longer held."""
    backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1)
    assert queue.finish([completed(job)]) == [True]
    assert queue.finish([failed(job)]) == [False]
    assert queue.finish([]) == []


def test_finish__a_retry_waits_out_its_backoff(backend: QueueBackend) -> None:
    """A retry is pending work at once (has_work) but is claimed only when its backoff is over."""
    job_id = backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1)
    queue.finish([retried(job, backend.now() + timedelta(seconds=60))])
    assert queue.has_work()
    assert queue.claim(1) == []
    assert close_to(queue.next_due(), timedelta(seconds=60))
    backend.advance(61)
    [again] = queue.claim(1)
    assert (again.id, again.attempt) == (job_id, 2)


def test_finish__a_retry_backoff_counts_from_the_queue_clock(backend: QueueBackend) -> None:
    """A retry given as a backoff is due that long after the queue's (the database's) now when it
    is written, whoever's clock the daemon reads; until then it is not claimed."""
    job_id = backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1)
    before = backend.now()
    assert queue.finish([(job, Retried(timedelta(seconds=60), "try again"))]) == [True]
    after = backend.now()
    run_after, slack = backend.row(job_id)["run_after"], timedelta(milliseconds=5)
    assert before + timedelta(seconds=60) - slack <= run_after <= after + timedelta(seconds=60) + slack
    assert queue.claim(1) == []
    assert close_to(queue.next_due(), timedelta(seconds=60))
    backend.advance(61)
    [again] = queue.claim(1)
    assert (again.id, again.attempt) == (job_id, 2)


@pytest.mark.parametrize("with_claim", [False, True], ids=["finish", "finish-and-claim"])
def test_finish__times_left_to_the_write_are_the_queue_clock(backend: QueueBackend, with_claim: bool) -> None:
    """A completion, a failure and a cancel given without their time are stamped with the
    queue's (the database's) now when written, whoever's clock the daemon reads, by both
    writes a daemon uses (alone, and with the next claim)."""
    done, broken, stopped = backend.enqueue("done"), backend.enqueue("broken"), backend.enqueue("stopped")
    queue = backend.queue()
    jobs = {job.id: job for job in queue.claim(3)}
    backend.cancel(stopped)
    backend.advance(3600)  # the stamps are the queue's now at the write, not at the claim
    results: list[JobResult] = [(jobs[done], Completed(None, 0.5, 10, {})), (jobs[broken], Failed(None, "boom", 0.5)),
                                (jobs[stopped], Cancelled(None, "cancelled by request while it ran"))]
    before = backend.now()
    written = queue.finish_and_claim(results, 5)[0] if with_claim else queue.finish(results)
    after = backend.now()
    assert written == [True, True, True]
    slack = timedelta(milliseconds=5)  # SQLite's clock reads whole milliseconds
    stamps = [backend.row(done)["completed_at"], backend.row(broken)["completed_at"],
              backend.row(stopped)["completed_at"], backend.row(stopped)["cancelled_at"]]
    for at in stamps:
        assert at is not None and before - slack <= at <= after + slack, (stamps, before, after)


def test_finish__a_time_limit_marks_the_job_to_run_alone(backend: QueueBackend) -> None:
    """A result of a call past its time limit marks the job suspect, so its next attempt runs alone."""
    backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1)
    overran = timed_out(Attempt(job, JobTimeoutError("over its limit"), 60.0))
    queue.finish([(job, Retried(backend.now(), "try again", timed_out=overran))])
    [again] = queue.claim(1)
    assert (again.attempt, again.lease_losses, again.suspect) == (2, 1, True)


def test_finish_and_claim__records_then_claims_at_once(backend: QueueBackend) -> None:
    """One call records the outcomes, then claims, and a retry without backoff may come straight back."""
    done_id, again_id = backend.enqueue("done", priority=1), backend.enqueue("again", priority=1)
    queue = backend.queue()
    done, again = queue.claim(2)
    fresh_id = backend.enqueue("fresh")
    written, claimed = queue.finish_and_claim([completed(done), retried(again, backend.now())], 5)
    assert written == [True, True]
    assert set(ids(claimed)) == {again_id, fresh_id}
    assert {job.id: job.attempt for job in claimed} == {again_id: 2, fresh_id: 1}
    assert backend.row(done_id)["status"] == "completed"


def test_finish_and_claim__a_fenced_outcome_still_claims(backend: QueueBackend) -> None:
    """An outcome refused by the fencing token does not stop the claim that goes with it."""
    backend.enqueue("lost", priority=1)
    stalled = backend.queue("stalled")
    [old] = stalled.claim(1)
    backend.advance(PAST_LEASE)
    stalled.rescue()
    backend.queue("other").claim(1)
    next_id = backend.enqueue("next")
    written, claimed = stalled.finish_and_claim([completed(old)], 5, start=True)
    assert (written, ids(claimed)) == ([False], [next_id])
    assert backend.row(next_id)["started_at"] is not None


# --- release ---


def test_release__gives_the_job_back_without_spending_its_attempt(backend: QueueBackend) -> None:
    """A released job is pending again, its attempt refunded, so the next claim is the same attempt."""
    job_id = backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1, start=True)
    assert queue.release([job]) == [True]
    row = backend.row(job_id)
    assert (row["status"], row["attempts"], row["worker_id"], row["claimed_at"]) == ("pending", 0, None, None)
    assert row["lease_expires_at"] is None
    [again] = queue.claim(1)
    assert again.attempt == 1


def test_release__leaves_a_message_or_keeps_the_last_error(backend: QueueBackend) -> None:
    """A release writes the message given for a job; without one the job's last error stays."""
    with_message, without = backend.enqueue("with"), backend.enqueue("without")
    queue = backend.queue()
    first, second = queue.claim(2)
    queue.finish([retried(second, backend.now(), "the last error")])
    [second] = queue.claim(1)
    assert queue.release([first, second], {with_message: "given back: disk full"}) == [True, True]
    assert queue.error_messages([with_message, without]) == {with_message: "given back: disk full",
                                                             without: "the last error"}
    assert backend.row(without)["attempts"] == 1  # the retry's attempt stays spent


def test_release__only_what_this_daemon_holds(backend: QueueBackend) -> None:
    """A daemon that lost a job cannot give it back: the new holder keeps it."""
    job_id = backend.enqueue()
    stalled = backend.queue("stalled")
    [old] = stalled.claim(1)
    backend.advance(PAST_LEASE)
    stalled.rescue()
    backend.queue("other").claim(1)
    assert stalled.release([old], {job_id: "not mine"}) == [False]
    row = backend.row(job_id)
    assert (row["status"], row["worker_id"], row["attempts"]) == ("processing", "other", 1)


def test_release__keeps_the_machine_fault_tally(backend: QueueBackend) -> None:
    """The refund tally of unconfirmed machine faults lives in error_message: a claim keeps it, a
    rescue replaces it."""
    job_id = backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1)
    mark = f"{MACHINE_FAULT_MARK}memory) [unconfirmed 2 of {UNCONFIRMED_REFUNDS}] MemoryError; given back"
    queue.release([job], {job_id: mark})
    assert tally(queue.error_messages([job_id])[job_id]) == 2
    queue.claim(1)
    assert tally(queue.error_messages([job_id])[job_id]) == 2
    backend.advance(PAST_LEASE)
    queue.rescue()
    assert tally(queue.error_messages([job_id])[job_id]) == 0


# --- rescue ---


def test_rescue__leaves_live_leases_alone(backend: QueueBackend) -> None:
    """The rescue takes nothing whose lease has not run out."""
    job_id = backend.enqueue()
    queue = backend.queue()
    queue.claim(1, start=True)
    backend.advance(LEASE.total_seconds() - 5)
    assert queue.rescue() == ([], [])
    assert backend.row(job_id)["status"] == "processing"


def test_rescue__refunds_jobs_no_call_started(backend: QueueBackend) -> None:
    """A job whose daemon died before any call started it goes back with its attempt refunded."""
    job_ids = {backend.enqueue("a"), backend.enqueue("b")}
    dead = backend.queue("dead")
    dead.claim(2)
    backend.advance(PAST_LEASE)
    requeued, failed_ids = backend.queue("rescuer").rescue()
    assert (set(requeued), failed_ids) == (job_ids, [])
    for job_id in job_ids:
        row = backend.row(job_id)
        assert (row["status"], row["attempts"], row["lease_losses"], row["worker_id"]) == ("pending", 0, 0, None)
        assert (row["claimed_at"], row["lease_expires_at"], row["run_after"]) == (None, None, None)
        assert row["error_message"].startswith("lease expired before it started")


def test_rescue__charges_a_running_job_and_marks_it_to_run_alone(backend: QueueBackend) -> None:
    """A job that was running when its lease ran out spends its attempt and is suspect from then on."""
    job_id = backend.enqueue(max_attempts=3)
    queue = backend.queue()
    [job] = queue.claim(1)
    queue.mark_started([job])
    backend.advance(PAST_LEASE)
    assert queue.rescue() == ([job_id], [])
    row = backend.row(job_id)
    assert (row["status"], row["attempts"], row["lease_losses"], row["started_at"]) == ("pending", 1, 1, None)
    assert row["error_message"] == ("lease lost while it ran: its daemon died or stalled (1 time(s)); requeued"
                                    " to run alone")
    [again] = queue.claim(1)
    assert (again.attempt, again.lease_losses, again.suspect) == (2, 1, True)


def test_rescue__a_batch_mate_on_its_last_attempt_gets_it_back(backend: QueueBackend) -> None:
    """A job that shared its last attempt with the one that killed the daemon (it never ran alone)
    is requeued with that attempt refunded, not failed."""
    job_id = backend.enqueue(max_attempts=1)
    queue = backend.queue()
    queue.claim(1, start=True)
    backend.advance(PAST_LEASE)
    assert queue.rescue() == ([job_id], [])
    row = backend.row(job_id)
    assert (row["status"], row["attempts"], row["lease_losses"]) == ("pending", 0, 1)


def test_rescue__fails_a_job_that_kills_its_daemon_alone_on_its_last_attempt(backend: QueueBackend) -> None:
    """A suspect whose last attempt, run alone, also ends with its lease lost is failed for good."""
    job_id = backend.enqueue(max_attempts=2)
    queue = backend.queue()
    for _ in range(2):
        queue.claim(1, start=True)
        backend.advance(PAST_LEASE)
        requeued, failed_ids = queue.rescue()
    assert (requeued, failed_ids) == ([], [job_id])
    row = backend.row(job_id)
    assert (row["status"], row["attempts"], row["lease_losses"], row["worker_id"]) == ("failed", 2, 2, None)
    assert row["lease_expires_at"] is None and row["completed_at"] is not None
    assert row["error_message"] == ("killed its daemon 2 times: its lease expired while it ran alone, on its"
                                    " last attempt")
    assert not queue.has_work()


# --- idle waiting ---


def test_has_work__due_jobs_or_retries_waiting_of_its_models(backend: QueueBackend) -> None:
    """has_work: a due job of its models, or a retry in its backoff; not a scheduled first attempt,
    another model's job or a job being run."""
    queue = backend.queue()
    assert not queue.has_work()
    backend.enqueue("other's", model_name="other")
    backend.enqueue("scheduled", run_after=backend.now() + timedelta(hours=1))
    assert not queue.has_work()
    due = backend.enqueue("due")
    assert queue.has_work()
    [job] = queue.claim(1)
    assert job.id == due and not queue.has_work()
    queue.finish([retried(job, backend.now() + timedelta(hours=1))])
    assert queue.has_work()


def test_next_due__the_earliest_scheduled_job_of_its_models(backend: QueueBackend) -> None:
    """next_due: how long until the earliest not-yet-due pending job of its models, else None."""
    queue = backend.queue()
    assert queue.next_due() is None
    backend.enqueue("due now")
    backend.enqueue("other's", model_name="other", run_after=backend.now() + timedelta(seconds=10))
    assert queue.next_due() is None
    backend.enqueue("in two minutes", run_after=backend.now() + timedelta(minutes=2))
    backend.enqueue("in one minute", run_after=backend.now() + timedelta(minutes=1))
    assert close_to(queue.next_due(), timedelta(minutes=1))
    backend.advance(90)
    assert close_to(queue.next_due(), timedelta(seconds=30))


# --- reads ---


def test_error_messages_and_attempts__read_the_rows_that_exist(backend: QueueBackend) -> None:
    """error_messages and attempts answer for the ids that exist and leave out the others."""
    done_id, waiting_id = backend.enqueue("done"), backend.enqueue("waiting")
    queue = backend.queue("me")
    [done] = queue.claim(1)
    queue.finish([completed(done, size=99)])
    assert queue.error_messages([done_id, waiting_id, "no-such-job"]) == {done_id: None, waiting_id: None}
    states = queue.attempts([done_id, waiting_id, "no-such-job"])
    assert states[done_id] == AttemptState("completed", "me", 1, backend.row(done_id)["file_path"], 99)
    assert states[waiting_id] == AttemptState("pending", None, 0, backend.row(waiting_id)["file_path"], None)
    assert set(states) == {done_id, waiting_id}


def test_ping_and_close__answer_without_error(backend: QueueBackend) -> None:
    """ping answers on a reachable queue, the stop's deadline starts unset, and close lets go."""
    queue = backend.queue("me", models=["b", "a"])
    queue.ping()
    assert (queue.worker_id, queue.models, queue.lease, queue.deadline) == ("me", ("a", "b"), LEASE, None)
    queue.close()
