"""A hard limit on a stop: the process ends when its shutdown overruns.

The shutdown's database calls give up at the store's deadline, but only between tries: a
statement sent to a server that stopped answering (frozen, or behind a network path that drops
packets without a reset) waits for ever, and systemd would kill the daemon at TimeoutStopSec
without a word. A thread watches a deadline set by the stop request and, past it, says what is
left to the lease rescue and where the main loop is stuck (:func:`stuck_in`: read from its stack,
not assumed to be the database), and ends the process with the daemon's exit code.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

#: How long after the store's deadline the shutdown may still run: one more connection attempt
#: (the engine's connect timeout) may have started just before that deadline.
HARD_STOP_MARGIN = 10.0
_SAY_SECONDS = 2.0  # the last words may not block the exit: stdout may be a pipe nobody reads
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # dgxqueue/


def stuck_in(thread: threading.Thread | None, depth: int = 6) -> list[str]:
    """Where ``thread`` is now: its innermost frames, innermost first, as ``file:line in function``
    (dgxqueue's files by their path in the package); the first is followed by the innermost of
    dgxqueue's own frames below it, when it is not one of them. ``["unknown"]`` for a thread that
    does not run."""
    frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident is not None else None
    if frame is None:
        return ["unknown"]
    frames = list(reversed(traceback.extract_stack(frame)))

    def ours(f: traceback.FrameSummary) -> bool:
        return os.path.abspath(f.filename).startswith(_PACKAGE + os.sep)

    def said(f: traceback.FrameSummary) -> str:
        path = os.path.abspath(f.filename)
        name = os.path.relpath(path, os.path.dirname(_PACKAGE)) if ours(f) else os.path.basename(path)
        return f"{name}:{f.lineno} in {f.name}"

    where = [said(f) for f in frames[:depth]]
    if not ours(frames[0]):
        mine = next((f for f in frames if ours(f)), None)
        if mine is not None:
            where[0] += f", called from {said(mine)}"
    return where


class HardStop:
    """Calls ``say`` then ends the process with ``exit_code()`` once an armed deadline passes."""

    def __init__(self, say: Callable[[], None], exit_code: Callable[[], int], *, poll: float = 0.25) -> None:
        self._say = say
        self._exit_code = exit_code
        self._poll = poll
        self._deadline: float | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="dgxqueue-hardstop", daemon=True)
            self._thread.start()

    def arm(self, deadline: float) -> None:
        """End the process at ``deadline`` (``time.monotonic()``) unless closed by then; an earlier
        one wins. Safe in a signal handler: it only stores a number."""
        current = self._deadline
        self._deadline = deadline if current is None else min(current, deadline)

    def close(self) -> None:
        """The shutdown is over: never end the process."""
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(self._poll):
            deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline and not self._closed.is_set():
                self._end()

    def _end(self) -> None:
        def last_words() -> None:
            self._say()
            sys.stdout.flush()
            sys.stderr.flush()

        speaker = threading.Thread(target=last_words, name="dgxqueue-hardstop-log", daemon=True)
        speaker.start()
        speaker.join(_SAY_SECONDS)
        os._exit(self._exit_code())
