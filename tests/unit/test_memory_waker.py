"""The in-memory queue's idle wait (:class:`dgxqueue.testing.MemoryWaker`)."""

from __future__ import annotations

import time
from datetime import timedelta

from dgxqueue.testing import ManualClock, MemoryStore, MemoryWaker


def test_memory_waker__returns_at_once_after_a_write_or_a_wake() -> None:
    """A write to the store since the last wait, or a wake(), ends the next wait at once."""
    store = MemoryStore()
    waker = MemoryWaker(store)
    store.enqueue("a prompt")
    started = time.monotonic()
    assert waker.wait(30.0)
    waker.wake()
    assert waker.wait(30.0)
    assert time.monotonic() - started < 5.0
    assert not waker.wait(0.01)  # nothing new: it waits out its timeout


def test_memory_waker__on_a_manual_clock_an_idle_wait_lets_the_time_pass() -> None:
    """With nothing to wake it, a wait on a ManualClock moves the clock by its timeout instead of sleeping."""
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    waker = MemoryWaker(store)
    before = clock()
    started = time.monotonic()
    assert waker.wait(45.0)
    assert clock() - before == timedelta(seconds=45)
    assert time.monotonic() - started < 5.0
