"""Test backends. They serve model ``scripted``; what each job does is written in its prompt.

Prompt directives (anything else renders silence):

- ``transient:N``  fail with a transient error on the first N attempts, then succeed
- ``permanent``    fail with a permanent error
- ``crash``        raise an unexpected RuntimeError
- ``validate-crash`` ``validate`` raises an unexpected RuntimeError (not a refusal) on every attempt
- ``exit-0:N``, ``interrupt:N``, ``generator-exit:N``  raise SystemExit(0) (a library calling
                   ``sys.exit()``), KeyboardInterrupt or GeneratorExit on the first N attempts, then succeed
- ``validate-exit``, ``key-exit`` ``validate`` or ``batch_key`` raises SystemExit(0) on every attempt
- ``block``        wait until ``gate`` is set (in-process) or ``release_path`` exists (processes)
- ``work:S``       take S seconds, like a GPU would (simulated work, not synchronisation)
- ``steps:N``      report progress k/N for k = 0..N, waiting before each step for ``steps``
                   (a semaphore the test releases); stops early, cancelled, once its control says so
- ``none``         return None instead of audio (a broken backend)
- ``meta:numpy``   audio with numpy scalars in its metadata (``bpm`` float32 120, ``bars`` int64 8)
- ``meta:nan``     audio with ``tempo`` NaN in its metadata, which JSON cannot hold
- ``meta:nul``     audio with a NUL character in its metadata's ``note``, which PostgreSQL cannot store
- ``nul``          fail permanently with a NUL byte in the message (PostgreSQL text cannot hold it)
- ``short``        audio one frame shorter than asked for
- ``oom``          raise MemoryError (a backend out of memory), every time
- ``alloc:M``      reserve M MiB (not touched, so it costs no RAM): MemoryError under an RLIMIT_AS
- ``oserror:NAME`` raise a plain ``OSError`` of errno ``NAME`` (``EMFILE``, ``ENOMEM``, ...) with the system's
                   text, as a backend's own ``open()`` of a model or cache file does, every time
- ``scratch:PATH`` write a scratch file of the backend's own at ``PATH`` (not the WAV): ``/dev/full``
                   fails that write with a real ENOSPC, every time
- ``refuse:PATH``  its ``validate`` writes a scratch file at ``PATH`` and, should that fail, refuses the
                   request (PermanentGeneratorError) ``from None``: the OSError, ``/dev/full``'s ENOSPC
                   say, stays only in the refusal's suppressed ``__context__``
- ``kill``         (:class:`KillingGenerator` only) SIGKILL the daemon's own process
- ``start-crash:N``, ``start-oom:N``, ``start-enospc:N``, ``start-capacity:N``, ``start-unprintable:N``
                   (:class:`ScriptedSlots` only) its ``start`` raises on the job's first N starts: an
                   unexpected RuntimeError, MemoryError, a WAV-style OutputError caused by ENOSPC (a full
                   disk), CapacityError (out of memory, the slots halved), or an unexpected error whose
                   ``str()`` raises (:class:`Unprintable`); then it joins and renders silence.
                   ``start-exit:N``: its ``start`` raises SystemExit(0) on the job's first N starts.
                   ``start-orphan:N``: its ``start`` puts the request in a slot and then raises an
                   unexpected RuntimeError, on the job's first N starts; the request left so holds its
                   slot, never finished by a step (decoding for nobody), until ``cancel``. A start of a
                   job that holds a slot already raises RuntimeError (a duplicate key)
- ``step-capacity:N``, ``step-unprintable:N``, ``step-exit:N`` (:class:`ScriptedSlots` only) a step that
                   holds the job raises on the job's first N such steps, dropping every slot: CapacityError,
                   halving the slots (never below one, where it has no fewer slots), :class:`Unprintable`,
                   or SystemExit(0)
- ``... pid``      (a suffix to any of the above, or alone) audio at a level set by the process id,
                   :func:`pid_level`, so a test can tell which daemon's attempt made a file

Every execution is appended to ``log_path`` as one line ``<job_id> <pid>`` (O_APPEND writes of
one short line are atomic), so a test can count how often each job really ran, across processes.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dgxqueue.errors import (
    CapacityError,
    JobCancelledError,
    OutputError,
    PermanentGeneratorError,
    TransientGeneratorError,
)
from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest


def pid_level(pid: int) -> float:
    """The sample value a ``pid`` job renders in process ``pid``: distinct for any two pids below
    9973 apart, after 16-bit quantization too."""
    return 0.05 + (pid % 9973) / 20000


#: The exceptions that are no ``Exception`` a backend's code may raise, by prompt directive.
EXITS: dict[str, Callable[[], BaseException]] = {
    "exit-0": lambda: SystemExit(0), "interrupt": KeyboardInterrupt, "generator-exit": GeneratorExit,
}


def read_executions(log_path: Path) -> Counter[str]:
    if not log_path.exists():
        return Counter()
    return Counter(line.split()[0] for line in log_path.read_text().splitlines() if line.strip())


class ScriptedGenerator:
    name = "scripted"

    def __init__(
        self,
        models: Sequence[str] = ("scripted",),
        max_batch_size: int = 8,
        log_path: str | None = None,
        release_path: str | None = None,
    ) -> None:
        self.models = frozenset(models)
        self.max_batch_size = max_batch_size
        self.log_path = Path(log_path) if log_path else None
        self.release_path = Path(release_path) if release_path else None
        self.gate = threading.Event()
        self.steps = threading.Semaphore(0)
        self.entered = threading.Event()
        self.executions: Counter[str] = Counter()
        self.batches: list[list[str]] = []  # the job ids of each generate() call, in order
        self.loaded = False
        self.threads: dict[str, set[int]] = {"load": set(), "generate": set()}  # thread idents per call

    def load(self) -> None:
        self.threads["load"].add(threading.get_ident())
        self.loaded = True

    def batch_key(self, request: GenerationRequest) -> Hashable:
        if request.prompt == "key-exit":
            raise SystemExit(0)
        return (request.sample_rate, request.channels)

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt == "invalid":
            raise PermanentGeneratorError("prompt 'invalid' is refused by the scripted backend")
        if request.prompt == "validate-crash":
            raise RuntimeError("scripted: validate crashed")
        if request.prompt == "validate-exit":
            raise SystemExit(0)
        kind, _, path = request.prompt.partition(":")
        if kind == "refuse":  # a verdict on the request that hides what the backend met on the way
            try:
                self._write_scratch(Path(path))
            except OSError:
                raise PermanentGeneratorError("scripted: the request is refused") from None

    def _record(self, request: GenerationRequest) -> int:
        """Log this execution; returns how many times this job ran before."""
        previous = self.executions[request.job_id]
        self.executions[request.job_id] += 1
        if self.log_path is not None:
            previous = read_executions(self.log_path)[request.job_id]
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{request.job_id} {os.getpid()}\n".encode())
            finally:
                os.close(fd)
        return previous

    def _wait_for_release(self) -> None:
        self.entered.set()
        while not self.gate.wait(0.01):
            if self.release_path is not None and self.release_path.exists():
                return

    @staticmethod
    def _write_scratch(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        self.threads["generate"].add(threading.get_ident())
        self.batches.append([request.job_id for request in requests])
        results: list[GenerationOutcome] = []
        for request in requests:
            ran_before = self._record(request)
            prompt, level = request.prompt, 0.25
            if prompt == "pid" or prompt.endswith(" pid"):
                prompt, level = prompt.removesuffix("pid").rstrip(), pid_level(os.getpid())
            if prompt == "block":
                self._wait_for_release()
            if prompt.startswith("steps:"):
                total = int(prompt.split(":")[1])
                request.control.report(0, total)
                stopped = False
                for k in range(1, total + 1):
                    while not self.steps.acquire(timeout=0.01):
                        if request.control.cancelled:
                            break
                    if request.control.cancelled:
                        stopped = True
                        break
                    request.control.report(k, total)
                if stopped:
                    results.append(JobCancelledError(f"scripted: cancelled at step {k} of {total}"))
                    continue
            if prompt.startswith("work:"):
                threading.Event().wait(float(prompt.split(":")[1]))
            kind, _, count = prompt.partition(":")
            if kind in EXITS and ran_before < int(count):
                raise EXITS[kind]()
            if prompt.startswith("transient:") and ran_before < int(prompt.split(":")[1]):
                results.append(TransientGeneratorError(f"scripted transient failure #{ran_before + 1}"))
                continue
            if prompt == "permanent":
                results.append(PermanentGeneratorError("scripted permanent failure"))
                continue
            if prompt == "nul":
                results.append(PermanentGeneratorError("scripted\x00failure"))
                continue
            if prompt == "crash":
                raise RuntimeError("scripted crash")
            if prompt == "oom":
                raise MemoryError("scripted: out of memory")
            if kind == "oserror":  # the argument: an errno's name
                code = getattr(errno, count)
                raise OSError(code, os.strerror(code))
            if kind == "scratch":  # the argument: a path
                self._write_scratch(Path(count))
            if prompt.startswith("alloc:"):
                np.empty(int(prompt.split(":")[1]) << 20, dtype=np.uint8)  # reserved, freed at once
            if prompt == "none":
                results.append(None)  # type: ignore[arg-type]  # what a broken backend does
                continue
            metadata: dict[str, object] = {"scripted": True}
            if prompt == "meta:numpy":
                metadata.update(bpm=np.float32(120.0), bars=np.int64(8))
            if prompt == "meta:nan":
                metadata.update(tempo=float("nan"))
            if prompt == "meta:nul":
                metadata.update(note="a\x00b")
            frames = round(request.duration_seconds * request.sample_rate) - (prompt == "short")
            samples = np.full((request.channels, frames), level, dtype=np.float32)
            results.append(GeneratedAudio(samples=samples, sample_rate=request.sample_rate, metadata=metadata))
        return results


class KillingGenerator(ScriptedGenerator):
    """:class:`ScriptedGenerator` whose ``kill`` prompt SIGKILLs its own process when the batch
    reaches it (the jobs before it render), as a crashing native library or the OOM killer
    would: for daemon processes only. The job's execution is logged before the kill."""

    name = "killing"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        results: list[GenerationOutcome] = []
        for request in requests:
            if request.prompt == "kill":
                self._record(request)
                os.kill(os.getpid(), signal.SIGKILL)
            results.extend(super().generate([request]))
        return results


class ValidateKillingGenerator(ScriptedGenerator):
    """:class:`ScriptedGenerator` whose ``validate`` SIGKILLs its own process on the ``kill``
    prompt, as a tokenizer in a crashing native library would: for daemon processes only."""

    name = "validate-killing"

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt == "kill":
            self._record(request)
            os.kill(os.getpid(), signal.SIGKILL)
        super().validate(request)


class BatchKeyKillingGenerator(ScriptedGenerator):
    """:class:`ScriptedGenerator` whose ``batch_key`` SIGKILLs its own process on the ``kill``
    prompt, as a backend that plans a request there (MusicGen's tokenizer) might: for daemon
    processes only."""

    name = "batch-key-killing"

    def batch_key(self, request: GenerationRequest) -> Hashable:
        if request.prompt == "kill":
            self._record(request)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().batch_key(request)


class ValidateHangingGenerator(ScriptedGenerator):
    """:class:`ScriptedGenerator` whose ``validate`` never returns on the ``hang`` prompt, as a
    tokenizer stuck in a native library would: for daemon processes only."""

    name = "validate-hanging"

    def validate(self, request: GenerationRequest) -> None:
        if request.prompt == "hang":
            self._record(request)
            threading.Event().wait()
        super().validate(request)


class Unprintable(RuntimeError):
    """A backend's error that cannot be turned into text: its ``str()`` raises."""

    def __str__(self) -> str:
        raise ValueError("scripted: this error has no text")


class ScriptedSlots(ScriptedGenerator):
    """:class:`ScriptedGenerator` with slots (:class:`~dgxqueue.generators.SlotGenerator`), for
    continuous batching in daemon processes without torch: a request started into a slot
    finishes at the next step, rendered as :meth:`generate` renders it. ``max_batch_size``
    slots, halved by a ``start-capacity`` start; the ``start-*`` prompts make :meth:`start` raise."""

    name = "scripted-slots"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._running: dict[str, GenerationRequest] = {}
        self._orphans: set[str] = set()  # in a slot after a start that raised: no step finishes them
        self._slots = self.max_batch_size

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def free_slots(self) -> int:
        return self._slots - len(self._running)

    def start(self, request: GenerationRequest) -> None:
        if request.job_id in self._running:
            raise RuntimeError(f"scripted: job {request.job_id} is in a slot already (a duplicate key)")
        kind, _, count = request.prompt.partition(":")
        if kind == "start-orphan":
            assert self.free_slots > 0, "started with no slot free"
            self._running[request.job_id] = request
            if self._record(request) < int(count):
                self._orphans.add(request.job_id)
                raise RuntimeError("scripted: start crashed after taking a slot")
            return
        self._start_fault(request)
        assert self.free_slots > 0, "started with no slot free"
        self._running[request.job_id] = request

    def _start_fault(self, request: GenerationRequest) -> None:
        """Raise what a ``start-*`` prompt asks for, on the job's first N starts (logged as executions)."""
        kind, _, count = request.prompt.partition(":")
        if not kind.startswith("start-") or self._record(request) >= int(count):
            return
        if kind == "start-crash":
            raise RuntimeError("scripted: start crashed")
        if kind == "start-oom":
            raise MemoryError("scripted: out of memory at a start")
        if kind == "start-enospc":
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                raise OutputError("scripted: could not write a start's file") from exc
        if kind == "start-capacity":
            self._slots = max(1, self._slots // 2)
            raise CapacityError(f"scripted: out of memory at a start; {self._slots} slots now")
        if kind == "start-unprintable":
            raise Unprintable()
        if kind == "start-exit":
            raise SystemExit(0)
        raise AssertionError(f"unknown start directive {request.prompt!r}")

    def step(self) -> list[tuple[str, GenerationOutcome]]:
        requests = [r for key, r in self._running.items() if key not in self._orphans]
        self._running = {key: r for key, r in self._running.items() if key in self._orphans}
        if not requests:
            return []
        for request in requests:
            kind, _, count = request.prompt.partition(":")
            if kind in ("step-capacity", "step-unprintable", "step-exit") and self._record(request) < int(count):
                if kind == "step-unprintable":
                    raise Unprintable()
                if kind == "step-exit":
                    raise SystemExit(0)
                self._slots = max(1, self._slots // 2)
                raise CapacityError(f"scripted: out of memory at a step; {self._slots} slots now")
        return [(request.job_id, result) for request, result in zip(requests, self.generate(requests), strict=True)]

    def cancel(self, job_id: str) -> bool:
        self._orphans.discard(job_id)
        return self._running.pop(job_id, None) is not None


class ExitingLoad(ScriptedGenerator):
    """:class:`ScriptedGenerator` whose ``load`` raises SystemExit(0), as a library that calls
    ``sys.exit()`` while a model loads would: for daemon processes only."""

    name = "exiting-load"

    def load(self) -> None:
        super().load()
        raise SystemExit(0)


class ValidateHangingSlots(ValidateHangingGenerator, ScriptedSlots):
    """:class:`ValidateHangingGenerator` with slots, for continuous batching."""

    name = "validate-hanging-slots"
