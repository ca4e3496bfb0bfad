"""What the pages and the JSON API show, read from the database into JSON-ready dicts.

The pages and the API share these functions, so the API holds the same data as the page.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dgxqueue.audio import OutputRoot
from dgxqueue.errors import JobNotFoundError, OutputError, ValidationError
from dgxqueue.outputs import OUTSIDE, output
from dgxqueue.storage import Generation, browse, reads, registry, search, session_scope
from dgxqueue.storage.browse import JobFilter
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import GenerationStatus
from dgxqueue.web.files import servable

#: The running jobs the overview lists (the daemons page lists them all).
RUNNING_SHOWN = 20


@dataclass(frozen=True)
class Source:
    """Where the pages read from: the queue's engine and the outputs folder."""

    engine: Engine
    outputs_dir: Path


@contextlib.contextmanager
def _reading(source: Source) -> Iterator[Session]:
    with session_scope(source.engine) as session:
        profile_of(source.engine.dialect).prepare_page_read(session)
        yield session


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        # Stored by plain SQL (both engines take infinity; metadata's 1e999 parses as one), and
        # not JSON: JSONResponse would refuse the whole list. Shown as text, as Unreadable is.
        return str(value)
    if isinstance(value, list):
        return [_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _value(item) for key, item in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def fraction(done: Any, total: Any) -> float | None:
    if type(done) is not int or type(total) is not int or total <= 0:
        return None
    return min(1.0, max(0.0, done / total))


def file_url(root: OutputRoot, file_path: Any) -> str | None:
    """The ``/files/...`` address of a job's file, or None when its path leaves the outputs folder.
    ``root``: one per page, so the folder's real path is looked up once, not once a row.

    The path as the job names it (``outputs/a/b.wav`` is ``/files/a/b.wav``, a linked folder
    kept), so that :func:`refusal` finds the job again by it; the located path only for a
    ``file_path`` the door would not have written so (plain SQL)."""
    if not isinstance(file_path, str):
        return None
    try:
        absolute = root.locate(file_path)
    except OutputError:
        return None
    named = file_path.removeprefix(root.name + "/")
    relative = named if named != file_path and servable(named) else os.path.relpath(absolute, root.real)
    return "/files/" + "/".join(quote(part) for part in relative.split(os.sep))


def refusal(source: Source, relative: str) -> str | None:
    """Why ``/files/<relative>`` is not served: the completed job whose ``file_path`` that address
    is (as :func:`file_url` writes it) has not its WAV there, by :func:`dgxqueue.outputs.output`:
    its result held under its temporary name while another's file sits at its path, a file
    another job's id marks, or nothing. None to serve the file there (one no completed job
    names is served as it is). Read now: one indexed row and the one file, per request; the
    jobs list links every completed job's file unchecked."""
    if "\x00" in relative or not servable(relative):  # refused anyway (no row holds a NUL)
        return None
    root = OutputRoot(source.outputs_dir)
    file_path = f"{root.name}/{relative}"
    with _reading(source) as session:
        job = reads.completed_job_at(session, file_path)
    if job is None:
        return None
    job_id, attempt, worker_id = job
    found = output(root, job_id, file_path, attempt=attempt, worker_id=worker_id)
    if found is not None and found.exists:
        return None
    why = OUTSIDE if found is None else found.reason(relative_to=os.path.dirname(root.real))
    return f"job {job_id}'s WAV is not at {file_path}, so nothing is served for it: {why}"


def list_row(root: OutputRoot, row: Mapping[str, Any]) -> dict[str, Any]:
    shown = {key: _value(value) for key, value in row.items() if key != "file_path"}
    shown["progress"] = fraction(row["progress_done"], row["progress_total"])
    shown["cancel_requested"] = row["cancel_requested_at"] is not None
    shown["audio_url"] = file_url(root, row["file_path"]) if row["status"] == "completed" else None
    return shown


def job_detail(source: Source, job: Generation) -> dict[str, Any]:
    """Every column of the job (``metadata`` under its column's name), and what the page adds."""
    row: dict[str, Any] = {}
    for column in Generation.__table__.columns:
        row[column.name] = _value(getattr(job, "meta" if column.name == "metadata" else column.name))
    row["progress"] = fraction(job.progress_done, job.progress_total)
    url, exists, note = None, None, None
    if job.status == "completed":  # its file may be gone, or its result held under its temporary name
        root = OutputRoot(source.outputs_dir)
        found = output(root, job.id, job.file_path, attempt=job.attempts, worker_id=job.worker_id)
        exists = found is not None and found.exists
        url = file_url(root, job.file_path) if exists else None
        note = OUTSIDE if found is None else found.reason(relative_to=os.path.dirname(root.real))
    row["audio_url"] = url
    row["download_url"] = None if url is None else url + "?download=1"
    row["output_exists"] = exists
    row["output_note"] = note
    return row


def read_job(source: Source, job_id: str) -> dict[str, Any]:
    if "\x00" in job_id:  # no row holds one (PostgreSQL text cannot), and PostgreSQL refuses to compare it
        raise JobNotFoundError(job_id)
    with _reading(source) as session:
        return job_detail(source, reads.require_job(session, job_id))


def read_jobs(source: Source, where: JobFilter, limit: int, cursor: str | None) -> dict[str, Any]:
    with _reading(source) as session:
        page = browse.jobs_page(session, where, limit=limit, cursor=cursor)
    root = OutputRoot(source.outputs_dir)
    return {"jobs": [list_row(root, row) for row in page.rows], "next_cursor": page.next_cursor}


def read_overview(source: Source) -> dict[str, Any]:
    with _reading(source) as session:
        live = registry.daemons(session)
        per_model: dict[str, int] = {}
        for daemon in live:
            for model in set(daemon.models):
                per_model[model] = per_model.get(model, 0) + 1
        overview = browse.overview(session, per_model)
        running = browse.running_jobs(session)
    return {
        "now": _value(overview.now),
        "by_status": overview.by_status,
        "completed_is_estimate": overview.completed_is_estimate,
        "total": sum(overview.by_status.values()),
        "live_daemons": len(live),
        "finished": {status: {str(m): n for m, n in counts.items()} for status, counts in overview.finished.items()},
        "running": [_running(job) for job in running[:RUNNING_SHOWN]],
        "running_total": len(running),
        "models": [{"model": name, "pending": line.pending, "processing": line.processing,
                    "oldest_due_age_seconds": line.oldest_due_age_seconds, "paused": line.paused,
                    "paused_reason": line.paused_reason, "live_daemons": line.live_daemons,
                    "finished": {status: {str(m): n for m, n in counts.items()}
                                 for status, counts in line.finished.items()}}
                   for name, line in overview.models.items()],
    }


def _running(job: browse.RunningJob) -> dict[str, Any]:
    return {"id": job.id, "prompt": job.prompt, "model_name": job.model_name, "worker_id": job.worker_id,
            "progress_done": job.progress_done, "progress_total": job.progress_total,
            "progress": fraction(job.progress_done, job.progress_total),
            "started_at": _value(job.started_at), "cancel_requested": job.cancel_requested}


def read_daemons(source: Source) -> dict[str, Any]:
    with _reading(source) as session:
        live = registry.daemons(session, include_stale=True)
        running = browse.running_jobs(session)
    by_worker: dict[str | None, list[dict[str, Any]]] = {}
    for job in running:
        by_worker.setdefault(job.worker_id, []).append(_running(job))
    # _value: a pid stored by plain SQL may be a float SQLite kept, infinity included.
    daemons = [{**_value(daemon.as_dict()), "jobs": by_worker.pop(daemon.id, [])} for daemon in live]
    others = [job for jobs in by_worker.values() for job in jobs]
    return {"daemons": daemons, "other_running": others}


def parse_filter(params: Mapping[str, str]) -> JobFilter:
    """The jobs list's filter from query parameters (``status``, ``model``, ``q``, ``since``,
    ``until``); a bad value raises :class:`ValidationError` naming its parameter."""
    status_text = (params.get("status") or "").strip()
    status = None
    if status_text:
        try:
            status = GenerationStatus(status_text)
        except ValueError:
            raise ValidationError("status", status_text, "one of " + ", ".join(s.value for s in GenerationStatus)) \
                from None
    text = _no_nul("q", params.get("q") or "").strip() or None
    if text is not None:
        try:
            search.search_words(text)  # the prompt search's rules, said here under the page's name
        except ValidationError as exc:
            raise ValidationError("q", text, exc.allowed) from None
    return JobFilter(status=status, model=_no_nul("model", (params.get("model") or "").strip()) or None,
                     text=text, since=parse_time("since", params.get("since")),
                     until=parse_time("until", params.get("until")))


def _no_nul(name: str, text: str) -> str:
    # PostgreSQL refuses a NUL in any text parameter (a 500 otherwise); no row can hold one.
    if "\x00" in text:
        raise ValidationError(name, text, "text without NUL bytes")
    return text


def parse_time(name: str, text: str | None) -> datetime | None:
    """An ISO 8601 time; without an offset it is UTC (the page shows every time in UTC)."""
    if not text or not text.strip():
        return None
    try:
        when = datetime.fromisoformat(text.strip())
        # OverflowError: an offset that carries year 1 or 9999 out of range in UTC.
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValidationError(name, text, "an ISO 8601 time such as 2026-12-06T10:00 (UTC)") from None


def parse_limit(text: str | None, default: int = 50) -> int:
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValidationError("limit", text, f"an integer in [1, {browse.MAX_PAGE}]") from None
    if not 1 <= value <= browse.MAX_PAGE:
        raise ValidationError("limit", text, f"an integer in [1, {browse.MAX_PAGE}]")
    return value
