"""dgxqueue: a persistent job queue and worker daemon for AI music generation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dgxqueue.api import enqueue, enqueue_many, pause, paused_models, resume, search_generations
    from dgxqueue.jobs import Job, get_job, submit, wait_all, wait_all_async

__all__ = ["Job", "__version__", "enqueue", "enqueue_many", "get_job", "pause", "paused_models", "resume",
           "search_generations", "submit", "wait_all", "wait_all_async"]
#: The module each lazily imported name comes from.
_LAZY = {**dict.fromkeys(("enqueue", "enqueue_many", "pause", "paused_models", "resume", "search_generations"),
                         "api"),
         **dict.fromkeys(("Job", "get_job", "submit", "wait_all", "wait_all_async"), "jobs")}


def __getattr__(name: str) -> Any:
    # Imported on first use: the API pulls in SQLAlchemy, which ``dgxqueue --version`` and every
    # ``import dgxqueue.<module>`` would otherwise pay for.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"dgxqueue.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dgxqueue' has no attribute {name!r}")
