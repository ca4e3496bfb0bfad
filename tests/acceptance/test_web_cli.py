"""``dgxqueue web`` as a process: refusals before it binds, the token off loopback (never shown),
raw paths that try to leave the outputs folder, and the missing extra."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgxqueue.storage import dispose_engines
from tests.acceptance.test_cli import assert_error
from tests.support import zygote
from tests.support.db import build_sqlite_template, sqlite_url_at_head
from tests.support.processes import REPO, free_port, ignores, stop, wait_until, write_config

TOKEN = "a-long-enough-token-0123456789"


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "template").mkdir()
    url = sqlite_url_at_head(tmp_path, build_sqlite_template(tmp_path / "template"))
    (tmp_path / "outputs").mkdir()
    yield write_config(tmp_path / "config.toml", {"database": {"url": url},
                                                  "outputs": {"dir": str(tmp_path / "outputs")}})
    dispose_engines()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGXQUEUE_") and k != "DATABASE_URL"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _run(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return zygote.run([sys.executable, "-m", "dgxqueue", "--config", str(config), "web", *args], cwd=REPO,
                      env=env or _env(), capture_output=True, text=True, timeout=60)


def test_web_cli__off_loopback_without_a_token_is_refused(config: Path, tmp_path: Path) -> None:
    """A non-loopback --host without a token exits 78 naming what to do; a short token is refused
    without being echoed; an empty or unreadable token file too; a port in use is 69, one line."""
    refused = _run(config, "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 78 and "--token-file" in refused.stderr and refused.stdout == ""
    short = _run(config, "--host", "0.0.0.0", env=_env(DGXQUEUE_WEB_TOKEN="tiny-secret"))
    assert short.returncode == 78 and "tiny-secret" not in short.stderr + short.stdout
    (tmp_path / "empty").write_text("\n")
    assert _run(config, "--host", "0.0.0.0", "--token-file", str(tmp_path / "empty")).returncode == 78
    assert _run(config, "--token-file", str(tmp_path / "missing")).returncode == 74
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = _run(config, "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 69 and "cannot listen" in busy.stderr and len(busy.stderr.splitlines()) == 1


def test_web_cli__an_unreadable_token_file_says_what_is_wrong_with_it(config: Path, tmp_path: Path) -> None:
    """A token file that is missing, a folder, or not UTF-8: one line naming --token-file, the path
    and what is wrong (exit 74, an I/O error); it said only the exception's class
    ('FileNotFoundError'). The file's bytes are never echoed."""
    (tmp_path / "binary").write_bytes(b"\xffsecret-bytes-0123456789")
    for name, reason in (("missing", "No such file or directory"), ("", "Is a directory"),
                         ("binary", "not UTF-8 text")):
        path = str(tmp_path / name) if name else str(tmp_path)
        done = _run(config, "--token-file", path)
        assert_error(done, 74, "--token-file", path, reason)
        assert "Error" not in done.stderr and "secret-bytes" not in done.stderr and done.stdout == ""


def test_web_cli__a_token_file_that_never_ends_is_refused_not_read_whole(config: Path, tmp_path: Path) -> None:
    """--token-file /dev/zero (or a log, an image, a disk named by mistake): refused once it is
    past a token's size, exit 78 naming the file, at once and in little memory. It was read
    whole: /dev/zero took every byte of memory the process could get, then 'internal error:
    MemoryError' (exit 70); a huge text file became a token of that size."""
    import resource

    def little_memory() -> None:  # in the child: what an unbounded read runs into, soon
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run([sys.executable, "-m", "dgxqueue", "--config", str(config), "web", "--host", "0.0.0.0",
                           "--token-file", "/dev/zero"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60, preexec_fn=little_memory)
    assert_error(done, 78, "--token-file /dev/zero", "bytes")
    (tmp_path / "big").write_text("a" * 100_000)
    assert_error(_run(config, "--host", "0.0.0.0", "--token-file", str(tmp_path / "big")), 78, "bytes")


def test_web_cli__a_token_file_saved_with_a_byte_order_mark_gives_the_token(tmp_path: Path) -> None:
    """A token file an editor saved as 'UTF-8 with BOM' (Notepad's default), CRLF ended: the token
    is the text the operator sees. The BOM stayed at its start, so the file was refused as 'at
    least 16 printable characters without spaces' though it showed exactly that."""
    import argparse

    from dgxqueue.cli.web import read_token

    path = tmp_path / "token"
    path.write_bytes(b"\xef\xbb\xbf" + TOKEN.encode() + b"\r\n")
    assert read_token(argparse.Namespace(token_file=str(path))) == TOKEN


def test_web_cli__without_the_web_extra_says_how_to_install_it(config: Path) -> None:
    """Without starlette importable, the command exits 78 naming the extra."""
    code = ("import sys; sys.modules['starlette'] = None; from dgxqueue.cli import main; "
            f"sys.exit(main(['--config', {str(config)!r}, 'web']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 78 and "pip install 'dgxqueue[web]'" in result.stderr


def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """A GET with the path sent exactly as given (http.client normalizes nothing)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_web_cli__token_required_on_every_address_and_never_printed(config: Path, tmp_path: Path) -> None:
    """Bound to every address with a token file: no token is 401, the token passes, raw '../'
    paths are 404 with a token too, and neither the output nor the log holds the token."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    (tmp_path / "secret.txt").write_text("outside the outputs folder")
    port = free_port()
    log = tmp_path / "web.log"
    web = _start_web(config, log, port, "--host", "0.0.0.0", "--token-file", str(token_file))
    try:
        wait_until(lambda: b"http://0.0.0.0" in log.read_bytes(), 30, "the server's first line", alive=web)
        wait_until(lambda: _answers(port), 30, "the server to answer", alive=web)
        assert _get(port, "/api/overview")[0] == 401
        assert _get(port, "/api/overview", "wrong-" + TOKEN)[0] == 401
        assert _get(port, "/api/overview", TOKEN)[0] == 200
        assert _get(port, f"/jobs?token={TOKEN}")[0] == 303
        for path in ["/files/../secret.txt", "/files/../../etc/passwd", "/files/%2e%2e/secret.txt",
                     "/files/./../secret.txt"]:
            status, body = _get(port, path, TOKEN)
            assert status == 404 and b"outside" not in body, path
    finally:
        assert stop(web) == 0
    assert TOKEN not in log.read_text()


def _start_web(config: Path, log: Path, port: int, *args: str, ignored: int | None = None) -> subprocess.Popen[bytes]:
    """``dgxqueue web`` on ``port``, its output in ``log``; ``ignored``: a signal it starts with ignored."""
    with log.open("ab") as out:
        return zygote.popen(
            [sys.executable, "-m", "dgxqueue", "--config", str(config), "web", "--port", str(port), *args],
            cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=None if ignored is None else (lambda: signal.signal(ignored, signal.SIG_IGN)))


def _answers(port: int) -> bool:
    try:
        return _get(port, "/login")[0] == 200
    except OSError:
        return False


def _open_descriptors(pid: int, name: str) -> int:
    """How many of process ``pid``'s descriptors are open on a file called ``name``."""
    folder = Path(f"/proc/{pid}/fd")
    found = 0
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            found += os.readlink(entry).endswith("/" + name)
    return found


def test_web_cli__clients_that_hang_up_leave_no_file_open(config: Path, tmp_path: Path) -> None:
    """Clients that ask for a large file and reset the connection before reading a byte: every
    descriptor the server opened for them is closed once they are gone (each one left open was a
    step towards EMFILE, when the page could open neither files nor the database)."""
    (tmp_path / "outputs" / "big.wav").write_bytes(os.urandom(1 << 24))
    port = free_port()
    log = tmp_path / "web.log"
    web = _start_web(config, log, port)
    try:
        wait_until(lambda: _answers(port), 30, "the server to answer", alive=web)
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(f"GET /files/big.wav HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
        assert _get(port, "/files/big.wav")[0] == 200  # served whole: and after all the resets
        wait_until(lambda: _open_descriptors(web.pid, "big.wav") == 0, 30, "the server to close every big.wav",
                   alive=web)
    finally:
        assert stop(web) == 0


@pytest.mark.parametrize("ignored", [False, True], ids=["", "ignored-at-start"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["sigint", "sighup"])
def test_web_cli__sigint_or_sighup_stops_it_unless_ignored_at_start(config: Path, tmp_path: Path, ignored: bool,
                                                                    signum: signal.Signals) -> None:
    """SIGINT or SIGHUP stops the server with exit 0, as they stop the worker; started with it
    ignored (a script's ``web &``, ``nohup``), it keeps it ignored (uvicorn caught SIGINT anyway
    and stopped) and SIGTERM still stops it with 0. SIGHUP killed it by its default action."""
    port = free_port()
    log = tmp_path / "web.log"
    web = _start_web(config, log, port, ignored=signum if ignored else None)
    try:
        wait_until(lambda: _answers(port), 30, "the server to answer", alive=web)
        assert ignores(web.pid, signum) == ignored, Path(f"/proc/{web.pid}/status").read_text()
        web.send_signal(signum)
        if ignored:
            assert _answers(port) and web.poll() is None
            code = stop(web)
        else:
            code = web.wait(30)
    finally:
        if web.poll() is None:
            web.kill()
            web.wait()
    assert code == 0, log.read_text()


@pytest.mark.parametrize("ignored", [False, True], ids=["sigterm-twice", "sigterm-twice-sigint-ignored-at-start"])
def test_web_cli__a_second_sigterm_drops_a_slow_download_and_exits_0(config: Path, tmp_path: Path,
                                                                     ignored: bool) -> None:
    """A client that stops reading a large file holds a graceful stop open forever: a second
    SIGTERM stops the server at once (exit 0, no traceback), as a second stop signal does the
    worker. uvicorn forces only on a second SIGINT, so a script's ``web &`` (SIGINT ignored)
    stopped only on SIGKILL."""
    with (tmp_path / "outputs" / "big.wav").open("wb") as sparse:
        sparse.truncate(1 << 28)  # far more than the socket buffers hold; no disk spent
    port = free_port()
    log = tmp_path / "web.log"
    web = _start_web(config, log, port, ignored=signal.SIGINT if ignored else None)
    try:
        wait_until(lambda: _answers(port), 30, "the server to answer", alive=web)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(f"GET /files/big.wav HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert client.recv(64).startswith(b"HTTP/1.1 200")  # then never read again
            web.send_signal(signal.SIGTERM)
            wait_until(lambda: not _answers(port), 30, "the server to stop listening", alive=web)
            assert web.poll() is None  # the graceful stop waits for the download
            web.send_signal(signal.SIGTERM)
            code = web.wait(30)
    finally:
        if web.poll() is None:
            web.kill()
            web.wait()
    assert code == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
