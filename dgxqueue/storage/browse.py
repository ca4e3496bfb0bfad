"""Reads for the status page (``dgxqueue web``): the jobs list, the overview, the running jobs.

Callers own the session. Nothing here writes.

The jobs list is newest first, ``(created_at DESC, id DESC)``, paginated by keyset (a cursor that
holds the last row's ``created_at``, as stored, and ``id``), never by offset: a page deep in a table of
millions of rows costs what the first page costs, a range read on ``idx_generations_created_at``
(the specification's index). ``benchmarks/bench_web_jobs.py`` measures it beside the bare SQL.
A text filter is the prompt search of :mod:`dgxqueue.storage.search` (words as word prefixes,
through migration 006's index, as ``dgxqueue list --search``): its matches are found first and
the page is cut from them, so a rare word costs what the index costs, not a walk of the table.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dgxqueue.errors import ValidationError
from dgxqueue.storage import reads, search
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import (
    COMPLETED,
    FAILED,
    IS_PROCESSING,
    G,
    GenerationStatus,
)

__all__ = ["MAX_PAGE", "THROUGHPUT_WINDOWS", "JobFilter", "JobPage", "Overview", "RunningJob", "decode_cursor",
           "encode_cursor", "jobs_page", "jobs_statement", "overview", "running_jobs"]

#: The most rows one page of the list holds.
MAX_PAGE = 500
#: The windows (minutes) over which the overview counts finished jobs.
THROUGHPUT_WINDOWS = (1, 5, 15)
#: The columns a list row shows (the job page reads the whole row).
LIST_COLUMNS = (G.c.id, G.c.prompt, G.c.model_name, G.c.status, G.c.created_at, G.c.completed_at,
                G.c.duration_seconds, G.c.attempts, G.c.max_attempts, G.c.progress_done, G.c.progress_total,
                G.c.error_message, G.c.worker_id, G.c.cancel_requested_at, G.c.file_path)
#: The most running rows the daemons page reads (a GPU box runs a few dozen at most).
MAX_RUNNING = 1000
#: The label of a page's extra column: its created_at as stored, read past the column's type.
_STORED = "created_at_stored"
#: What starts a cursor holding a stored value (a time's ISO text starts with a digit).
_RAW = "~"
#: A value a raw read of created_at returns: text or a number (SQLite keeps whatever plain SQL
#: wrote, and PostgreSQL's lenient loader gives a time Python cannot hold as its text).
StoredTime = str | int | float | bytes


@dataclass(frozen=True)
class JobFilter:
    """What the jobs list is narrowed to; every field optional. ``since``/``until`` bound
    ``created_at`` (``since`` <= created_at < ``until``), timezone-aware."""

    status: GenerationStatus | None = None
    model: str | None = None
    text: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class JobPage:
    """One page: its rows (mappings of :data:`LIST_COLUMNS`) and the cursor of the next page
    (None on the last one)."""

    rows: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(created_at: datetime | StoredTime, job_id: str) -> str:
    """An opaque cursor (URL-safe) for the page after the row (``created_at``, ``job_id``).

    ``created_at`` is a time, or the value a row stores (text on SQLite, whatever plain SQL
    wrote), which is kept as it is: the next page starts from the same value the list is sorted
    by, so a value that is no time, or a time in another text form, neither ends the list early
    nor repeats or skips rows.
    """
    if isinstance(created_at, datetime):
        text = f"{created_at.astimezone(UTC).isoformat()}|{job_id}"
    else:
        value = {"hex": created_at.hex()} if isinstance(created_at, bytes) else created_at
        text = _RAW + json.dumps([value, job_id], ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime | StoredTime, str]:
    """The row a cursor points after; :class:`ValidationError` naming ``cursor`` if it is not one."""
    refusal = ValidationError("cursor", cursor, "a cursor returned by a previous page")
    created_at: datetime | StoredTime
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith(_RAW):
            created_at, job_id = _stored_value(json.loads(text[len(_RAW):]))
        else:
            when, _, job_id = text.partition("|")
            created_at = datetime.fromisoformat(when)
            if created_at.tzinfo is None:
                raise refusal
            created_at = created_at.astimezone(UTC)  # OverflowError past year 1 or 9999, as bound
    except (ValueError, OverflowError, RecursionError, binascii.Error, UnicodeDecodeError):
        raise refusal from None
    # A NUL: PostgreSQL refuses it as a parameter, and no id holds one.
    if not job_id or "\x00" in job_id or (isinstance(created_at, str) and "\x00" in created_at):
        raise refusal
    return created_at, job_id


def _stored_value(decoded: Any) -> tuple[StoredTime, str]:
    """The stored value and id of a raw cursor's JSON; ValueError if it is not what one holds."""
    if not isinstance(decoded, list) or len(decoded) != 2 or not isinstance(decoded[1], str):
        raise ValueError(decoded)
    value, job_id = decoded
    if isinstance(value, dict) and list(value) == ["hex"] and isinstance(value["hex"], str):
        return bytes.fromhex(value["hex"]), job_id
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(decoded)
    # A stored integer fits SQLite's 64 bits, the driver refuses a wider one with OverflowError.
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        raise ValueError(decoded)
    # JSON's "\ud800" decodes to a lone surrogate, which no driver can encode (UnicodeEncodeError).
    for text in (value, job_id) if isinstance(value, str) else (job_id,):
        text.encode()
    return value, job_id


def _conditions(where: JobFilter) -> list[sa.ColumnElement[bool]]:
    found: list[sa.ColumnElement[bool]] = []
    if where.status is not None:
        found.append(G.c.status == where.status.value)
    if where.model is not None:
        found.append(G.c.model_name == where.model)
    if where.since is not None:
        found.append(G.c.created_at >= where.since)
    if where.until is not None:
        found.append(G.c.created_at < where.until)
    return found


def jobs_statement(where: JobFilter, limit: int, after: tuple[datetime | sa.ColumnElement[Any], str] | None,
                   matches: sa.Subquery | None = None) -> sa.Select[Any]:
    """The page's statement: ``limit`` rows of :data:`LIST_COLUMNS` (and created_at as stored,
    labelled ``created_at_stored``) after the cursor's row (its created_at a time, or SQL for a
    stored value), among ``matches`` (ids and created_at of the rows a text search found) when given."""
    conditions = _conditions(where)
    # Sorted and cut by the search's own columns when there is one (search.matching_rows says why).
    order = (G.c.created_at, G.c.id) if matches is None else (matches.c.created_at, matches.c.id)
    if after is not None:
        created_at, job_id = after
        # "<=" on its own is the index's range; the OR only sorts out the ties at its edge.
        conditions += [order[0] <= created_at, sa.or_(order[0] < created_at, order[1] < job_id)]
    source = G if matches is None else G.join(matches, matches.c.id == G.c.id)
    stored = sa.type_coerce(order[0], sa.types.NullType()).label(_STORED)  # no type: the value as stored
    return (sa.select(*LIST_COLUMNS, stored).select_from(source).where(*conditions)
            .order_by(order[0].desc(), order[1].desc()).limit(limit))


def jobs_page(session: Session, where: JobFilter, *, limit: int = 50, cursor: str | None = None) -> JobPage:
    """A page of the jobs list, newest first, after ``cursor`` (None: the first page)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValidationError("limit", limit, f"an integer in [1, {MAX_PAGE}]")
    after: tuple[datetime | sa.ColumnElement[Any], str] | None = None
    if cursor:
        created_at, job_id = decode_cursor(cursor)
        if not isinstance(created_at, datetime):
            after = profile_of(session.get_bind().dialect).stored_time(created_at), job_id
        else:
            after = created_at, job_id
    # One row more than asked says whether a next page exists.
    matches = search.matching_rows(session, where.text) if where.text else None
    try:
        rows = [dict(row) for row in session.execute(jobs_statement(where, limit + 1, after, matches)).mappings()]
    except sa.exc.DataError:  # a stored value PostgreSQL cannot read as a time: not from a page
        raise ValidationError("cursor", cursor, "a cursor returned by a previous page") from None
    stored = [row.pop(_STORED) for row in rows]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor(stored[limit - 1], str(rows[limit - 1]["id"]))
    return JobPage(rows[:limit], next_cursor)


# --- the overview ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLine:
    """One model's line of the overview."""

    pending: int = 0
    processing: int = 0
    oldest_due_age_seconds: float | None = None  # of its oldest pending job that may run now
    paused: bool = False
    paused_reason: str | None = None
    live_daemons: int = 0
    #: finished jobs per window: {"completed": {1: n, 5: n, 15: n}, "failed": {...}}
    finished: dict[str, dict[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Overview:
    """The queue at a glance: rows per status (completed is PostgreSQL's estimate past
    :data:`~dgxqueue.storage.reads.PG_EXACT_LIMIT` rows), a line per model, throughput."""

    now: datetime
    by_status: dict[str, int]
    completed_is_estimate: bool
    models: dict[str, ModelLine]
    #: finished jobs of every model per window (minutes): {"completed": {1: n, ...}, "failed": {...}}
    finished: dict[str, dict[int, int]]


def _finished_since(session: Session, now: datetime) -> dict[tuple[str, str], dict[int, int]]:
    """(model, status) -> finished jobs per window, from one range read of ``completed_at``'s index."""
    since = {minutes: now - timedelta(minutes=minutes) for minutes in THROUGHPUT_WINDOWS}
    # The range first, MATERIALIZED so that it stays a range: grouping the table itself by model
    # made SQLite walk idx_generations_model_name, every row of the table (1 s on a million).
    # No status in the range either, which SQLite answered from the status index. Only finished
    # jobs have a completed_at; any other status is dropped below.
    recent = (sa.select(G.c.model_name, G.c.status, G.c.completed_at)
              .where(G.c.completed_at >= since[max(THROUGHPUT_WINDOWS)])
              .cte("recent").prefix_with("MATERIALIZED"))
    sums = [sa.func.sum(sa.case((recent.c.completed_at >= since[m], 1), else_=0)) for m in THROUGHPUT_WINDOWS]
    query = sa.select(recent.c.model_name, recent.c.status, *sums).group_by(recent.c.model_name, recent.c.status)
    return {(row[0], row[1]): {m: int(row[2 + i] or 0) for i, m in enumerate(THROUGHPUT_WINDOWS)}
            for row in session.execute(query) if row[1] in (COMPLETED, FAILED)}


def overview(session: Session, live_per_model: dict[str, int], now: datetime | None = None) -> Overview:
    """The overview, from indexed reads only (no read grows with the table; the throughput's
    grows with the jobs finished in the last :data:`THROUGHPUT_WINDOWS` minutes, each a row
    looked up: about 6 µs a job on SQLite, see docs/results/2026-12-06-web-jobs.md).
    ``live_per_model``: how many live daemons serve each model (the registry's). ``now``, what is
    due and ages count from: by default the database's, since the web host's clock may be off."""
    now = now or reads.database_now(session)
    depth = reads.queue_depth(session, now)
    oldest = reads.oldest_due_per_model(session, now)
    # From the running rows themselves: a GROUP BY model_name made SQLite walk the model index,
    # reading every row of the table to test its status.
    processing = Counter(job.model_name for job in running_jobs(session))
    finished = _finished_since(session, now)
    paused = reads.paused_models(session)
    names = sorted(set(depth.pending_by_model) | set(processing) | set(paused) | set(live_per_model)
                   | {model for model, _ in finished})
    models: dict[str, ModelLine] = {}
    for name in names:
        created = oldest.get(name)
        age = (now - created).total_seconds() if isinstance(created, datetime) else None
        models[name] = ModelLine(
            pending=depth.pending_by_model.get(name, 0), processing=processing.get(name, 0),
            oldest_due_age_seconds=None if age is None else max(0.0, age),
            paused=name in paused, paused_reason=paused.get(name), live_daemons=live_per_model.get(name, 0),
            finished={status: finished.get((name, status), dict.fromkeys(THROUGHPUT_WINDOWS, 0))
                      for status in (COMPLETED, FAILED)})
    totals = {status: {m: sum(counts[m] for (_, s), counts in finished.items() if s == status)
                       for m in THROUGHPUT_WINDOWS} for status in (COMPLETED, FAILED)}
    return Overview(now, depth.by_status, depth.completed_is_estimate, models, totals)


# --- running jobs, for the daemons page --------------------------------------------------------


@dataclass(frozen=True)
class RunningJob:
    """A processing row as the daemons page shows it."""

    id: str
    prompt: str
    model_name: str
    worker_id: str | None
    progress_done: int | None
    progress_total: int | None
    started_at: datetime | None
    cancel_requested: bool


def running_jobs(session: Session) -> list[RunningJob]:
    """Every processing row (at most :data:`MAX_RUNNING`), oldest claim first."""
    query = (sa.select(G.c.id, G.c.prompt, G.c.model_name, G.c.worker_id, G.c.progress_done, G.c.progress_total,
                       G.c.started_at, G.c.cancel_requested_at)
             .where(IS_PROCESSING).order_by(G.c.claimed_at, G.c.id).limit(MAX_RUNNING))
    # Plain SQL can store anything on SQLite: a progress that is not an integer is no progress.
    return [RunningJob(str(row.id), str(row.prompt), str(row.model_name), row.worker_id,
                       row.progress_done if type(row.progress_done) is int else None,
                       row.progress_total if type(row.progress_total) is int else None,
                       row.started_at if isinstance(row.started_at, datetime) else None,
                       row.cancel_requested_at is not None)
            for row in session.execute(query)]
