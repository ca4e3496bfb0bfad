"""SIGTERM and SIGHUP as interrupts: a command that cleans up on Ctrl-C (the demo stopping its
daemon, ``enqueue --wait`` naming the queued jobs) does the same when a supervisor, timeout(1) or
a closed terminal stops it, then exits 128 + the signal's number (143, 129) as a process killed by
it would, not Ctrl-C's 130. Kept apart from the commands so a light one imports no daemon."""

from __future__ import annotations

import signal
import types
from collections.abc import Iterator
from contextlib import contextmanager


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt, so the same clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise :class:`Signalled`; the handlers before are restored after.
    A signal the process was started ignoring stays ignored: ``nohup`` ignores SIGHUP so that a
    closed terminal does not stop the command."""
    def handler(signum: int, frame: types.FrameType | None) -> None:
        raise Signalled(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
