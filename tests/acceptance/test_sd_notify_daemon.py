"""A real `dgxqueue worker` process talking sd_notify to a socket the test binds, as systemd would.

The watchdog pings must come from the daemon's main loop, so a loop that stalls stops them: the
test stalls the loop for real by holding SQLite's write lock, on which the loop's next write
(its rescue pass) blocks.
"""

from __future__ import annotations

import itertools
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgxqueue.storage import dispose_engines, init_db
from tests.support import zygote
from tests.support.processes import stop

WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2s: a gap this long would get the daemon killed


class NotifySocket:
    """systemd's side of the protocol: a bound AF_UNIX datagram socket that records messages."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.messages: list[str] = []

    def next(self, timeout: float) -> str | None:
        """The next datagram, or None when none arrives within ``timeout`` seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.messages.append(message)
        return message

    def until(self, predicate: str, timeout: float, process: subprocess.Popen[bytes]) -> str:
        """Read until a message contains ``predicate``; fail after ``timeout`` or if the daemon exits."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(min(left, 0.5))
            if message is not None and predicate in message.splitlines():
                return message
            if process.poll() is not None:
                raise AssertionError(f"daemon exited {process.returncode}; messages: {self.messages}")
        raise AssertionError(f"no {predicate} within {timeout:g} s; messages: {self.messages}")

    def arrivals(self, predicate: str, seconds: float) -> list[float]:
        """When messages containing ``predicate`` arrive during the next ``seconds`` (monotonic)."""
        deadline, seen = time.monotonic() + seconds, []
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            if message is not None and predicate in message.splitlines():
                seen.append(time.monotonic())
        return seen


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@dgxqueue-{uuid.uuid4().hex}"
    bound = NotifySocket(address)
    yield bound
    bound.sock.close()


def start_daemon(tmp_path: Path, notify: NotifySocket, **env: str) -> subprocess.Popen[bytes]:
    init_db(f"sqlite:///{tmp_path / 'generations.db'}")  # the worker never creates its database
    dispose_engines()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DGXQUEUE_", "WATCHDOG_"))}
    full_env = {
        **clean, "DATABASE_URL": f"sqlite:///{tmp_path / 'generations.db'}",
        "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "DGXQUEUE_METRICS_ENABLED": "false", "DGXQUEUE_OUTPUTS_DIR": str(tmp_path / "outputs"), **env,
    }
    with (tmp_path / "daemon.log").open("ab") as log:
        return zygote.popen([sys.executable, "-m", "dgxqueue", "worker"], cwd=tmp_path, env=full_env,
                            stdout=log, stderr=subprocess.STDOUT)


def test_daemon__ready_watchdog_stopping_in_order(tmp_path: Path, notify: NotifySocket) -> None:
    """STATUS while loading, READY, WATCHDOG pings closer than WATCHDOG_USEC, STOPPING on SIGTERM."""
    daemon = start_daemon(tmp_path, notify)
    try:
        ready = notify.until("READY=1", 60, daemon)
        assert any(line.startswith("STATUS=") for line in ready.splitlines())
        pings = [time.monotonic(), *notify.arrivals("WATCHDOG=1", 3.0)]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(gaps) >= 2 and max(gaps) < WATCHDOG_USEC / 1e6, gaps
        daemon.terminate()
        notify.until("STOPPING=1", 30, daemon)
        assert daemon.wait(timeout=30) == 0
    finally:
        stop(daemon)
    kinds = [line.split("=")[0] for message in notify.messages for line in message.splitlines()]
    assert "STATUS" in kinds[: kinds.index("READY")], "a STATUS (loading) comes before READY"
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING")
    assert "READY" not in kinds[kinds.index("READY") + 1:]


def test_daemon__stalled_loop_stops_watchdog(tmp_path: Path) -> None:
    """While the main loop is blocked (on a held database lock) no WATCHDOG arrives; then they resume."""
    notify = NotifySocket(str(tmp_path / "notify"))
    daemon = start_daemon(tmp_path, notify, DGXQUEUE_WORKER_RESCUE_INTERVAL_SECONDS="0.05",
                          DGXQUEUE_DATABASE_SQLITE_BUSY_TIMEOUT_MS="60000")
    blocker = None
    try:
        notify.until("READY=1", 60, daemon)
        notify.until("WATCHDOG=1", 5, daemon)
        blocker = sqlite3.connect(tmp_path / "generations.db", timeout=30, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the daemon's next write waits for this lock
        notify.arrivals("WATCHDOG=1", 1.5)  # the round under way may still ping once
        assert notify.arrivals("WATCHDOG=1", 3.0) == [], "pings kept coming while the loop was stuck"
        blocker.execute("ROLLBACK")
        notify.until("WATCHDOG=1", 10, daemon)
        daemon.terminate()
        notify.until("STOPPING=1", 30, daemon)
        assert daemon.wait(timeout=30) == 0
    finally:
        if blocker is not None:
            blocker.close()
        stop(daemon)
        notify.sock.close()
