"""Whose fault a failed call is, the machine's or the job's, and what the job pays for it.

:func:`~dgxqueue.machine_faults.machine_fault` names a suspect from the error alone. A failed WAV
write is then put to the test: the daemon writes, fsyncs and removes a file of the same size in
the outputs folder (:func:`probe_write`). Should that fail too, the outputs folder cannot take
files: the machine's fault, confirmed, and its jobs go back unspent however often it happens.
Should it pass, the job's own path (a subfolder of its own, its name) is at fault, and the write
error is recorded against that job alone, like any other failed write.

Memory, file descriptors, a backend's own full disk (a cache or scratch file: which disk, the
daemon cannot know, and the outputs folder's test write would clear it wrongly) and the GPU cannot
be tested that way, and a job may cause them (a prompt that needs more memory than there is). A
job is given back unspent for such a fault up to :data:`UNCONFIRMED_REFUNDS` times, counted in its
row's ``error_message``; each later one is charged to it as a transient failure, so a job that
always faults costs at most ``UNCONFIRMED_REFUNDS + max_attempts`` restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dgxqueue.daemon.executor import Attempt
from dgxqueue.daemon.retry import MACHINE_FAULT_MARK, describe
from dgxqueue.errors import TransientGeneratorError
from dgxqueue.machine_faults import OUTPUT_FAULTS, PROBED_REASONS, machine_fault
from dgxqueue.storage.claimed import ClaimedJob

#: How many faults no test can confirm a job is given back for, unspent, before it pays for them.
UNCONFIRMED_REFUNDS = 5
_TALLY = re.compile(re.escape(MACHINE_FAULT_MARK) + r"[a-z_]+\) \[unconfirmed (\d{1,6}) of \d{1,6}\]")
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Verdict:
    """``outcomes`` to record (the job's own faults, the charged ones, all the rest); ``marks``:
    the jobs to give back unspent, with their ``error_message``; ``reason`` and ``error``: the
    machine's fault, or None; ``own``: the jobs whose failed write the test write cleared."""

    outcomes: list[Attempt]
    marks: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    error: BaseException | None = None
    own: list[str] = field(default_factory=list)


def wav_size(job: ClaimedJob) -> int:
    """The bytes of the job's WAV file: a 44-byte header and 16-bit samples."""
    return 44 + max(0, round(job.duration_seconds * job.sample_rate)) * max(1, job.channels) * 2


def probe_write(folder: Path, size: int) -> OSError | None:
    """Write ``size`` bytes to a hidden file in ``folder``, fsync it and remove it; the error met,
    or None. The folder is not made when missing: a daemon writes into an outputs folder that is."""
    try:
        folder_fd = os.open(folder, _FOLDER)
    except OSError as exc:
        return exc
    name = f".dgxqueue-test-write.{secrets.token_hex(6)}.tmp"
    fd = -1
    try:
        fd = os.open(name, _CREATE, 0o600, dir_fd=folder_fd)
        # Random bytes: a compressing file system would store zeros in less than the WAV needs.
        block = os.urandom(min(size, _BLOCK))
        left = size
        while left > 0:
            left -= os.write(fd, block if left >= len(block) else block[:left])
        os.fsync(fd)
    except OSError as exc:
        return exc
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=folder_fd)
        os.close(folder_fd)
    return None


def tally(message: str | None) -> int:
    """How many unconfirmed machine faults the job's ``error_message`` counts (0 for any other)."""
    found = _TALLY.match(message or "")
    return int(found.group(1)) if found else 0


def _mark(reason: str, count: int) -> str:
    text = f"{MACHINE_FAULT_MARK}{reason})"
    return f"{text} [unconfirmed {count} of {UNCONFIRMED_REFUNDS}]" if count else text


def judge(outcomes: Sequence[Attempt], outputs: Path,
          read_messages: Callable[[list[str]], Mapping[str, str | None]]) -> Verdict:
    """Sort a batch's outcomes by whose fault they are. ``read_messages``: the jobs' stored
    ``error_message`` by id (where their tally is kept)."""
    suspects = [(o, r) for o in outcomes if o.error is not None and (r := machine_fault(o.error))]
    if not suspects:
        return Verdict(list(outcomes))
    probed = [o for o, r in suspects if r in PROBED_REASONS]
    confirmed: str | None = None
    if probed:
        failure = probe_write(outputs, max(wav_size(o.job) for o in probed))
        if failure is not None:  # the outputs folder itself: that error names the reason best
            confirmed = OUTPUT_FAULTS.get(failure.errno or 0, "io_error")
    faults = [(o, confirmed if r in PROBED_REASONS else r) for o, r in suspects
              if confirmed is not None or r not in PROBED_REASONS]
    own = [o.job.id for o in probed] if confirmed is None else []
    if not faults:
        return Verdict(list(outcomes), own=own)
    messages = read_messages([o.job.id for o, _ in faults])
    taken = {o.job.id for o, _ in faults}
    kept = [o for o in outcomes if o.job.id not in taken]
    marks: dict[str, str] = {}
    for outcome, reason in faults:
        assert outcome.error is not None and reason is not None
        count = tally(messages.get(outcome.job.id))
        if reason in PROBED_REASONS:
            marks[outcome.job.id] = (f"{_mark(reason, count)} {describe(outcome.error)}; the outputs folder failed"
                                     " a test write too: given back, attempt not counted")
            continue
        text = f"{_mark(reason, count + 1)} {describe(outcome.error)}"
        if count + 1 > UNCONFIRMED_REFUNDS:
            error = TransientGeneratorError(f"{text}; given back {UNCONFIRMED_REFUNDS} times already: counted"
                                            " against the job")
            kept.append(Attempt(outcome.job, error, outcome.generation_seconds))
        else:
            marks[outcome.job.id] = f"{text}; given back, attempt not counted"
    first, reason = faults[0]
    return Verdict(kept, marks, reason, first.error, own)


def refund(outcomes: Sequence[Attempt], reason: str,
           read_messages: Callable[[list[str]], Mapping[str, str | None]]) -> Verdict:
    """The jobs of a running batch that failed as a whole (a decoding step raised: every slot's
    job was dropped, and which one caused it cannot be told) go back unspent, marked, each up to
    :data:`UNCONFIRMED_REFUNDS` times; later ones are charged like an unconfirmed machine fault,
    so a job that always breaks the step fails in the end. The daemon goes on: ``reason`` stays
    out of the verdict."""
    messages = read_messages([o.job.id for o in outcomes])
    kept: list[Attempt] = []
    marks: dict[str, str] = {}
    for outcome in outcomes:
        assert outcome.error is not None
        count = tally(messages.get(outcome.job.id)) + 1
        text = f"{_mark(reason, count)} {describe(outcome.error)}"
        if count > UNCONFIRMED_REFUNDS:
            error = TransientGeneratorError(f"{text}; given back {UNCONFIRMED_REFUNDS} times already: counted"
                                            " against the job")
            kept.append(Attempt(outcome.job, error, outcome.generation_seconds))
        else:
            marks[outcome.job.id] = f"{text}; given back, attempt not counted"
    return Verdict(kept, marks)
