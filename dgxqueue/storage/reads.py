"""Reads for people and metrics: a job, lists, prompts, stats and the queue's depth.

Callers own the session. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dgxqueue.errors import JobNotFoundError
from dgxqueue.storage import rowvalues
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import (
    COMPLETED,
    FAILED,
    HOLDS_ITS_FILE_SQL,
    PAUSED,
    PENDING,
    PROCESSING,
    G,
    Generation,
    GenerationStatus,
    P,
    Prompt,
)


def database_now(session: Session) -> datetime:
    """The database's current time: the one clock every host's cutoffs are counted from, since
    a host's own clock may be off or stepped."""
    now = session.execute(sa.select(profile_of(session.get_bind().dialect).now())).scalar_one()
    assert isinstance(now, datetime)  # the engine's own function: never text a row could hold
    return now


def get_prompt(session: Session, text: str) -> Prompt | None:
    return session.scalars(sa.select(Prompt).where(Prompt.text == text)).one_or_none()


def get_job(session: Session, job_id: str) -> Generation | None:
    return session.get(Generation, job_id, populate_existing=True)


def job_ids_between(session: Session, lower: str, upper: str | None, limit: int) -> list[str]:
    """Ids in ``[lower, upper)`` in order, at most ``limit``: a prefix search as a range on the
    primary key, so it uses its index and no pattern is built from the caller's text."""
    query = sa.select(G.c.id).where(G.c.id >= lower)
    if upper is not None:
        query = query.where(G.c.id < upper)
    return list(session.scalars(query.order_by(G.c.id).limit(limit)))


def require_job(session: Session, job_id: str) -> Generation:
    job = get_job(session, job_id)
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def completed_job_at(session: Session, file_path: str) -> tuple[str, Any, Any] | None:
    """``(id, attempts, worker_id)`` of the completed job whose ``file_path`` is exactly
    ``file_path``, if any: at most one, since only failed rows share a path (migration 007's
    unique index, looked up through its key)."""
    key = profile_of(session.get_bind().dialect).path_key
    row = session.execute(
        sa.select(G.c.id, G.c.attempts, G.c.worker_id)
        .where(key(G.c.file_path) == key(sa.literal(file_path, sa.Text)), G.c.file_path == file_path,
               sa.text(HOLDS_ITS_FILE_SQL), G.c.status == COMPLETED)
        .limit(1)).first()
    return None if row is None else (row.id, row.attempts, row.worker_id)


def list_jobs(
    session: Session, status: GenerationStatus | None, limit: int, offset: int
) -> list[Generation]:
    query = sa.select(Generation)
    if status is not None:
        query = query.where(Generation.status == status.value)
    if status is GenerationStatus.COMPLETED:
        query = query.order_by(Generation.completed_at.desc())
    else:
        query = query.order_by(Generation.created_at.desc())
    return list(session.scalars(query.limit(limit).offset(offset)))


def pending_jobs(session: Session, limit: int) -> list[Generation]:
    """Pending jobs in the order the daemon claims them."""
    query = (
        sa.select(Generation).where(Generation.status == PENDING)
        .order_by(Generation.priority.desc(), Generation.created_at).limit(limit)
    )
    return list(session.scalars(query))


def most_used_prompts(session: Session, limit: int) -> list[Prompt]:
    query = sa.select(Prompt).order_by(Prompt.used_count.desc(), Prompt.last_used_at.desc()).limit(limit)
    return list(session.scalars(query))


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(sa.select(G.c.status, sa.func.count()).group_by(G.c.status)).all()
    counts = {status.value: 0 for status in GenerationStatus}
    counts.update({status: n for status, n in rows})
    return counts


def pending_by_model(session: Session) -> dict[str, int]:
    rows = session.execute(
        sa.select(G.c.model_name, sa.func.count()).where(G.c.status == PENDING).group_by(G.c.model_name)
    ).all()
    return {model: n for model, n in rows}


def oldest_pending_created_at(session: Session) -> datetime | None:
    value = session.execute(
        sa.select(sa.func.min(Generation.created_at)).where(Generation.status == PENDING)
    ).scalar_one_or_none()
    return value


def database_stats(session: Session) -> dict[str, Any]:
    counts = count_by_status(session)
    completed = session.execute(
        sa.select(sa.func.avg(G.c.generation_time_seconds), sa.func.sum(G.c.duration_seconds))
        .where(G.c.status == COMPLETED)
    ).one()
    oldest = oldest_pending_created_at(session)
    return {
        "total_generations": sum(counts.values()),
        "by_status": counts,
        **{f"{status}_generations": n for status, n in counts.items()},
        # Cancelled jobs are failed ones with cancelled_at: counted apart, inside "failed".
        "cancelled_generations": session.execute(
            sa.select(sa.func.count()).where(G.c.status == FAILED, G.c.cancelled_at.is_not(None))).scalar_one(),
        "total_prompts": session.execute(sa.select(sa.func.count()).select_from(P)).scalar_one(),
        "average_generation_time_seconds": float(completed[0]) if completed[0] is not None else None,
        "total_audio_seconds": float(completed[1] or 0.0),
        # A value that is not a time (plain SQL) is shown as it is stored.
        "oldest_pending_created_at": oldest.isoformat() if isinstance(oldest, datetime) else oldest,
        # Failed without running because they were still pending at their expires_at.
        "expired_generations": session.execute(
            sa.select(sa.func.count()).select_from(G).where(G.c.status == FAILED, G.c.expired_at.is_not(None))
        ).scalar_one(),
        "paused_models": paused_models(session),
    }


def _text(value: Any) -> Any:
    """A text column's value as text: SQLite keeps a BLOB that plain SQL stored in one, which
    sorts apart from text (the metrics sort model names) and which JSON cannot encode."""
    return value if value is None or isinstance(value, str) else rowvalues.Unreadable.of(value)


def paused_models(session: Session) -> dict[str, str | None]:
    """Each paused model with its reason, by name."""
    return {_text(name): _text(reason) for name, reason in session.execute(
        sa.select(PAUSED.c.model_name, PAUSED.c.reason).order_by(PAUSED.c.model_name))}


def finished_jobs_before(
    session: Session, statuses: Iterable[str], before: datetime
) -> list[tuple[str, str]]:
    """(id, file_path) of jobs in ``statuses`` that finished before ``before`` (created, if unset)."""
    # A time plain SQL wrote in another ISO form compares as the time it names, not as its text.
    profile = profile_of(session.get_bind().dialect)
    finished_at = profile.comparable_time(sa.func.coalesce(G.c.completed_at, G.c.created_at))
    query = (
        sa.select(G.c.id, G.c.file_path)
        .where(G.c.status.in_(sorted(set(statuses) & {COMPLETED, FAILED})), finished_at < before)
        .order_by(finished_at)
    )
    # A path stored as something other than text (plain SQL) is read as text, like every read.
    return [(row.id, row.file_path if isinstance(row.file_path, str) else rowvalues.Unreadable.of(row.file_path))
            for row in session.execute(query)]


# --- metrics --------------------------------------------------------------------------------
# The queue depth behind /metrics, read at scrape time. Pending rows are counted exactly through
# the partial claim index (one range per model and priority); the oldest pending job comes from a
# skip scan of that index (one seek per model and priority), whatever the backlog. Processing and
# failed rows are counted exactly through the status index. Completed rows are the rest of the
# table: exact on SQLite (count(*) of a table walks pages, not rows), and on PostgreSQL, where
# count(*) reads every row, its planner's estimate (pg_class scaled to the table's current size)
# once that exceeds PG_EXACT_LIMIT rows. benchmarks/bench_metrics.py measures it with 1M rows.

#: Up to this many rows (by estimate) PostgreSQL counts completed jobs exactly.
PG_EXACT_LIMIT = 100_000


@dataclass(frozen=True)
class QueueDepth:
    """Rows per status, pending rows per model, and when the oldest pending job was created."""

    by_status: dict[str, int]
    pending_by_model: dict[str, int]
    oldest_pending_created_at: datetime | None  # of the pending jobs that are due
    completed_is_estimate: bool
    paused: frozenset[str] = frozenset()  # the models no daemon claims
    #: The time "due" was judged at (the database's now unless a caller gave one): ages count to it.
    read_at: datetime | None = None


def _pending_levels(now: datetime) -> sa.Select[Any]:
    """(model, count, oldest due) for each distinct (model, priority) of pending rows, by skip
    scan. Oldest due: the earliest ``created_at`` among rows that may run now; a scheduled job
    or a retry in its backoff is not waiting yet."""
    g = G.alias("g")
    pending = g.c.status == _inline(PENDING)
    models = (
        sa.select(sa.func.min(g.c.model_name).label("name")).where(pending)
        .cte("models", recursive=True)
    )
    after = sa.select(sa.func.min(g.c.model_name)).where(pending, g.c.model_name > models.c.name)
    models = models.union_all(
        sa.select(after.scalar_subquery()).where(models.c.name.is_not(None))
    )
    top = sa.select(sa.func.max(g.c.priority)).where(pending, g.c.model_name == models.c.name)
    levels = (
        sa.select(models.c.name.label("model_name"), top.scalar_subquery().label("priority"))
        .where(models.c.name.is_not(None))
        .cte("levels", recursive=True)
    )
    below = sa.select(sa.func.max(g.c.priority)).where(
        pending, g.c.model_name == levels.c.model_name, g.c.priority < levels.c.priority
    )
    levels = levels.union_all(
        sa.select(levels.c.model_name, below.scalar_subquery()).where(levels.c.priority.is_not(None))
    )
    here = (pending, g.c.model_name == levels.c.model_name, g.c.priority == levels.c.priority)
    due = sa.or_(g.c.run_after.is_(None), g.c.run_after <= now)
    return sa.select(
        levels.c.model_name,
        sa.select(sa.func.count()).select_from(g).where(*here).scalar_subquery(),
        sa.select(sa.func.min(g.c.created_at)).where(*here, due).scalar_subquery(),
    ).where(levels.c.priority.is_not(None))


def oldest_due_per_model(session: Session, now: datetime | None = None) -> dict[str, datetime]:
    """Each model's oldest pending job that may run ``now`` (its ``created_at``), by the skip scan
    of :func:`queue_depth`; models with none due are left out. ``now`` defaults to the database's:
    the reading host's clock may be off."""
    profile_of(session.get_bind().dialect).prepare_depth_read(session)
    oldest: dict[str, datetime] = {}
    for model, _n, created in session.execute(_pending_levels(now or database_now(session))).all():
        # A created_at that is not a time (plain SQL) says nothing about waiting: skipped.
        if isinstance(created, datetime) and (model not in oldest or created < oldest[model]):
            oldest[model] = created
    return oldest


def _inline(status: str) -> sa.BindParameter[str]:
    # Rendered into the SQL, so PostgreSQL's generic plans can still prove the partial indexes.
    return sa.literal(status, literal_execute=True)


def _count(status: str | None = None) -> sa.ScalarSelect[int]:
    query = sa.select(sa.func.count()).select_from(G)
    return (query if status is None else query.where(G.c.status == _inline(status))).scalar_subquery()


def queue_depth(session: Session, now: datetime | None = None) -> QueueDepth:
    """The queue's depth from indexed reads; the comment above says what each part costs. What is
    due is judged at ``now``, by default the database's (the reading host's clock may be off)."""
    by_model: dict[str, int] = {}
    oldest: datetime | None = None
    profile = profile_of(session.get_bind().dialect)
    profile.prepare_depth_read(session)
    now = now or database_now(session)
    for stored, n, created in session.execute(_pending_levels(now)).all():
        model = _text(stored)
        by_model[model] = by_model.get(model, 0) + n
        # A created_at that is not a time (plain SQL) says nothing about waiting: skipped.
        if isinstance(created, datetime) and (oldest is None or created < oldest):
            oldest = created
    estimate = profile.row_estimate(session, G)
    use_estimate = estimate > PG_EXACT_LIMIT
    total = sa.literal(int(estimate)) if use_estimate else _count()
    row = session.execute(sa.select(total, _count(PROCESSING), _count(FAILED))).one()
    pending = sum(by_model.values())
    counts = {PENDING: pending, PROCESSING: row[1], FAILED: row[2]}
    # The parts come from different statements (and, on PostgreSQL, an estimate): never below 0.
    counts[COMPLETED] = max(0, int(row[0]) - pending - row[1] - row[2])
    paused = frozenset(_text(name) for name in session.scalars(sa.select(PAUSED.c.model_name)))
    return QueueDepth(counts, by_model, oldest, use_estimate, paused, now)
