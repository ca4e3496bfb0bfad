"""dgxqueue: a persistent job queue and worker daemon for AI music generation."""

from __future__ import annotations

__version__ = "0.1.0"
