"""Administration: mark, cancel, retry and delete jobs (the specification's calls and the CLI's),
and pause or resume the claiming of a model.

Callers own the session and its transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dgxqueue.errors import InvalidStateError
from dgxqueue.storage import queue
from dgxqueue.storage.dberrors import violates_unique
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import (
    COMPLETED,
    DEDUPE_INDEX,
    FAILED,
    PAUSED,
    PENDING,
    PROCESSING,
    G,
    Generation,
    GenerationStatus,
)
from dgxqueue.storage.reads import require_job
from dgxqueue.storage.validation import validate_model_name, validate_pause_reason

CANCELLED_MESSAGE = "cancelled by request"
CANCELLED_RUNNING_MESSAGE = "cancelled by request while it ran"
#: PostgreSQL channel a cancel of a running job notifies (payload: the job id), so its daemon
#: stops it at once instead of at its next heartbeat.
CANCEL_CHANNEL = "dgxqueue_cancel"


def delete_job(session: Session, job_id: str) -> bool:
    result = session.execute(sa.delete(G).where(G.c.id == job_id))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def set_outcome(
    session: Session, job_id: str, status: GenerationStatus, values: Mapping[str, Any]
) -> Generation:
    """The specification's complete/fail: from pending or processing, unfenced (producer side).
    ``completed_at`` is the database's now, not the caller's clock (prune and archive count from it)."""
    profile = profile_of(session.get_bind().dialect)
    ended = session.execute(profile.announce(  # an outcome: published as a daemon's is
        sa.update(G)
        .where(G.c.id == job_id, G.c.status.in_((PENDING, PROCESSING)))
        .values(status=status.value, completed_at=profile.now(), worker_id=None, lease_expires_at=None,
                **({"progress_done": queue.DONE_AT_COMPLETION} if status == GenerationStatus.COMPLETED else {}),
                **values)
        .returning(G.c.id), queue.EVENTS_CHANNEL,
    )).first()
    if ended is None:
        job = require_job(session, job_id)
        raise InvalidStateError(f"generation {job_id} is already {job.status}; cannot mark it {status}")
    return require_job(session, job_id)


def cancel_job(session: Session, job_id: str) -> Generation:
    """Cancel a job. A pending one becomes failed at once ('cancelled by request', ``cancelled_at``
    set). A running one gets ``cancel_requested_at``: its daemon notices at its next heartbeat
    (on PostgreSQL at once, through :data:`CANCEL_CHANNEL`), stops it and records it failed with
    ``cancelled_at``. Until then it stays ``processing``; a result that commits first wins (the
    job completes and keeps ``cancel_requested_at`` as a trace). Finished jobs refuse. Its times
    are the database's now, not the caller's clock."""
    profile = profile_of(session.get_bind().dialect)
    now = profile.now()
    # An outcome no daemon records: published here, as a daemon's are, for listeners and waiters.
    ended = session.execute(profile.announce(
        sa.update(G).where(G.c.id == job_id, G.c.status == PENDING)
        .values(status=FAILED, error_message=CANCELLED_MESSAGE, completed_at=now, cancel_requested_at=now,
                cancelled_at=now)
        .returning(G.c.id), queue.EVENTS_CHANNEL,
    )).first()
    if ended is not None:
        return require_job(session, job_id)
    asked = session.execute(
        sa.update(G).where(G.c.id == job_id, G.c.status == PROCESSING)
        .values(cancel_requested_at=sa.func.coalesce(G.c.cancel_requested_at, now))
    )
    if asked.rowcount == 1:  # type: ignore[attr-defined]
        statement = profile_of(session.get_bind().dialect).notify()
        if statement is not None:  # delivered when the transaction commits
            session.execute(statement, {"channel": CANCEL_CHANNEL, "model": job_id})
        return require_job(session, job_id)
    job = require_job(session, job_id)
    raise InvalidStateError(f"generation {job_id} is already {job.status}; only pending or running jobs can be "
                            "cancelled")


#: The generations table under another name: a retry looks for another row holding its key.
_HOLDER = G.alias("holder")


def retry_job(session: Session, job_id: str, run_after: datetime | None = None) -> Generation:
    """Send a failed job back to pending with a fresh set of attempts. An expired job loses its
    expiry (else the next rescue would expire it again, unrun); a job whose ``dedupe_key`` another
    unfinished job holds now is refused (the key's index allows one holder), and so is one whose
    ``file_path`` another job took while it was failed (a failed job holds no path: migration 007)."""
    key = profile_of(session.get_bind().dialect).path_key
    key_holder = sa.select(_HOLDER.c.id).where(
        _HOLDER.c.dedupe_key == G.c.dedupe_key, _HOLDER.c.id != G.c.id,
        _HOLDER.c.status.in_((PENDING, PROCESSING)))
    path_holder = sa.select(_HOLDER.c.id).where(
        key(_HOLDER.c.file_path) == key(G.c.file_path), _HOLDER.c.file_path == G.c.file_path,
        _HOLDER.c.id != G.c.id, _HOLDER.c.status != sa.literal_column(f"'{FAILED}'"))
    retry = (
        sa.update(G).where(G.c.id == job_id, G.c.status == FAILED, ~key_holder.exists(), ~path_holder.exists())
        .values(status=PENDING, attempts=0, error_message=None, completed_at=None,
                run_after=run_after, worker_id=None, claimed_at=None, lease_expires_at=None,
                generation_time_seconds=None, file_size_bytes=None, cancel_requested_at=None, cancelled_at=None,
                progress_done=None, progress_total=None,
                expires_at=sa.case((G.c.expired_at.is_(None), G.c.expires_at), else_=None), expired_at=None)
    )
    if not _retried(session, retry):
        job = require_job(session, job_id)
        if job.status != FAILED:
            raise InvalidStateError(f"generation {job_id} is {job.status}; only failed jobs can be retried")
        held_by = None if job.dedupe_key is None else session.execute(
            sa.select(G.c.id).where(G.c.dedupe_key == job.dedupe_key, G.c.status.in_((PENDING, PROCESSING)))
        ).scalar()
        if held_by is not None:
            raise InvalidStateError(f"generation {job_id} cannot be retried: its dedupe_key is held by the "
                                    f"unfinished job {held_by}")
        taken_by = session.execute(sa.select(G.c.id).where(
            key(G.c.file_path) == key(sa.literal(job.file_path, sa.Text)), G.c.file_path == job.file_path,
            G.c.id != job_id, queue.HOLDS_ITS_FILE)).scalar()
        raise InvalidStateError(f"generation {job_id} cannot be retried: its file_path {job.file_path!r} is job "
                                f"{taken_by}'s now (each job's WAV is its own); enqueue it again with another "
                                "file_path")
    return require_job(session, job_id)


def _retried(session: Session, retry: sa.Update) -> bool:
    """Run ``retry``; whether it sent the job back. On PostgreSQL a retry's holder check cannot see
    a holder another transaction has not committed yet (a retry of another job of the same file or
    key, an enqueue of its file): the unique index then refuses the update once that one commits, and
    the savepoint leaves the caller's transaction usable for the refusal's reads. SQLite's one writer
    runs the check and the update with no other writer between them."""
    if profile_of(session.get_bind().dialect).is_file:
        return bool(session.execute(retry).rowcount == 1)  # type: ignore[attr-defined]
    try:
        with session.begin_nested():
            return bool(session.execute(retry).rowcount == 1)  # type: ignore[attr-defined]
    except sa.exc.IntegrityError as exc:
        if violates_unique(exc, queue.PATH_INDEX, "generations.file_path") or violates_unique(
                exc, DEDUPE_INDEX, "generations.dedupe_key"):
            return False
        raise


def delete_finished(session: Session, ids: Sequence[str], chunk: int = 500) -> list[str]:
    """Delete the finished jobs among ``ids``, in chunks (SQLite limits bound parameters).

    Returns the ids really deleted: a job retried meanwhile is pending again and stays.
    """
    deleted: list[str] = []
    for start in range(0, len(ids), chunk):
        deleted.extend(session.execute(
            sa.delete(G).where(G.c.id.in_(ids[start:start + chunk]), G.c.status.in_((COMPLETED, FAILED)))
            .returning(G.c.id)
        ).scalars())
    return deleted


def delete_jobs(session: Session, ids: Sequence[str], chunk: int = 500) -> int:
    """Delete finished jobs by id, in chunks; returns how many went."""
    return len(delete_finished(session, ids, chunk))


# --- pause and resume ------------------------------------------------------------------------


def pause_model(session: Session, model: str, reason: str | None = None) -> bool:
    """Stop every daemon claiming ``model`` (from its next claim; running jobs finish). Returns
    False when it was paused already (its reason is then replaced, its time kept). ``model`` is
    read as enqueue reads it (blanks around it dropped); bad input raises
    :class:`~dgxqueue.errors.ValidationError`."""
    model, reason = validate_model_name(model), validate_pause_reason(reason)
    profile = profile_of(session.get_bind().dialect)
    added = session.execute(
        profile.insert(PAUSED).on_conflict_do_nothing(index_elements=[PAUSED.c.model_name])
        # The database's clock, as a job's created_at: not the clock of whichever host paused it.
        .values(model_name=model, paused_at=profile.now(), reason=reason)
        .returning(PAUSED.c.model_name)
    ).first()
    if added is None:
        session.execute(sa.update(PAUSED).where(PAUSED.c.model_name == model).values(reason=reason))
    return added is not None


def resume_model(session: Session, model: str) -> bool:
    """Let daemons claim ``model`` again, waking the idle ones when the transaction commits (where
    the engine notifies). Returns False when it was not paused. ``model`` is read as
    :func:`pause_model` reads it; a name stored as given (plain SQL) is resumed too."""
    name = validate_model_name(model)
    names = sorted({name, model}) if isinstance(model, str) else [name]
    gone = session.execute(
        sa.delete(PAUSED).where(PAUSED.c.model_name.in_(names)).returning(PAUSED.c.model_name)
    ).first()
    if gone is not None:
        queue.notify(session, [name])
    return gone is not None

