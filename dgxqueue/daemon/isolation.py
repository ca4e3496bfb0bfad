"""A job that may kill its daemon runs alone, so its batch-mates are never charged for it.

A job is suspect once an attempt of it ended with its lease lost while it ran (its daemon died
or stalled; the lease rescue counts it) or with the time limit (counted with the outcome). A
suspect runs in a backend call of its own, after the other jobs of its claim, with nothing else
in flight: if it kills the daemon again, only its own attempt is spent; the lease rescue gives
back the attempts of the jobs that had not started. A suspect's ``validate`` runs inside its
own backend call too (:func:`prepare_isolating`): validated with the claim, before any call, a
validate that kills the daemon was charged to every job the claim had marked started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence

from dgxqueue.daemon.executor import Attempt, Work, prepare, to_request
from dgxqueue.errors import JobTimeoutError
from dgxqueue.generators import Generator, split_into_batches
from dgxqueue.storage.claimed import ClaimedJob


def prepare_isolating(jobs: Sequence[ClaimedJob], generator: Generator) -> tuple[list[Work], list[Attempt]]:
    """:func:`~dgxqueue.daemon.executor.prepare`, but a suspect is not validated here: its own
    backend call does that (:func:`validate_alone`), after its start mark."""
    work, refused = prepare([job for job in jobs if not job.suspect], generator)
    for job in jobs:
        if not job.suspect:
            continue
        request = None
        if job.defect is None:
            with contextlib.suppress(Exception):  # prepare() words the refusal: it fails before validate
                request = to_request(job)
        if request is not None:
            work.append(Work(job, request))
            continue
        more, more_refused = prepare([job], generator)
        work.extend(more)
        refused.extend(more_refused)
    return work, refused


def validate_alone(batch: Sequence[Work], generator: Generator) -> tuple[list[Work], list[Attempt]]:
    """A suspect's batch validated, in its own backend call; any other batch as it is."""
    if not any(work.job.suspect for work in batch):
        return list(batch), []
    return prepare([work.job for work in batch], generator)


def split_isolating(work: Sequence[Work], key: Callable[[Work], Hashable], size: int) -> list[list[Work]]:
    """Batches of trusted jobs as the backend groups them, then each suspect alone, the least
    suspect first (the one that killed its daemon most often runs last)."""
    trusted = [w for w in work if not w.job.suspect]
    suspects = sorted((w for w in work if w.job.suspect), key=lambda w: w.job.lease_losses)
    return split_into_batches(trusted, key, size) + [[w] for w in suspects]


def timed_out(outcome: Attempt) -> bool:
    """The job's call overran the time limit: its result marks it suspect (storage counts it
    in ``lease_losses``)."""
    return isinstance(outcome.error, JobTimeoutError)
