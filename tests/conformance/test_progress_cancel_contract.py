"""Progress and cancelling a running job keep the same rules on SQLite, PostgreSQL and in memory
(issue 17): the heartbeat writes progress fenced on the attempt and reports held jobs whose
cancel was asked; a cancelled result fails the job with ``cancelled_at`` and is never retried."""

from __future__ import annotations

import pytest

from dgxqueue.errors import InvalidStateError
from dgxqueue.storage.results import Cancelled
from tests.support.queues import LEASE, QueueBackend, completed, failed


def test_extend__writes_the_progress_given_and_leaves_the_rest(backend: QueueBackend) -> None:
    """One heartbeat writes each job's own progress; a job given none keeps what it had."""
    first, second = backend.enqueue("first"), backend.enqueue("second")
    queue = backend.queue()
    jobs = queue.claim(2)
    assert queue.extend(jobs, {first: (3, 10), second: (1, 4)}).held == {first, second}
    assert queue.extend(jobs, {first: (7, 10)}).held == {first, second}
    assert (backend.row(first)["progress_done"], backend.row(first)["progress_total"]) == (7, 10)
    assert (backend.row(second)["progress_done"], backend.row(second)["progress_total"]) == (1, 4)


def test_extend__progress_of_an_attempt_no_longer_held_is_not_written(backend: QueueBackend) -> None:
    """Progress is fenced like the lease: a finished job's row is left as its result wrote it."""
    job_id = backend.enqueue()
    queue = backend.queue()
    [job] = queue.claim(1)
    assert queue.finish([completed(job)]) == [True]
    assert queue.extend([job], {job_id: (5, 10)}).held == set()
    assert backend.row(job_id)["progress_done"] is None


def test_cancel__a_running_job_is_reported_by_the_next_heartbeat(backend: QueueBackend) -> None:
    """A cancel of a processing job only asks: it stays processing, and the heartbeat of the daemon
    holding it reports it (and no other)."""
    job_id, other = backend.enqueue("stop me"), backend.enqueue("keep me")
    queue = backend.queue()
    jobs = queue.claim(2)
    assert queue.extend(jobs).cancel_requested == set()
    assert backend.cancel(job_id) == "processing"
    assert backend.row(job_id)["cancel_requested_at"] is not None
    beat = queue.extend(jobs)
    assert (beat.held, beat.cancel_requested) == ({job_id, other}, {job_id})


def test_cancel__a_pending_job_fails_at_once_a_finished_one_refuses(backend: QueueBackend) -> None:
    """A pending job is failed by the cancel itself, with cancelled_at; a finished one refuses."""
    done = backend.enqueue("done")
    queue = backend.queue()
    [job] = queue.claim(1)
    queue.finish([completed(job)])
    fresh = backend.enqueue("fresh")
    assert backend.cancel(fresh) == "failed"
    row = backend.row(fresh)
    assert row["cancelled_at"] is not None and row["error_message"] == "cancelled by request"
    with pytest.raises(InvalidStateError):
        backend.cancel(done)


def test_finish__a_cancelled_result_fails_the_job_for_good(backend: QueueBackend) -> None:
    """The Cancelled result: failed, cancelled_at set, its message kept, no retry whatever the
    attempts left; fenced like every result."""
    job_id = backend.enqueue(max_attempts=5)
    queue = backend.queue()
    [job] = queue.claim(1)
    backend.cancel(job_id)
    assert queue.finish([(job, Cancelled(backend.now(), "cancelled by request while it ran"))]) == [True]
    row = backend.row(job_id)
    assert (row["status"], row["error_message"]) == ("failed", "cancelled by request while it ran")
    assert row["cancelled_at"] is not None and row["completed_at"] is not None
    assert queue.claim(1) == []
    assert queue.finish([(job, Cancelled(backend.now(), "again"))]) == [False]


@pytest.mark.parametrize("started", [False, True])
def test_rescue__a_job_whose_cancel_was_asked_fails_cancelled_not_requeued(backend: QueueBackend,
                                                                            started: bool) -> None:
    """A cancel asked of a running job whose daemon then died is honoured by the rescue: the job
    fails cancelled instead of going back to pending to be run again (or to wait for ever)."""
    job_id = backend.enqueue(max_attempts=5)
    dead = backend.queue("dead")
    dead.claim(1, start=started)
    assert backend.cancel(job_id) == "processing"
    backend.advance(LEASE.total_seconds() + 5)
    assert backend.queue("rescuer").rescue() == ([], [job_id])
    row = backend.row(job_id)
    assert row["status"] == "failed" and row["error_message"].startswith("cancelled by request while it ran")
    assert row["cancelled_at"] is not None and row["completed_at"] is not None
    assert backend.queue("other").claim(1) == []


def test_release__of_a_job_whose_cancel_was_asked_leaves_it_to_fail_cancelled(backend: QueueBackend) -> None:
    """A daemon stopping gives back its jobs; one whose cancel was asked after its last heartbeat
    is not sent back to pending (another daemon would run it again): the rescue of its lease
    fails it as cancelled."""
    job_id = backend.enqueue()
    stopping = backend.queue("stopping")
    jobs = stopping.claim(1)
    assert backend.cancel(job_id) == "processing"
    assert stopping.release(jobs) == [False]
    assert backend.queue("other").claim(1) == []
    backend.advance(LEASE.total_seconds() + 5)
    assert backend.queue("rescuer").rescue() == ([], [job_id])
    assert backend.row(job_id)["cancelled_at"] is not None


def _progress(backend: QueueBackend, job_id: str) -> tuple[object, object]:
    row = backend.row(job_id)
    return row["progress_done"], row["progress_total"]


@pytest.mark.parametrize("with_claim", [False, True])
def test_finish__a_completed_job_reads_its_total_a_failed_one_where_it_stopped(backend: QueueBackend,
                                                                                 with_claim: bool) -> None:
    """Progress is written with the heartbeats, so a job that finished between two of them would
    keep its last report (40/50) for ever: the completion itself makes a known total done (50/50).
    A failed or cancelled job keeps where it stopped; a job that reported no progress stays NULL."""
    done, stopped, cancelled, silent = (backend.enqueue(name) for name in ("done", "stopped", "cancelled", "silent"))
    queue = backend.queue()
    jobs = {job.id: job for job in queue.claim(4)}
    queue.extend(list(jobs.values()), {done: (40, 50), stopped: (40, 50), cancelled: (40, 50)})
    results = [completed(jobs[done]), failed(jobs[stopped]), completed(jobs[silent]),
               (jobs[cancelled], Cancelled(backend.now(), "cancelled by request while it ran"))]
    written = queue.finish_and_claim(results, 5)[0] if with_claim else queue.finish(results)
    assert written == [True] * 4
    assert backend.row(done)["status"] == "completed" and _progress(backend, done) == (50, 50)
    assert backend.row(stopped)["status"] == "failed" and _progress(backend, stopped) == (40, 50)
    assert backend.row(cancelled)["status"] == "failed" and _progress(backend, cancelled) == (40, 50)
    assert backend.row(silent)["status"] == "completed" and _progress(backend, silent) == (None, None)


def test_finish__a_completion_alone_in_its_batch_reads_its_total(backend: QueueBackend) -> None:
    """The usual batch (every result a completion, one statement) fills the total as well."""
    job_id = backend.enqueue()
    queue = backend.queue()
    jobs = queue.claim(1)
    queue.extend(jobs, {job_id: (0, 7)})
    assert queue.finish([completed(jobs[0])]) == [True]
    assert _progress(backend, job_id) == (7, 7)
