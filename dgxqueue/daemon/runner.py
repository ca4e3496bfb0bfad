"""Runs the backend off the main thread, so the main loop keeps heartbeating and can give up.

Each batch gets a fresh daemon thread. A call that overruns its time limit is abandoned: Python
cannot interrupt it (a stuck GPU kernel), so the runner stays *busy* until it returns, the daemon
claims nothing meanwhile, and reports itself unhealthy so that systemd restarts it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class Runner:
    """One call at a time on a background thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._abandoned_at: float | None = None

    @property
    def busy(self) -> bool:
        """A call is still running (including one that was abandoned)."""
        return self._thread is not None and self._thread.is_alive()

    def stuck_for(self) -> float:
        """Seconds since an abandoned call was given up on, 0 when none is still running."""
        if self._abandoned_at is None or not self.busy:
            self._abandoned_at = None
            return 0.0
        return time.monotonic() - self._abandoned_at

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        if self.busy:
            raise RuntimeError("the runner is still busy with an earlier call")
        future: Future[T] = Future()

        def target() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the main loop, which records it
                future.set_exception(exc)

        self._thread = threading.Thread(target=target, name="dgxqueue-generator", daemon=True)
        self._abandoned_at = None
        self._thread.start()
        return future

    def abandon(self) -> None:
        """Give up waiting on the current call; it may still finish in the background."""
        if self.busy:
            self._abandoned_at = time.monotonic()
