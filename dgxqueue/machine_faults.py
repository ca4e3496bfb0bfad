"""The one rule for whose fault an error is, the machine's or the job's.

It lives outside ``dgxqueue.daemon`` so that backends can apply it too: a backend that turns
errors into per-request results (``workers/musicgen.py``) asks it which errors it must not keep,
because the daemon gives the jobs back for a machine fault instead of charging them.
"""

from __future__ import annotations

import errno
import re

from dgxqueue.errors import OutputError, text_of

#: A WAV write that failed so may be the machine's fault (the outputs folder cannot take files) or
#: the job's (its own subfolder cannot): a test write into the outputs folder tells which
#: (:mod:`~dgxqueue.daemon.faults`).
OUTPUT_FAULTS = {
    errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only",
    errno.EACCES: "permission", errno.EPERM: "permission", errno.EIO: "io_error",
    errno.ENOTDIR: "not_a_folder", errno.ENOENT: "not_a_folder",
}
#: The process's resources, not a path's: the machine's fault whichever file met it, the daemon's
#: WAV write or a backend's own (a model, a cache file).
_RESOURCE_FAULTS = {errno.ENOMEM: "memory", errno.EMFILE: "descriptors", errno.ENFILE: "descriptors"}
#: A backend's own write (a cache or scratch file, not the WAV) that found its disk full or over
#: quota. Which disk it was the daemon cannot know, so no test write can confirm it.
_SCRATCH_FAULTS = {errno.ENOSPC: "scratch_disk_full", errno.EDQUOT: "scratch_disk_full"}
#: The reasons a test write can confirm; the others (memory, descriptors, scratch_disk_full, gpu)
#: no probe can see.
PROBED_REASONS = frozenset(OUTPUT_FAULTS.values())
#: Every reason :func:`machine_fault` may give, the probed ones first.
REASONS = (*dict.fromkeys(OUTPUT_FAULTS.values()), "memory", "descriptors", "scratch_disk_full", "gpu")
#: CUDA's "sticky" errors: after one, every later call in the process fails, so only a new process
#: (a new CUDA context) can run again. CUDA's out-of-memory error is not one: it stays the job's.
_GPU_LOST = re.compile(
    r"CUDA error: (an illegal memory access|unspecified launch failure|device-side assert|an illegal"
    r" instruction|misaligned address|uncorrectable ECC error|the launch timed out|unknown error|no"
    r" CUDA-capable device|CUDA-capable device\(s\) is/are busy or unavailable)|GPU is lost|fallen off the bus",
    re.IGNORECASE,
)


def _culprit(error: BaseException) -> tuple[BaseException, str] | None:
    """The link of ``error``'s chain that makes it the machine's fault, with the reason."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return current, "memory"
        if isinstance(current, OutputError) and isinstance(current.__cause__, OSError):
            code = current.__cause__.errno or 0
            reason = _RESOURCE_FAULTS.get(code) or OUTPUT_FAULTS.get(code)
            if reason is not None:
                return current, reason
        elif isinstance(current, OSError):  # a backend's own: below an OutputError it adds nothing
            code = current.errno or 0
            reason = _RESOURCE_FAULTS.get(code) or _SCRATCH_FAULTS.get(code)
            if reason is not None:
                return current, reason
        if isinstance(current, RuntimeError) and _GPU_LOST.search(text_of(current)):
            return current, "gpu"
        # The chain Python prints: a context the raiser suppressed (``raise ... from None``) is no
        # part of it. A backend that refuses a request so, over an OSError it met on the way, has
        # said what the failure is: the job's, not the full disk or the descriptors behind it.
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def machine_fault(error: BaseException) -> str | None:
    """The reason when ``error`` is the machine's fault rather than the job's, else None.

    The rule, for each link of the ``__cause__``/``__context__`` chain in turn (the chain a
    traceback shows: a context suppressed by ``raise ... from None`` is not read): a ``MemoryError``
    (``memory``); an ``OSError`` of ENOMEM (``memory``) or no file descriptors left (EMFILE, ENFILE:
    ``descriptors``), whether the daemon's WAV write met it or a backend's own ``open()``; a
    failed WAV write (:class:`OutputError`) caused, subject to the daemon's test write
    (:data:`PROBED_REASONS`), by a full disk or quota (``disk_full``), a read-only file system
    (``read_only``), a permission error (``permission``), an I/O error (``io_error``) or a folder
    gone or replaced by a file (``not_a_folder``); a plain ``OSError`` of a full disk or quota
    (ENOSPC, EDQUOT) not under an ``OutputError``: a backend's own write, a cache or scratch file
    on a disk the daemon cannot tell, so no test write can confirm it (``scratch_disk_full``); a
    ``RuntimeError`` (torch's ``AcceleratorError`` is one) carrying one of CUDA's sticky errors
    (``gpu``). Anything else is the job's, a backend's own OSError of any other errno (a missing
    or unreadable file of its own, say) included. Only the reasons in :data:`PROBED_REASONS` are
    put to a test; the daemon gives a job back for the others a bounded number of times.
    """
    found = _culprit(error)
    return found[1] if found else None


def detached_machine_fault(error: BaseException) -> BaseException | None:
    """The link of ``error``'s chain that makes it the machine's fault, stripped of its traceback
    and of the links around it, or None when ``error`` is the job's.

    For a backend to raise in place of ``error`` once its ``except`` block is over: the failed
    call's frames, and the tensors or arrays they hold, can then be freed, while the daemon still
    reads the same reason from it (:func:`machine_fault`).
    """
    found = _culprit(error)
    if found is None:
        return None
    culprit = found[0]
    culprit.__traceback__ = culprit.__context__ = None
    cause = culprit.__cause__
    if isinstance(culprit, OutputError) and isinstance(cause, OSError):  # the errno is the reason
        cause.__traceback__ = cause.__cause__ = cause.__context__ = None
    else:
        culprit.__cause__ = None
    return culprit
