"""A pytest plugin for the zygote experiment: one JSON line per process the tests start and reap.

``-p tests.support.process_account`` with ``DGXQ_TEST_PROCESS_LOG=PATH``: every child a
:class:`subprocess.Popen` reaps is reaped with ``wait4`` and logged with its argv, wall time and CPU
(user + system, its own and its reaped descendants'); the zygote logs its own children the same
way (``tests/support/zygote.py``). A process killed and never waited for is not logged. Each line
names the test that started the process (``test``); one more line per test (``"via": "test"``) gives
the test's wall time and the CPU of the pytest process itself while it ran.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
from typing import Any

import pytest

_started: dict[int, tuple[float, list[str], str | None]] = {}
_lock = threading.Lock()


def _log(pid: int, usage: Any) -> None:
    with _lock:
        began, argv, test = _started.pop(pid, (time.monotonic(), [], None))
    _write({"pid": pid, "argv": argv, "cpu": usage.ru_utime + usage.ru_stime, "wall": time.monotonic() - began,
            "via": "popen", "test": test})


def _write(line: dict[str, Any]) -> None:
    with open(os.environ["DGXQ_TEST_PROCESS_LOG"], "a") as out:
        out.write(json.dumps(line) + "\n")


def _test() -> str | None:
    current = os.environ.get("PYTEST_CURRENT_TEST")
    return current.rsplit(" ", 1)[0] if current else None


def _wait4(pid: int, options: int) -> tuple[int, int]:
    found, status, usage = os.wait4(pid, options)
    if found:
        _log(found, usage)
    return found, status


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("DGXQ_TEST_PROCESS_LOG"):
        return
    popen: Any = subprocess.Popen
    original_init = popen.__init__
    original_poll = popen._internal_poll

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if not hasattr(self, "_zygote"):
            with _lock:
                _started[self.pid] = (time.monotonic(), [os.fsdecode(a) for a in self.args], _test())

    def internal_poll(self: Any, _deadstate: int | None = None, *_rest: Any) -> int | None:
        result: int | None = original_poll(self, _deadstate, _wait4)
        return result

    def try_wait(self: Any, wait_flags: int) -> tuple[int, int]:
        try:
            return _wait4(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0

    if not hasattr(popen, "_zygote_accounted"):
        popen.__init__ = init
        popen._internal_poll = internal_poll
        popen._try_wait = try_wait
        popen._zygote_accounted = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Any:
    if not os.environ.get("DGXQ_TEST_PROCESS_LOG"):
        return (yield)
    began, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        return (yield)
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        _write({"via": "test", "test": item.nodeid, "wall": time.monotonic() - began,
                "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime})
