"""The daemon: claim what the generator serves, run it, record the outcome, repeat.

:class:`Daemon` composes single-purpose services, each given what it needs and each with a
``run_once`` step that tests call directly: the :class:`~dgxqueue.daemon.claimer.Claimer`
(claims and holds jobs), the :class:`~dgxqueue.daemon.completer.Completer` (writes outcomes),
and the lease services of :mod:`~dgxqueue.daemon.leases` (heartbeat, rescue, sweep). The daemon
keeps the loop, the stop and its grace period, health, and the backend calls.

One main thread owns the loop and every database call; the backend runs on the runner's thread
(every generator method of a round: a claim's ``validate()`` and ``batch_key()`` as much as
``generate()``) so the loop keeps refreshing leases, rescuing, pinging the systemd watchdog and
honouring a stop's grace period while a long job runs or a backend method hangs.
:meth:`Daemon.run` is the thin loop; :meth:`Daemon.run_once` is one claim-and-process step that
tests drive directly.

Whose fault it is decides how the daemon ends (:meth:`Daemon.run` returns the exit code):

- A job's error is recorded against that job (retried or failed); the daemon carries on. So is a
  SystemExit (a library's ``sys.exit()``), KeyboardInterrupt or GeneratorExit that backend code
  raises: on the runner's thread it is the backend's own, an error like any other, never an exit
  (:mod:`~dgxqueue.daemon.runner`). One from ``load()`` ends :meth:`Daemon.run` with
  :class:`~dgxqueue.errors.BackendExitError` naming it (the worker exits 70), not exit 0.
- A machine fault (:mod:`~dgxqueue.daemon.faults`: the outputs folder full, read-only, unwritable
  or gone, as a test write confirms; memory or file descriptors gone; a backend's own scratch
  disk full; the GPU lost) stops claiming, gives every held job back with its attempt refunded,
  and exits with :data:`EXIT_MACHINE_FAULT` for systemd to restart the process. The jobs of the
  call that faulted are marked (``error_message`` starts ``machine fault (``). A fault no test can
  confirm (memory, descriptors, a scratch disk, the GPU) may be the job's doing: past a bounded
  number of refunds it is charged to the job. A failed write that the test write clears is the job's own path's fault:
  that job fails alone and the daemon carries on.
- A backend call past ``worker.job_timeout_seconds`` is charged to the jobs of the generator
  method it is stuck in (:class:`~dgxqueue.errors.JobTimeoutError`; one job's ``validate()`` or
  ``batch_key()``, or the jobs of a ``generate()``), everything else held goes back unspent, and
  the daemon exits with :data:`EXIT_JOB_TIMEOUT`: Python cannot interrupt the stuck call, and only
  a new process gets a clean GPU. The log names the method and the jobs that did not return.
- Before each claim the outputs folder is checked (:mod:`~dgxqueue.daemon.diskcheck`): short of
  space, read-only or unwritable, the daemon claims nothing, says why, and resumes by itself.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar, cast

import structlog
from sqlalchemy.engine import Engine

import dgxqueue
from dgxqueue.config import Settings
from dgxqueue.daemon.claimer import Claimer
from dgxqueue.daemon.completer import Completer
from dgxqueue.daemon.continuous import Continuous
from dgxqueue.daemon.diskcheck import OutputsCheck
from dgxqueue.daemon.executor import Attempt, Handoff, Work, render
from dgxqueue.daemon.faults import judge
from dgxqueue.daemon.hardstop import HARD_STOP_MARGIN, HardStop, stuck_in
from dgxqueue.daemon.isolation import plan, validate_unvalidated
from dgxqueue.daemon.leases import Heartbeat, Held, Rescuer, Sweeper
from dgxqueue.daemon.outages import outage_skips
from dgxqueue.daemon.queue_client import QueueClient
from dgxqueue.daemon.queue_protocol import DaemonQueue
from dgxqueue.daemon.registration import Registration, entry_for
from dgxqueue.daemon.retry import describe
from dgxqueue.daemon.runner import Runner
from dgxqueue.daemon.waker import Waker, make_waker
from dgxqueue.errors import ConfigError, JobTimeoutError
from dgxqueue.generators import Generator, JobControl, SlotGenerator, serves_slots
from dgxqueue.hooks import DaemonInfo, Hooks
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.dberrors import is_transient_db_error
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import utcnow
from dgxqueue.systemd import Notifier

log = structlog.get_logger("dgxqueue.daemon")
_SLICE = 0.25  # longest the loop blocks without looking at stop requests and timers
#: After a stop's grace period, how long the database calls of the shutdown may go on trying
#: altogether (each connection attempt is bounded by the engine's connect timeout besides).
SHUTDOWN_DB_SECONDS = 5.0
#: Exit codes of :meth:`Daemon.run`; systemd restarts the daemon after either (Restart=on-failure).
EXIT_MACHINE_FAULT = 75  # EX_TEMPFAIL: the machine failed (disk, memory, GPU); jobs given back
EXIT_JOB_TIMEOUT = 124  # as timeout(1): a backend call overran its time limit and may never return
T = TypeVar("T")


@dataclass(frozen=True)
class GaveUp:
    """A backend call the main loop stopped waiting for (:meth:`Daemon._await`): ``charged``, the
    attempts it costs (the time limit's), empty when a stop's grace period ended first."""

    charged: list[Attempt]


def _with_control(work: Work, control: JobControl) -> Work:
    """``work`` with its request carrying ``control`` (made on the main loop, which owns them)."""
    if work.request.control is control:
        return work
    return dataclasses.replace(work, request=dataclasses.replace(work.request, control=control))


def new_worker_id() -> str:
    """Unique per process: host, pid and a random suffix (pids are reused across restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Daemon:
    """Composes the queue client, the runner, the waker, the hooks and the services around one generator."""

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
        runner: Runner | None = None,
    ) -> None:
        """``queue``: the jobs to serve (by default a :class:`QueueClient` on ``engine``), whose
        ``worker_id`` the daemon takes (a different ``worker_id`` is refused); a daemon given its
        queue and its ``waker`` needs no engine (:mod:`dgxqueue.testing`). ``runner``: the thread
        that runs the backend (one that loaded it already)."""
        if queue is not None and worker_id is not None and worker_id != queue.worker_id:
            # Files are named after the daemon's id and rows signed with the queue's: the sweep
            # would take this daemon's own temporaries for a dead attempt's and delete them.
            raise ValueError(f"worker_id {worker_id!r} is not its queue's ({queue.worker_id!r})")
        self.settings = settings
        self.config = settings.worker
        self.engine = engine
        self.generator = generator
        self.hooks = hooks or Hooks()
        self.notifier = notifier or Notifier({})
        self.worker_id = worker_id or (queue.worker_id if queue is not None else new_worker_id())
        self.models = tuple(sorted(settings.generator.models or generator.models))
        self.batch_size = settings.worker.batch_size or max(1, generator.max_batch_size)
        self.engine_name = engine.name if engine is not None else "memory"
        if engine is not None:
            queue = queue or QueueClient(
                engine, worker_id=self.worker_id, models=self.models,
                lease=timedelta(seconds=settings.worker.lease_seconds),
            )
            waker = waker or make_waker(engine, settings.worker.sqlite_check_interval_seconds)
        if queue is None or waker is None:
            raise TypeError("Daemon needs an engine, or both a queue and a waker")
        self.store: DaemonQueue = queue
        self.runner = runner or Runner()
        self.waker = waker
        self.log = log.bind(worker_id=self.worker_id)
        self._render_seconds = 0.0  # the last backend call's, timed on the runner thread
        self._call = Handoff()  # the running (or last) backend call's
        # Sizes of calls whose jobs were validated in the call, for on_batch on the main thread.
        self._sent: list[int] = []
        self._stop_requested_at: float | None = None
        self._immediate = False
        self._stopping_sent = False
        self._loaded = False  # until start() has loaded the generator: loading is not a stall
        self._last_loop = time.monotonic()
        self._next_watchdog = 0.0
        self.outputs_check = OutputsCheck(settings.outputs_dir, settings.outputs.min_free_mb)
        self.exit_code = 0
        self.fault: str | None = None  # a machine fault's reason: claim nothing more, then exit
        self._fault_marks: dict[str, str] = {}  # job id -> error_message it is given back with
        # The services, each given what it needs; they share the jobs held.
        self.held = Held()
        self.heartbeat = Heartbeat(self.store, self.held, interval=self.config.heartbeat_seconds, log=self.log,
                                   hooks=self.hooks)
        self.sweeper = Sweeper(self.store, settings.outputs_dir, interval=self.config.lease_seconds, log=self.log)
        # Refreshed at the heartbeat's cadence, whether or not any job is held.
        self.registration = Registration(self.store, self.held, entry_for(self.store, generator.name,
                                                                          dgxqueue.__version__),
                                         interval=self.config.heartbeat_seconds, log=self.log)
        self.rescuer = Rescuer(self.store, self.heartbeat, self.sweeper, self.hooks,
                               interval=self.config.rescue_interval_seconds, log=self.log,
                               forget_dead=self.registration.forget_dead)
        self.claimer = Claimer(
            self.store, self.held, self.heartbeat, batch_size=self.batch_size,
            runner=self.runner, stopping=lambda: self.stopping,
            outputs_check=self.outputs_check, hooks=self.hooks, notifier=self.notifier, clock=clock, log=self.log,
        )
        writes_behind = profile_of(engine.dialect).writes_behind if engine is not None else True
        self.completer = Completer(
            self.store, self.held, self.claimer, settings=self.config, writes_behind=writes_behind,
            hooks=self.hooks, clock=clock, rng=rng or random.Random(), log=self.log,
        )
        self._hard_stop = HardStop(self._overran, lambda: self.exit_code)
        self._main_thread: threading.Thread | None = None  # the one that runs the loop, for the hard stop
        self.heartbeat.on_cancel = self._cancel_now
        #: The running batch of slots, with ``[generator] continuous = true``; else None.
        self.continuous: Continuous | None = None
        if settings.generator.continuous:
            if not serves_slots(generator):
                raise ConfigError("generator.continuous", True, "false, or a backend with slots (dgxqueue.generators."
                                  f"SlotGenerator; musicgen with decode = \"loop\"); {generator.name} has none")
            self.continuous = Continuous(self, cast(SlotGenerator, generator))

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
        doing, generator = self.runner.doing, self.generator

        def load() -> None:
            doing("load")  # named by an error that leaves it (a SystemExit: see runner)
            generator.load()

        self.runner.submit(load).result()
        self._loaded, self._last_loop = True, time.monotonic()
        self.hooks.on_model_loaded(time.perf_counter() - started)
        self.store.ping()
        self.registration.start(time.monotonic())
        self.waker.wait(0)  # connects a listening waker now: a cancel's NOTIFY must reach the first jobs
        self.sweeper.run_once()  # results a crash left between their commit and their rename
        self.notifier.ready(f"serving {', '.join(self.models)}")
        self.log.info("daemon ready", generator=self.generator.name, models=list(self.models),
                      batch_size=self.batch_size, engine=self.engine_name)

    def run(self, *, burst: bool = False) -> int:
        """Run until stopped (or, with ``burst``, until the queue is drained). Returns the exit
        code: 0, :data:`EXIT_MACHINE_FAULT` or :data:`EXIT_JOB_TIMEOUT`."""
        self._main_thread = threading.current_thread()
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
                    if burst and self.claimer.paused is not None and self.store.has_work():
                        # A burst run must end: waiting for the outputs folder to recover is a
                        # service's job, and a cron-driven drain would otherwise hang for good.
                        self.log.error("burst: not drained: the outputs folder cannot take files",
                                       reason=self.claimer.paused.reason, exit_code=EXIT_MACHINE_FAULT)
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
            if self.continuous is not None:  # stopping: the running batch decodes on within the grace
                self.continuous.drain()
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
        if self.held.jobs and self.waker.cancels() & {job.id for job in self.held.jobs}:
            self.heartbeat.run_once()  # a cancel notified (PostgreSQL): the beat reads it now
        self.heartbeat.run_if_due(now)
        if self.healthy():  # a call stuck past its time limit stops the liveness signals too
            self.hooks.on_loop(now)
        if self.stopping and not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping("finishing running jobs")
            self.log.info("stopping", held=len(self.held.jobs), immediate=self._immediate)
        if now >= self._next_watchdog and self.healthy():
            self.notifier.watchdog()
            self._next_watchdog = now + min(1.0, (self.notifier.watchdog_interval or 2.0) / 2)
        self.rescuer.run_if_due(now)
        self.registration.run_if_due(now)  # last: the registry waits behind the leases and the watchdog

    def run_once(self) -> int:
        """Run the jobs claimed with the last outcomes, or claim a batch; record them. Returns how
        many jobs it took.

        Each backend call renders while the outcomes of the one before are written. After the
        last call the completer claims the next jobs (:meth:`Completer.claim_next_round
        <dgxqueue.daemon.completer.Completer.claim_next_round>`), with this round's last outcomes
        or alone, leaving them pending to be written while the next round's first call renders.
        With ``worker.prefetch`` the claim is made while the last call renders, and the last
        outcomes are left pending the same way. With ``[generator] continuous`` it is one step of
        the running batch instead (:meth:`Continuous.run_once
        <dgxqueue.daemon.continuous.Continuous.run_once>`).
        """
        if self.continuous is not None:  # a running batch of slots instead of rounds of batches
            return self.continuous.run_once()
        if self.stopping:
            return 0
        held, completer, claimer = self.held, self.completer, self.claimer
        if not held.next:  # with any outcomes a database outage left unwritten
            completer.flush(claim_next=True)
        jobs, held.next = held.next, []
        premarked, held.premarked = held.premarked, set()
        if not jobs:
            return 0
        self._render_seconds = 0.0  # no backend call this round (all refused): nothing hides a write
        kept = False
        try:
            planned = self._plan(jobs, premarked)
            # None: given up on, so none runs, and all but a charged job go back below.
            batches, rendering = planned if planned is not None else ([], None)
            if planned is not None and rendering is None:
                claimer.unmark_not_first(jobs, premarked, batches)
            for i, batch in enumerate(batches):
                if i == 0 and rendering is not None:  # the plan's own call renders it already
                    running = rendering
                else:
                    if self.stopping or self.runner.busy:
                        # Not started: run next round, or given back below if there is none.
                        held.next = [w.job for later in batches[i:] for w in later]
                        break
                    self.heartbeat.run_if_due(time.monotonic())
                    if batch[0].job.suspect:  # alone: nothing else in flight if it kills the daemon again
                        with outage_skips(self.log, "could not write outcomes before a suspect job"):
                            completer.flush(claim_next=False)
                    if i > 0 or not {w.job.id for w in batch} <= premarked:
                        self._mark_started(batch)
                    running = self._start(batch)
                # An outage must not abandon the batch now rendering: its outcomes stay pending.
                with outage_skips(self.log, "could not write outcomes yet; will try again after this batch"):
                    completer.flush(claim_next=self.config.prefetch and i == len(batches) - 1)
                outcomes = self._wait(running, batch)
                while self._sent:
                    self.hooks.on_batch(self._sent.pop())
                if outcomes is None:
                    break
                completer.pending.extend(self._sort_faults(outcomes))
            if claimer.may_claim() and not held.next:
                completer.claim_next_round(self._render_seconds)
            if not (claimer.may_claim() and held.next):  # no next round to write behind: write now
                completer.flush(claim_next=False)
            kept = claimer.may_claim()  # what held.next holds runs next, and pending is written then
        finally:
            if not kept:  # a stop, a stuck backend or an error: give back what did not run
                held.next, held.premarked = [], set()
                # Finished jobs whose outcomes an outage left unwritten stay held (see Completer.flush).
                completer.release(keep={o.job.id for o in completer.pending}, marks=self._fault_marks)
        return len(jobs)

    def _sort_faults(self, outcomes: list[Attempt]) -> list[Attempt]:
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
        with outage_skips(self.log, "could not read how often these jobs faulted before; giving them back"):
            return self.store.error_messages(ids)
        return {}

    def _plan(self, jobs: list[ClaimedJob],
              premarked: set[str]) -> tuple[list[list[Work]], tuple[Future[list[Attempt]], float] | None] | None:
        """The round's backend calls (:func:`~dgxqueue.daemon.isolation.plan`: the claim's
        ``validate()`` and ``batch_key()``), worked out on the runner's thread and waited for as
        a call is, so the loop heartbeats and stops meanwhile; the jobs it refuses go to the
        completer. None when a stop's grace or the time limit gave up on it (the time limit
        charges the job whose method did not return; the rest go back unspent).

        When nothing is left for the main loop to do between the plan and the first call (one
        call, of jobs all validated and marked started by their claim, none refused: no mark to
        set or clear), the plan's own call goes on to render it, so the usual round still costs
        one hand-off to the runner: that call's future and start come back with the batches. The
        loop then hears of the plan before the render only when it has outcomes to write meanwhile
        (or claims ahead, ``worker.prefetch``): woken in the middle of a render for nothing, it
        took the GIL from it (no-op throughput at claims of one fell 14%)."""
        size = min(self.batch_size, self.generator.max_batch_size)
        generator, doing = self.generator, self.runner.doing
        outputs, worker_id = self.settings.outputs_dir, self.worker_id
        # Made here, so a cancel noticed while the plan runs reaches the control its render reads.
        controls = {job.id: self.held.control(job.id) for job in jobs}
        beside = self.completer.publishing()  # as for a call (see _start)
        self._call = handoff = Handoff()
        planned: Future[tuple[list[list[Work]], list[Attempt], bool]] = Future()
        meanwhile = bool(self.completer.pending) or self.config.prefetch

        def call() -> list[Attempt]:
            batches, refused = plan(jobs, generator, premarked, size, doing)
            now = (not refused and len(batches) == 1 and not self.stopping
                   and all(w.validated and w.job.id in premarked for w in batches[0]))
            if meanwhile or not now:
                planned.set_result((batches, refused, now))
            if not now:
                return []
            started = time.monotonic()
            batch = [_with_control(w, controls[w.job.id]) for w in batches[0]]
            outcomes = render(generator, batch, outputs, worker_id, beside, doing)
            self._render_seconds = time.monotonic() - started
            delivered = handoff.deliver(outcomes)
            if not planned.done():  # nothing to write meanwhile: the loop wakes once, for both
                planned.set_result((batches, refused, now))
            return delivered

        def unplanned(done: Future[list[Attempt]]) -> None:
            # The call raised before it handed its plan over: the loop, waiting for the plan, gets
            # the error as the runner hands it on (a backend's SystemExit as an error, not an exit).
            # On the runner's thread, as is every other write of ``planned`` (or after the call ended).
            error = done.exception()
            if error is not None and not planned.done():
                planned.set_exception(error)

        self.heartbeat.run_if_due(time.monotonic())  # as before each call
        started = time.monotonic()
        future = self.runner.submit(call)
        future.add_done_callback(unplanned)
        got = self._await(planned, started, jobs)
        if isinstance(got, GaveUp):
            self.completer.pending.extend(got.charged)
            return None
        batches, refused, now = got
        self.completer.pending.extend(self._sort_faults(refused))
        if now:
            self.hooks.on_batch(len(batches[0]))
            return batches, (future, started)
        future.result()  # it returns with its plan: the runner is free for the first call
        # A job whose cancel was recorded while the plan ran (the heartbeat beat meanwhile) has no
        # control left to stop it: it never starts, and no outcome of it is waited for.
        ended = self.held.ended
        kept = [[self._controlled(w) for w in batch if ended.pop(id(w.job), None) is None] for batch in batches]
        return [batch for batch in kept if batch], None

    def _mark_started(self, batch: list[Work]) -> None:
        """Record, before the backend call, which jobs it starts: if it kills the daemon, the
        lease rescue charges them and gives the jobs that had not started their attempt back."""
        with outage_skips(self.log, "could not mark jobs started; if this call kills the daemon they are "
                          "charged nothing", jobs=[w.job.id for w in batch]):
            self.store.mark_started([w.job for w in batch])

    def _start(self, batch: list[Work]) -> tuple[Future[list[Attempt]], float]:
        """Hand a batch to the runner; returns its future and start time for :meth:`_wait`."""
        if all(w.validated for w in batch):  # else counted once its validate refused the call's invalid jobs
            self.hooks.on_batch(len(batch))
        outputs, worker_id = self.settings.outputs_dir, self.worker_id
        # The results written behind this call: their renames come after its jobs' checks.
        beside = self.completer.publishing()
        self._call = handoff = Handoff()
        doing = self.runner.doing

        def call() -> list[Attempt]:  # timed where it runs: the main loop may be busy writing
            started = time.monotonic()
            ready, refused = validate_unvalidated(batch, self.generator, doing)
            if ready and not all(w.validated for w in batch):
                self._sent.append(len(ready))
            outcomes = refused + render(self.generator, ready, outputs, worker_id, beside, doing) if ready else refused
            self._render_seconds = time.monotonic() - started
            return handoff.deliver(outcomes)

        return self.runner.submit(call), time.monotonic()

    def _cancel_now(self, ids: set[str]) -> None:
        """Jobs whose cancel the heartbeat just noticed (their controls are set, so the backend
        may stop them): those held but not in a running call are taken out of the next round, and
        all are recorded cancelled now rather than when their call returns."""
        held = self.held
        waiting = {job.id for job in held.next if job.id in ids}
        held.next = [job for job in held.next if job.id not in ids]
        held.premarked -= ids
        self.completer.cancel_running([job for job in held.jobs if job.id in ids], waiting)

    def _controlled(self, work: Work) -> Work:
        """``work`` with its request carrying the job's control (progress and cancel, shared with
        the heartbeat)."""
        return _with_control(work, self.held.control(work.job.id))

    def _wait(self, running: tuple[Future[list[Attempt]], float], batch: list[Work]) -> list[Attempt] | None:
        """Wait for a started batch while heartbeating; None when a stop gave up on it."""
        future, started = running
        outcomes = self._await(future, started, [w.job for w in batch])
        if isinstance(outcomes, GaveUp):
            return outcomes.charged or None
        return outcomes

    def _await(self, future: Future[T], started: float, jobs: Sequence[ClaimedJob]) -> T | GaveUp:
        """A backend call's result, heartbeating while it runs; :class:`GaveUp` when a stop's
        grace period ended first (nothing charged: its jobs go back unspent) or the call overran
        ``worker.job_timeout_seconds`` (charged to the jobs of ``jobs`` it was in a generator
        method for, as the runner's :class:`~dgxqueue.daemon.runner.Doing` says, else to all of
        them; the daemon stops to exit :data:`EXIT_JOB_TIMEOUT`). The log names what did not return.
        The limit counts from the start of the method the call is in (:meth:`Doing.began
        <dgxqueue.daemon.runner.Doing.began>`), ``started`` before any: a claim's plan and its
        render in one hand-off, or a claim's validate() of each job, are each given all of it."""
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
                    hung = self.runner.doing.describe()
                    self._abandon_call()
                    self.log.warning(f"grace period over; giving running jobs back: {hung} did not return",
                                     jobs=[job.id for job in jobs])
                    return GaveUp([])
            begun = self.runner.doing.began(started)
            if now - begun >= self.config.job_timeout_seconds:
                hung, named = self.runner.doing.describe(), set(self.runner.doing.job_ids())
                self._abandon_call()
                charged = [job for job in jobs if job.id in named] or list(jobs)
                error = JobTimeoutError(f"job exceeded its time limit of {self.config.job_timeout_seconds:g} s")
                self.log.error(f"generator call overran its time limit: {hung} did not return; charged to its"
                               " jobs, the rest go back unspent, then exit for a fresh process",
                               jobs=[job.id for job in charged], exit_code=EXIT_JOB_TIMEOUT)
                self.exit_code = EXIT_JOB_TIMEOUT
                self.request_stop(immediate=True)
                return GaveUp([Attempt(job, error, now - begun) for job in charged])

    def _abandon_call(self) -> None:
        """Give up on the running call: its outcomes are not recorded and its files never published."""
        self._call.abandon()
        self.runner.abandon()

    def shutdown(self) -> None:
        try:
            completer, held = self.completer, self.held
            if completer.pending:  # outcomes left for the next round's render: write them now
                with outage_skips(self.log, "could not write the last outcomes; their leases will expire and be"
                                  " rescued", to_rescue=True):
                    completer.flush(claim_next=False)
            # Finished jobs whose outcomes could not be written stay held, as in run_once: given
            # back, they would render again with their attempt refunded.
            unwritten = {o.job.id for o in completer.pending}
            for outcome in completer.pending:  # committed or not, unknown: the sweep settles their files
                if outcome.staged is not None:
                    outcome.staged.leave()
            completer.pending, held.next, held.premarked = [], [], set()
            if held.jobs:
                completer.release(keep=unwritten, marks=self._fault_marks)
        finally:
            if not self._stopping_sent:
                self._stopping_sent = True
                self.notifier.stopping()
            self.runner.close()
            self.registration.stop()  # after the jobs went back: the entry said what it held
            self.waker.close()
            self.store.close()
            self.hooks.on_stop()
            self._hard_stop.close()

    def _overran(self) -> None:
        """The hard stop's last words: where the main loop is stuck (most often a database call
        the server never answers, but read, not assumed), and what the runner still runs."""
        where = stuck_in(self._main_thread)
        self.log.error(f"the stop overran its time limit (the main loop did not return from {where[0]}): exiting"
                       " now; the jobs still held are left to the lease rescue",
                       jobs=[job.id for job in list(self.held.jobs)], main_loop=where,
                       backend=self.runner.doing.describe() if self.runner.busy else None, exit_code=self.exit_code)
