"""A backend whose jobs advance one progress step per file the test creates, for daemon processes.

A prompt ``paced:N`` (or metadata ``{"paced": N}``, whatever the prompt) reports progress 0/N,
then k/N once the file ``<gate_dir>/<job_id>-<k>`` exists, for k = 1..N, and renders its audio
after the last step; it stops, cancelled, as soon as its control says so. Any other prompt is
:class:`~tests.support.generators.ScriptedGenerator`'s (a plain prompt renders a constant level of
the requested duration at once).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from dgxqueue.errors import JobCancelledError
from dgxqueue.generators import GenerationOutcome, GenerationRequest
from tests.support.generators import ScriptedGenerator


def release_step(gate_dir: Path, job_id: str, step: int) -> None:
    """Let ``job_id`` past ``step``."""
    (gate_dir / f"{job_id}-{step}").touch()


class PacedGenerator(ScriptedGenerator):
    name = "paced"

    def __init__(self, gate_dir: str, models: Sequence[str] = ("scripted",), max_batch_size: int = 1) -> None:
        super().__init__(models=models, max_batch_size=max_batch_size)
        self.gate_dir = Path(gate_dir)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        results: list[GenerationOutcome] = []
        for request in requests:
            steps = request.metadata.get("paced")
            if steps is None and request.prompt.startswith("paced:"):
                steps = request.prompt.split(":")[1]
            if steps is None:
                results.extend(super().generate([request]))
                continue
            total = int(steps)
            request.control.report(0, total)
            wait = threading.Event()
            stopped = False
            for k in range(1, total + 1):
                while not (self.gate_dir / f"{request.job_id}-{k}").exists():
                    if request.control.cancelled:
                        stopped = True
                        break
                    wait.wait(0.01)  # the backend's own pace; the test waits on the row, with a deadline
                if stopped:
                    break
                request.control.report(k, total)
            if stopped:
                results.append(JobCancelledError(f"paced: cancelled at step {k} of {total}"))
                continue
            results.extend(super().generate([GenerationRequest(
                job_id=request.job_id, prompt="done", model_name=request.model_name,
                duration_seconds=request.duration_seconds, sample_rate=request.sample_rate,
                channels=request.channels, seed=request.seed, metadata=request.metadata,
                control=request.control)]))
        return results
