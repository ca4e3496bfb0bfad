"""``dgxqueue worker``: build the daemon from settings, say where everything is, run it.

The worker never creates or migrates its database (``open_queue(create="never")``): a mistyped
``DATABASE_URL`` stops it with exit 69 naming the location, instead of leaving it idling on a
second, empty queue. Its first log line names the database, the outputs folder and the address
``/metrics`` really listens on. SIGTERM and SIGINT stop it gracefully from the moment the command
starts, so a stop during start-up is a clean exit rather than death by the signal's default action.
SIGHUP stops it too: settings are read once, so a reload is a restart (``systemctl restart``).
Under ``nohup`` SIGHUP stays ignored, and so does SIGINT in a background job (``worker &``) of a
non-interactive shell: a signal the worker was started ignoring stays ignored (SIGTERM excepted).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

from dgxqueue.cli.common import EX_UNAVAILABLE, CliError
from dgxqueue.cli.stopsignals import catch, restore
from dgxqueue.config import Settings
from dgxqueue.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dgxqueue.daemon import Daemon
    from dgxqueue.metrics import MetricsServer


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP handlers installed before anything slow: each one asks the
    daemon to stop (the second one at once), remembered until the daemon exists. SIGHUP and SIGINT
    stay ignored if the worker was started ignoring them (``nohup``, ``worker &``)."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.requests = 0
        self.daemon: Daemon | None = None
        # SIGTERM is caught even if ignored at start: it is a supervisor's stop request, and a
        # stop it cannot deliver ends in SIGKILL with the running jobs left to the lease rescue.
        self.previous = catch((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.requests += 1
        if signum == signal.SIGINT and self.requests == 1 and os.isatty(2):
            # os.write, not print: a signal handler may interrupt a write to sys.stderr.
            os.write(2, (f"\ndgxqueue: stopping: no new jobs; the running ones get up to "
                         f"{self.grace_seconds:g} s to finish. Ctrl-C again releases them at once "
                         "(back to the queue).\n").encode())
        if self.daemon is not None:
            self.daemon.request_stop(immediate=self.daemon.stopping)

    def attach(self, daemon: Daemon) -> None:
        self.daemon = daemon
        for _ in range(self.requests):
            daemon.request_stop(immediate=daemon.stopping)

    def restore(self) -> None:
        restore(self.previous)


def _start_metrics(settings: Settings, registry: CollectorRegistry, daemon: Daemon) -> MetricsServer:
    """The ``/metrics`` server, or an error that says which setting to change."""
    from dgxqueue.metrics import start_metrics_server

    address, port = settings.metrics.address, settings.metrics.port
    try:
        return start_metrics_server(address, port, registry, is_healthy=daemon.healthy)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CliError(
                f"metrics.port {port} on {address} is already in use (another worker?): give this one "
                "another port with --metrics-port N (0 picks a free one), or turn metrics off with "
                "metrics.enabled = false", EX_UNAVAILABLE) from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError("metrics.address", address, f"an address of this machine ({exc})") from None
        raise


def run_worker(settings: Settings, *, burst: bool = False, worker_id: str | None = None) -> int:
    """Check the database, build the daemon, serve metrics, log where everything is, run; returns
    :meth:`Daemon.run`'s exit code (0, or the daemon's own for a machine fault or a stuck job)."""
    signals = StopSignals(settings.worker.grace_seconds)  # first: a stop during start-up is clean
    engine = None
    server = None
    try:
        from dgxqueue.daemon import Daemon, HookChain, Hooks, new_worker_id
        from dgxqueue.generators import create_generator
        from dgxqueue.logs import LogHooks, configure_logging, get_logger
        from dgxqueue.storage.database import describe_url, open_queue
        from dgxqueue.systemd import Notifier

        configure_logging(settings.logging)
        engine = open_queue(settings.database.url, settings.database, create="never")
        backend = create_generator(settings.generator.name, settings.generator.options)
        worker_id = worker_id or new_worker_id()
        hooks: list[Hooks] = [LogHooks(worker_id=worker_id)]
        registry = None
        if settings.metrics.enabled:  # only then: prometheus_client and its HTTP server are imported
            from prometheus_client import CollectorRegistry

            from dgxqueue.metrics import DaemonMetrics

            registry = CollectorRegistry()
            hooks.insert(0, DaemonMetrics(
                registry, engine, depth_cache_seconds=settings.metrics.depth_cache_seconds))
        daemon = Daemon(settings, engine=engine, generator=backend, hooks=HookChain(hooks),
                        notifier=Notifier(), worker_id=worker_id)
        if registry is not None:
            server = _start_metrics(settings, registry, daemon)
        get_logger("dgxqueue.worker").info(
            "worker starting", worker_id=worker_id, database=describe_url(settings.database.url),
            outputs=str(settings.outputs_dir.absolute()),
            metrics=f"{server.url}/metrics" if server is not None else "off (metrics.enabled = false)",
        )
        signals.attach(daemon)
        code = daemon.run(burst=burst)
    finally:
        if server is not None:
            server.close()
        signals.restore()
        if engine is not None:
            engine.dispose()
    if daemon.runner.busy:
        # A backend call given up on (a grace period over during a step, a stuck call) is still
        # running on its thread: the interpreter's teardown would pull the backend's native
        # libraries from under it (torch aborts: "terminate called without an active exception",
        # exit -6 in place of this code). Its jobs are given back or left to the lease rescue.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
