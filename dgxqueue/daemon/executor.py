"""The executor's step: claimed jobs in, rendered and written WAV files (or errors) out.

:func:`prepare` turns claimed rows into generator requests and refuses the ones the backend
rejects. :func:`render` resolves each job's output path (refusing one outside the outputs folder),
runs one batch through the backend and writes each result atomically; it runs on the runner
thread, so it touches no database and returns plain :class:`Outcome` values for the main loop
to record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgxqueue import audio
from dgxqueue.errors import DgxQueueError, GeneratorError, OutputError, PermanentGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationRequest, Generator, seed_for
from dgxqueue.storage.repository import ClaimedJob


@dataclass(frozen=True)
class Work:
    """A claimed job ready for the backend: its request (its file's path is resolved by
    :func:`render`, on the generator thread, to keep the main loop short)."""

    job: ClaimedJob
    request: GenerationRequest


@dataclass(frozen=True)
class Outcome:
    """How one attempt went. ``error`` is None for a completed job."""

    job: ClaimedJob
    error: BaseException | None
    generation_seconds: float
    file_size: int = 0
    audio_seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)


MAX_SEED = 2**31 - 1


def job_seed(job: ClaimedJob) -> int:
    """``metadata.seed`` when the producer chose one, else derived from the job id (stable across
    attempts). A bad one refuses the job."""
    value = (job.metadata or {}).get("seed")
    if value is None:
        return seed_for(job.id)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise PermanentGeneratorError(f"metadata.seed={value!r} is invalid: expected an integer in [0, {MAX_SEED}]")
    return value


def to_request(job: ClaimedJob) -> GenerationRequest:
    return GenerationRequest(
        job_id=job.id, prompt=job.prompt, model_name=job.model_name,
        duration_seconds=job.duration_seconds, sample_rate=job.sample_rate, channels=job.channels,
        seed=job_seed(job), metadata=dict(job.metadata or {}),
    )


def _refusal(job: ClaimedJob, exc: Exception) -> Outcome:
    error = exc if isinstance(exc, GeneratorError) else PermanentGeneratorError(str(exc))
    return Outcome(job, error, 0.0)


def prepare(jobs: Sequence[ClaimedJob], generator: Generator) -> tuple[list[Work], list[Outcome]]:
    """Split claimed jobs into runnable work and immediate failures (requests the backend refuses)."""
    ready: list[Work] = []
    refused: list[Outcome] = []
    for job in jobs:
        try:
            request = to_request(job)
            generator.validate(request)
        except (DgxQueueError, ValueError) as exc:
            refused.append(_refusal(job, exc))
            continue
        ready.append(Work(job, request))
    return ready, refused


def locate(batch: Sequence[Work], outputs_dir: Path) -> tuple[list[tuple[Work, str]], list[Outcome]]:
    """Each job's output path, or its failure when that path is not inside the outputs folder."""
    root = audio.OutputRoot(outputs_dir)  # one per batch: folders' real paths looked up once
    located: list[tuple[Work, str]] = []
    refused: list[Outcome] = []
    for work in batch:
        try:
            located.append((work, root.locate(work.job.file_path)))
        except (OutputError, ValueError) as exc:
            refused.append(_refusal(work.job, exc))
    return located, refused


def _check_shape(result: GeneratedAudio, request: GenerationRequest) -> None:
    frames = round(request.duration_seconds * request.sample_rate)
    if result.sample_rate != request.sample_rate or result.channels != request.channels:
        raise PermanentGeneratorError(
            f"backend returned {result.channels} channel(s) at {result.sample_rate} Hz; "
            f"the job asked for {request.channels} at {request.sample_rate} Hz"
        )
    if abs(result.frames - frames) > 1:
        raise PermanentGeneratorError(f"backend returned {result.frames} frames; the job asked for {frames}")


def render(generator: Generator, batch: Sequence[Work], outputs_dir: Path) -> list[Outcome]:
    """Generate one batch in one backend call and write each file. Runs on the runner thread.

    A job whose file would land outside ``outputs_dir`` fails without reaching the backend.
    """
    located, refused = locate(batch, outputs_dir)
    if not located:
        return refused
    return refused + _render(generator, [w for w, _ in located], [path for _, path in located])


def _render(generator: Generator, batch: Sequence[Work], paths: Sequence[str]) -> list[Outcome]:
    started = time.perf_counter()
    try:
        results = generator.generate([work.request for work in batch])
        if len(results) != len(batch):
            raise PermanentGeneratorError(
                f"backend returned {len(results)} results for a batch of {len(batch)}"
            )
    except Exception as exc:  # the whole batch failed: every job gets this error
        elapsed = time.perf_counter() - started
        return [Outcome(work.job, exc, elapsed) for work in batch]
    generated = time.perf_counter() - started
    outcomes: list[Outcome] = []
    for work, path, result in zip(batch, paths, results, strict=True):
        if isinstance(result, BaseException):
            outcomes.append(Outcome(work.job, result, generated))
            continue
        write_started = time.perf_counter()
        try:
            _check_shape(result, work.request)
            size = audio.write_wav_atomic(path, result, sync_folder=False)
        except (GeneratorError, OutputError) as exc:
            outcomes.append(Outcome(work.job, exc, generated))
            continue
        measured = audio.measure(result)
        metadata = {**work.request.metadata, **result.metadata, **measured}
        outcomes.append(Outcome(
            work.job, None, generated + (time.perf_counter() - write_started), size,
            result.duration_seconds, metadata,
        ))
    # One folder fsync per batch, not per file; an outcome counts as written only after it.
    failed = audio.sync_folders(path for o, path in zip(outcomes, paths, strict=True) if o.error is None)
    if not failed:
        return outcomes
    return [
        Outcome(o.job, failed[path], o.generation_seconds) if o.error is None and path in failed else o
        for o, path in zip(outcomes, paths, strict=True)
    ]
