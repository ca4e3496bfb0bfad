"""dgxqueue: a persistent job queue and worker daemon for AI music generation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dgxqueue.api import enqueue, enqueue_many, pause, paused_models, resume

__all__ = ["__version__", "enqueue", "enqueue_many", "pause", "paused_models", "resume"]
_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    # Imported on first use: the API pulls in SQLAlchemy, which ``dgxqueue --version`` and every
    # ``import dgxqueue.<module>`` would otherwise pay for.
    if name in _API:
        from dgxqueue import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dgxqueue' has no attribute {name!r}")
