"""Retry decisions: a pure function of the attempt number and the error, stored in the row.

Job retries are rows going back to ``pending`` with a ``run_after`` in the future, not a loop in
memory, so a daemon that dies between attempts loses nothing. (tenacity, in ``store.py``, only
retries short database calls.)
"""

from __future__ import annotations

import errno
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from dgxqueue.config import WorkerSettings
from dgxqueue.errors import GeneratorError, OutputError


@dataclass(frozen=True)
class Decision:
    """``retry`` with a ``run_after``, or ``fail`` for good."""

    retry: bool
    run_after: datetime | None
    message: str


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, capped, scaled by 0.5..1."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return float(delay * (0.5 + rng.random() / 2))


def is_transient(error: BaseException, settings: WorkerSettings) -> bool:
    """Backend errors say so themselves; a failed write is final; unexpected ones follow the config."""
    if isinstance(error, GeneratorError):
        return error.transient
    if isinstance(error, OutputError):
        return False
    return settings.retry_unexpected_errors


#: A WAV write that failed so may be the machine's fault (the outputs folder cannot take files) or
#: the job's (its own subfolder cannot): a test write into the outputs folder tells which
#: (:mod:`~dgxqueue.daemon.faults`).
OUTPUT_FAULTS = {
    errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only",
    errno.EACCES: "permission", errno.EPERM: "permission", errno.EIO: "io_error",
    errno.ENOTDIR: "not_a_folder", errno.ENOENT: "not_a_folder",
}
#: The process's resources, not a path's: the machine's fault whichever file met it.
_RESOURCE_FAULTS = {errno.ENOMEM: "memory", errno.EMFILE: "descriptors", errno.ENFILE: "descriptors"}
#: The reasons a test write can confirm; the others (memory, descriptors, gpu) no probe can see.
PROBED_REASONS = frozenset(OUTPUT_FAULTS.values())
#: CUDA's "sticky" errors: after one, every later call in the process fails, so only a new process
#: (a new CUDA context) can run again. CUDA's out-of-memory error is not one: it stays the job's.
_GPU_LOST = re.compile(
    r"CUDA error: (an illegal memory access|unspecified launch failure|device-side assert|an illegal"
    r" instruction|misaligned address|uncorrectable ECC error|the launch timed out|unknown error|no"
    r" CUDA-capable device|CUDA-capable device\(s\) is/are busy or unavailable)|GPU is lost|fallen off the bus",
    re.IGNORECASE,
)
#: How a job given back after a machine fault is marked in its row's ``error_message``.
MACHINE_FAULT_MARK = "machine fault ("


def machine_fault(error: BaseException) -> str | None:
    """The reason when ``error`` is the machine's fault rather than the job's, else None.

    The rule: a ``MemoryError`` anywhere in the chain (``memory``); a failed WAV write
    (:class:`OutputError`) caused by ENOMEM (``memory``), no file descriptors left (EMFILE, ENFILE:
    ``descriptors``), or, subject to the daemon's test write (:data:`PROBED_REASONS`), a full disk
    or quota (``disk_full``), a read-only file system (``read_only``), a permission error
    (``permission``), an I/O error (``io_error``) or a folder gone or replaced by a file
    (``not_a_folder``); a ``RuntimeError`` (torch's ``AcceleratorError`` is one) carrying one of
    CUDA's sticky errors (``gpu``). Anything else is the job's.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return "memory"
        if isinstance(current, OutputError) and isinstance(current.__cause__, OSError):
            code = current.__cause__.errno or 0
            reason = _RESOURCE_FAULTS.get(code) or OUTPUT_FAULTS.get(code)
            if reason is not None:
                return reason
        if isinstance(current, RuntimeError) and _GPU_LOST.search(str(current)):
            return "gpu"
        current = current.__cause__ or current.__context__
    return None


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if not isinstance(error, GeneratorError):
        text = f"{type(error).__name__}: {text}"
    return text[:4000]


def decide(
    error: BaseException,
    *,
    attempt: int,
    max_attempts: int,
    now: datetime,
    settings: WorkerSettings,
    rng: random.Random,
) -> Decision:
    """Retry a transient error while attempts remain; otherwise fail with the last error."""
    message = describe(error)
    if not is_transient(error, settings):
        return Decision(False, None, message)
    if attempt >= max_attempts:
        return Decision(False, None, f"{message} (gave up after {attempt} attempts)")
    delay = backoff_seconds(attempt, settings.backoff_base_seconds, settings.backoff_max_seconds, rng)
    return Decision(True, now + timedelta(seconds=delay), f"{message} (attempt {attempt}, retrying)")
