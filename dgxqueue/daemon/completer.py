"""The completer: record each attempt's outcome in its job's row (fenced), publish its file, tell the hooks.

Finished outcomes wait in :attr:`Completer.pending` until the daemon's loop has them written,
by one of two strategies:

- **write-with-claim**: the outcomes and the claim of the next jobs share one transaction
  (``DaemonQueue.finish_and_claim``), which saves a commit a round. ``flush(claim_next=True)``.
- **write-behind**: the next jobs are claimed alone, and the outcomes are written in a transaction
  of their own (``DaemonQueue.finish``) while the next backend call renders, which hides the
  write. ``flush(claim_next=False)``; also how the last outcomes are written before a stop.

:meth:`Completer.claim_next_round` makes the choice at the end of each round; the daemon's loop
leaves outcomes to be written behind the next render on its own in two cases: a backend call of
a round that has more (the previous call's outcomes are written while it renders) and
``worker.prefetch`` (the next jobs were claimed while the round's last call rendered).

:meth:`Completer._row_write` is the one place where an outcome becomes what its row is written
with. It has no thread and nothing to start or stop.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from random import Random

from structlog.typing import FilteringBoundLogger

from dgxqueue import faultpoints
from dgxqueue.config import WorkerSettings
from dgxqueue.daemon import staging
from dgxqueue.daemon.claimer import Claimer
from dgxqueue.daemon.executor import Attempt, cancelled, pending_files
from dgxqueue.daemon.isolation import timed_out
from dgxqueue.daemon.leases import Held
from dgxqueue.daemon.outages import outage_skips
from dgxqueue.daemon.queue_protocol import DaemonQueue
from dgxqueue.daemon.retry import decide
from dgxqueue.errors import DgxQueueError, JobCancelledError, OutputError, PathTakenError
from dgxqueue.hooks import Hooks
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.dberrors import is_transient_db_error
from dgxqueue.storage.models import FAILED
from dgxqueue.storage.results import Cancelled, Completed, Failed, Result, Retried

# A backend call longer than a transaction's fixed cost (a round trip and a commit) hides the
# outcome write that runs beside it; see Completer.claim_next_round.
HIDE_WRITES_AFTER = 0.001


class Completer:
    """Writes outcomes for one daemon, fenced by each attempt's (worker, attempt) token."""

    def __init__(
        self,
        store: DaemonQueue,
        held: Held,
        claimer: Claimer,
        *,
        settings: WorkerSettings,
        writes_behind: bool,
        hooks: Hooks,
        clock: Callable[[], datetime],
        rng: Random,
        log: FilteringBoundLogger,
    ) -> None:
        self.store = store
        self.held = held
        self.claimer = claimer
        self.settings = settings
        # Whether hiding a write behind the render may pay: not on SQLite, whose one writer lock
        # for every process makes a transaction more per round cost every daemon sharing the file
        # more than hiding the write gains one.
        self.writes_behind = writes_behind
        self.hooks = hooks
        self.clock = clock
        self.rng = rng
        self.log = log
        self.pending: list[Attempt] = []  # outcomes not yet written

    # --- the strategies -------------------------------------------------------------------

    def claim_next_round(self, render_seconds: float) -> None:
        """Claim the next jobs, alone (write-behind: :attr:`pending` is written while the next
        call renders) or with this round's outcomes (write-with-claim).

        Alone costs a transaction of its own (a round trip and a commit), which pays once the
        backend call (``render_seconds``, the round's last) lasts longer than such a transaction,
        since the write then costs the generator nothing; shorter calls, and SQLite, save the
        commit instead."""
        if self.pending and (not self.writes_behind or render_seconds < HIDE_WRITES_AFTER):
            self.flush(claim_next=True)
        else:
            self.claimer.run_once()

    def flush(self, *, claim_next: bool) -> None:
        """Write :attr:`pending`; with ``claim_next``, claim the next jobs in the same transaction
        (or alone, when there is nothing to write). Outcomes an outage left unwritten stay
        pending for the next round, and the error passes."""
        outcomes, self.pending = self.drop_superseded(self.pending), []
        try:
            if outcomes:
                self.record(outcomes, claim_next=claim_next)
            elif claim_next and self.claimer.may_claim():
                self.claimer.run_once()
        except Exception as exc:
            if is_transient_db_error(exc):  # nothing was written: keep them for the next round
                self.pending = outcomes + self.pending
            raise

    # --- one write ------------------------------------------------------------------------

    def record(self, outcomes: Sequence[Attempt], *, claim_next: bool = False) -> None:
        """Write each outcome (fenced), in one transaction, and tell the hooks.

        ``claim_next``: the same transaction claims the next jobs, which the next round then
        starts; it saves a commit per round.
        """
        claimer = self.claimer
        if self.held.superseded or self.held.ended:
            outcomes = self.drop_superseded(outcomes)
        if not outcomes:
            if claim_next and claimer.may_claim():
                claimer.run_once()
            return
        outcomes = [self._unless_cancelled(outcome) for outcome in outcomes]
        now = self.clock()
        rows = [(outcome.job, *self._row_write(outcome)) for outcome in outcomes]
        pairs = [(job, result) for job, result, _, _ in rows]
        claimed: list[ClaimedJob] = []
        start = claimer.starts()
        staged = any(o.staged is not None for o in outcomes)
        if staged:
            faultpoints.reached("before-commit")
        if claim_next and claimer.may_claim():
            written, claimed = self.store.finish_and_claim(pairs, claimer.batch_size, start=start)
        else:
            written = self.store.finish(pairs)
        refused: set[str] = set()
        if staged:
            faultpoints.reached("after-commit")
            written, refused = self._publish(outcomes, written)
        recorded = {o.job.id: o for o in outcomes}
        # Before take(): a retry without backoff can be claimed again by this very transaction.
        self.held.forget(set(recorded))
        claimer.take(claimed, now, premarked=start)
        for (job, _, kind, error), ok in zip(rows, written, strict=True):
            outcome = recorded[job.id]
            if job.id in refused:  # the database refused the result: the row was failed instead
                kind, ok, error = "failed", True, "the outcome could not be stored"
            self.hooks.on_job_finished(
                job, kind if ok else "fenced", generation_seconds=outcome.generation_seconds,
                audio_seconds=outcome.audio_seconds if kind == "completed" else None, error=error,
            )

    def cancel_running(self, jobs: Sequence[ClaimedJob], waiting: Collection[str] = ()) -> None:
        """Record ``jobs`` cancelled now (a cancel was noticed): the row ends within a heartbeat
        of the request. Their backend call may still run, except for those in ``waiting`` (taken
        out of the next round): its outcome for them is dropped when it comes. An outage leaves
        them to be recorded with their call's outcomes."""
        if not jobs:
            return
        with outage_skips(self.log, "could not record cancels yet; recorded with their call's outcomes",
                          jobs=[job.id for job in jobs]):
            self.record([cancelled(job) for job in jobs])
            self.held.ended.update((id(job), job) for job in jobs if job.id not in waiting)

    def _unless_cancelled(self, outcome: Attempt) -> Attempt:
        """A result of a job whose cancel was noticed before its outcome is written becomes the
        cancellation, its file discarded: of a cancel and a completion, the first to commit wins."""
        if not self.held.cancelled(outcome.job.id) or isinstance(outcome.error, JobCancelledError):
            return outcome
        if outcome.staged is not None:
            outcome.staged.discard()
        return cancelled(outcome.job, outcome.generation_seconds)

    def _row_write(self, outcome: Attempt) -> tuple[Result, str, str | None]:
        """What ``outcome`` comes to: the result storage records, the hooks' label for it
        (completed, retried, failed or cancelled) and the error message it records. Its times
        are left to the write, which stamps the database's now: this daemon's clock may be off."""
        job = outcome.job
        if isinstance(outcome.error, JobCancelledError):  # never retried
            message = str(outcome.error) or "cancelled by request while it ran"
            return Cancelled(None, message, outcome.generation_seconds), "cancelled", message
        if outcome.error is None:
            return Completed(None, outcome.generation_seconds, outcome.file_size, outcome.metadata), "completed", None
        if not isinstance(outcome.error, DgxQueueError):  # a bug, not a refusal: keep the traceback
            self.log.error("unexpected error in the generator", job_id=job.id, model=job.model_name,
                           attempt=job.attempt, exc_info=outcome.error)
        decision = decide(outcome.error, attempt=job.attempt, max_attempts=job.max_attempts,
                          settings=self.settings, rng=self.rng)
        if decision.retry:
            assert decision.backoff is not None
            return (Retried(decision.backoff, decision.message, timed_out=timed_out(outcome)), "retried",
                    decision.message)
        return (Failed(None, decision.message, outcome.generation_seconds, timed_out=timed_out(outcome)), "failed",
                decision.message)

    def release(self, keep: Collection[str] = (), marks: Mapping[str, str] | None = None) -> None:
        """Give back every held job but those in ``keep``, without spending their attempts;
        ``marks``: the ``error_message`` to leave on some of them, by id."""
        held = self.held
        jobs = [job for job in held.jobs if job.id not in keep]
        held.jobs = [job for job in held.jobs if job.id in keep]
        for job in jobs:
            held.controls.pop(job.id, None)
        if not jobs:
            return
        outcomes = ["abandoned"] * len(jobs)  # unless written: left to the lease rescue
        with outage_skips(self.log, "could not give jobs back; their leases will expire and be rescued",
                          to_rescue=True, jobs=[j.id for j in jobs]):
            released = self.store.release(jobs, marks)
            outcomes = ["released" if ok else "fenced" for ok in released]
        for job, outcome in zip(jobs, outcomes, strict=True):  # this daemon holds them no more
            self.hooks.on_job_finished(job, outcome, generation_seconds=None, audio_seconds=None, error=None)

    # --- files and superseded attempts ----------------------------------------------------

    def publishing(self) -> list[tuple[ClaimedJob, str]]:
        """The jobs of :attr:`pending` whose staged file may still be put in place, with their
        paths (:func:`~dgxqueue.daemon.executor.pending_files`): not one whose cancel was seen, or
        that was recorded cancelled or superseded meanwhile, whose file is dropped at its write."""
        held = self.held
        return pending_files([o for o in self.pending if not held.cancelled(o.job.id)
                              and id(o.job) not in held.ended and id(o.job) not in held.superseded])

    def drop_superseded(self, outcomes: Sequence[Attempt]) -> list[Attempt]:
        """The outcomes of live attempts; those of attempts a later claim of the same job
        superseded (see :meth:`Claimer.take`) are discarded, files included."""
        live: list[Attempt] = []
        for outcome in outcomes:
            if self.held.ended.pop(id(outcome.job), None) is not None:  # recorded cancelled while it ran
                if outcome.staged is not None:
                    outcome.staged.discard()
                continue
            if self.held.superseded.pop(id(outcome.job), None) is None:
                live.append(outcome)
                continue
            if outcome.staged is not None:
                outcome.staged.discard()
            self.hooks.on_job_finished(outcome.job, "fenced", generation_seconds=outcome.generation_seconds,
                                       audio_seconds=None, error=None)
        return live

    def _publish(self, outcomes: Sequence[Attempt], written: list[bool]) -> tuple[list[bool], set[str]]:
        """Rename each committed result into place, straight after the commit: until then a
        reader who sees the row completed finds no file at its path (or, after a crash in
        between, until the sweep renames it). Delete the results whose write was fenced off.

        A fenced result whose row is completed by this very attempt nonetheless (the commit's
        reply was lost and the retried write found the job done) is published, and returned as
        written. Whether that is so is asked once, only when some result was fenced, after the
        committed ones are in place; if the database cannot answer, those files stay for the
        sweep to settle.

        Also returns the ids of results whose row this attempt recorded failed instead (the
        database refused their values): their files are deleted like a fenced one's.
        """
        doubtful: dict[str, Attempt] = {}
        for outcome, ok in zip(outcomes, written, strict=True):
            if outcome.staged is None:
                continue
            if ok:
                self._rename(outcome)
            else:
                doubtful[outcome.job.id] = outcome
        if not doubtful:
            return written, set()
        try:
            states = self.store.attempts(list(doubtful))
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            self.log.warning("could not check fenced results; the sweep will settle their files",
                             jobs=list(doubtful), error=str(exc)[:300])
            for outcome in doubtful.values():
                assert outcome.staged is not None
                outcome.staged.leave()
            return written, set()
        me, ours, refused = staging.worker_hash(self.store.worker_id), set(), set()
        for job_id, outcome in doubtful.items():
            state = states.get(job_id)
            if staging.verdict(state, outcome.job.attempt, me) is staging.Verdict.PUBLISH:
                ours.add(job_id)
                self._rename(outcome)
                continue
            assert outcome.staged is not None
            outcome.staged.discard()
            if (state is not None and state.status == FAILED and state.attempts == outcome.job.attempt
                    and state.worker_id is not None and staging.worker_hash(state.worker_id) == me):
                refused.add(job_id)
        return [ok or o.job.id in ours for o, ok in zip(outcomes, written, strict=True)], refused

    def _rename(self, outcome: Attempt) -> None:
        """Publish a committed result. A failure is this job's alone, logged, never raised: its row
        stays completed, its file stays under its temporary name for the sweep to publish."""
        assert outcome.staged is not None
        try:
            outcome.staged.publish()
        except PathTakenError as exc:  # something appeared at the path since its last check
            self.log.error("result recorded but its file path holds a file that is not its result; both are left"
                           " as they are (move that file away and the next sweep publishes the result)",
                           job_id=outcome.job.id, attempt=outcome.job.attempt, file_path=outcome.job.file_path,
                           path=exc.path, temporary=exc.temporary, holder=exc.holder)
        except OutputError as exc:  # the temporary stays: the sweep renames it later
            self.log.error("result recorded but not renamed into place; the sweep will retry",
                           job_id=outcome.job.id, attempt=outcome.job.attempt, error=str(exc))
