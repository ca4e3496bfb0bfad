"""Operator rules of the queue (pause, resume, expiry), on SQLite, PostgreSQL and the in-memory queue."""

from __future__ import annotations

from datetime import timedelta

from tests.support.queues import QueueBackend, completed, ids


def test_pause__no_claim_takes_a_paused_models_jobs(backend: QueueBackend) -> None:
    """A paused model's jobs stay pending for every daemon; other models are claimed as before."""
    paused = backend.enqueue("paused")
    other = backend.enqueue("other", model_name="other")
    backend.pause()
    both = ["other", "scripted"]
    assert ids(backend.queue("a", models=both).claim(10)) == [other]
    assert backend.queue("b").claim(10) == []
    assert backend.row(paused)["status"] == "pending"


def test_pause__not_work_for_has_work_or_next_due(backend: QueueBackend) -> None:
    """A daemon whose only jobs are paused has no work and nothing coming due."""
    backend.enqueue("now")
    backend.enqueue("later", run_after=backend.now() + timedelta(seconds=60))
    queue = backend.queue()
    backend.pause()
    assert not queue.has_work()
    assert queue.next_due() is None
    backend.resume()
    assert queue.has_work()
    assert queue.next_due() is not None


def test_pause__a_running_job_still_finishes(backend: QueueBackend) -> None:
    """Pausing stops claims, not the jobs already held: their outcomes are written."""
    job_id = backend.enqueue("running")
    queue = backend.queue()
    [job] = queue.claim(1)
    backend.pause()
    assert queue.finish([completed(job)]) == [True]
    assert backend.row(job_id)["status"] == "completed"


def test_resume__the_next_claim_takes_the_jobs(backend: QueueBackend) -> None:
    """Resuming makes the model's jobs claimable again, in their usual order."""
    first = backend.enqueue("first")
    second = backend.enqueue("second")
    queue = backend.queue()
    backend.pause()
    assert queue.claim(5) == []
    backend.resume()
    assert ids(queue.claim(5)) == [first, second]


# --- expiry ---


def test_expiry__a_job_past_its_expires_at_is_never_claimed(backend: QueueBackend) -> None:
    """The claim leaves out a pending job whose expires_at has passed, even before the sweep."""
    job_id = backend.enqueue("soon gone", expires_at=backend.now() + timedelta(seconds=60))
    kept = backend.enqueue("kept", expires_at=backend.now() + timedelta(seconds=600))
    queue = backend.queue()
    backend.advance(61)
    assert ids(queue.claim(5)) == [kept]
    assert backend.row(job_id)["status"] == "pending"


def test_expiry__the_sweep_fails_expired_pending_jobs_unrun(backend: QueueBackend) -> None:
    """expire() fails each pending job past its expires_at, marks it expired and says so; a job
    without an expiry, one not yet expired, and a running one are left alone."""
    gone = backend.enqueue("gone", ttl=60)
    later = backend.enqueue("later", ttl=600)
    plain = backend.enqueue("plain")
    queue = backend.queue()
    running = backend.enqueue("running", ttl=60)
    backend.pause("other")  # nothing to do with it: another model's pause
    claimed = queue.claim(4)
    assert set(ids(claimed)) == {gone, later, plain, running}
    for job in claimed:  # give them back, but keep one running
        if job.id != running:
            queue.release([job])
    backend.advance(61)
    assert queue.expire() == [(gone, "scripted")]
    row = backend.row(gone)
    assert row["status"] == "failed" and row["expired_at"] is not None and row["completed_at"] is not None
    assert "expired" in row["error_message"]
    assert [backend.row(i)["status"] for i in (later, plain, running)] == ["pending", "pending", "processing"]
    assert queue.expire() == []
    assert set(ids(queue.claim(5))) == {later, plain}


def test_expiry__a_burst_daemon_has_no_work_in_expired_jobs(backend: QueueBackend) -> None:
    """has_work ignores an expired pending job, so a burst worker does not wait on it."""
    backend.enqueue("gone", ttl=60)
    queue = backend.queue()
    assert queue.has_work()
    backend.advance(61)
    assert not queue.has_work()


# --- dedupe ---


def test_dedupe__a_pending_holder_past_its_expiry_frees_the_key(backend: QueueBackend) -> None:
    """A pending holder past its expires_at, not yet swept, is expired by the enqueue that meets
    it, which makes a new job: the caller never gets back a job that cannot run."""
    first = backend.enqueue("first", dedupe_key="k", ttl=60)
    backend.advance(61)
    second = backend.enqueue("again", dedupe_key="k")
    assert second != first and backend.row(second)["status"] == "pending"
    row = backend.row(first)
    assert row["status"] == "failed" and row["expired_at"] is not None and "expired" in row["error_message"]
    assert backend.enqueue("once more", dedupe_key="k") == second


def test_dedupe__one_unfinished_job_per_key(backend: QueueBackend) -> None:
    """An enqueue with a key an unfinished job holds returns that job; once it has finished, the
    key makes a new job."""
    first = backend.enqueue("first", dedupe_key="k")
    assert backend.enqueue("again", dedupe_key="k") == first
    queue = backend.queue()
    [job] = queue.claim(5)
    assert backend.enqueue("while it runs", dedupe_key="k") == first
    queue.finish([completed(job)])
    second = backend.enqueue("after", dedupe_key="k")
    assert second != first and backend.row(second)["status"] == "pending"
