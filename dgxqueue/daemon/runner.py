"""Runs the backend off the main thread, so the main loop keeps heartbeating and can give up.

One long-lived daemon thread takes calls from a queue (a thread per call costs a start-up
hand-off each time). A call that overruns its time limit is abandoned: Python cannot interrupt it
(a stuck GPU kernel), so the runner stays *busy* until it returns, the daemon claims nothing
meanwhile, and reports itself unhealthy so that systemd restarts it.

The code a call runs says, before each backend method it calls, which one and for which jobs
(:class:`Doing`): a call the main loop gives up on is then logged, and charged, by what did not
return (one job's ``validate()``, not the whole claim's).

Whatever a call raises on this thread is the backend's own, SystemExit, KeyboardInterrupt and
GeneratorExit too: Python delivers signals to the main thread only, so a real Ctrl-C or SIGTERM
never lands here. The handlers around a job's backend method (``validate()``, ``batch_key()``,
``generate()``, ``start()``) catch ``BaseException``, so a library's ``sys.exit(0)`` there is judged
by that method's rule as any other error (for ``generate()``, the job's unexpected error). One that
leaves the call (a decoding step's, ``load()``'s) reaches the main loop as
:class:`~dgxqueue.errors.BackendExitError`, logged here naming what raised it: re-raised there as
it was, it ended the daemon with exit 0 (which systemd's ``Restart=on-failure`` does not restart,
leaving the queue unserved) or 130.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import structlog

from dgxqueue.errors import BackendExitError, text_of

T = TypeVar("T")
log = structlog.get_logger("dgxqueue.daemon")
_Call = tuple[Callable[[], Any], "Future[Any]"]


class Doing:
    """The backend method the runner's thread is in, the ids of the jobs it is called for, and
    since when: set by the code the call runs, before each method (plain assignments, so they cost
    nothing beside a backend call), read by the main loop while the call has not returned."""

    def __init__(self) -> None:
        self.now: tuple[str, tuple[str, ...]] | None = None
        self.since: float | None = None  # time.monotonic() when the method in ``now`` began

    def __call__(self, method: str, *job_ids: str) -> None:
        self.since = time.monotonic()
        self.now = (method, job_ids)

    def began(self, started: float) -> float:
        """When the method the call is in began; ``started`` (the call's start) before any. The
        time limit counts from there: a call runs many methods (a claim's validate() of each job),
        and one that returned within the limit did not hang, however long the ones before took."""
        since = self.since
        return started if since is None else max(started, since)

    def job_ids(self) -> tuple[str, ...]:
        return () if self.now is None else self.now[1]

    def describe(self) -> str:
        """What did not return, for a log line: ``the generator's validate() of job X``; the
        method ``files`` is the daemon's own work on the jobs' output files."""
        if self.now is None:
            return "the backend call (in no generator method)"
        method, ids = self.now
        jobs = f"job {ids[0]}" if len(ids) == 1 else f"jobs {', '.join(ids)}" if ids else "no job"
        if method == "files":
            return f"the output file checks or writes of {jobs}"
        return f"the generator's {method}() of {jobs}" if ids else f"the generator's {method}()"


class Runner:
    """One call at a time on a background thread."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._current: Future[Any] | None = None
        self._abandoned_at: float | None = None
        #: What the current call is doing (see :class:`Doing`); cleared by each :meth:`submit`.
        self.doing = Doing()

    @property
    def busy(self) -> bool:
        """A call is still running (including one that was abandoned)."""
        return self._current is not None and not self._current.done()

    @property
    def stuck(self) -> bool:
        """An abandoned call is still running: nothing new may start."""
        return self._abandoned_at is not None and self.busy

    def stuck_for(self) -> float:
        """Seconds since an abandoned call was given up on, 0 when none is still running."""
        if self._abandoned_at is None or not self.busy:
            self._abandoned_at = None
            return 0.0
        return time.monotonic() - self._abandoned_at

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        if self.busy:
            raise RuntimeError("the runner is still busy with an earlier call")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="dgxqueue-generator", daemon=True)
            self._thread.start()
        future: Future[T] = Future()
        self._current = future
        self._abandoned_at = None
        self.doing.now = self.doing.since = None
        self._calls.put((fn, future))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the main loop, which records it
                future.set_exception(exc)
            except BaseException as exc:  # the backend's own (see the module's docstring): an error, not an exit
                future.set_exception(self._error_of(exc))

    def _error_of(self, exc: BaseException) -> BackendExitError:
        """A SystemExit, KeyboardInterrupt or GeneratorExit that left a call, as an error naming it
        and the backend method it left, logged."""
        error = BackendExitError(
            f"{self.doing.describe()} raised {type(exc).__name__}({text_of(exc)}): backend code asked the process to"
            " exit (a library's sys.exit() or exit(), or an interrupt it raised itself); taken as an error of that"
            " call, not as a clean exit")
        error.__cause__ = exc
        log.error(str(error), exc_info=exc)
        return error

    def abandon(self) -> None:
        """Give up waiting on the current call; it may still finish in the background."""
        if self.busy:
            self._abandoned_at = time.monotonic()

    def close(self) -> None:
        """Let the thread end once its current call (if any) returns."""
        self._calls.put(None)
