"""Where the hard stop says the main loop is stuck: read from the thread's stack, not assumed."""

from __future__ import annotations

import threading

from dgxqueue.daemon.hardstop import stuck_in
from dgxqueue.daemon.runner import Runner


def test_stuck_in__names_the_innermost_frame_and_dgxqueues_own_caller() -> None:
    """A thread blocked in a call made from dgxqueue's code (the runner here) is described by its
    innermost frame, the dgxqueue frame that called into it, and the frames between."""
    runner, entered, gate = Runner(), threading.Event(), threading.Event()

    def blocked_in_a_backend() -> None:
        entered.set()
        gate.wait(30)

    future = runner.submit(blocked_in_a_backend)
    try:
        assert entered.wait(10)
        thread = runner._thread
        where = stuck_in(thread)
    finally:
        gate.set()
        future.result(10)
        runner.close()
    assert where[0].startswith("threading.py:") and " in wait, called from dgxqueue/daemon/runner.py:" in where[0]
    assert any(line.endswith(" in blocked_in_a_backend") for line in where), where


def test_stuck_in__a_thread_that_does_not_run_is_unknown() -> None:
    """A thread never started (or ended) has no stack to read."""
    assert stuck_in(threading.Thread(target=lambda: None)) == ["unknown"]
    assert stuck_in(None) == ["unknown"]
