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

"With the claim" is on the runner's thread all the same (:func:`plan`, which the daemon waits for
as for a call), never on the main loop: a ``validate()`` or ``batch_key()`` that never returns is
then a call given up on at a stop's grace (its jobs go back unspent) or at the time limit (charged
to that one job), not a stalled loop that the watchdog ends, charging the whole claim, or that a
stop's hard limit ends as if a database call had hung.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Hashable, Sequence

from dgxqueue.daemon.executor import Attempt, Work, backend_error, prepare, to_request, validate
from dgxqueue.daemon.runner import Doing
from dgxqueue.errors import JobTimeoutError
from dgxqueue.generators import Generator, split_into_batches
from dgxqueue.storage.claimed import ClaimedJob

_UNKEYED = object()  # the batch key of a job whose request the backend could not key


def plan(jobs: Sequence[ClaimedJob], generator: Generator, marked: Collection[str], size: int,
         doing: Doing) -> tuple[list[list[Work]], list[Attempt]]:
    """A claim's backend calls, in order (:func:`split_isolating`), and the jobs refused before
    any (:func:`prepare_isolating`). Run on the runner's thread, as every backend method is: a
    ``validate()`` or ``batch_key()`` that never returns is then a call the main loop gives up on
    at a stop's grace or at the time limit, charged to that job (``doing`` names it), not a
    stalled main loop that only the watchdog ends. A ``batch_key()`` that raises on a request its
    ``validate()`` accepted is that job's error (:func:`~dgxqueue.daemon.executor.backend_error`),
    never the daemon's: raised out of the plan, it ended the process, the claim went back unspent,
    and the restarted daemon claimed the same job and died again."""
    work, refused = prepare_isolating(jobs, generator, marked, doing)
    keys: dict[str, Hashable] = {}
    for w in work:
        if w.job.suspect:  # never keyed: it runs alone
            continue
        doing("batch_key", w.job.id)
        try:
            key = generator.batch_key(w.request)
            hash(key)
        except BaseException as exc:  # SystemExit too: the backend's own on the runner's thread
            if w.validated:  # on a request the backend accepted: this job's error, as validate's would be
                refused.append(backend_error(w.job, exc))
                continue
            key = (_UNKEYED, w.job.id)  # it runs alone, and its validate, in its call, judges it
        keys[w.job.id] = key
    kept = [w for w in work if w.job.suspect or w.job.id in keys]
    return split_isolating(kept, lambda w: keys[w.job.id], size), refused


def prepare_isolating(jobs: Sequence[ClaimedJob], generator: Generator, marked: Collection[str],
                      doing: Doing | None = None) -> tuple[list[Work], list[Attempt]]:
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
        more, more_refused = prepare([job], generator, doing)
        work.extend(more)
        refused.extend(more_refused)
    return work, refused


def validate_unvalidated(batch: Sequence[Work], generator: Generator,
                         doing: Doing | None = None) -> tuple[list[Work], list[Attempt]]:
    """A batch's jobs not validated yet, validated in its backend call (after its start mark);
    those validated already as they are."""
    if all(work.validated for work in batch):
        return list(batch), []
    ready: list[Work] = []
    refused: list[Attempt] = []
    for work in batch:
        # Its own request, built with the claim: its control the heartbeat may have cancelled already.
        refusal = None if work.validated else validate(work.job, work.request, generator, doing)
        if refusal is not None:
            refused.append(refusal)
        else:
            ready.append(work)
    return ready, refused


def split_isolating(work: Sequence[Work], key: Callable[[Work], Hashable], size: int) -> list[list[Work]]:
    """Batches of trusted jobs as ``key`` groups them, then each suspect alone (never keyed), the
    least suspect first (the one that killed its daemon most often runs last)."""
    trusted = [w for w in work if not w.job.suspect]
    suspects = sorted((w for w in work if w.job.suspect), key=lambda w: w.job.lease_losses)
    return split_into_batches(trusted, key, size) + [[w] for w in suspects]


def timed_out(outcome: Attempt) -> bool:
    """The job's call overran the time limit: its result marks it suspect (storage counts it
    in ``lease_losses``)."""
    return isinstance(outcome.error, JobTimeoutError)
