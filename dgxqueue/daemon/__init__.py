"""The worker daemon: :class:`Daemon`, which ``dgxqueue worker`` builds (:mod:`dgxqueue.cli.worker`)."""

from __future__ import annotations

from dgxqueue.daemon.daemon import EXIT_JOB_TIMEOUT, EXIT_MACHINE_FAULT, Daemon, new_worker_id
from dgxqueue.hooks import DaemonInfo, HookChain, Hooks

__all__ = ["EXIT_JOB_TIMEOUT", "EXIT_MACHINE_FAULT", "Daemon", "DaemonInfo", "HookChain", "Hooks",
           "new_worker_id"]
