"""A pytest plugin for the zygote experiment: one JSON line per process the tests start and reap.

``-p tests.support.process_account`` with ``DGXQ_TEST_PROCESS_LOG=PATH``: every child a
:class:`subprocess.Popen` reaps is reaped with ``wait4`` and logged with its argv, wall time and CPU
(user + system, its own and its reaped descendants'); the zygote logs its own children the same
way (``tests/support/zygote.py``). A process killed and never waited for is not logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from typing import Any

import pytest

_started: dict[int, tuple[float, list[str]]] = {}
_lock = threading.Lock()


def _log(pid: int, usage: Any) -> None:
    with _lock:
        began, argv = _started.pop(pid, (time.monotonic(), []))
    path = os.environ["DGXQ_TEST_PROCESS_LOG"]
    line = {"pid": pid, "argv": argv, "cpu": usage.ru_utime + usage.ru_stime, "wall": time.monotonic() - began,
            "via": "popen"}
    with open(path, "a") as out:
        out.write(json.dumps(line) + "\n")


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
                _started[self.pid] = (time.monotonic(), [os.fsdecode(a) for a in self.args])

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
