"""The worker daemon: :class:`Daemon` and :func:`run_worker`, what ``dgxqueue worker`` runs."""

from __future__ import annotations

import signal
from types import FrameType

from dgxqueue.config import Settings
from dgxqueue.daemon.daemon import EXIT_JOB_TIMEOUT, EXIT_MACHINE_FAULT, Daemon, new_worker_id
from dgxqueue.daemon.hooks import DaemonInfo, HookChain, Hooks
from dgxqueue.generators import Generator, create_generator
from dgxqueue.storage.database import ensure_schema, get_engine
from dgxqueue.systemd import Notifier

__all__ = ["EXIT_JOB_TIMEOUT", "EXIT_MACHINE_FAULT", "Daemon", "DaemonInfo", "HookChain", "Hooks",
           "new_worker_id", "run_worker"]


def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    worker_id: str | None = None,
    generator: Generator | None = None,
) -> int:
    """Build the daemon from settings, serve metrics, handle signals, run; returns
    :meth:`Daemon.run`'s exit code. SIGTERM, SIGINT and SIGHUP all stop gracefully (a second one
    at once): settings are read once, so a reload is a restart (``systemctl restart``)."""
    from prometheus_client import CollectorRegistry

    from dgxqueue.logs import LogHooks, configure_logging
    from dgxqueue.metrics import DaemonMetrics, start_metrics_server

    configure_logging(settings.logging)
    engine = get_engine(settings.database.url, settings.database)
    ensure_schema(engine)
    backend = generator or create_generator(settings.generator.name, settings.generator.options)
    worker_id = worker_id or new_worker_id()
    hooks: list[Hooks] = [LogHooks(worker_id=worker_id)]
    registry = CollectorRegistry()
    if settings.metrics.enabled:
        hooks.insert(0, DaemonMetrics(
            registry, engine, depth_cache_seconds=settings.metrics.depth_cache_seconds))
    daemon = Daemon(settings, engine=engine, generator=backend, hooks=HookChain(hooks),
                    notifier=Notifier(), worker_id=worker_id)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop(immediate=daemon.stopping)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    server = None
    try:
        if settings.metrics.enabled:
            server = start_metrics_server(settings.metrics.address, settings.metrics.port, registry,
                                          is_healthy=daemon.healthy)
        return daemon.run(burst=burst)
    finally:
        if server is not None:
            server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.dispose()
