"""A complete dgxqueue backend: one sine tone per prompt, its pitch set by a config option."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from dgxqueue.errors import PermanentGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest


class ToneGenerator:
    name = "tone"  # shown in logs and in dgxqueue_build_info

    def __init__(self, models: Sequence[str] = ("tone",), max_batch_size: int = 8, pitch_hz: float = 440.0):
        # Called with the [generator.options] table as keyword arguments.
        self.models = frozenset([models] if isinstance(models, str) else models)  # jobs claimed
        self.max_batch_size = max_batch_size  # most requests in one generate() call
        self.pitch_hz = float(pitch_hz)

    def load(self) -> None:
        """Load weights and warm up: called once, before the first claim."""

    def validate(self, request: GenerationRequest) -> None:
        """Refuse what this backend can never render: the job fails at once, never retried."""
        if request.channels not in (1, 2):
            raise PermanentGeneratorError(f"tone renders 1 or 2 channels, not {request.channels}")

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Requests with equal keys may share one generate() call."""
        return (request.sample_rate, request.channels)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        """One GeneratedAudio, or one GeneratorError, per request, in order."""
        outcomes: list[GenerationOutcome] = []
        for r in requests:
            frames = round(r.duration_seconds * r.sample_rate)  # exactly this many
            t = np.arange(frames) / r.sample_rate
            wave = (0.5 * np.sin(2 * np.pi * self.pitch_hz * t)).astype(np.float32)
            samples = np.tile(wave, (r.channels, 1))  # shape (channels, frames), in [-1, 1]
            outcomes.append(GeneratedAudio(samples, r.sample_rate, {"pitch_hz": self.pitch_hz}))
        return outcomes
