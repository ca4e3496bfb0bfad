"""An experiment: a fork server ("zygote") for the ``python -m dgxqueue`` processes the tests start.

With ``DGXQ_TEST_ZYGOTE=1`` each test process (xdist worker) starts, on its first eligible command,
one long-lived ``python -m tests.support.zygote`` that imports the heavy modules that read no
environment at import (SQLAlchemy, the storage models, the daemon, structlog, numpy, ...) and then
forks a child per command. The child takes the request's argv, environment, working folder,
standard streams (passed over a Unix socket), session, umask, signal mask and the signals its
caller ignores, puts the rest of the signals back to what a fresh ``python`` starts with, and runs
``dgxqueue`` exactly as ``python -m`` does (``runpy._run_module_as_main``), so its exit code,
its atexit handlers and its interpreter shutdown are Python's own. Off (the default), :func:`popen`
and :func:`run` are :class:`subprocess.Popen` and :func:`subprocess.run`.

:class:`ZygotePopen` is a :class:`subprocess.Popen` whose child comes from the zygote: pipes,
``communicate``, ``wait(timeout)``, ``poll`` and ``returncode`` are Popen's own; signals go through
a pidfd, so a late ``terminate`` can never reach a recycled pid. The zygote reports the exit status
without reaping (``waitid(..., WNOWAIT)``) and reaps only once the caller has seen it, so the
child's pid and ``/proc`` entry last as long as they would for a child of the caller.

A command falls back to a real process when the zygote cannot reproduce it faithfully: any other
program, ``preexec_fn``, ``pass_fds``, another user or group, or an environment that differs from
the zygote's in a variable the interpreter or a preloaded module reads at start-up
(:data:`STARTUP_VARIABLES`); one zygote is started per distinct set of those.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ENABLED = os.environ.get("DGXQ_TEST_ZYGOTE") == "1"
REPO = Path(__file__).resolve().parents[2]

#: Imported once by the zygote: heavy, and none reads the environment or a file at import.
PRELOAD = (
    "sqlalchemy", "sqlalchemy.orm", "sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql",
    "psycopg", "structlog", "numpy", "numpy.random", "prometheus_client", "alembic", "alembic.command",
    "alembic.config", "alembic.script", "alembic.runtime.migration",
    "dgxqueue.config", "dgxqueue.storage", "dgxqueue.logs", "dgxqueue.metrics", "dgxqueue.daemon",
    "dgxqueue.cli.common", "dgxqueue.cli.admin", "dgxqueue.cli.jobs", "dgxqueue.cli.worker",
    "dgxqueue.cli.workers", "dgxqueue.cli.models", "dgxqueue.cli.dbmove",
    "workers", "tests.support.generators",
)
#: Modules that read the environment at import: run again in each child, under the child's environment.
RELOAD_IN_CHILD = ("dgxqueue.faultpoints",)
#: Environment variables read when the interpreter or a preloaded module starts (interpreter
#: settings, locale, BLAS threads, coverage, structlog's colours, psycopg's implementation,
#: prometheus_client's and SQLAlchemy's switches, and SQLite's temporary folder: the sqlite3
#: module initialises SQLite at import, which reads SQLITE_TMPDIR and TMPDIR then, once).
STARTUP_VARIABLES = ("PYTHON", "LANG", "LC_", "OMP_", "OPENBLAS_", "MKL_", "NUMPY_", "NPY_", "COV_CORE_", "COVERAGE_",
                     "NO_COLOR", "FORCE_COLOR", "PSYCOPG_", "PROMETHEUS_", "prometheus_", "DISABLE_SQLALCHEMY",
                     "SQLITE_TMPDIR", "TMPDIR")
#: Popen arguments the zygote reproduces; any other (set to a non-default value) means a real process.
_SUPPORTED = frozenset({"stdin", "stdout", "stderr", "cwd", "env", "text", "universal_newlines", "encoding",
                        "errors", "bufsize", "start_new_session", "process_group", "close_fds"})
_MAX_MESSAGE = 1 << 20


def startup_key(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """What of ``env`` a process reads at its start-up: two environments with the same key can share a fork server."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP_VARIABLES)))


def take_environment(env: Mapping[str, str]) -> None:
    """In a process forked from a server that imported everything: ``env`` as if it had started with
    it (the time zone, the temporary folder, the modules that read the environment at import)."""
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    tempfile.tempdir = None  # read from TMPDIR on first use, as in a fresh process
    for name in RELOAD_IN_CHILD:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


def _eligible(args: Any, kwargs: Mapping[str, Any]) -> bool:
    if isinstance(args, (str, bytes, os.PathLike)) or len(args) < 3:
        return False
    if [os.fsdecode(a) for a in args[:3]] != [sys.executable, "-m", "dgxqueue"]:
        return False
    unsupported = {k: v for k, v in kwargs.items() if k not in _SUPPORTED}
    return all(v in (None, (), False) for v in unsupported.values()) and kwargs.get("close_fds", True) is True


# --- the caller's side ----------------------------------------------------------------------------

#: What the zygotes did, for the experiment's report: commands forked, commands run as real processes.
COUNTS = {"forked": 0, "fallback": 0}


def popen(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """:class:`subprocess.Popen`, from the zygote when it is on and can run ``args`` faithfully."""
    if ENABLED and _eligible(args, kwargs):
        env = kwargs.get("env")
        zygote = _zygote_for(dict(os.environ if env is None else env))
        COUNTS["forked"] += 1
        return ZygotePopen(zygote, args, **kwargs)
    if ENABLED:
        COUNTS["fallback"] += 1
    return subprocess.Popen(args, **kwargs)


def run(args: Sequence[str], *, input: Any = None, capture_output: bool = False, timeout: float | None = None,
        check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """:func:`subprocess.run` through :func:`popen` (its logic, as of Python 3.11)."""
    if not ENABLED:
        return subprocess.run(args, input=input, capture_output=capture_output, timeout=timeout, check=check,
                              **kwargs)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            exc.stdout, exc.stderr = process.communicate()
            raise
        except BaseException:
            process.kill()
            raise
        code = process.poll()
        assert code is not None  # communicate waited
    if check and code:
        raise subprocess.CalledProcessError(code, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, code, stdout, stderr)


class _Zygote:
    """One zygote process and the socket its requests go to."""

    def __init__(self, env: Mapping[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            log = os.environ.get("DGXQ_TEST_ZYGOTE_LOG")
            with open(log or os.devnull, "ab") as errors:
                # From the repository root, where ``-m tests.support.zygote`` imports whatever the
                # PYTHONPATH: each child puts its own folder first in ``sys.path`` again.
                # Its own variables are this process's, but for those read at start-up: the children's.
                own = {k: v for k, v in os.environ.items() if not k.startswith(STARTUP_VARIABLES)}
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "tests.support.zygote", str(theirs.fileno())], cwd=REPO,
                    env={**own, **dict(startup_key(env))},
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, pass_fds=[theirs.fileno()])
        self.control = ours
        self.lock = threading.Lock()

    def spawn(self, request: dict[str, Any], fds: list[int]) -> tuple[int, int, int]:
        """Fork a child for ``request``; its status socket (a descriptor), pid and pidfd."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs, self.lock:
            socket.send_fds(self.control, [json.dumps(request).encode()], [*fds, theirs.fileno()])
        message, pidfds, _flags, _address = socket.recv_fds(mine, _MAX_MESSAGE, 1)
        if not message:
            mine.close()
            raise ChildProcessError(f"the zygote (pid {self.process.pid}) went away")
        reply = json.loads(message)
        if "errno" in reply:
            mine.close()
            raise OSError(reply["errno"], os.strerror(reply["errno"]), request["cwd"])
        return mine.detach(), int(reply["pid"]), pidfds[0]

    def close(self) -> None:
        self.control.close()  # the zygote exits at the end of its control socket
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_zygotes: dict[tuple[tuple[str, str], ...], _Zygote] = {}
_zygotes_lock = threading.Lock()


def _zygote_for(env: Mapping[str, str]) -> _Zygote:
    key = startup_key(env)
    with _zygotes_lock:
        if key not in _zygotes:
            if not _zygotes:
                import atexit

                atexit.register(shutdown)
            _zygotes[key] = _Zygote(env)
        return _zygotes[key]


def shutdown() -> None:
    """Stop every zygote this process started (their running children carry on, orphaned)."""
    with _zygotes_lock:
        for zygote in _zygotes.values():
            zygote.close()
        _zygotes.clear()


def _proc_field(field: str) -> str:
    status = Path("/proc/self/status").read_text()
    return next(line for line in status.splitlines() if line.startswith(field)).split()[1]


def _ignored_signals() -> list[int]:
    """The signals this process ignores, which a child it starts inherits through exec; Popen puts
    SIGPIPE and SIGXFSZ back to their default first, and the child's Python ignores both itself."""
    mask = int(_proc_field("SigIgn:"), 16)
    return [n for n in range(1, 65) if mask & 1 << (n - 1) and n not in (signal.SIGPIPE, signal.SIGXFSZ)]


class ZygotePopen(subprocess.Popen[Any]):
    """A Popen whose child the zygote forks (see the module's docstring)."""

    def __init__(self, zygote: _Zygote, args: Sequence[str], **kwargs: Any) -> None:
        self._zygote = zygote
        self._status = -1  # a raw descriptor: a Popen collected unwaited leaves no socket to warn about
        self._pidfd = -1
        super().__init__(args, **kwargs)

    def _execute_child(self, args: Sequence[str], executable: Any, preexec_fn: Any, close_fds: bool,
                       pass_fds: Any, cwd: Any, env: Mapping[str, str] | None, startupinfo: Any, creationflags: Any,
                       shell: bool, p2cread: int, p2cwrite: int, c2pread: int, c2pwrite: int, errread: int,
                       errwrite: int, restore_signals: bool, gid: Any, gids: Any, uid: Any, umask: int,
                       start_new_session: bool, process_group: int) -> None:
        try:
            fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                   errwrite if errwrite != -1 else 2]
            present = [_valid(fd) for fd in fds]
            request = {
                "argv": [os.fsdecode(a) for a in args],
                "env": dict(os.environ if env is None else env),
                "cwd": os.fsdecode(cwd) if cwd is not None else os.getcwd(),
                "present": present,
                "new_session": start_new_session,
                "process_group": process_group,
                "umask": int(_proc_field("Umask:"), 8),
                "ignored": _ignored_signals(),
                "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            }
            self._status, self.pid, self._pidfd = self._zygote.spawn(
                request, [fd for fd, ok in zip(fds, present) if ok])
            self._child_created = True
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)  # type: ignore[attr-defined]

    def _read_status(self, timeout: float | None) -> bool:
        """Take the exit status if the zygote sent it within ``timeout``; caller holds the wait lock."""
        if self.returncode is not None:
            return True
        if self._status < 0:
            return False
        if not select.select([self._status], [], [], None if timeout is None else max(timeout, 0.0))[0]:
            return False
        message = os.read(self._status, 4096)
        if not message:
            raise ChildProcessError(f"the zygote went away before pid {self.pid} exited")
        self.returncode = int(json.loads(message)["returncode"])
        os.close(self._status)  # the zygote reaps the child once this end closes
        self._status = -1
        os.close(self._pidfd)
        self._pidfd = -1
        return True

    def _internal_poll(self, _deadstate: int | None = None, _waitpid: Any = None, _WNOHANG: Any = None,
                       _ECHILD: Any = None) -> int | None:
        if self.returncode is None and self._waitpid_lock.acquire(False):  # type: ignore[attr-defined]
            try:
                self._read_status(0)
            except OSError:
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                self._waitpid_lock.release()  # type: ignore[attr-defined]
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        if self.returncode is not None:
            return self.returncode
        with self._waitpid_lock:  # type: ignore[attr-defined]
            if not self._read_status(timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is not None or self._pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- the zygote's side ----------------------------------------------------------------------------

class _Request:
    """A child's orders, as the fork returns them to it."""

    def __init__(self, request: dict[str, Any], fds: list[int], ready: int) -> None:
        self.request, self.fds, self.ready = request, fds, ready


class _Server:
    """The zygote's loop: fork on each request, report each child's exit, reap it once reported."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ, "control")
        self.status: dict[int, socket.socket] = {}  # pid -> the caller's status socket, while open
        self.pidfds: dict[int, int] = {}  # pid -> pidfd, until the child exits
        self.exited: set[int] = set()  # reported, not reaped: the caller has not closed its socket yet
        self.started: dict[int, tuple[float, list[str], str | None]] = {}
        self.account = os.environ.get("DGXQ_TEST_PROCESS_LOG")

    def serve(self) -> _Request | None:
        """Serve until the control socket ends (None); in a forked child, return its request."""
        while True:
            for key, _events in self.selector.select():
                if key.data == "control":
                    message, fds, _flags, _address = socket.recv_fds(self.control, _MAX_MESSAGE, 4)
                    if not message:
                        return None
                    child = self._fork(json.loads(message), fds)
                    if child is not None:
                        return child
                elif key.data[0] == "exit":
                    self._exited(key.data[1])
                else:
                    self._caller_gone(key.data[1])

    def _fork(self, request: dict[str, Any], fds: list[int]) -> _Request | None:
        *stdio, status_fd = fds
        status = socket.socket(fileno=status_fd)
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                status.close()
                self._close_in_child()
                return _Request(request, stdio, write_end)
            except BaseException:
                os._exit(127)
        os.close(write_end)
        for fd in stdio:
            os.close(fd)
        with os.fdopen(read_end, "rb") as ready:
            failure = ready.read()
        if failure:  # the child could not set itself up (its folder is missing): as Popen, an OSError
            os.waitpid(pid, 0)
            status.send(json.dumps({"errno": int(failure)}).encode())
            status.close()
            return None
        pidfd = os.pidfd_open(pid)
        socket.send_fds(status, [json.dumps({"pid": pid}).encode()], [pidfd])
        self.status[pid] = status
        self.pidfds[pid] = pidfd
        test = request["env"].get("PYTEST_CURRENT_TEST")
        self.started[pid] = (time.monotonic(), request["argv"], test.rsplit(" ", 1)[0] if test else None)
        self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
        self.selector.register(status, selectors.EVENT_READ, ("caller", pid))
        return None

    def _exited(self, pid: int) -> None:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None:
            return
        pidfd = self.pidfds.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        status = self.status.get(pid)
        if status is None:
            self._reap(pid)
            return
        try:
            status.send(json.dumps({"returncode": code}).encode())
        except OSError:
            self._caller_gone(pid)
            self._reap(pid)
            return
        self.exited.add(pid)

    def _caller_gone(self, pid: int) -> None:
        status = self.status.pop(pid, None)
        if status is not None:
            self.selector.unregister(status)
            status.close()
        if pid in self.exited:
            self.exited.discard(pid)
            self._reap(pid)

    def _reap(self, pid: int) -> None:
        _pid, _status, usage = os.wait4(pid, 0)
        began, argv, test = self.started.pop(pid)
        if self.account:
            line = {"pid": pid, "argv": argv, "cpu": usage.ru_utime + usage.ru_stime,
                    "wall": time.monotonic() - began, "via": "zygote", "test": test}
            with open(self.account, "a") as out:
                out.write(json.dumps(line) + "\n")

    def _close_in_child(self) -> None:
        """Close everything of the zygote's in a child: it must hold only what a fresh process holds."""
        for status in self.status.values():
            status.close()
        for pidfd in self.pidfds.values():
            os.close(pidfd)
        self.selector.close()
        self.control.close()


def _become(child: _Request) -> None:
    """Turn this forked child into ``python -m dgxqueue ...`` as its caller asked, then run it."""
    request = child.request
    try:
        stdio = iter(child.fds)
        for target, present in enumerate(request["present"]):
            if present:
                fd = next(stdio)
                os.dup2(fd, target)
                os.close(fd)
            else:
                os.close(target)
        os.chdir(request["cwd"])
    except OSError as exc:
        os.write(child.ready, str(exc.errno).encode())
        os._exit(255)
    if request["new_session"]:
        os.setsid()
    if request["process_group"] >= 0:
        os.setpgid(0, request["process_group"])
    os.umask(request["umask"])
    _reset_signals(set(request["ignored"]), set(request["blocked"]))
    sys.path[0] = request["cwd"]  # what ``python -m`` puts first
    importlib.invalidate_caches()
    _forget_unreachable()
    take_environment(request["env"])
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()  # the global generator was seeded once, in the zygote
    _fresh_stdio(request["present"])
    argv = request["argv"]
    sys.argv = ["-m", *argv[3:]]
    sys.orig_argv = list(argv)
    sys.modules["__main__"] = types.ModuleType("__main__")
    os.close(child.ready)  # the caller's Popen returns now
    import runpy

    runpy._run_module_as_main("dgxqueue")  # type: ignore[attr-defined]


def _reset_signals(ignored: set[int], blocked: set[int]) -> None:
    """Every disposition as a fresh ``python`` has it: the caller's ignored ones ignored, the rest at
    their default, SIGPIPE and SIGXFSZ ignored and SIGINT raising KeyboardInterrupt (unless ignored)."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):  # the C library's own real-time signals refuse
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if signal.SIGINT not in ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _forget_unreachable() -> None:
    """Forget preloaded packages this child's ``sys.path`` would not find where the zygote did, so
    that importing them fails or finds another copy, as in a fresh process."""
    for top in ("tests", "workers", "dgxqueue"):
        module = sys.modules.get(top)
        if module is None or not getattr(module, "__path__", None):
            continue
        spec = next((found for finder in sys.meta_path if hasattr(finder, "find_spec")
                     if (found := finder.find_spec(top, None)) is not None), None)
        if spec is None or list(spec.submodule_search_locations or []) != list(module.__path__):
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]


def _fresh_stdio(present: list[bool]) -> None:
    """New sys.stdin, stdout and stderr on the caller's streams, buffered as Python buffers them at start-up."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        old = getattr(sys, name)
        if mode == "w" and old is not None:
            old.flush()
        if not present[fd]:
            setattr(sys, name, None)
            setattr(sys, f"__{name}__", None)
            continue
        tty = os.isatty(fd)
        buffered = open(fd, mode + "b", closefd=False)  # noqa: SIM115  (the process's stream from now on)
        stream = io.TextIOWrapper(
            buffered, encoding=old.encoding if old is not None else None,
            errors=old.errors if old is not None else None, newline="\n",
            line_buffering=(tty and mode == "w") or name == "stderr",
            write_through=name == "stderr")
        stream.mode = mode  # type: ignore[misc]
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    # Ctrl-C at the terminal, or a test's signal to its own process group, is not for the zygote
    # (its children put SIGINT back as their caller has it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _preload()
    # OpenBLAS starts its threads when numpy loads (unless OMP_NUM_THREADS=1, as the xdist workers
    # set it), and stops them around a fork itself; a Python thread would be unsafe to fork.
    if threading.active_count() != 1:
        print(f"zygote: {threading.enumerate()} after the imports: forking is unsafe", file=sys.stderr)
        sys.exit(70)
    # Out of the collector's sight: else every child's collections, and the one at its exit, walk
    # (and copy, page by page) the whole preloaded heap, a third of a CPU-second each.
    gc.collect()
    gc.freeze()
    server = _Server(control)
    child = server.serve()
    if child is not None:
        _become(child)
    elif server.account:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(server.account, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "argv": sys.orig_argv, "cpu": usage.ru_utime + usage.ru_stime,
                                  "wall": None, "via": "zygote-self"}) + "\n")


if __name__ == "__main__":
    main()
