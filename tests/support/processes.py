"""Real daemon processes for acceptance tests: a config file, ``python -m dgxqueue worker``, polling."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dgxqueue.config import toml_value
from tests.support import zygote

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
SCRIPTED = "tests.support.generators:ScriptedGenerator"
#: The logs of the daemons the running test started: a failed test's report shows their ends.
STARTED_LOGS: list[Path] = []
#: How long a daemon process may take to start serving: Python, dgxqueue's imports and the
#: generator's load cost over a second of CPU, which a loaded 2-core CI machine (xdist beside
#: torch.compile) stretches past 20 s. Start-up is not what a test's own timeout measures: wait for
#: :func:`wait_ready` first, then time the behaviour from there.
STARTUP_SECONDS = 120.0


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a small TOML file; nested tables as ``"generator.options"`` keys."""
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def worker_config(
    tmp: Path, url: str, *, log_path: Path | None = None, release_path: Path | None = None,
    generator: str = SCRIPTED, models: list[str] | None = None, **worker: Any,
) -> Path:
    options: dict[str, Any] = {}
    if generator == SCRIPTED:
        options = {"log_path": str(log_path or tmp / "executions.log"),
                   "release_path": str(release_path or tmp / "release")}
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": url},
        "outputs": {"dir": str(tmp / "outputs")},
        "generator": {"name": generator, **({"models": models} if models else {})},
        "worker": {"lease_seconds": 30.0, "heartbeat_seconds": 0.2, "rescue_interval_seconds": 0.2,
                   "backoff_base_seconds": 0.0, "poll_interval_seconds": 0.5, **worker},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    }
    if options:
        sections["generator.options"] = options
    return write_config(tmp / f"config-{time.monotonic_ns()}.toml", sections)


def start_worker(config: Path, log: Path, *args: str, env: Mapping[str, str] | None = None,
                 preexec_fn: Callable[[], object] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m dgxqueue worker`` from the repository root (so ``tests`` imports);
    ``preexec_fn`` runs in the child before the exec (``nohup``'s ignored SIGHUP, say)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("DATABASE_URL", None)
    STARTED_LOGS.append(log)
    with log.open("ab") as out:
        return zygote.popen(
            [sys.executable, "-m", "dgxqueue", "--config", str(config), "worker", *args],
            cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
        )


def burst(config: Path, log: Path, timeout: float = 60.0) -> int:
    """Run a ``--burst`` daemon to its end; its exit code (killed if it outlives ``timeout``)."""
    worker = start_worker(config, log, "--burst")
    try:
        return worker.wait(timeout)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def ignores(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores ``signum``, as the kernel holds it (a Python handler that does
    nothing would read as caught, not ignored)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(mask & 1 << (signum - 1))


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], timeout: float, what: str, *,
    alive: subprocess.Popen[bytes] | None = None, interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail with ``what``
    after ``timeout`` seconds, or at once if the ``alive`` process exits first."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not (result := predicate()):
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the daemon exited with {alive.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        pause.wait(interval)
    return result


def ready(process: subprocess.Popen[bytes], log: Path) -> bool:
    """Whether the daemon ``process`` logged that it is ready (started, and its first sweep
    done) to ``log``: its own line, by the pid in its worker id, in a log other daemons may share."""
    if not log.exists():
        return False
    return any('"daemon ready"' in line and f"-{process.pid}-" in line for line in log.read_text().splitlines())


def wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = STARTUP_SECONDS) -> None:
    """Wait until the daemon ``process`` (logging to ``log``) serves, however slowly it starts; it
    must not exit first."""
    wait_until(lambda: ready(process, log), timeout, f"the daemon logging to {log.name} to be ready", alive=process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, then the exit code (SIGKILL if it does not exit in time)."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("daemon ignored SIGTERM") from None


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (state ``T`` in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"
