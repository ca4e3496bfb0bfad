"""The executor's step: claimed jobs in, rendered and written WAV files (or errors) out.

:func:`prepare` turns claimed rows into generator requests and refuses the ones the backend
rejects. :func:`render` resolves each job's output path (refusing one outside the outputs folder,
or one where a file exists already: never this job's, so never replaced),
runs one batch through the backend and writes each result beside its path under a temporary name
of its attempt (:mod:`~dgxqueue.daemon.staging`); it runs on the runner thread, so it touches no
database and returns plain :class:`Attempt` values for the main loop to record. The main loop
renames a result into place only once its outcome has committed.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from dgxqueue import audio
from dgxqueue.daemon import staging
from dgxqueue.daemon.runner import Doing
from dgxqueue.errors import DgxQueueError, GeneratorError, JobCancelledError, OutputError, PermanentGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationRequest, Generator, seed_for
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.validation import steering_value, unstorable

log = structlog.get_logger("dgxqueue.daemon")


@dataclass(frozen=True)
class Work:
    """A claimed job ready for the backend: its request (its file's path is resolved by
    :func:`render`, on the generator thread, to keep the main loop short). ``validated``: the
    backend's ``validate`` accepted it; one not validated yet is, in its own backend call
    (:mod:`~dgxqueue.daemon.isolation`)."""

    job: ClaimedJob
    request: GenerationRequest
    validated: bool = True


@dataclass(frozen=True)
class Attempt:
    """How one attempt went. ``error`` is None for a completed job, whose file waits in
    ``staged`` until the outcome commits."""

    job: ClaimedJob
    error: BaseException | None
    generation_seconds: float
    file_size: int = 0
    audio_seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    staged: audio.StagedWav | None = None


def discard(outcomes: Sequence[Attempt]) -> None:
    """Delete the files of outcomes that will not be recorded (an abandoned call's)."""
    for outcome in outcomes:
        if outcome.staged is not None:
            outcome.staged.discard()


class Handoff:
    """One backend call's outcomes, passed from the runner thread to the main loop unless the
    loop gave up on the call first: then the call's files are deleted, never published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._delivered: list[Attempt] | None = None

    def deliver(self, outcomes: list[Attempt]) -> list[Attempt]:
        """On the runner thread, as the call returns: its outcomes, or none if it was abandoned."""
        with self._lock:
            if not self._abandoned:
                self._delivered = outcomes
                return outcomes
        discard(outcomes)
        if any(o.error is None for o in outcomes):
            log.warning("an abandoned backend call returned; its files were deleted, not published",
                        jobs=[o.job.id for o in outcomes])
        return []

    def abandon(self) -> None:
        """On the main loop, giving up on the call: outcomes delivered too late to be read are
        discarded now, later ones as they arrive."""
        with self._lock:
            self._abandoned = True
            late, self._delivered = self._delivered or [], None
        discard(late)


def job_metadata(job: ClaimedJob) -> dict[str, Any]:
    """The job's metadata. The API only stores JSON objects; a row written by plain SQL may hold
    any JSON, and anything else refuses the job rather than stopping the daemon."""
    metadata = job.metadata
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise PermanentGeneratorError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    # Checked before the render: its outcome would carry this metadata into a write that fails.
    why = unstorable_json(metadata)
    if why:
        raise PermanentGeneratorError(f"{why}; the stored metadata cannot be written back")
    return dict(metadata)


def unstorable_json(metadata: Mapping[str, Any]) -> str | None:
    """Why ``metadata`` cannot be written to the metadata column (naming the key), or None. The
    door's rule, so that a job it accepted is never refused here for its own metadata."""
    problem = unstorable(metadata)
    return None if problem is None else " ".join(problem)


def job_seed(job: ClaimedJob) -> int:
    """``metadata.seed`` when the producer chose one, else derived from the job id (stable across
    attempts). A bad one refuses the job."""
    value = job_metadata(job).get("seed")
    if value is None:
        return seed_for(job.id)
    try:
        return int(steering_value("seed", value))  # the door's rule: a job it accepts passes here
    except ValueError as exc:
        raise PermanentGeneratorError(f"metadata.seed={value!r} is invalid: expected {exc}") from None


def to_request(job: ClaimedJob) -> GenerationRequest:
    return GenerationRequest(
        job_id=job.id, prompt=job.prompt, model_name=job.model_name,
        duration_seconds=job.duration_seconds, sample_rate=job.sample_rate, channels=job.channels,
        seed=job_seed(job), metadata=job_metadata(job),
    )


def _refusal(job: ClaimedJob, exc: Exception) -> Attempt:
    error = exc if isinstance(exc, GeneratorError) else PermanentGeneratorError(str(exc))
    return Attempt(job, error, 0.0)


def prepare(jobs: Sequence[ClaimedJob], generator: Generator,
            doing: Doing | None = None) -> tuple[list[Work], list[Attempt]]:
    """Split claimed jobs into runnable work and immediate failures (requests the backend refuses).

    Any other exception (a row no producer of ours writes, a bug in ``validate``) fails only its
    job, decided like an unexpected error from the backend, instead of stopping the daemon on
    the same row at every restart. ``doing``: told of each ``validate`` before it is called."""
    ready: list[Work] = []
    refused: list[Attempt] = []
    for job in jobs:
        if job.defect is not None:  # the row itself: retrying cannot help
            refused.append(Attempt(job, PermanentGeneratorError(job.defect), 0.0))
            continue
        try:
            request = to_request(job)
        except (DgxQueueError, ValueError) as exc:
            refused.append(_refusal(job, exc))
            continue
        except Exception as exc:
            refused.append(Attempt(job, exc, 0.0))
            continue
        refusal = validate(job, request, generator, doing)
        if refusal is None:
            ready.append(Work(job, request))
        else:
            refused.append(refusal)
    return ready, refused


def validate(job: ClaimedJob, request: GenerationRequest, generator: Generator,
             doing: Doing | None = None) -> Attempt | None:
    """The job's failure if the backend refuses its request, else None: the one rule for every
    path that validates (a claim's, a call's, a job joining a running batch). A typed refusal
    (:class:`~dgxqueue.errors.DgxQueueError`, ``ValueError``) fails the job for good unless it is
    a transient :class:`~dgxqueue.errors.GeneratorError`; any other exception is the job's
    unexpected error, decided as one the backend raised from ``generate`` (retried while
    ``worker.retry_unexpected_errors``, a machine fault judged as one), a SystemExit or
    KeyboardInterrupt too (:mod:`~dgxqueue.daemon.runner`: on its thread they are the backend's
    own). ``doing``: told first."""
    if doing is not None:
        doing("validate", job.id)
    try:
        generator.validate(request)
    except BaseException as exc:  # SystemExit too: the backend's own on the runner's thread
        return backend_error(job, exc)
    return None


def backend_error(job: ClaimedJob, exc: BaseException) -> Attempt:
    """The job's failure for ``exc``, raised by a backend method on its request before its
    render (``validate``, ``batch_key``), by :func:`validate`'s rule: a typed
    refusal fails it for good unless transient; anything else is its unexpected error."""
    if isinstance(exc, (DgxQueueError, ValueError)):
        return _refusal(job, exc)
    return Attempt(job, exc, 0.0)


def locate(batch: Sequence[Work], root: audio.OutputRoot,
           running: Sequence[tuple[ClaimedJob, str]] = ()) -> tuple[list[tuple[Work, str]], list[Attempt]]:
    """Each job's output path, or its failure when that path is not inside the outputs folder or
    something is there already (see :func:`occupied`): checked before the render, so the backend
    does not spend a job's time on a file it may not write. ``running``: the jobs (and their
    paths) rendering beside these, as a running batch's slots are, or whose results are still to
    be published (:meth:`Completer.publishing <dgxqueue.daemon.completer.Completer.publishing>`).

    Nor may a job share a file with one of ``running`` (paths that lead to one through a link) or
    have its file be a folder on the other's path, or the reverse: nothing is at either path until
    the commits, so neither check would see the other, and the second rename would replace the
    first job's WAV or fail under its completed row. The job fails (:func:`collides`). Jobs of
    ``batch`` are not checked against each other here: one that fails or is cancelled never writes
    its file, so :func:`stage` checks them against the batch-mates it has written."""
    located: list[tuple[Work, str]] = []
    refused: list[Attempt] = []
    beside = Paths(root, running)
    for work in batch:
        try:
            path, taken = root.place(work.job.file_path, owner=work.job.id)
        except (OutputError, ValueError) as exc:
            refused.append(_refusal(work.job, exc))
            continue
        if taken:
            refused.append(Attempt(work.job, occupied(work.job, path), 0.0))
            continue
        other = beside.other(work.job, path)
        if other is not None:
            refused.append(Attempt(work.job, collides(work.job, path, other), 0.0))
            continue
        located.append((work, path))
    return located, refused


class Paths:
    """The files of jobs that are, or may yet be, put in place beside a job's, and the folders on
    their way (under the outputs folder ``root``): what a job's own file must not be or be under."""

    def __init__(self, root: audio.OutputRoot | str, jobs: Sequence[tuple[ClaimedJob, str]] = ()) -> None:
        self._inside = root if isinstance(root, str) else root.real
        self._files: dict[str, ClaimedJob] = {}
        self._folders: dict[str, ClaimedJob] = {}
        for job, path in jobs:
            self.add(job, path)

    def add(self, job: ClaimedJob, path: str) -> None:
        self._files[path] = job
        self._folders.update((folder, job) for folder in _folders(path, self._inside))

    def other(self, job: ClaimedJob, path: str) -> ClaimedJob | None:
        """The job whose file ``path`` (``job``'s) would be, or lie under or above; None if none, or
        only ``job`` itself (its own older attempt never publishes now)."""
        if not self._files:
            return None
        other = (self._files.get(path) or self._folders.get(path)
                 or next((self._files[f] for f in _folders(path, self._inside) if f in self._files), None))
        return None if other is None or other.id == job.id else other


def pending_files(outcomes: Sequence[Attempt]) -> list[tuple[ClaimedJob, str]]:
    """The jobs among ``outcomes`` whose staged file waits for its commit, with their paths: written
    and renamed while the next call renders, so after its jobs' checks."""
    return [(o.job, o.staged.path) for o in outcomes if o.staged is not None]


def _folders(path: str, inside: str) -> list[str]:
    """The folders between the outputs folder (its real path ``inside``) and the file ``path`` (a located path)."""
    found = []
    folder = os.path.dirname(path)
    while len(folder) > len(inside) and folder.startswith(inside + os.sep):
        found.append(folder)
        folder = os.path.dirname(folder)
    return found


def collides(job: ClaimedJob, path: str, other: ClaimedJob) -> PermanentGeneratorError:
    """The error of a job whose path is, or lies under or above, the path of ``other``, rendered
    beside it and written first (or still rendering in a running batch, or waiting to be
    published): each job's WAV is its own, and the first of the two keeps it."""
    return PermanentGeneratorError(
        f"file_path {job.file_path} leads to {path}, which collides with the file of job {other.id}"
        f" (file_path {other.file_path}) rendered beside it: one would be the other's file or folder."
        " Enqueue the job again with another file_path"
    )


def occupied(job: ClaimedJob, path: str) -> PermanentGeneratorError:
    """The error of a job whose path holds something already: not its output (a job's file is put
    there only after its attempt is recorded completed, and a completed job never runs again; one
    the job wrote itself, whose completion the database lost, is told apart by
    :data:`audio.OWNER_XATTR` and replaced) but an archived job's, another queue's or a user's,
    never replaced. The job's input names a taken file: it fails, permanently and alone, never as
    the machine's fault. A WAV of another job (:func:`audio.holder`) is named: most often a job of
    the call before, whose rename beat this job's checks (else :func:`collides` names it)."""
    holder = audio.holder(path)
    what = "is not this job's output" if holder is None else f"is the WAV of job {holder}, not this job's"
    return PermanentGeneratorError(
        f"file_path {job.file_path} already exists ({path}) and {what}; it was left as it is."
        f" Remove or move it, then run `dgxqueue retry {job.id}`, or enqueue the job again with another file_path"
    )


def _check_shape(result: GeneratedAudio, request: GenerationRequest) -> None:
    frames = round(request.duration_seconds * request.sample_rate)
    if result.sample_rate != request.sample_rate or result.channels != request.channels:
        raise PermanentGeneratorError(
            f"backend returned {result.channels} channel(s) at {result.sample_rate} Hz; "
            f"the job asked for {request.channels} at {request.sample_rate} Hz"
        )
    if result.frames != frames:
        raise PermanentGeneratorError(f"backend returned {result.frames} frames; the job asked for {frames}")


def _storable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The backend's metadata as the JSON column stores it: numpy scalars become Python numbers.
    What JSON cannot hold (NaN, infinities, other objects) fails the job, naming the key, before
    its outcome could fail the whole write."""
    if not metadata:
        return {}
    if not isinstance(metadata, Mapping):
        raise PermanentGeneratorError(f"backend metadata must be a mapping, not {type(metadata).__name__}")
    return {str(key): _json_value(value, f"metadata.{key}") for key, value in metadata.items()}


def _json_value(value: Any, name: str) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            raise PermanentGeneratorError(f"backend returned {name}={value!r}: JSON has no non-finite numbers")
        return float(value)
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise PermanentGeneratorError(f"backend returned {name} of type {type(value).__name__}, which JSON cannot hold")


def render(generator: Generator, batch: Sequence[Work], outputs_dir: Path, worker_id: str,
           beside: Sequence[tuple[ClaimedJob, str]] = (), doing: Doing | None = None) -> list[Attempt]:
    """Generate one batch in one backend call and stage each file (written and fsynced under its
    attempt's temporary name, ``worker_id`` naming the attempt with the job's ``attempt``; the
    folders fsynced once). Runs on the runner thread. The caller publishes or discards each
    completed outcome's ``staged`` file, after its outcome write. ``beside``: the jobs whose
    results are still to be published meanwhile, with their paths (see :func:`locate`).

    A job whose file would land outside ``outputs_dir`` fails without reaching the backend, and
    again at the write if a folder on its path became a link meanwhile. ``doing``: told of the
    ``generate`` call, and for which jobs, before it is made.
    """
    if doing is not None:
        doing("files", *(work.job.id for work in batch))
    root = audio.OutputRoot(outputs_dir)  # one per batch: folders' real paths looked up once
    located, refused = locate(batch, root, beside)
    if not located:
        return refused
    paths = [path for _, path in located]
    return refused + _render(generator, [w for w, _ in located], paths, root.real, worker_id, doing)


def cancelled(job: ClaimedJob, generation_seconds: float = 0.0) -> Attempt:
    """The attempt of a job whose cancel was asked while it ran."""
    return Attempt(job, JobCancelledError("cancelled by request while it ran"), generation_seconds)


def _render(generator: Generator, batch: Sequence[Work], paths: Sequence[str], inside: str,
            worker_id: str, doing: Doing | None) -> list[Attempt]:
    stopped = [cancelled(work.job) for work in batch if work.request.control.cancelled]
    if stopped:  # cancelled before its call began: the backend never sees it
        kept = [(work, path) for work, path in zip(batch, paths, strict=True) if not work.request.control.cancelled]
        if not kept:
            return stopped
        return stopped + _render(generator, [w for w, _ in kept], [p for _, p in kept], inside, worker_id, doing)
    if doing is not None:
        doing("generate", *(work.job.id for work in batch))
    started = time.perf_counter()
    try:
        results = generator.generate([work.request for work in batch])
        if len(results) != len(batch):
            raise PermanentGeneratorError(
                f"backend returned {len(results)} results for a batch of {len(batch)}"
            )
    except BaseException as exc:  # the whole batch failed, by SystemExit too (see runner): every job gets this error
        elapsed = time.perf_counter() - started
        return [Attempt(work.job, exc, elapsed) for work in batch]
    if doing is not None:
        doing("files", *(work.job.id for work in batch))
    return stage(batch, paths, results, time.perf_counter() - started, inside, worker_id)


def stage(batch: Sequence[Work], paths: Sequence[str], results: Sequence[Any], generated: float, inside: str,
          worker_id: str) -> list[Attempt]:
    """Stage the file of each result (in order with ``batch`` and its located ``paths``), or record
    why not; the folders fsynced once. ``inside``: the outputs folder's real path. Runs on the
    runner thread."""
    folders = audio.Folders(inside)  # each folder opened and checked once a batch
    try:
        outcomes = _write(batch, paths, results, generated, folders, inside, worker_id)
        # One folder fsync per batch, not per file: the temporaries' names become durable before
        # any outcome commits, so a crash after the commit leaves a temporary the sweep renames.
        failed = folders.sync()
    finally:
        folders.release()  # the staged files hold the folders until they are settled
    if not failed:
        return outcomes
    discard([o for o, folder in zip(outcomes, map(audio.folder_of, paths), strict=True) if folder in failed])
    return [
        Attempt(o.job, failed[folder], o.generation_seconds) if o.error is None and folder in failed else o
        for o, folder in zip(outcomes, map(audio.folder_of, paths), strict=True)
    ]


def _write(batch: Sequence[Work], paths: Sequence[str], results: Sequence[Any], generated: float,
           folders: audio.Folders, inside: str, worker_id: str) -> list[Attempt]:
    """Stage each result's file (or record why not); the folders' fsync is the caller's. A job
    whose path collides with a batch-mate's written before it fails (:func:`collides`): only a
    batch-mate that writes its file blocks it, never one that failed or was cancelled."""
    outcomes: list[Attempt] = []
    written = Paths(inside)
    for work, path, result in zip(batch, paths, results, strict=True):
        if work.request.control.cancelled:  # whatever the backend returned: never written
            outcomes.append(cancelled(work.job, generated))
            continue
        if isinstance(result, BaseException):
            outcomes.append(Attempt(work.job, result, generated))
            continue
        write_started = time.perf_counter()
        try:
            if not isinstance(result, GeneratedAudio):
                raise PermanentGeneratorError(
                    f"backend returned {type(result).__name__}, not GeneratedAudio or an exception")
            _check_shape(result, work.request)
            metadata = {**work.request.metadata, **_storable(result.metadata), **audio.measure(result)}
            # Before the file: the outcome write must not fail on its data, and a job recorded
            # failed leaves no file behind.
            why = unstorable_json(metadata)
            if why:
                raise PermanentGeneratorError(f"{why}; the result cannot be recorded")
            job = work.job
            other = written.other(job, path)
            if other is not None:  # before the file check: the other's temporary made the folder
                raise collides(job, path, other)
            # Again at the write: the file may have appeared while the backend rendered. One that
            # appears after this is not replaced either: the rename after the commit refuses it.
            if audio.taken(path, job.id):
                raise occupied(job, path)
            staged = audio.stage_wav(path, result, tag=staging.tag(job.id, job.attempt, worker_id), folders=folders,
                                     owner=job.id)
        except Exception as exc:  # this job's alone: the others of the batch are written
            outcomes.append(Attempt(work.job, exc, generated))
            continue
        written.add(work.job, path)
        outcomes.append(Attempt(
            work.job, None, generated + (time.perf_counter() - write_started), staged.size,
            result.duration_seconds, metadata, staged,
        ))
    return outcomes
