"""dgxqueue: a persistent job queue and worker daemon for AI music generation."""

from __future__ import annotations

__version__ = "0.1.0"

from dgxqueue.api import enqueue, enqueue_many

__all__ = ["__version__", "enqueue", "enqueue_many"]
