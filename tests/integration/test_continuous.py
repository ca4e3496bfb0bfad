"""The continuous daemon in process on a SlotGenerator of the tests' own: what a failed step, running
out of memory and a job's time limit cost whom. (The tiny MusicGen in daemon processes:
tests/acceptance/test_continuous_processes.py.)"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from structlog.testing import capture_logs

from dgxqueue.audio import read_wav, resolve_output_path
from dgxqueue.config import OutputSettings
from dgxqueue.daemon import EXIT_JOB_TIMEOUT, EXIT_MACHINE_FAULT, Daemon
from dgxqueue.daemon.faults import UNCONFIRMED_REFUNDS
from dgxqueue.errors import CapacityError, PermanentGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest
from dgxqueue.storage import cancel_generation, create_generations, get_engine, init_db, session_scope
from tests.support.daemons import RecordingHooks, make_settings
from tests.support.processes import wait_until

RATE = 8000


class Slots:
    """A SlotGenerator: a job of prompt ``steps:N`` finishes after N steps; ``hang`` never does;
    ``poison`` makes every step it is in raise; ``stall`` makes it hang for 3 s.
    ``fail_once``: the first step raises it (every job in a slot is dropped), and a CapacityError
    halves the slots as MusicGen does."""

    name = "slots"
    models = frozenset({"slots"})

    def __init__(self, slots: int = 4, fail_once: Exception | None = None) -> None:
        self.max_batch_size = self._slots = slots
        self.fail_once = fail_once
        self.running: dict[str, tuple[GenerationRequest, int]] = {}  # job id -> (request, steps left)
        self.peak = 0  # most jobs in slots at once
        self._pause = threading.Event()

    def load(self) -> None: ...

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt not in ("hang", "poison", "stall") and not request.prompt.startswith("steps:"):
            raise PermanentGeneratorError(f"unknown prompt {request.prompt!r}")

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return "all"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        raise AssertionError("a continuous daemon never calls generate")

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def free_slots(self) -> int:
        return self._slots - len(self.running)

    def start(self, request: GenerationRequest) -> None:
        self.validate(request)
        assert self.free_slots > 0, "started with no slot free"
        steps = 10**9 if request.prompt in ("hang", "poison", "stall") else int(request.prompt.split(":")[1])
        self.running[request.job_id] = (request, steps)
        self.peak = max(self.peak, len(self.running))

    def step(self) -> list[tuple[str, GenerationOutcome]]:
        self._pause.wait(0.002)  # a step's work, simulated
        if any(request.prompt == "stall" for request, _ in self.running.values()):
            self._pause.wait(3.0)  # a step that hangs (simulated), past the time limit
        if any(request.prompt == "poison" for request, _ in self.running.values()):
            self.running = {}
            raise RuntimeError("a step that a poison job breaks, every time")
        if self.fail_once is not None and self.running:
            error, self.fail_once = self.fail_once, None
            if isinstance(error, CapacityError):
                self._slots = max(1, self._slots // 2)
            self.running = {}
            raise error
        done: list[tuple[str, GenerationOutcome]] = []
        for key, (request, left) in list(self.running.items()):
            if left <= 1:
                del self.running[key]
                samples = np.full((request.channels, round(request.duration_seconds * RATE)), 0.1, np.float32)
                done.append((key, GeneratedAudio(samples, RATE)))
            else:
                self.running[key] = (request, left - 1)
        return done

    def cancel(self, job_id: str) -> bool:
        return self.running.pop(job_id, None) is not None


def _daemon(url: str, outputs: Path, generator: Slots, hooks: RecordingHooks, **worker: Any) -> Daemon:
    settings = make_settings(url, outputs, **worker)
    settings = dataclasses.replace(settings, generator=dataclasses.replace(settings.generator, continuous=True))
    init_db(url)
    return Daemon(settings, engine=get_engine(url), generator=generator, hooks=hooks)


def _enqueue(url: str, outputs: Path, *prompts: str) -> list[str]:
    init_db(url)
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [{"prompt": p, "model_name": "slots", "duration_seconds": 0.25,
                                       "sample_rate": RATE, "channels": 1} for p in prompts],
                                  outputs=OutputSettings(dir=str(outputs)))


def _rows(url: str, ids: list[str]) -> list[sa.RowMapping]:
    with get_engine(url).connect() as conn:
        found = {r["id"]: r for r in conn.execute(sa.text(
            "SELECT id, status, attempts, error_message, file_path FROM generations")).mappings()}
    return [found[i] for i in ids]


def test_continuous__out_of_memory_gives_the_jobs_back_unspent_and_fewer_slots_finish_them(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """A step out of memory (CapacityError) drops every job in a slot: they go back pending with
    their attempt refunded, rejoin the halved slots and complete on their first counted attempt."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(sqlite_db_url, outputs, "steps:3", "steps:5", "steps:2", "steps:4")
    generator, hooks = Slots(4, CapacityError("out of memory decoding 4 jobs; 2 slots now")), RecordingHooks()
    assert _daemon(sqlite_db_url, outputs, generator, hooks).run(burst=True) == 0
    rows = _rows(sqlite_db_url, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 1)] * 4
    assert generator.slots == 2 and all(hooks.outcomes(i) == ["released", "completed"] for i in ids)
    assert all(resolve_output_path(outputs, r["file_path"]).is_file() for r in rows)


def test_continuous__a_failed_step_gives_its_jobs_back_marked(sqlite_db_url: str, tmp_path: Path) -> None:
    """A step that raises something else drops its jobs too: given back marked with the failure and
    unspent (up to the refund limit), they complete after."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(sqlite_db_url, outputs, "steps:3", "steps:3")
    generator, hooks = Slots(4, RuntimeError("a bug in the step")), RecordingHooks()
    assert _daemon(sqlite_db_url, outputs, generator, hooks).run(burst=True) == 0
    rows = _rows(sqlite_db_url, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 1)] * 2
    assert all(hooks.outcomes(i) == ["released", "completed"] for i in ids)


def test_continuous__a_job_past_its_time_limit_leaves_its_slot_and_the_others_go_on(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """A job that never finishes is charged its time limit each attempt, alone; the jobs that
    joined with it and after it complete, and the daemon does not exit for it."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(sqlite_db_url, outputs, "hang", "steps:20", "steps:2")
    generator, hooks = Slots(2), RecordingHooks()
    daemon = _daemon(sqlite_db_url, outputs, generator, hooks, job_timeout_seconds=0.3)
    assert daemon.run(burst=True) == 0
    hung, *rest = _rows(sqlite_db_url, ids)
    assert [r["status"] for r in rest] == ["completed", "completed"]
    assert hung["status"] == "failed" and "time limit" in (hung["error_message"] or "")
    assert generator.peak <= 2


def test_continuous__a_job_that_breaks_every_step_is_charged_alone(sqlite_db_url: str, tmp_path: Path) -> None:
    """A job that breaks every step it is in drags its companions down once: after that each of
    them runs alone, so they complete on their first counted attempt, and it alone is charged
    until it fails."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(sqlite_db_url, outputs, "poison", "steps:3", "steps:4")
    generator, hooks = Slots(4), RecordingHooks()
    assert _daemon(sqlite_db_url, outputs, generator, hooks).run(burst=True) == 0
    poison, *rest = _rows(sqlite_db_url, ids)
    assert [(r["status"], r["attempts"]) for r in rest] == [("completed", 1)] * 2
    assert all(hooks.outcomes(r["id"]) == ["released", "completed"] for r in rest)
    assert poison["status"] == "failed" and "a step that a poison job breaks" in (poison["error_message"] or "")
    assert hooks.outcomes(ids[0]).count("released") == UNCONFIRMED_REFUNDS  # then charged


def test_continuous__a_step_past_the_time_limit_charges_its_slots_and_exits_124(sqlite_db_url: str,
                                                                                tmp_path: Path) -> None:
    """A step that hangs past the time limit is a stuck call, as in the claim-a-batch loop: the
    jobs in its slots are charged the time limit (retried later), and the daemon exits 124 for a
    fresh process."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(sqlite_db_url, outputs, "stall", "steps:50")
    daemon = _daemon(sqlite_db_url, outputs, Slots(4), RecordingHooks(), job_timeout_seconds=0.5,
                     backoff_base_seconds=60.0)
    assert daemon.run(burst=True) == EXIT_JOB_TIMEOUT
    rows = _rows(sqlite_db_url, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 1)] * 2
    assert all("time limit" in (r["error_message"] or "") for r in rows)


class CancelHanging(Slots):
    """Slots whose cancel() of the ``hang`` job does not return until ``gate`` is set, as a
    backend stuck freeing a slot."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.gate = threading.Event()

    def cancel(self, job_id: str) -> bool:
        if job_id in self.running and self.running[job_id][0].prompt == "hang":
            self.gate.wait(30)
        return super().cancel(job_id)


def test_continuous__a_cancel_that_never_returns_charges_no_job_beside_it(db_url: str, tmp_path: Path) -> None:
    """A job cancelled by request while it decodes beside another, the backend's cancel() of it
    never returning: the step is given up on at the time limit (exit 124), and the job beside it,
    in no method that hung, goes back unspent and unmarked. It was charged the time limit and
    marked to run alone, as if its own step had hung."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(db_url, outputs, "hang", "steps:1000000000")
    generator = CancelHanging(4)
    daemon = _daemon(db_url, outputs, generator, RecordingHooks(), job_timeout_seconds=3.0)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()))
    thread.start()
    try:
        wait_until(lambda: len(generator.running) == 2, 30, "both jobs to decode")
        with session_scope(get_engine(db_url)) as s:
            cancel_generation(s, ids[0])
        thread.join(30)
    finally:
        generator.gate.set()
        thread.join(30)
    assert codes == [EXIT_JOB_TIMEOUT]
    with get_engine(db_url).connect() as conn:
        found = {r.id: r for r in conn.execute(sa.text(
            "SELECT id, status, attempts, lease_losses, cancelled_at FROM generations"))}
    assert found[ids[0]].status == "failed" and found[ids[0]].cancelled_at is not None
    assert (found[ids[1]].status, found[ids[1]].attempts, found[ids[1]].lease_losses) == ("pending", 0, 0)


class SlowToValidate(Slots):
    """Slots whose validate() of a ``steps:N`` job takes 0.4 s (simulated work)."""

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        self._pause.wait(0.4)


def test_continuous__each_validate_of_the_jobs_joining_a_step_gets_the_time_limit(
        db_url: str, tmp_path: Path) -> None:
    """Three jobs joining one step, each validate() taking less than the time limit and the three
    more: none is a method that did not return, so none is charged and all complete at their first
    attempt. Timed as one step, the third was charged a time limit (exit 124) and marked to run
    alone."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(db_url, outputs, "steps:1", "steps:1", "steps:1")
    daemon = _daemon(db_url, outputs, SlowToValidate(4), RecordingHooks(), job_timeout_seconds=1.0)
    assert daemon.run(burst=True) == 0
    assert [(r["status"], r["attempts"]) for r in _rows(db_url, ids)] == [("completed", 1)] * 3


class _JoinsBeside(Slots):
    """Slots where a second job, whose path leads to the first one's file (through a link), is
    enqueued during the first step, and the first job decodes on only once the second has joined a
    slot or ended: the second joins the running batch beside the first, and leaves it first."""

    def __init__(self, url: str, outputs: Path) -> None:
        super().__init__(4)
        self.url, self.outputs = url, outputs
        self.first: str | None = None
        self.second: str | None = None

    def step(self) -> list[tuple[str, GenerationOutcome]]:
        if self.second is None:
            self.first = next(iter(self.running))
            with session_scope(get_engine(self.url)) as s:
                [self.second] = create_generations(s, [
                    {"prompt": "steps:1", "model_name": "slots", "duration_seconds": 0.5, "sample_rate": RATE,
                     "channels": 1, "file_path": "outputs/latest/a.wav"}])
        if self.second not in self.running and _rows(self.url, [self.second])[0]["status"] in ("pending",
                                                                                             "processing"):
            self._pause.wait(0.002)
            return []  # the first job waits for the second to join or end
        return super().step()


def test_continuous__a_job_joining_beside_one_whose_file_is_its_own_fails_and_the_first_keeps_its_wav(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """A job joins the running batch while another decodes whose path leads to the same file
    (``latest`` links to ``2026``): nothing is at the path yet, so the check at the join cannot see
    it. The joining job fails naming the other; the first completes with its own WAV (before: the
    second completed first, and the first was failed for the second's file)."""
    outputs = tmp_path / "outputs"
    (outputs / "2026").mkdir(parents=True)
    (outputs / "latest").symlink_to("2026")
    init_db(sqlite_db_url)
    with session_scope(get_engine(sqlite_db_url)) as s:
        [first] = create_generations(s, [{"prompt": "steps:3", "model_name": "slots", "duration_seconds": 0.25,
                                          "sample_rate": RATE, "channels": 1, "file_path": "outputs/2026/a.wav"}])
    generator, hooks = _JoinsBeside(sqlite_db_url, outputs), RecordingHooks()
    assert _daemon(sqlite_db_url, outputs, generator, hooks).run(burst=True) == 0
    assert generator.first == first and generator.second is not None
    done, refused = _rows(sqlite_db_url, [first, generator.second])
    assert (done["status"], refused["status"]) == ("completed", "failed"), (done, refused)
    assert first in (refused["error_message"] or "") and "outputs/latest/a.wav" in refused["error_message"]
    assert read_wav(outputs / "2026" / "a.wav")[0].shape == (1, round(0.25 * RATE))


class _RefusesAtStart(Slots):
    """Slots that refuse a ``steps:2`` job when it would join (validated, then the backend's start
    raises for it): it never takes a slot, so never writes its file."""

    def start(self, request: GenerationRequest) -> None:
        if request.prompt == "steps:2":
            raise PermanentGeneratorError("refused at its start")
        super().start(request)


def test_continuous__a_job_that_never_joined_does_not_block_the_file_of_one_joining_beside_it(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """Two jobs join at one step, ``x.wav`` and ``x.wav/y.wav``: the first is refused at its start,
    so nothing of it is ever written; the second joins and completes with its WAV (before: it was
    failed for good as colliding with the file of a job that never took a slot)."""
    outputs = tmp_path / "outputs"
    init_db(sqlite_db_url)
    with session_scope(get_engine(sqlite_db_url)) as s:
        first, second = create_generations(s, [
            {"prompt": prompt, "model_name": "slots", "duration_seconds": 0.25, "sample_rate": RATE, "channels": 1,
             "file_path": path} for prompt, path in (("steps:2", "outputs/x.wav"), ("steps:1", "outputs/x.wav/y.wav"))])
    hooks = RecordingHooks()
    with capture_logs() as logs:
        assert _daemon(sqlite_db_url, outputs, _RefusesAtStart(4), hooks).run(burst=True) == 0
    assert not [e for e in logs if "cancel() freed it" in e["event"]]  # it took no slot: no leak to name
    refused, done = _rows(sqlite_db_url, [first, second])
    assert refused["status"] == "failed" and "refused at its start" in (refused["error_message"] or "")
    assert (done["status"], done["attempts"]) == ("completed", 1), done
    assert read_wav(outputs / "x.wav" / "y.wav")[0].shape == (1, round(0.25 * RATE))


class ValidateObserving(Slots):
    """:class:`Slots` noting, at each validate, whether its job is marked started."""

    def __init__(self, url: str, slots: int) -> None:
        super().__init__(slots)
        self.url = url
        self.marked: dict[str, list[bool]] = {}  # job id -> at each of its validates

    def validate(self, request: GenerationRequest) -> None:
        with get_engine(self.url).connect() as conn:
            started = conn.execute(sa.text("SELECT started_at FROM generations WHERE id = :id"),
                                   {"id": request.job_id}).scalar_one()
        self.marked.setdefault(request.job_id, []).append(started is not None)
        super().validate(request)


def test_continuous__a_job_is_validated_only_once_marked_started(db_url: str, tmp_path: Path) -> None:
    """Jobs joining a running batch, more than its slots, a suspect and an invalid one among them:
    each is validated only once marked started (by its claim, or again when a suspect joins), so
    a validate that kills the daemon is charged to its job; the invalid one fails alone."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(db_url, outputs, "steps:2", "steps:3", "bogus", "steps:2", "steps:2")
    with get_engine(db_url).begin() as conn:  # it lost a lease before: it runs alone
        conn.execute(sa.text("UPDATE generations SET lease_losses = 1 WHERE id = :id"), {"id": ids[3]})
    generator = ValidateObserving(db_url, 2)
    assert _daemon(db_url, outputs, generator, RecordingHooks()).run(burst=True) == 0
    assert set(generator.marked) == set(ids) and all(all(seen) for seen in generator.marked.values())
    rows = _rows(db_url, ids)
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "completed", "completed"]
    assert rows[2]["error_message"] == "unknown prompt 'bogus'"


class _TakesASlotThenRaises(Slots):
    """Slots whose start() of a ``steps:3`` job, on its first start, puts it in a slot and then
    raises ``error`` (a backend's bug after taking the slot); the request so left would decode on.
    A start of a job that holds a slot already is a duplicate key: noted, and refused. Every key a
    step finishes is noted; ``cancel_error`` is what cancel() raises after freeing the slot, and
    ``gate``, when given, is what a cancel() of a job in a slot waits on first (a cancel that hangs)."""

    def __init__(self, slots: int, error: BaseException, cancel_error: BaseException | None = None,
                 gate: threading.Event | None = None) -> None:
        super().__init__(slots)
        self.error, self.cancel_error, self.gate = error, cancel_error, gate
        self.starts: dict[str, int] = {}
        self.duplicates: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []

    def start(self, request: GenerationRequest) -> None:
        if request.job_id in self.running:
            self.duplicates.append(request.job_id)
            raise RuntimeError(f"job {request.job_id} is in a slot already")
        super().start(request)
        self.starts[request.job_id] = self.starts.get(request.job_id, 0) + 1
        if request.prompt == "steps:3" and self.starts[request.job_id] == 1:
            raise self.error

    def step(self) -> list[tuple[str, GenerationOutcome]]:
        done = super().step()
        self.finished += [key for key, _ in done]
        return done

    def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        if self.gate is not None and job_id in self.running:
            self.gate.wait(30)
        held = super().cancel(job_id)
        if self.cancel_error is not None:
            raise self.cancel_error
        return held


def test_continuous__a_start_that_took_a_slot_then_raised_leaves_no_job_in_it(db_url: str, tmp_path: Path) -> None:
    """A start() that puts its job in a slot and then raises: the daemon cancels the job, so the
    slot is free for the next job (every slot is used again, no start finds none free), nothing of
    the failed attempt is ever finished, and the job's retry starts cleanly and completes. (The
    request stayed in its slot: the next job was started with no slot free, the failed attempt's
    result came from a later step under a key the daemon dropped, and the retry was a duplicate key.)"""
    outputs = tmp_path / "outputs"
    ids = _enqueue(db_url, outputs, "steps:3", "steps:2", "steps:2", "steps:2", "steps:2")
    generator, hooks = _TakesASlotThenRaises(2, RuntimeError("a bug after taking the slot")), RecordingHooks()
    with capture_logs() as logs:
        assert _daemon(db_url, outputs, generator, hooks).run(burst=True) == 0
    leaked = [e for e in logs if "cancel() freed it" in e["event"]]
    assert [(e["log_level"], e["job_id"]) for e in leaked] == [("warning", ids[0])], leaked
    rows = _rows(db_url, ids)
    assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 2)] + [("completed", 1)] * 4
    assert hooks.outcomes(ids[0]) == ["retried", "completed"]
    assert generator.cancelled == [ids[0]] and generator.duplicates == []
    assert generator.finished.count(ids[0]) == 1  # its retry's result alone: the failed attempt never finished
    assert generator.peak == 2 and generator.free_slots == generator.slots == 2
    assert all(resolve_output_path(outputs, r["file_path"]).is_file() for r in rows)


def test_continuous__a_cancel_raising_after_a_failed_start_is_logged_and_the_outcome_is_the_starts(
        db_url: str, tmp_path: Path) -> None:
    """The cancel() after a start that raised raising itself (SystemExit too: the backend's own):
    it is logged as a warning naming the job, escapes nowhere, and the job's outcome is its
    start's error; the job beside it completes."""
    outputs = tmp_path / "outputs"
    ids = _enqueue(db_url, outputs, "steps:3", "steps:2")
    generator = _TakesASlotThenRaises(2, PermanentGeneratorError("refused after taking a slot"), SystemExit(3))
    with capture_logs() as logs:
        assert _daemon(db_url, outputs, generator, RecordingHooks()).run(burst=True) == 0
    refused, done = _rows(db_url, ids)
    assert (refused["status"], refused["attempts"], refused["error_message"]) == (
        "failed", 1, "refused after taking a slot")
    assert (done["status"], done["attempts"]) == ("completed", 1)
    warned = [e for e in logs if e.get("job_id") == ids[0] and "cancel()" in e["event"]]
    assert [(e["log_level"], e["error"]) for e in warned] == [("warning", "SystemExit: 3")], warned
    assert generator.free_slots == generator.slots


def _run_with_a_hanging_cancel(db_url: str, outputs: Path, error: BaseException) -> tuple[int, _TakesASlotThenRaises]:
    """A burst run on slots whose start() of the ``steps:3`` job takes a slot and raises ``error``
    and whose cancel() of a job in a slot hangs until the run is over; its exit code."""
    gate = threading.Event()
    generator = _TakesASlotThenRaises(2, error, gate=gate)
    try:
        return _daemon(db_url, outputs, generator, RecordingHooks(), job_timeout_seconds=1.0,
                       backoff_base_seconds=60.0).run(burst=True), generator
    finally:
        gate.set()


def test_continuous__a_cancel_hanging_after_a_failed_start_is_charged_to_that_job_alone(
        db_url: str, tmp_path: Path) -> None:
    """The cancel() after a start that raised never returning: the call is given up on at the time
    limit (exit 124), charged to that job alone, as a start that hung would be; the job that joined
    beside it goes back unspent."""
    ids = _enqueue(db_url, tmp_path / "outputs", "steps:1000000000", "steps:3")
    code, _ = _run_with_a_hanging_cancel(db_url, tmp_path / "outputs", RuntimeError("a bug after taking the slot"))
    assert code == EXIT_JOB_TIMEOUT
    beside, hung = _rows(db_url, ids)
    assert (hung["status"], hung["attempts"]) == ("pending", 1)
    assert "time limit" in (hung["error_message"] or ""), hung
    assert (beside["status"], beside["attempts"], beside["error_message"]) == ("pending", 0, None), beside


def test_continuous__no_cancel_after_a_start_that_met_a_machine_fault(db_url: str, tmp_path: Path) -> None:
    """A start() that took a slot and then met a machine fault no test write can clear (here a
    MemoryError): the daemon gives the job back unspent and exits 75 for a fresh process, whose
    slots go with it, without asking cancel(), which on a lost GPU may never return: it hangs
    here, and asked, it turned the machine's fault into this job's time limit (exit 124)."""
    ids = _enqueue(db_url, tmp_path / "outputs", "steps:3")
    code, generator = _run_with_a_hanging_cancel(db_url, tmp_path / "outputs",
                                                 MemoryError("out of memory after taking a slot"))
    assert code == EXIT_MACHINE_FAULT
    [job] = _rows(db_url, ids)
    assert (job["status"], job["attempts"]) == ("pending", 0), job
    assert f"machine fault (memory) [unconfirmed 1 of {UNCONFIRMED_REFUNDS}]" in (job["error_message"] or ""), job
    assert generator.cancelled == []
