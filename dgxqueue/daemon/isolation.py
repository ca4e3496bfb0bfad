"""A job that may kill its daemon runs alone, so its batch-mates are never charged for it.

A job is suspect once an attempt of it ended with its lease lost while it ran (its daemon died
or stalled; the lease rescue counts it) or with the time limit (counted with the outcome). A
suspect runs in a backend call of its own, after the other jobs of its claim, with nothing else
in flight: if it kills the daemon again, only its own attempt is spent; the lease rescue gives
back the attempts of the jobs that had not started.

A job's ``validate`` runs only once the job is marked started (:func:`prepare_isolating`), so
a validate that kills the daemon is charged to its job, which becomes suspect. The jobs of a
claim that marked them started are validated with the claim, suspects excepted: a suspect is
validated inside its own backend call, or a validate that kills the daemon again would be
charged to every job of its claim. So is each job of a claim that marked none (one made while
a call ran: see :meth:`Claimer.starts <dgxqueue.daemon.claimer.Claimer.starts>`), inside the call
that runs it, after that call's start mark: validated with the claim, before any mark, a validate
that killed the daemon was refunded to every job every time, and the restarted daemon claimed the
same job and died again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Hashable, Sequence

from dgxqueue.daemon.executor import Attempt, Work, prepare, to_request, validate
from dgxqueue.errors import JobTimeoutError
from dgxqueue.generators import Generator, split_into_batches
from dgxqueue.storage.claimed import ClaimedJob

_UNKEYED = object()  # the batch key of a job whose request the backend could not key


def prepare_isolating(jobs: Sequence[ClaimedJob], generator: Generator,
                      marked: Collection[str]) -> tuple[list[Work], list[Attempt]]:
    """:func:`~dgxqueue.daemon.executor.prepare`, but only the jobs already marked started
    (``marked``: by their claim) and not suspect are validated here; the others are validated in
    their own backend call (:func:`validate_unvalidated`), after its start mark."""
    work: list[Work] = []
    refused: list[Attempt] = []
    for job in jobs:
        request = None
        if job.defect is None and (job.suspect or job.id not in marked):
            with contextlib.suppress(Exception):  # prepare() words the refusal: it fails before validate
                request = to_request(job)
        if request is not None:
            work.append(Work(job, request, validated=False))
            continue
        more, more_refused = prepare([job], generator)
        work.extend(more)
        refused.extend(more_refused)
    return work, refused


def validate_unvalidated(batch: Sequence[Work], generator: Generator) -> tuple[list[Work], list[Attempt]]:
    """A batch's jobs not validated yet, validated in its backend call (after its start mark);
    those validated already as they are."""
    if all(work.validated for work in batch):
        return list(batch), []
    ready: list[Work] = []
    refused: list[Attempt] = []
    for work in batch:
        # Its own request, built with the claim: its control the heartbeat may have cancelled already.
        refusal = None if work.validated else validate(work.job, work.request, generator)
        if refusal is not None:
            refused.append(refusal)
        else:
            ready.append(work)
    return ready, refused


def split_isolating(work: Sequence[Work], key: Callable[[Work], Hashable], size: int) -> list[list[Work]]:
    """Batches of trusted jobs as the backend groups them, then each suspect alone, the least
    suspect first (the one that killed its daemon most often runs last). A job not validated yet
    whose request the backend cannot key runs alone: its validate, in its call, refuses it."""

    def keyed(w: Work) -> Hashable:
        try:
            return key(w)
        except Exception:
            if w.validated:
                raise
            return (_UNKEYED, w.job.id)

    trusted = [w for w in work if not w.job.suspect]
    suspects = sorted((w for w in work if w.job.suspect), key=lambda w: w.job.lease_losses)
    return split_into_batches(trusted, keyed, size) + [[w] for w in suspects]


def timed_out(outcome: Attempt) -> bool:
    """The job's call overran the time limit: its result marks it suspect (storage counts it
    in ``lease_losses``)."""
    return isinstance(outcome.error, JobTimeoutError)
