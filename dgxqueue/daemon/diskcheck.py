"""Before claiming: can the outputs folder take more files?

A full, read-only or unwritable outputs folder fails every job the daemon would claim, and a
restart cannot fix it; so the daemon claims nothing while :meth:`OutputsCheck.problem` reports
one, and carries on by itself once it passes again. The answer is kept for ``interval`` seconds:
the claim loop asks on every round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Label values of ``dgxqueue_claims_paused``.
PAUSE_REASONS = ("disk_low", "read_only", "not_writable")


@dataclass(frozen=True)
class Problem:
    """Why the outputs folder cannot take files now: ``reason`` (one of :data:`PAUSE_REASONS`)
    for metrics, ``message`` for people."""

    reason: str
    message: str


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest existing parent (the daemon makes the folder on first write)."""
    path = folder.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def look(folder: Path, min_free_mb: int) -> Problem | None:
    """What stops ``folder`` from taking files now, or None. ``min_free_mb`` 0 skips the space check.

    Total: whatever stops the folder from being examined (a parent it may not search, a name too
    long, an I/O error) is a problem to pause on, never an error out of the claim loop."""
    try:
        return _look(folder, min_free_mb)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return Problem("not_writable", f"cannot examine the outputs folder {folder}: {why}")


def _look(folder: Path, min_free_mb: int) -> Problem | None:
    path = _existing(folder)
    stats = os.statvfs(path)
    if not path.is_dir():
        return Problem("not_writable", f"the outputs folder {path} is not a folder")
    if stats.f_flag & os.ST_RDONLY:
        return Problem("read_only", f"the outputs folder {path} is on a read-only file system")
    if not os.access(path, os.W_OK | os.X_OK):
        return Problem("not_writable", f"the outputs folder {path} is not writable by this user")
    free_mb = stats.f_bavail * stats.f_frsize / 2**20
    if free_mb < min_free_mb:
        return Problem("disk_low", f"{free_mb:.1f} MiB free for the outputs folder {path}, below "
                                   f"outputs.min_free_mb = {min_free_mb}")
    return None


class OutputsCheck:
    """:func:`look` at most once per ``interval`` seconds."""

    def __init__(self, folder: Path, min_free_mb: int, *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = folder
        self.min_free_mb = min_free_mb
        self.interval = interval
        self._clock = clock
        self._next = 0.0
        self._problem: Problem | None = None

    def problem(self) -> Problem | None:
        now = self._clock()
        if now >= self._next:
            self._next = now + self.interval
            self._problem = look(self.folder, self.min_free_mb)
        return self._problem
