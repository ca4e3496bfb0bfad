"""SIGTERM and SIGHUP as interrupts: a command that cleans up on Ctrl-C (the demo stopping its
daemon, ``enqueue --wait`` naming the queued jobs) does the same when a supervisor, timeout(1) or
a closed terminal stops it, then exits 128 + the signal's number (143, 129) as a process killed by
it would, not Ctrl-C's 130. Kept apart from the commands so a light one imports no daemon.

Every command that catches a stop signal installs its handlers through :func:`catch`, the one home
of the Unix rule that a signal the process was started ignoring stays ignored: ``nohup`` ignores
SIGHUP so that a closed terminal does not stop the command, and a non-interactive shell starts a
background job (``cmd &``) with SIGINT ignored so that Ctrl-C meant for the script spares it.
"""

from __future__ import annotations

import signal
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias

Handler: TypeAlias = Callable[[int, types.FrameType | None], Any] | int | signal.Handlers | None

#: The signals a parent hands over ignored by convention (``nohup``, ``cmd &``). SIGTERM is not
#: among them: it is how supervisors ask for a clean stop, and no convention ignores it for a child.
IGNORED_BY_CONVENTION = (signal.SIGHUP, signal.SIGINT)


def catch(signals: Iterable[int], handler: Handler) -> dict[int, Handler]:
    """Install ``handler`` for each of ``signals`` except one of :data:`IGNORED_BY_CONVENTION`
    ignored now (as the process started: call it before any handler of ours); returns the
    handlers it replaced, so that restoring them undoes exactly what it changed."""
    return {sig: signal.signal(sig, handler) for sig in signals
            if sig not in IGNORED_BY_CONVENTION or signal.getsignal(sig) != signal.SIG_IGN}


def restore(previous: dict[int, Handler]) -> None:
    """Put back the handlers :func:`catch` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt, so the same clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise :class:`Signalled`; the handlers before are restored after.
    Under ``nohup`` SIGHUP stays ignored (:func:`catch`)."""
    def handler(signum: int, frame: types.FrameType | None) -> None:
        raise Signalled(signum)

    previous = catch((signal.SIGTERM, signal.SIGHUP), handler)
    try:
        yield
    finally:
        restore(previous)
