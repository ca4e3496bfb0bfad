"""A backend that renders silence instantly: the no-op job for tests and throughput benchmarks."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from dgxqueue.errors import PermanentGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest


class SilenceGenerator:
    """Serves model ``silence``; any batch size; every request gets zeros of the right shape."""

    name = "silence"

    def __init__(self, models: Sequence[str] = ("silence",), max_batch_size: int = 64) -> None:
        self.models = frozenset([models] if isinstance(models, str) else models)  # not its letters
        self.max_batch_size = max_batch_size

    def load(self) -> None:
        """Nothing to load."""

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return (request.sample_rate, request.channels)

    def validate(self, request: GenerationRequest) -> None:
        if not 1 <= request.channels <= 2:
            raise PermanentGeneratorError(f"silence renders 1 or 2 channels, not {request.channels}")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        import numpy as np  # here: a producer builds this backend only to read its models

        results: list[GenerationOutcome] = []
        for r in requests:
            try:
                self.validate(r)
            except PermanentGeneratorError as exc:
                results.append(exc)
                continue
            frames = round(r.duration_seconds * r.sample_rate)
            results.append(GeneratedAudio(samples=np.zeros((r.channels, frames), np.float32),
                                          sample_rate=r.sample_rate))
        return results
