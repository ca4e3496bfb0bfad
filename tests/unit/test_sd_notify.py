"""The sd_notify Notifier against a real AF_UNIX datagram socket, as systemd would bind it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgxqueue.systemd import Notifier


class Listener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = address
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(5.0)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5.0)
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    """A notify socket at a filesystem path, or at an abstract '@' address."""
    abstract = f"@dgxqueue-test-{uuid.uuid4().hex}"
    address = str(tmp_path / "notify.sock") if request.param == "path" else abstract
    bound = Listener(address)
    yield bound
    bound.sock.close()


def test_notifier__sends_ready_watchdog_status_stopping_in_order(listener: Listener) -> None:
    """Each call arrives as one datagram with systemd's KEY=VALUE lines, in the order sent."""
    notifier = Notifier({"NOTIFY_SOCKET": listener.address})
    assert notifier.enabled
    assert notifier.ready("serving synth")
    assert notifier.watchdog()
    assert notifier.status("processing 2 jobs")
    assert notifier.stopping("finishing running jobs")
    notifier.close()
    assert listener.receive() == "READY=1\nSTATUS=serving synth"
    assert listener.receive() == "WATCHDOG=1"
    assert listener.receive() == "STATUS=processing 2 jobs"
    assert listener.receive() == "STOPPING=1\nSTATUS=finishing running jobs"
    assert listener.nothing_pending()


def test_notifier__plain_ready_and_stopping(listener: Listener) -> None:
    """Without a status text, READY=1 and STOPPING=1 go alone."""
    notifier = Notifier({"NOTIFY_SOCKET": listener.address})
    notifier.ready()
    notifier.stopping()
    notifier.close()
    assert [listener.receive(), listener.receive()] == ["READY=1", "STOPPING=1"]


def test_notifier__without_notify_socket_does_nothing() -> None:
    """Outside systemd every call returns False and raises nothing."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog()
    assert not notifier.status("x") and not notifier.stopping()
    assert notifier.watchdog_interval is None
    notifier.close()


def test_notifier__vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    """A socket path that nobody listens on makes the call return False, never raise."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    notifier.close()


def test_notifier__relative_notify_socket_is_ignored() -> None:
    """Only absolute paths and '@' addresses are valid notify sockets; anything else is ignored."""
    assert not Notifier({"NOTIFY_SOCKET": "relative.sock"}).enabled


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_notifier__watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], interval: float | None
) -> None:
    """WATCHDOG_USEC sets a ping every half period; a bad value or another WATCHDOG_PID disables it."""
    assert Notifier(env).watchdog_interval == interval
