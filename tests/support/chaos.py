"""A backend for chaos tests: every render is different, so a file can be matched to its row.

Each call takes ``work_seconds`` (simulated GPU work, so that signals land mid-render) and gives
every request a level drawn at random, unseeded: two attempts of one job render different audio.
If a stale attempt replaced a finished file, the file's measured levels would disagree with the
levels its row records.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence

import numpy as np

from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest


class ChaosGenerator:
    name = "chaos"

    def __init__(self, models: Sequence[str] = ("scripted",), max_batch_size: int = 8,
                 work_seconds: float = 0.1) -> None:
        self.models = frozenset(models)
        self.max_batch_size = max_batch_size
        self.work_seconds = work_seconds
        self._rng = np.random.default_rng()

    def load(self) -> None:
        pass

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return (request.sample_rate, request.channels)

    def validate(self, request: GenerationRequest) -> None:
        pass

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        threading.Event().wait(self.work_seconds)
        results: list[GenerationOutcome] = []
        for request in requests:
            frames = round(request.duration_seconds * request.sample_rate)
            level = float(self._rng.uniform(0.05, 0.95))
            wave = level * np.sin(np.linspace(0.0, 200.0 * np.pi, frames, dtype=np.float64))
            samples = np.repeat(wave.astype(np.float32)[None, :], request.channels, axis=0)
            results.append(GeneratedAudio(samples=samples, sample_rate=request.sample_rate,
                                          metadata={"level": level}))
        return results
