"""The storage API of the user's specification, importable as ``dgxqueue.storage``.

Every function takes the caller's session (from :func:`get_session`) and never commits itself,
so several calls can share one transaction. Inputs are validated before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, make_transient_to_detached

from dgxqueue.config import JobSettings, OutputSettings
from dgxqueue.errors import ValidationError
from dgxqueue.storage import admin, queue, reads
from dgxqueue.storage.database import (
    create_engine,
    dispose_engines,
    ensure_schema,
    get_engine,
    get_session,
    init_db,
    resolve_url,
    session_scope,
)
from dgxqueue.storage.models import Base, Generation, GenerationStatus, Prompt
from dgxqueue.storage.results import storable_text
from dgxqueue.storage.validation import (
    MAX_FILE_SIZE,
    JobSpec,
    validate_job,
    validate_jobs,
    validate_limit,
    validate_prompt,
    validate_run_after,
    validate_status,
)

__all__ = [
    "Base", "Generation", "GenerationStatus", "JobSpec", "Prompt", "Session", "cancel_generation",
    "complete_generation", "create_engine", "create_generation", "create_generations",
    "delete_generation", "dispose_engines", "ensure_schema", "fail_generation", "get_all_generations",
    "get_database_stats", "get_engine", "get_generation", "get_most_used_prompts",
    "get_pending_generations", "get_session", "init_db", "resolve_url", "retry_generation",
    "session_scope", "track_prompt_usage", "validate_job", "validate_jobs",
]

_DEFAULT_LIMITS = JobSettings()
_DEFAULT_OUTPUTS = OutputSettings()


def create_generations(
    session: Session,
    specs: Iterable[Mapping[str, Any] | JobSpec],
    *,
    limits: JobSettings | None = None,
    outputs: OutputSettings | None = None,
) -> list[str]:
    """Validate every spec first, then insert them all and count their prompts, in the caller's
    transaction. Returns the ids.

    Each spec is a mapping of :func:`create_generation`'s keyword arguments, or a :class:`JobSpec`.
    One bad spec raises :class:`~dgxqueue.errors.ValidationError` and nothing is written.
    """
    jobs = validate_jobs(specs, limits=limits or _DEFAULT_LIMITS, outputs=outputs or _DEFAULT_OUTPUTS)
    if not jobs:  # none: the session's transaction is not begun for nothing
        return []
    return queue.insert_jobs(_flushed_connection(session), jobs)


def create_generation(
    session: Session,
    prompt: str,
    model_name: str | None = None,
    duration_seconds: float | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
    file_path: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    model_version: str | None = None,
    priority: int = 0,
    run_after: datetime | timedelta | None = None,
    max_attempts: int | None = None,
    limits: JobSettings | None = None,
    outputs: OutputSettings | None = None,
) -> Generation:
    """Create a pending generation (UUID v4 id) and count its prompt, in the caller's transaction.

    ``file_path`` is relative to the folder that holds the outputs folder (``outputs/x.wav``); left
    out, it is ``outputs/<id>.wav``. ``priority``: higher runs first. ``run_after``: not before
    (a datetime, or a timedelta from the insert by the database's clock).
    """
    job = validate_job(prompt, model_name=model_name, duration_seconds=duration_seconds, sample_rate=sample_rate,
                       channels=channels, file_path=file_path, metadata=metadata, model_version=model_version,
                       priority=priority, run_after=run_after, max_attempts=max_attempts,
                       limits=limits or _DEFAULT_LIMITS, outputs=outputs or _DEFAULT_OUTPUTS)
    # The row as inserted, with created_at from the database's clock (RETURNING, no read back).
    return _persistent(session, queue.insert_job(_flushed_connection(session), job))


def _flushed_connection(session: Session) -> sa.Connection:
    """The session's connection, its pending changes flushed first as ``session.execute`` would
    (unless autoflush is off): else a prompt row the caller added or changed is written after the
    insert's upsert, and fails on the unique index or overwrites the count."""
    if session.autoflush:
        session.flush()
    return session.connection()


def _persistent(session: Session, row: Mapping[str, Any]) -> Generation:
    """The row just inserted as the session's object, as if loaded, without reading it back."""
    # As a query loads a row: the values go straight into the instance's dict, past the attribute
    # events that Generation(**values) would fire for each column.
    job: Generation = _GENERATIONS.class_manager.new_instance()
    values = sa.orm.attributes.instance_dict(job)
    for key, column in _GENERATION_COLUMNS:
        if column.name in row:
            values[key] = row[column.name]
        elif column.server_default is None:
            values[key] = None  # a column the insert leaves out is NULL, unless the server fills it
    make_transient_to_detached(job)  # a column the server filled is loaded on first access
    session.add(job)
    return job


_GENERATIONS = sa.inspect(Generation)
_GENERATION_COLUMNS = tuple((prop.key, prop.columns[0]) for prop in _GENERATIONS.column_attrs)


def get_generation(session: Session, generation_id: str) -> Generation | None:
    """The generation with this id, or None."""
    return reads.get_job(session, generation_id)


def _non_negative(field: str, value: object, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValidationError(field, value, f"a non-negative {'number' if kind is float else 'integer'}")
    if (isinstance(value, float) and not math.isfinite(value)) or value < 0:
        raise ValidationError(field, value, "a finite non-negative number")
    try:
        return kind(value)
    except OverflowError:  # an int past the largest float
        raise ValidationError(field, value, "a finite non-negative number") from None


def _file_size(value: object) -> int:
    size: int = _non_negative("file_size_bytes", value, int)
    if size > MAX_FILE_SIZE:
        raise ValidationError("file_size_bytes", value, f"an integer in [0, {MAX_FILE_SIZE}] (the column is 32-bit)")
    return size


def complete_generation(
    session: Session,
    generation_id: str,
    generation_time: float,
    file_size_bytes: int,
    metadata: Mapping[str, Any] | None = None,
) -> Generation:
    """Mark a pending or processing generation completed with its timings."""
    values: dict[str, Any] = {
        "generation_time_seconds": _non_negative("generation_time", generation_time, float),
        "file_size_bytes": _file_size(file_size_bytes),
        "error_message": None,
    }
    if metadata is not None:
        from dgxqueue.storage.validation import validate_metadata

        values["metadata"] = validate_metadata(metadata, _DEFAULT_LIMITS)
    return admin.set_outcome(session, generation_id, GenerationStatus.COMPLETED, values)


def fail_generation(session: Session, generation_id: str, error_message: str) -> Generation:
    """Mark a pending or processing generation failed with its reason."""
    if not isinstance(error_message, str) or not error_message.strip():
        raise ValidationError("error_message", error_message, "non-empty text")
    return admin.set_outcome(
        session, generation_id, GenerationStatus.FAILED, {"error_message": storable_text(error_message)}
    )


def cancel_generation(session: Session, generation_id: str) -> Generation:
    """Cancel a generation: a pending one is failed at once ('cancelled by request'); a running
    one is marked for its daemon to stop (see :func:`dgxqueue.storage.admin.cancel_job`)."""
    return admin.cancel_job(session, generation_id)


def retry_generation(session: Session, generation_id: str, run_after: datetime | None = None) -> Generation:
    """Send a failed generation back to the queue with fresh attempts."""
    return admin.retry_job(session, generation_id, validate_run_after(run_after))


def get_all_generations(
    session: Session,
    status: GenerationStatus | str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Generation]:
    """Generations, newest first (completed ones by completion time), optionally of one status."""
    chosen = None if status is None else validate_status(status)
    return reads.list_jobs(
        session, chosen, validate_limit(limit), validate_limit(offset, "offset", 10**9)
    )


def get_pending_generations(session: Session, limit: int = 100) -> list[Generation]:
    """Pending generations in the order the daemon will claim them."""
    return reads.pending_jobs(session, validate_limit(limit))


def get_most_used_prompts(session: Session, limit: int = 10) -> list[Prompt]:
    """Prompts by use count, most used first."""
    return reads.most_used_prompts(session, validate_limit(limit))


def delete_generation(session: Session, generation_id: str) -> bool:
    """Delete a generation row (not its file). True if it existed."""
    return admin.delete_job(session, generation_id)


def track_prompt_usage(session: Session, prompt: str, *, limits: JobSettings | None = None) -> Prompt:
    """Count one use of ``prompt`` (atomic upsert) and return its row."""
    text = validate_prompt(prompt, limits or _DEFAULT_LIMITS)
    queue.upsert_prompts(session, {text: 1})
    found = reads.get_prompt(session, text)
    assert found is not None
    session.refresh(found)
    return found


def get_database_stats(session: Session) -> dict[str, Any]:
    """Totals: ``total_generations``, counts by status, prompts, average time, audio seconds."""
    return reads.database_stats(session)
