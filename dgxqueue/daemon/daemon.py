"""The daemon: claim what the generator serves, run it, record the outcome, repeat.

One main thread owns the loop and every database call; the backend runs on the runner's thread
so the loop keeps refreshing leases, rescuing, and pinging the systemd watchdog while a long job
runs. :meth:`Daemon.run` is the thin loop; :meth:`Daemon.run_once` is one claim-and-process step
that tests drive directly.

Whose fault it is decides how the daemon ends (:meth:`Daemon.run` returns the exit code):

- A job's error is recorded against that job (retried or failed); the daemon carries on.
- A machine fault (:mod:`~dgxqueue.daemon.faults`: the outputs folder full, read-only, unwritable
  or gone, as a test write confirms; memory or file descriptors gone; the GPU lost) stops
  claiming, gives every held job back with its attempt refunded, and exits with
  :data:`EXIT_MACHINE_FAULT` for systemd to restart the process. The jobs of the call that
  faulted are marked (``error_message`` starts ``machine fault (``). A fault no test can confirm
  (memory, descriptors, GPU) may be the job's doing: past a bounded number of refunds it is
  charged to the job. A failed write that the test write clears is the job's own path's fault:
  that job fails alone and the daemon carries on.
- A backend call past ``worker.job_timeout_seconds`` is charged to its jobs
  (:class:`~dgxqueue.errors.JobTimeoutError`), everything else held goes back unspent, and the
  daemon exits with :data:`EXIT_JOB_TIMEOUT`: Python cannot interrupt the stuck call, and only a
  new process gets a clean GPU.
- Before each claim the outputs folder is checked (:mod:`~dgxqueue.daemon.diskcheck`): short of
  space, read-only or unwritable, the daemon claims nothing, says why, and resumes by itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.engine import Engine

import dgxqueue
from dgxqueue import faultpoints
from dgxqueue.config import Settings
from dgxqueue.daemon import staging
from dgxqueue.daemon.diskcheck import OutputsCheck, Problem
from dgxqueue.daemon.executor import Outcome, Work, discard, render
from dgxqueue.daemon.faults import judge
from dgxqueue.daemon.hardstop import HARD_STOP_MARGIN, HardStop
from dgxqueue.daemon.isolation import prepare_isolating, split_isolating, timeout_marks, validate_alone
from dgxqueue.daemon.queue_client import QueueClient
from dgxqueue.daemon.queue_protocol import DaemonQueue
from dgxqueue.daemon.retry import decide, describe
from dgxqueue.daemon.runner import Runner
from dgxqueue.daemon.waker import Waker, make_waker
from dgxqueue.errors import DgxQueueError, JobTimeoutError, OutputError
from dgxqueue.generators import Generator
from dgxqueue.hooks import DaemonInfo, Hooks
from dgxqueue.storage import repository
from dgxqueue.storage.driver import is_transient_db_error
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.repository import ClaimedJob
from dgxqueue.systemd import Notifier

log = structlog.get_logger("dgxqueue.daemon")
_SLICE = 0.25  # longest the loop blocks without looking at stop requests and timers
# A backend call longer than a transaction's fixed cost (a round trip and a commit) hides the
# outcome write that runs beside it; see Daemon._claim_next_round.
_HIDE_WRITES_AFTER = 0.001
#: After a stop's grace period, how long the database calls of the shutdown may go on trying
#: altogether (each connection attempt is bounded by the engine's connect timeout besides).
SHUTDOWN_DB_SECONDS = 5.0
#: Exit codes of :meth:`Daemon.run`; systemd restarts the daemon after either (Restart=on-failure).
EXIT_MACHINE_FAULT = 75  # EX_TEMPFAIL: the machine failed (disk, memory, GPU); jobs given back
EXIT_JOB_TIMEOUT = 124  # as timeout(1): a backend call overran its time limit and may never return


class _Handoff:
    """One backend call's outcomes, passed from the runner thread to the main loop unless the
    loop gave up on the call first: then the call's files are deleted, never published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._delivered: list[Outcome] | None = None

    def deliver(self, outcomes: list[Outcome]) -> list[Outcome]:
        """On the runner thread, as the call returns: its outcomes, or none if it was abandoned."""
        with self._lock:
            if not self._abandoned:
                self._delivered = outcomes
                return outcomes
        discard(outcomes)
        if any(o.error is None for o in outcomes):
            log.warning("an abandoned backend call returned; its files were deleted, not published",
                        jobs=[o.job.id for o in outcomes])
        return []

    def abandon(self) -> None:
        """On the main loop, giving up on the call: outcomes delivered too late to be read are
        discarded now, later ones as they arrive."""
        with self._lock:
            self._abandoned = True
            late, self._delivered = self._delivered or [], None
        discard(late)


def new_worker_id() -> str:
    """Unique per process: host, pid and a random suffix (pids are reused across restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Daemon:
    """Composes the store, the runner, the waker and the hooks around one generator."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        generator: Generator,
        hooks: Hooks | None = None,
        notifier: Notifier | None = None,
        worker_id: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        waker: Waker | None = None,
        queue: DaemonQueue | None = None,
    ) -> None:
        """``queue``: the jobs to serve (by default a :class:`QueueClient` on ``engine``), whose
        ``worker_id`` is the daemon's unless one is given; a daemon given its queue and its
        ``waker`` needs no engine (:mod:`dgxqueue.testing`)."""
        self.settings = settings
        self.config = settings.worker
        self.engine = engine
        self.generator = generator
        self.hooks = hooks or Hooks()
        self.notifier = notifier or Notifier({})
        self.worker_id = worker_id or (queue.worker_id if queue is not None else new_worker_id())
        self.models = tuple(sorted(settings.generator.models or generator.models))
        self.batch_size = settings.worker.batch_size or max(1, generator.max_batch_size)
        self.clock = clock
        self.rng = rng or random.Random()
        self.engine_name = engine.dialect.name if engine is not None else "memory"
        if engine is not None:
            queue = queue or QueueClient(
                engine, worker_id=self.worker_id, models=self.models,
                lease=timedelta(seconds=settings.worker.lease_seconds),
            )
            waker = waker or make_waker(engine, settings.worker.sqlite_check_interval_seconds)
        if queue is None or waker is None:
            raise TypeError("Daemon needs an engine, or both a queue and a waker")
        self.store: DaemonQueue = queue
        self.runner = Runner()
        self.waker = waker
        self.log = log.bind(worker_id=self.worker_id)
        self._held: list[ClaimedJob] = []  # claimed, outcome not yet written (includes _next)
        self._next: list[ClaimedJob] = []  # claimed with earlier outcomes; run_once starts them
        self._done: list[Outcome] = []  # outcomes to write while the next batch renders
        self._premarked: set[str] = set()  # of _next: marked started by their claim (see _claim_starts)
        # Attempts superseded by a later claim of the same job by this daemon, by object identity:
        # a refund (rescue of a job that never started) lets the claim hand back the same
        # (worker, attempt) token, so only this daemon can tell its two attempts apart.
        self._superseded: dict[int, ClaimedJob] = {}
        self._render_seconds = 0.0  # the last backend call's, timed on the runner thread
        self._call = _Handoff()  # the running (or last) backend call's
        self._next_sweep = 0.0
        # SQLite has one writer lock for every process: a transaction more per round costs every
        # daemon sharing the file more than hiding the write gains one.
        self._writes_behind = self.engine_name != "sqlite"
        self._stop_requested_at: float | None = None
        self._immediate = False
        self._stopping_sent = False
        self._loaded = False  # until start() has loaded the generator: loading is not a stall
        self._last_loop = time.monotonic()
        self._next_rescue = 0.0
        self._next_watchdog = 0.0
        # One deadline for every held job, counted from the first claim or the last heartbeat: a
        # round of many short backend calls must still refresh the leases of the jobs waiting.
        self._next_heartbeat = 0.0
        self.outputs_check = OutputsCheck(settings.outputs_dir, settings.outputs.min_free_mb)
        self._paused: Problem | None = None  # the outputs check's last problem, while it lasts
        self.exit_code = 0
        self.fault: str | None = None  # a machine fault's reason: claim nothing more, then exit
        self._fault_marks: dict[str, str] = {}  # job id -> error_message it is given back with
        self._hard_stop = HardStop(self._overran, lambda: self.exit_code)

    # --- control --------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_requested_at is not None

    def request_stop(self, immediate: bool = False) -> None:
        """Stop claiming; finish running work within the grace period (none if ``immediate``).

        Safe to call from a signal handler. A second request makes the stop immediate.
        """
        if self._stop_requested_at is None and not immediate:
            self._stop_requested_at = time.monotonic()
        else:
            self._stop_requested_at = self._stop_requested_at or time.monotonic()
            self._immediate = True
        # Every database call from now on gives up by this time, so a stop during an outage is
        # bounded; a later, immediate request may only bring it closer.
        grace = 0.0 if self._immediate else self.config.grace_seconds
        deadline = max(self._stop_requested_at + grace, time.monotonic()) + SHUTDOWN_DB_SECONDS
        self.store.deadline = min(deadline, self.store.deadline or deadline)
        self._hard_stop.arm(self.store.deadline + HARD_STOP_MARGIN)  # a call the server never answers
        self.waker.wake()

    def healthy(self) -> bool:
        """False when the loop has stalled or a backend call overran its limit and is stuck.
        True while the generator loads (minutes, for a big model; systemd's TimeoutStartSec
        bounds that)."""
        if self.runner.stuck_for() > 0 or self.fault is not None:
            return False
        stall_limit = max(20.0, 2 * self.config.heartbeat_seconds + 15.0)
        return not self._loaded or time.monotonic() - self._last_loop < stall_limit

    # --- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the generator and check the database; then tell systemd we are ready."""
        self.hooks.on_start(DaemonInfo(
            worker_id=self.worker_id, generator=self.generator.name, models=self.models,
            engine=self.engine_name, version=dgxqueue.__version__,
        ))
        self.notifier.status(f"loading generator {self.generator.name}")
        started = time.perf_counter()
        # On the thread that will generate: torch's OpenMP pool belongs to the thread that first
        # ran parallel work, and a second pool on the runner thread would fight it for the cores.
        self.runner.submit(self.generator.load).result()
        self._loaded, self._last_loop = True, time.monotonic()
        self.hooks.on_model_loaded(time.perf_counter() - started)
        self.store.ping()
        self.sweep()  # results a crash left between their commit and their rename
        self.notifier.ready(f"serving {', '.join(self.models)}")
        self.log.info("daemon ready", generator=self.generator.name, models=list(self.models),
                      batch_size=self.batch_size, engine=self.engine_name)

    def run(self, *, burst: bool = False) -> int:
        """Run until stopped (or, with ``burst``, until the queue is drained). Returns the exit
        code: 0, :data:`EXIT_MACHINE_FAULT` or :data:`EXIT_JOB_TIMEOUT`."""
        self._hard_stop.start()
        self.start()
        try:
            while not self.stopping:
                self.tick()
                if self.runner.busy:  # an abandoned backend call still runs: take nothing new
                    self.waker.wait(_SLICE)
                    continue
                try:
                    if self.run_once():
                        continue
                    if burst and self._paused is not None and self.store.has_work():
                        # A burst run must end: waiting for the outputs folder to recover is a
                        # service's job, and a cron-driven drain would otherwise hang for good.
                        self.log.error("burst: not drained: the outputs folder cannot take files",
                                       reason=self._paused.reason, exit_code=EXIT_MACHINE_FAULT)
                        self.exit_code = EXIT_MACHINE_FAULT
                        break
                    if burst and not self.store.has_work():
                        self.log.info("burst: queue drained")
                        break
                    self.waker.wait(self._idle_timeout())
                except Exception as exc:
                    if not is_transient_db_error(exc):
                        raise
                    self.log.error("database unavailable; will retry", error=str(exc)[:300])
                    self.waker.wait(1.0)
        finally:
            self.shutdown()
        return self.exit_code

    def _idle_timeout(self) -> float:
        # Wake in time for the next watchdog ping, however short systemd's WatchdogSec is.
        until_ping = max(0.0, self._next_watchdog - time.monotonic())
        timeout = min(self.config.poll_interval_seconds, 1.0, until_ping)
        due = self.store.next_due()  # by the database's clock, as the claim reads it
        if due is not None:
            timeout = min(timeout, max(0.0, due.total_seconds()))
        return timeout

    def tick(self) -> None:
        """Housekeeping on every round: liveness, watchdog, STOPPING, leases, rescue."""
        now = time.monotonic()
        self._last_loop = now
        self._heartbeat_if_due(now)
        if self.healthy():  # a call stuck past its time limit stops the liveness signals too
            self.hooks.on_loop(now)
        if self.stopping and not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping("finishing running jobs")
            self.log.info("stopping", held=len(self._held), immediate=self._immediate)
        if now >= self._next_watchdog and self.healthy():
            self.notifier.watchdog()
            self._next_watchdog = now + min(1.0, (self.notifier.watchdog_interval or 2.0) / 2)
        if now >= self._next_rescue:
            self._next_rescue = now + self.config.rescue_interval_seconds
            self.rescue()

    def _heartbeat_if_due(self, now: float) -> None:
        if self._held and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_seconds
            self.heartbeat()

    def rescue(self) -> None:
        with self._outage_skips("rescue skipped: database unavailable"):
            if self._held:  # ours first: after an outage longer than a lease, it would take them back
                self._refresh()
            requeued, failed = self.store.rescue()
            if requeued or failed:
                self.hooks.on_rescued(requeued, failed)
        if time.monotonic() >= self._next_sweep:
            self.sweep()

    def sweep(self) -> None:
        """Settle the temporary WAVs crashes left in the outputs folder (:func:`staging.sweep`):
        now and once a lease period, the time after which a dead attempt's row is rescued."""
        self._next_sweep = time.monotonic() + self.config.lease_seconds
        with self._outage_skips("sweep of temporary files skipped: database unavailable"):
            swept = staging.sweep(self.settings.outputs_dir, self.store.attempts)
            if swept.published or swept.deleted:
                self.log.info("swept temporary files", published=len(swept.published), deleted=len(swept.deleted),
                              kept=swept.kept)

    def run_once(self) -> int:
        """Run the jobs claimed with the last outcomes, or claim a batch; record them. Returns how
        many jobs it took.

        Each backend call renders while the outcomes of the one before are written. After the
        last call the next jobs are claimed (:meth:`_claim_next_round`): alone on PostgreSQL
        when that call outlasted a transaction, and then this round's last outcomes are left in
        ``_done``, to be written while the next round's first call renders; else with them, in
        one transaction.
        With ``worker.prefetch`` the claim is made while the last call renders, and the last
        outcomes are left in ``_done`` the same way.
        """
        if self.stopping:
            return 0
        if not self._next:  # with any outcomes a database outage left unwritten
            self._flush(claim_next=True)
        jobs, self._next = self._next, []
        premarked, self._premarked = self._premarked, set()
        if not jobs:
            return 0
        self._render_seconds = 0.0  # no backend call this round (all refused): nothing hides a write
        kept = False
        try:
            work, refused = prepare_isolating(jobs, self.generator)
            self._done.extend(self._sort_faults(refused))
            size = min(self.batch_size, self.generator.max_batch_size)
            batches = split_isolating(work, lambda w: self.generator.batch_key(w.request), size)
            self._unmark_not_first(jobs, premarked, batches)
            for i, batch in enumerate(batches):
                if self.stopping or self.runner.busy:
                    # Not started: run next round, or given back below if there is none.
                    self._next = [w.job for later in batches[i:] for w in later]
                    break
                self._heartbeat_if_due(time.monotonic())
                if batch[0].job.suspect:  # alone: nothing else in flight if it kills the daemon again
                    with self._outage_skips("could not write outcomes before a suspect job"):
                        self._flush(claim_next=False)
                if i > 0 or not {w.job.id for w in batch} <= premarked:
                    self._mark_started(batch)
                running = self._start(batch)
                # An outage must not abandon the batch now rendering: its outcomes wait in _done.
                with self._outage_skips("could not write outcomes yet; will try again after this batch"):
                    self._flush(claim_next=self.config.prefetch and i == len(batches) - 1)
                outcomes = self._wait(running, batch)
                if outcomes is None:
                    break
                self._done.extend(self._sort_faults(outcomes))
            if self._may_claim() and not self._next:
                self._claim_next_round()
            if not (self._may_claim() and self._next):  # no next round to write behind: write now
                self._flush(claim_next=False)
            kept = self._may_claim()  # what _next holds runs next, and _done is written then
        finally:
            if not kept:  # a stop, a stuck backend or an error: give back what did not run
                self._next, self._premarked = [], set()
                # Finished jobs whose outcomes an outage left unwritten stay held (see _flush).
                self._release(keep={o.job.id for o in self._done})
        return len(jobs)

    def _may_claim(self) -> bool:
        return not self.stopping and not self.runner.stuck and self._outputs_ok()

    def _outputs_ok(self) -> bool:
        """The outputs check passes; its problem is said once when it starts and once when it ends."""
        problem = self.outputs_check.problem()
        if problem != self._paused:
            if problem is not None:
                self.log.error("not claiming: the outputs folder cannot take files", reason=problem.reason,
                               problem=problem.message)
                self.notifier.status(f"paused: {problem.message}")
            else:
                self.log.info("outputs folder usable again; claiming", was=self._paused and self._paused.reason)
                self.notifier.status(f"serving {', '.join(self.models)}")
            self._paused = problem
            self.hooks.on_claims_paused(problem.reason if problem else None)
        return problem is None

    def _sort_faults(self, outcomes: list[Outcome]) -> list[Outcome]:
        """The outcomes to record. Those that are a machine fault's (:func:`~dgxqueue.daemon.faults.judge`)
        are taken out: their jobs are given back marked (or, past their refunds, charged), and the
        daemon stops to exit."""
        verdict = judge(outcomes, self.settings.outputs_dir, self._error_messages)
        if verdict.own:
            self.log.warning("the outputs folder takes files: the failed writes are the jobs' own", jobs=verdict.own)
        if verdict.reason is None:
            return verdict.outcomes
        assert verdict.error is not None
        if self.fault is None:
            self.fault, self.exit_code = verdict.reason, EXIT_MACHINE_FAULT
            self.log.error("machine fault: claiming nothing more; held jobs go back unspent, then exit for a"
                           " restart", reason=verdict.reason, error=describe(verdict.error),
                           exit_code=EXIT_MACHINE_FAULT, jobs=list(verdict.marks))
            self.notifier.status(f"machine fault ({verdict.reason}): giving jobs back, exiting")
            self.hooks.on_machine_fault(verdict.reason)
            self.request_stop(immediate=True)
        self._fault_marks.update(verdict.marks)
        return verdict.outcomes

    def _error_messages(self, ids: list[str]) -> dict[str, str | None]:
        with self._outage_skips("could not read how often these jobs faulted before; giving them back"):
            return self.store.error_messages(ids)
        return {}

    def _claim_next_round(self) -> None:
        """Claim the next jobs, alone or with this round's outcomes.

        Alone, the outcomes are written while the next call renders, which hides the write but
        costs a transaction of its own (a round trip and a commit). On PostgreSQL that pays once a
        backend call lasts longer than such a transaction, since the write then costs the generator
        nothing; shorter calls, and SQLite, save the commit instead."""
        if self._done and (not self._writes_behind or self._render_seconds < _HIDE_WRITES_AFTER):
            self._flush(claim_next=True)
        else:
            self._claim_ahead()

    def _claim_ahead(self) -> None:
        now, start = self.clock(), self._claim_starts()
        self._take(self.store.claim(self.batch_size, start=start), now, premarked=start)

    def _claim_starts(self) -> bool:
        """Whether a claim now marks its jobs started: one made while no backend call runs, of
        no more jobs than a call takes, so the next call usually runs them all (those it does not
        are cleared first, see :meth:`_unmark_not_first`). It saves :meth:`_mark_started`'s
        statement, and its row writes, on most calls."""
        return not self.runner.busy and self.batch_size <= self.generator.max_batch_size

    def _unmark_not_first(self, jobs: Sequence[ClaimedJob], premarked: set[str], batches: list[list[Work]]) -> None:
        """Clear the claim's start marks of the jobs the first call will not run (refused, of
        another batch key, suspects), before it starts."""
        first = {w.job.id for w in batches[0]} if batches else set()
        stale = [job for job in jobs if job.id in premarked and job.id not in first]
        if stale:
            with self._outage_skips("could not clear start marks; if the next call kills the daemon these are "
                                    "charged too", jobs=[job.id for job in stale]):
                self.store.mark_started(stale, started=False)

    def _take(self, jobs: list[ClaimedJob], now: datetime, *, premarked: bool = False) -> None:
        """Hold claimed jobs; the next :meth:`run_once` starts them."""
        if premarked:
            self._premarked.update(job.id for job in jobs)
        claimed = {job.id for job in jobs}
        for stale in [held for held in self._held if held.id in claimed]:
            self._supersede(stale)
        if jobs:
            if not self._held:  # their leases run from now
                self._next_heartbeat = time.monotonic() + self.config.heartbeat_seconds
            self._next.extend(jobs)
            self._held.extend(jobs)
            self.hooks.on_claimed(jobs, now)

    def _supersede(self, stale: ClaimedJob) -> None:
        """This daemon claimed ``stale``'s job again: its lease was lost and the job requeued
        meanwhile. The older attempt is dead: its outcome must never be written (it would carry
        the same fencing token as the new claim) and its file never published."""
        self.log.warning("claimed again after its lease was lost: the earlier attempt is dropped",
                         job_id=stale.id, attempt=stale.attempt)
        self._held = [job for job in self._held if job is not stale]
        if any(job is stale for job in self._next):  # never started: no outcome will come
            self._next = [job for job in self._next if job is not stale]
            self.hooks.on_job_finished(stale, "fenced", generation_seconds=None, audio_seconds=None, error=None)
        else:  # started: its outcome is dropped when it arrives (see record)
            self._superseded[id(stale)] = stale

    def _drop_superseded(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """The outcomes of live attempts; those of superseded ones are discarded, files included."""
        live: list[Outcome] = []
        for outcome in outcomes:
            if self._superseded.pop(id(outcome.job), None) is None:
                live.append(outcome)
                continue
            if outcome.staged is not None:
                outcome.staged.discard()
            self.hooks.on_job_finished(outcome.job, "fenced", generation_seconds=outcome.generation_seconds,
                                       audio_seconds=None, error=None)
        return live

    def _flush(self, *, claim_next: bool) -> None:
        """Write the outcomes in ``_done``; with ``claim_next``, claim the next jobs in the same
        transaction (or alone, when there is nothing to write)."""
        outcomes, self._done = self._drop_superseded(self._done), []
        try:
            if outcomes:
                self.record(outcomes, claim_next=claim_next)
            elif claim_next and self._may_claim():
                self._claim_ahead()
        except Exception as exc:
            if is_transient_db_error(exc):  # nothing was written: keep them for the next round
                self._done = outcomes + self._done
            raise

    def _mark_started(self, batch: list[Work]) -> None:
        """Record, before the backend call, which jobs it starts: if it kills the daemon, the
        lease rescue charges them and gives the jobs that had not started their attempt back."""
        with self._outage_skips("could not mark jobs started; if this call kills the daemon they are "
                                "charged nothing", jobs=[w.job.id for w in batch]):
            self.store.mark_started([w.job for w in batch])

    def _start(self, batch: list[Work]) -> tuple[Future[list[Outcome]], float]:
        """Hand a batch to the runner; returns its future and start time for :meth:`_wait`."""
        self.hooks.on_batch(len(batch))
        outputs, worker_id = self.settings.outputs_dir, self.worker_id
        self._call = handoff = _Handoff()

        def call() -> list[Outcome]:  # timed where it runs: the main loop may be busy writing
            started = time.monotonic()
            ready, refused = validate_alone(batch, self.generator)
            outcomes = refused + render(self.generator, ready, outputs, worker_id) if ready else refused
            self._render_seconds = time.monotonic() - started
            return handoff.deliver(outcomes)

        return self.runner.submit(call), time.monotonic()

    def _wait(self, running: tuple[Future[list[Outcome]], float], batch: list[Work]) -> list[Outcome] | None:
        """Wait for a started batch while heartbeating; None when a stop gave up on it."""
        future, started = running
        while True:
            try:
                return future.result(timeout=_SLICE)
            except FutureTimeout:
                pass
            self.tick()
            if future.done():  # it ended while tick() ran: its outcomes stand
                continue
            now = time.monotonic()
            if self.stopping:
                assert self._stop_requested_at is not None
                grace = 0.0 if self._immediate else self.config.grace_seconds
                if now >= self._stop_requested_at + grace:
                    self._abandon_call()
                    self.log.warning("grace period over; giving running jobs back",
                                     jobs=[w.job.id for w in batch])
                    return None
            if now - started >= self.config.job_timeout_seconds:
                self._abandon_call()
                error = JobTimeoutError(f"job exceeded its time limit of {self.config.job_timeout_seconds:g} s")
                self.log.error("generator call overran its time limit: charged to its jobs; the rest go back"
                               " unspent, then exit for a fresh process", jobs=[w.job.id for w in batch],
                               exit_code=EXIT_JOB_TIMEOUT)
                self.exit_code = EXIT_JOB_TIMEOUT
                self.request_stop(immediate=True)
                return [Outcome(w.job, error, now - started) for w in batch]

    def _abandon_call(self) -> None:
        """Give up on the running call: its outcomes are not recorded and its files never published."""
        self._call.abandon()
        self.runner.abandon()

    def heartbeat(self) -> None:
        if not self._held:
            return
        with self._outage_skips("heartbeat failed: database unavailable"):
            self._refresh()

    def _refresh(self) -> None:
        held = self.store.extend(self._held)
        for job in self._held:
            if job.id not in held:
                self.log.warning("lease lost: another daemon may run this job; our outcome will be refused",
                                 job_id=job.id, model=job.model_name, attempt=job.attempt)

    def record(self, outcomes: Sequence[Outcome], *, claim_next: bool = False) -> None:
        """Write each outcome (fenced), in one transaction, and tell the hooks.

        ``claim_next``: the same transaction claims the next jobs, which :meth:`run_once` then
        starts; it saves a commit per round.
        """
        if self._superseded:
            outcomes = self._drop_superseded(outcomes)
        if not outcomes:
            if claim_next and self._may_claim():
                self._claim_ahead()
            return
        now = self.clock()
        rows: list[tuple[ClaimedJob, dict[str, Any], str, str | None]] = []
        for outcome in outcomes:
            job = outcome.job
            if outcome.error is None:
                values = repository.completed_values(
                    now, outcome.generation_seconds, outcome.file_size, outcome.metadata)
                rows.append((job, values, "completed", None))
                continue
            if not isinstance(outcome.error, DgxQueueError):  # a bug, not a refusal: keep the traceback
                self.log.error("unexpected error in the generator", job_id=job.id, model=job.model_name,
                               attempt=job.attempt, exc_info=outcome.error)
            decision = decide(outcome.error, attempt=job.attempt, max_attempts=job.max_attempts,
                              now=now, settings=self.config, rng=self.rng)
            if decision.retry:
                assert decision.run_after is not None
                values = repository.retry_values(decision.run_after, decision.message)
            else:
                values = repository.failed_values(now, decision.message, outcome.generation_seconds)
            values.update(timeout_marks(outcome))
            rows.append((job, values, "retried" if decision.retry else "failed", decision.message))
        pairs = [(job, values) for job, values, _, _ in rows]
        claimed: list[ClaimedJob] = []
        start = self._claim_starts()
        staged = any(o.staged is not None for o in outcomes)
        if staged:
            faultpoints.reached("before-commit")
        if claim_next and self._may_claim():
            written, claimed = self.store.finish_and_claim(pairs, self.batch_size, start=start)
        else:
            written = self.store.finish(pairs)
        refused: set[str] = set()
        if staged:
            faultpoints.reached("after-commit")
            written, refused = self._publish(outcomes, written)
        recorded = {o.job.id: o for o in outcomes}
        # Before _take: a retry without backoff can be claimed again by this very transaction.
        self._held = [job for job in self._held if job.id not in recorded]
        self._take(claimed, now, premarked=start)
        for (job, _, kind, error), ok in zip(rows, written, strict=True):
            outcome = recorded[job.id]
            if job.id in refused:  # the database refused the result: the row was failed instead
                kind, ok, error = "failed", True, "the outcome could not be stored"
            self.hooks.on_job_finished(
                job, kind if ok else "fenced", generation_seconds=outcome.generation_seconds,
                audio_seconds=outcome.audio_seconds if kind == "completed" else None, error=error,
            )

    def _publish(self, outcomes: Sequence[Outcome], written: list[bool]) -> tuple[list[bool], set[str]]:
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
        doubtful: dict[str, Outcome] = {}
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
        me, ours, refused = staging.worker_hash(self.worker_id), set(), set()
        for job_id, outcome in doubtful.items():
            state = states.get(job_id)
            if staging.verdict(state, outcome.job.attempt, me) is staging.Verdict.PUBLISH:
                ours.add(job_id)
                self._rename(outcome)
                continue
            assert outcome.staged is not None
            outcome.staged.discard()
            if (state is not None and state.status == repository.FAILED and state.attempts == outcome.job.attempt
                    and state.worker_id is not None and staging.worker_hash(state.worker_id) == me):
                refused.add(job_id)
        return [ok or o.job.id in ours for o, ok in zip(outcomes, written, strict=True)], refused

    def _rename(self, outcome: Outcome) -> None:
        assert outcome.staged is not None
        try:
            outcome.staged.publish()
        except OutputError as exc:  # the temporary stays: the sweep renames it later
            self.log.error("result recorded but not renamed into place; the sweep will retry",
                           job_id=outcome.job.id, attempt=outcome.job.attempt, error=str(exc))

    def _release(self, keep: Collection[str] = ()) -> None:
        """Give back every held job but those in ``keep``, without spending their attempts."""
        jobs = [job for job in self._held if job.id not in keep]
        self._held = [job for job in self._held if job.id in keep]
        if not jobs:
            return
        outcomes = ["abandoned"] * len(jobs)  # unless written: left to the lease rescue
        with self._outage_skips("could not give jobs back; their leases will expire and be rescued",
                                to_rescue=True, jobs=[j.id for j in jobs]):
            released = self.store.release(jobs, self._fault_marks)
            outcomes = ["released" if ok else "fenced" for ok in released]
        for job, outcome in zip(jobs, outcomes, strict=True):  # this daemon holds them no more
            self.hooks.on_job_finished(job, outcome, generation_seconds=None, audio_seconds=None, error=None)

    @contextlib.contextmanager
    def _outage_skips(self, message: str, *, to_rescue: bool = False, **context: Any) -> Iterator[None]:
        """Skip the rest of the block when the database stays unavailable (the store has already
        retried): the next round makes up for the step or, with ``to_rescue`` (logged as an
        error), the lease rescue does, later. Other errors pass."""
        try:
            yield
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            (self.log.error if to_rescue else self.log.warning)(message, error=str(exc)[:300], **context)

    def shutdown(self) -> None:
        try:
            if self._done:  # outcomes left for the next round's render: write them now
                with self._outage_skips("could not write the last outcomes; their leases will expire and be"
                                        " rescued", to_rescue=True):
                    self._flush(claim_next=False)
            # Finished jobs whose outcomes could not be written stay held, as in run_once: given
            # back, they would render again with their attempt refunded.
            unwritten = {o.job.id for o in self._done}
            for outcome in self._done:  # committed or not, unknown: the sweep settles their files
                if outcome.staged is not None:
                    outcome.staged.leave()
            self._done, self._next, self._premarked = [], [], set()
            if self._held:
                self._release(keep=unwritten)
        finally:
            if not self._stopping_sent:
                self._stopping_sent = True
                self.notifier.stopping()
            self.runner.close()
            self.waker.close()
            self.store.close()
            self.hooks.on_stop()
            self._hard_stop.close()

    def _overran(self) -> None:
        self.log.error("the stop overran its time limit (a database call never returned): exiting now; the"
                       " jobs still held are left to the lease rescue", jobs=[job.id for job in list(self._held)],
                       exit_code=self.exit_code)
