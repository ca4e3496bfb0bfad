"""Operator rules of the queue (pause, resume), on SQLite, PostgreSQL and the in-memory queue."""

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
