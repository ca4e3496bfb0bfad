"""Continuous batching: a running batch of slots that jobs join and leave between decoding steps.

With ``[generator] continuous = true`` and a backend with slots
(:class:`~dgxqueue.generators.SlotGenerator`, e.g. MusicGen with ``decode = "loop"``),
:class:`Continuous` takes the place of the claim-a-batch round of
:meth:`Daemon.run_once <dgxqueue.daemon.daemon.Daemon.run_once>`. Each round is one backend call
on the runner's thread: cancel the slots of cancelled or overdue jobs, start the jobs claimed
since the last step, run one step, stage the WAV of each job that finished. While that call
runs, the main thread (which owns every database call, as in the ordinary loop) writes the
outcomes of the jobs that finished at the step before, claims into the slots that are free,
heartbeats and rescues: the GPU never waits on the database.

- **Claims stay the one atomic statement**, marking the jobs started (they join at the next
  step), of at most the free slots not promised to jobs claimed already: no job is held that an
  idle daemon could run. A claim is made when the waker says the table changed, else once a
  poll interval.
- **Validation**: a job's ``validate()`` runs in the step it joins, on the runner's thread, after
  its start mark (never on the main loop, which a ``validate()`` that hangs would stall), by the
  rule of every path (:func:`~dgxqueue.daemon.executor.validate`: a refusal fails the job, any
  other exception is its unexpected error, retried by the retry policy), a suspect's too.
- **A start that raises** (the backend's ``start()`` of a joining job) fails that job alone, the
  others join: its error is judged as one raised from ``generate`` in the ordinary loop (the
  daemon's fault sorting, then the retry policy: an unexpected error is retried while
  ``worker.retry_unexpected_errors``; a machine fault is the machine's, its job given back
  unspent and the daemon stopping), a SystemExit too (:mod:`~dgxqueue.daemon.runner`). Out of
  memory (:class:`~dgxqueue.errors.CapacityError`) with fewer slots now gives the job back
  unspent to join again, as from a step, with the jobs after it that no slot is left for; with as
  many slots as before it is the job's transient error. The daemon then cancels the job (the
  backend's ``cancel()``): a start may have taken a slot before it raised, and kept it would
  decode for nobody, and a retry of the job would find its key taken; not after a machine fault
  no test write can clear, which ends the process and its slots. An error from that
  cancel is logged, the job's outcome unchanged; one that never returns is charged to that job
  alone, as its start would be.
- **Outcomes** go through the completer, fenced by each attempt's token, as in the ordinary loop;
  a finished job's file is staged on the runner thread and published after its write commits.
- **Cancels** free the job's slot at the next step; the other slots decode on.
- **A lost lease** (the heartbeat finds the attempt is no longer this daemon's, or this daemon
  claimed the job again) frees the job's slot at the next step too: its write is sure to be
  fenced off, so decoding it on would only keep jobs whose results count out of the slot.
- **Time limits** are per job: one past ``worker.job_timeout_seconds`` leaves its slot, charged
  with :class:`~dgxqueue.errors.JobTimeoutError`. A step that itself overruns the limit is a
  stuck call, handled as the ordinary loop handles one (charged, exit for a fresh process).
- **A step that raises** (a SystemExit too: :class:`~dgxqueue.errors.BackendExitError`) drops
  every job in a slot. Out of memory
  (:class:`~dgxqueue.errors.CapacityError`) with fewer slots now gives them back unspent to
  join again; a machine fault (:mod:`~dgxqueue.daemon.faults`) stops the daemon as in the
  ordinary loop; anything else (out of memory with as many slots as before too) gives them back
  marked, each up to :data:`~dgxqueue.daemon.faults.UNCONFIRMED_REFUNDS` times
  (:func:`~dgxqueue.daemon.faults.refund`).
- **A suspect** (:mod:`~dgxqueue.daemon.isolation`), and each job of a step that failed here (not
  for memory), joins an empty batch and runs alone: nothing is claimed while it waits or runs. So
  a job that breaks every step it is in is charged alone, not its companions. One claimed while
  the batch is busy is given back at once (unspent) for an idle daemon, and this daemon claims
  nothing until its batch is empty, then one job: not held unrun, nor starved (:meth:`Continuous.claim`).
- **A stop** claims and starts nothing more; the running jobs decode to their end within the
  grace period (:meth:`Continuous.drain`), and whatever is held after it goes back unspent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from dgxqueue import audio
from dgxqueue.daemon.executor import Attempt, Handoff, Work, cancelled, locate, stage, validate
from dgxqueue.daemon.faults import refund
from dgxqueue.daemon.isolation import prepare_isolating
from dgxqueue.daemon.outages import outage_skips
from dgxqueue.errors import CapacityError, JobTimeoutError, LeaseLostError, TransientGeneratorError, text_of
from dgxqueue.generators import GenerationOutcome, SlotGenerator
from dgxqueue.machine_faults import PROBED_REASONS, machine_fault
from dgxqueue.storage.claimed import ClaimedJob

if TYPE_CHECKING:
    from dgxqueue.daemon.daemon import Daemon

_SLICE = 0.25  # longest a wait for a step blocks without looking at stop requests and timers


@dataclass(frozen=True)
class _Slot:
    """A job decoding in a slot: its work, its file's path, when it joined (``time.monotonic()``)."""

    work: Work
    path: str
    joined: float


@dataclass(frozen=True)
class _Step:
    """What one backend call did: the jobs it started, and the outcomes of the jobs that left."""

    joined: list[_Slot]
    outcomes: list[Attempt]
    occupied: int  # jobs in slots during the step: what dgxqueue_batch_size observes
    back: list[ClaimedJob]  # jobs not started for want of memory (CapacityError at a start): given back unspent
    memory: str | None  # the CapacityError a start() raised, if one did


def _stops_the_daemon(error: BaseException) -> bool:
    """A machine fault no test write can clear (memory, descriptors, a scratch disk, the GPU):
    the daemon gives the call's jobs back and exits for a fresh process, whose slots die with it.
    No cancel() is asked after such a start: on a lost GPU it may never return, and the time
    limit would then charge this job for the machine's fault."""
    reason = machine_fault(error)
    return reason is not None and reason not in PROBED_REASONS


def _fewer_slots(error: BaseException, generator: SlotGenerator, before: int) -> bool:
    """Whether ``error`` is out of memory that its jobs may join again after: a CapacityError
    after which the backend has fewer slots than ``before``. With as many as before, they would
    only fail again, and given back unspent they would be claimed again at once, for ever."""
    return isinstance(error, CapacityError) and generator.slots < before


class Continuous:
    """The daemon's running batch: claims into free slots, one step a round, finished jobs written at once."""

    def __init__(self, daemon: Daemon, generator: SlotGenerator) -> None:
        self.daemon = daemon
        self.generator = generator
        self.running: dict[str, _Slot] = {}  # by job id; the main thread's alone
        self._claim_due = 0.0
        self._unmarked: set[str] = set()  # waiting suspects whose claim's start mark was cleared
        self._joining_now = 0  # jobs the running step starts: in no slot yet, and no longer held.next
        self._draining = False  # a suspect was given back: claim nothing until the batch is empty
        self._joining_alone = False  # the running step starts a suspect: it runs alone
        # Jobs that were in a step that failed (not for memory): any one may be what broke it, so
        # each runs alone until it leaves a step with an outcome; one that breaks the step alone
        # is charged alone (faults.refund), never again its companions.
        self._doubted: set[str] = set()

    # --- claiming -------------------------------------------------------------------------

    def room(self) -> int:
        """How many jobs a claim may take: the free slots not promised to jobs claimed already;
        none while a suspect waits or runs (it runs alone)."""
        held = self.daemon.held
        if (any(map(self._alone, held.next)) or any(self._alone(s.work.job) for s in self.running.values())
                or self._joining_alone):  # a suspect in its first step is in no slot yet, but it runs
            return 0
        if self._draining:  # for a suspect given back: nothing until the batch is empty, then one job
            return 0 if self._busy() else 1
        return max(0, self.generator.slots - len(self.running) - self._joining_now - len(held.next))

    def _busy(self) -> bool:
        return bool(self.running or self._joining_now or self.daemon.held.next)

    def claim(self) -> int:
        """Claim up to :meth:`room` jobs, marked started (they join at the next step); how many.

        A suspect runs alone, so it cannot join a busy batch: one claimed then is given back at
        once (unspent), for an idle daemon to run, and this daemon claims nothing more until its
        batch is empty, then one job (the oldest: the suspect, unless another daemon took it), so a
        suspect is not held unrun while a batch decodes, nor starved by a batch never empty."""
        daemon = self.daemon
        room = self.room()
        if room <= 0 or not daemon.claimer.may_claim():
            return 0
        self._claim_due = time.monotonic() + daemon.config.poll_interval_seconds
        now = daemon.claimer.clock()
        busy = self._busy()
        jobs = daemon.store.claim(room, start=True)
        self._draining = False
        daemon.claimer.take(jobs, now, premarked=True)
        if busy or any(not self._alone(job) for job in jobs):  # trusted jobs join first: the batch is busy
            waiting = [job for job in jobs if self._alone(job)]
            if waiting:
                self._give_back(waiting)
                self._draining = True
        return len(jobs)

    def _give_back(self, jobs: list[ClaimedJob]) -> None:
        """Give claimed jobs that have not joined back, unspent."""
        daemon, held = self.daemon, self.daemon.held
        ids = {job.id for job in jobs}
        daemon.log.info("suspects given back: they run alone, and the batch is busy; draining it", jobs=sorted(ids))
        held.next = [job for job in held.next if job.id not in ids]
        held.premarked -= ids
        daemon.completer.release(keep={job.id for job in held.jobs} - ids)

    def _claim_wanted(self) -> bool:
        # The waker first: it is how a job enqueued now joins at the next step, not a poll later.
        return self.room() > 0 and (self.daemon.waker.wait(0) or time.monotonic() >= self._claim_due)

    # --- the round ------------------------------------------------------------------------

    def run_once(self) -> int:
        """One round: start the jobs claimed into free slots and run a step; idle, write what is
        left and claim. Returns how many jobs it ran or claimed (0: idle, nothing to claim)."""
        daemon = self.daemon
        if daemon.stopping:
            return 0
        joining = self._joining()
        if self.running or joining:
            self._step(joining)
            return len(self.running) + len(joining) or 1
        completer = daemon.completer
        if completer.pending:
            completer.flush(claim_next=False)
        return self.claim()

    def drain(self) -> None:
        """After a stop: decode the running jobs to their end within the grace period (none if the
        stop is immediate); the shutdown gives back whatever is still held."""
        daemon = self.daemon
        while self.running and not daemon.runner.busy and not self._grace_over():
            self._step([])
        if self.running:
            daemon.log.warning("grace period over; giving running jobs back", jobs=sorted(self.running))
            self.running = {}

    def _grace_over(self) -> bool:
        daemon = self.daemon
        at = daemon._stop_requested_at
        if at is None:
            return False
        grace = 0.0 if daemon._immediate else daemon.config.grace_seconds
        return time.monotonic() >= at + grace

    def _joining(self) -> list[Work]:
        """The held jobs that join at the next step, as many as slots are free; those refused
        before the backend sees them go to the completer. A suspect joins only an empty batch."""
        daemon, held = self.daemon, self.daemon.held
        free = self.generator.slots - len(self.running)
        if not held.next or free <= 0 or any(self._alone(s.work.job) for s in self.running.values()):
            return []
        trusted = [job for job in held.next if not self._alone(job)]
        taken = trusted[:free] if trusted else ([held.next[0]] if not self.running else [])
        ids = {id(job) for job in taken}
        held.next = [job for job in held.next if id(job) not in ids]
        waiting = [job for job in held.next if self._alone(job) and job.id not in self._unmarked]
        self._mark(waiting, started=False)  # a waiting suspect is not charged if the batch kills the daemon
        self._unmarked.update(job.id for job in waiting)
        again = [job for job in taken if job.id in self._unmarked]
        self._mark(again, started=True)  # it runs alone now: the GPU is idle anyway
        self._unmarked -= {job.id for job in taken}
        held.premarked -= {job.id for job in taken}
        # Each job taken is marked started (by its claim, or again above); none is validated here,
        # on the main loop, where a validate() that never returns would stall the loop: each is
        # validated in the step it joins, on the runner's thread.
        work, refused = prepare_isolating(taken, daemon.generator, marked=())
        daemon.completer.pending.extend(daemon._sort_faults(refused))
        return [daemon._controlled(w) for w in work]

    def _alone(self, job: ClaimedJob) -> bool:
        """A suspect, or a job that was in a step that failed here: it joins an empty batch."""
        return job.suspect or job.id in self._doubted

    def _mark(self, jobs: list[ClaimedJob], *, started: bool) -> None:
        if jobs:
            with outage_skips(self.daemon.log, "could not change start marks", jobs=[job.id for job in jobs]):
                self.daemon.store.mark_started(jobs, started=started)

    def _step(self, joining: list[Work]) -> None:
        """One backend call (cancels, joins, a step, staged files); the database work beside it."""
        daemon = self.daemon
        now = time.monotonic()
        # The request's own control: a cancel recorded at once (Completer.cancel_running) no longer
        # holds the job, nor its control in Held.controls.
        stopped = [key for key, s in self.running.items() if s.work.request.control.cancelled]
        # Attempts this daemon holds no more (the heartbeat found the lease lost, or this daemon
        # claimed the job again): their outcomes are sure to be refused, so their slots go to
        # jobs whose results count, and a new attempt of the same job can start in this call.
        lost_leases, superseded = daemon.heartbeat.lost, daemon.held.superseded
        lost = [key for key, s in self.running.items() if key not in stopped
                and ((key, s.work.job.attempt) in lost_leases or id(s.work.job) in superseded)]
        limit = daemon.config.job_timeout_seconds
        overdue = [key for key, s in self.running.items()
                   if key not in stopped and key not in lost and now - s.joined >= limit]
        future = daemon.runner.submit(self._call(joining, stopped + lost + overdue))
        begun, self._joining_now = time.monotonic(), len(joining)
        self._joining_alone = any(self._alone(w.job) for w in joining)
        left = [self.running.pop(key) for key in stopped + lost + overdue]
        daemon.completer.pending.extend(cancelled(s.work.job, now - s.joined) for s in left[: len(stopped)])
        if lost:
            daemon.log.warning("slots freed of jobs whose lease was lost; the others decode on", jobs=lost)
            gone = LeaseLostError("this daemon no longer holds the attempt: its slot was freed")
            daemon.completer.pending.extend(Attempt(s.work.job, gone, now - s.joined)
                                            for s in left[len(stopped):len(stopped) + len(lost)])
        left = left[: len(stopped)] + left[len(stopped) + len(lost):]
        if overdue:
            daemon.log.error("job overran its time limit: its slot is freed, the others decode on", jobs=overdue)
            error = JobTimeoutError(f"job exceeded its time limit of {limit:g} s")
            daemon.completer.pending.extend(Attempt(s.work.job, error, now - s.joined) for s in left[len(stopped):])
        # While the step runs: the outcomes of the last one, then a claim into the free slots.
        with outage_skips(daemon.log, "could not write outcomes or claim yet; will try again after this step"):
            if daemon.completer.pending:
                daemon.completer.flush(claim_next=False)
            if self._claim_wanted():
                self.claim()
        daemon.tick()
        try:
            step = self._wait(future, begun, joining)
        except Exception as exc:
            self._failed(exc, joining, time.monotonic() - begun)
            return
        finally:
            self._joining_now, self._joining_alone = 0, False
        if step is None:
            return
        if step.occupied:
            # The running batch's size is the jobs in slots at each step, the generator call of
            # this mode: its histogram then shows how full the slots run, as in the ordinary loop
            # it shows how full the batches are (a per-join count would hide a batch left to empty).
            daemon.hooks.on_batch(step.occupied)
        self.running.update((s.work.job.id, s) for s in step.joined)
        if step.back:
            back = {job.id for job in step.back}
            daemon.log.warning("out of memory starting jobs: they go back unspent to join again; fewer slots now",
                               slots=self.generator.slots, jobs=sorted(back), error=step.memory)
            daemon.completer.release(keep={job.id for job in daemon.held.jobs} - back)
        for outcome in step.outcomes:
            self.running.pop(outcome.job.id, None)
            self._doubted.discard(outcome.job.id)  # it got through a step alone
        daemon.completer.pending.extend(daemon._sort_faults(step.outcomes))

    def _call(self, joining: list[Work], leaving: list[str]) -> Callable[[], _Step]:
        """The backend call of one round, for the runner's thread."""
        daemon, generator = self.daemon, self.generator
        outputs, worker_id = daemon.settings.outputs_dir, daemon.worker_id
        slots = dict(self.running)  # the runner's own copy: the main thread changes running meanwhile
        # Beside the slots that decode on, and the results written (and renamed) while this call runs.
        beside = [(s.work.job, s.path) for key, s in slots.items() if key not in leaving]
        beside += daemon.completer.publishing()
        daemon._call = handoff = Handoff()
        doing = daemon.runner.doing

        def call() -> _Step:
            for key in leaving:
                doing("cancel", key)
                generator.cancel(key)
            root = audio.OutputRoot(outputs)
            outcomes: list[Attempt] = []
            joined: list[_Slot] = []
            back: list[ClaimedJob] = []  # not started for want of memory: given back unspent
            memory: str | None = None
            for one in joining:  # each beside the slots and the jobs that joined before it, never one that did not
                doing("files", one.job.id)
                located, refused = locate([one], root, beside + [(s.work.job, s.path) for s in joined])
                outcomes += refused
                if not located:
                    continue
                [(work, path)] = located
                if work.request.control.cancelled:
                    outcomes.append(cancelled(work.job))
                    continue
                # Validated here, after its start mark, by the rule of every path (a suspect too).
                refusal = None if work.validated else validate(work.job, work.request, daemon.generator, doing)
                if refusal is not None:
                    outcomes.append(refusal)
                    continue
                if memory is not None and generator.free_slots <= 0:  # a start ran out of memory: fewer slots now
                    back.append(work.job)
                    continue
                before = generator.slots
                try:
                    doing("start", work.job.id)
                    generator.start(work.request)
                except BaseException as exc:  # SystemExit too: the backend's own on the runner's thread
                    fewer = _fewer_slots(exc, generator, before)
                    if not _stops_the_daemon(exc):
                        self._free_failed_start(work.job.id)
                    if fewer:  # as a step's: given back unspent to join again
                        back.append(work.job)
                        memory = memory or f"{type(exc).__name__}: {text_of(exc)}"
                        continue
                    outcomes.append(Attempt(work.job, exc, 0.0))  # this job's alone, judged as from generate()
                    continue
                joined.append(_Slot(work, path, time.monotonic()))
            occupied = generator.slots - generator.free_slots
            doing("step", *(key for key in slots if key not in leaving), *(s.work.job.id for s in joined))
            before = generator.slots
            try:
                finished = generator.step()
            except CapacityError as exc:
                if _fewer_slots(exc, generator, before):
                    raise
                raise TransientGeneratorError(f"{text_of(exc)} (no fewer slots: a failed step)") from exc
            if finished:
                doing("files", *(key for key, _ in finished))
                outcomes += self._stage(finished, {**slots, **{s.work.job.id: s for s in joined}},
                                        root.real, worker_id)
            return _Step(joined, handoff.deliver(outcomes), occupied, back, memory)

        return call

    def _free_failed_start(self, key: str) -> None:
        """After a start() of job ``key`` that raised, on the runner's thread: cancel whatever the
        backend may hold for it. A start may take a slot and then raise (a bug after the request
        went into its slot table, an error copying it in): kept, the request would hold that slot
        and decode for nobody, its result dropped, and a retry of the job would find its key taken.
        Named in ``doing``, a cancel that never returns is charged to that job alone, as its start
        would be (:meth:`_wait`). What the cancel raises is the backend's own: logged, never
        raised, and the job's outcome stays its start's. A cancel that freed a slot says the
        backend kept one after raising: logged, so that its author hears of the leak."""
        self.daemon.runner.doing("cancel", key)
        try:
            held = self.generator.cancel(key)
        except BaseException as exc:  # SystemExit too: the backend's own on the runner's thread
            self.daemon.log.warning("the generator's cancel() of a job whose start() raised raised too; ignored:"
                                    " the job's outcome is its start's", job_id=key,
                                    error=f"{type(exc).__name__}: {text_of(exc)}")
            return
        if held is True:
            self.daemon.log.warning("the generator's start() raised with the job in a slot; cancel() freed it"
                                    " (a backend should free what its start took before raising)",
                                    job_id=key, generator=self.daemon.generator.name)

    @staticmethod
    def _stage(finished: list[tuple[str, GenerationOutcome]], slots: dict[str, _Slot], inside: str,
               worker_id: str) -> list[Attempt]:
        """Stage the files of the jobs that finished, each timed from when it joined."""
        done = time.monotonic()
        mine = [(slots[key], result) for key, result in finished if key in slots]
        staged = stage([s.work for s, _ in mine], [s.path for s, _ in mine], [r for _, r in mine], 0.0, inside,
                       worker_id)
        return [replace(o, generation_seconds=o.generation_seconds + done - s.joined)
                for o, (s, _) in zip(staged, mine, strict=True)]

    def _wait(self, future: Future[_Step], begun: float, joining: list[Work]) -> _Step | None:
        """The step's result, heartbeating meanwhile; None when a stop or the time limit gave up on it."""
        daemon = self.daemon
        while True:
            try:
                return future.result(timeout=_SLICE)
            except FutureTimeout:
                pass
            daemon.tick()
            if future.done():
                continue
            if daemon.stopping and self._grace_over():
                hung = daemon.runner.doing.describe()
                daemon._abandon_call()
                daemon.log.warning(f"grace period over during a step; giving running jobs back: {hung} did not"
                                   " return", jobs=sorted([*self.running, *(w.job.id for w in joining)]))
                self.running = {}
                return None
            # From the start of the method it is in: each joining job's validate() is given all of it.
            if time.monotonic() - daemon.runner.doing.began(begun) >= daemon.config.job_timeout_seconds:
                hung, named = daemon.runner.doing.describe(), set(daemon.runner.doing.job_ids())
                daemon._abandon_call()
                jobs = [s.work.job for s in self.running.values()] + [w.job for w in joining]
                # The jobs of the generator method it is stuck in (one job's validate() or start(),
                # the cancel() after a start of its that raised, or the slots of a step), none for a
                # leaving job's cancel() (its outcome is recorded already, and it is no longer in
                # running), all only when it is in no method; the rest go back unspent.
                jobs = [job for job in jobs if job.id in named] if named else jobs
                daemon.log.error(f"a decoding step overran the time limit: {hung} did not return; charged to its"
                                 " jobs, the rest go back unspent, then exit for a fresh process",
                                 jobs=[j.id for j in jobs])
                from dgxqueue.daemon.daemon import EXIT_JOB_TIMEOUT  # here: that module imports this one

                daemon.exit_code = EXIT_JOB_TIMEOUT
                daemon.request_stop(immediate=True)
                error = JobTimeoutError(f"job exceeded its time limit of {daemon.config.job_timeout_seconds:g} s")
                daemon.completer.pending.extend(Attempt(job, error, time.monotonic() - begun) for job in jobs)
                self.running = {}
                return None

    def _failed(self, exc: Exception, joining: list[Work], elapsed: float) -> None:
        """A step raised: every job in a slot was dropped. See the module's docstring for who pays."""
        daemon = self.daemon
        jobs = [s.work.job for s in self.running.values()] + [w.job for w in joining]
        self.running = {}
        attempts = [Attempt(job, exc, elapsed) for job in jobs]
        if machine_fault(exc) is not None:
            daemon.completer.pending.extend(daemon._sort_faults(attempts))
            return
        if isinstance(exc, CapacityError):
            daemon.log.warning("out of memory: the jobs in slots go back unspent; fewer slots now",
                               slots=self.generator.slots, jobs=[job.id for job in jobs], error=text_of(exc))
            marks: dict[str, str] = {}
            kept: list[Attempt] = []
        else:
            daemon.log.error("a decoding step failed: the jobs in slots go back", jobs=[job.id for job in jobs],
                             error=f"{type(exc).__name__}: {text_of(exc)}")
            verdict = refund(attempts, "step", daemon._error_messages)
            marks, kept = verdict.marks, verdict.outcomes
            self._doubted.update(job.id for job in jobs)
        daemon.completer.pending.extend(kept)
        back = {job.id for job in jobs} - {o.job.id for o in kept}
        if back:
            daemon.completer.release(keep={job.id for job in daemon.held.jobs} - back, marks=marks)
