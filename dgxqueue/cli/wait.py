"""Waiting for jobs with a progress display on stderr (``wait``, ``enqueue --wait``, ``demo``).

The jobs are read again as soon as something may have changed (a completion event on
PostgreSQL, a commit on SQLite: :class:`dgxqueue.jobs.ChangeListener`, as a job handle's wait),
and at least every half second for the display; nothing spins. Each status change gets a line of
its own, and so does a running job's progress at each tenth (so a log stays short); on a terminal
a last line also counts the seconds and draws the running jobs' progress as a bar with an ETA.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dgxqueue.cli.common import (
    EX_TEMPFAIL,
    EXIT_JOB_FAILED,
    EXIT_OK,
    FINISHED,
    CliError,
    job_dict,
    job_output,
    output_fields,
    output_path,
    print_json,
    safe,
)
from dgxqueue.config import Settings
from dgxqueue.errors import JobNotFoundError
from dgxqueue.jobs import ChangeListener, read_reconnecting
from dgxqueue.storage import Generation, session_scope

POLL_SECONDS = 0.5
#: How many characters of an id the progress lines show; ``show``, ``cancel``, ``retry`` and
#: ``wait`` accept them back as a unique prefix.
SHORT_ID = 8


def fraction(job: Generation) -> float | None:
    """How far a running job is (0..1), from the progress its daemon wrote; None if unknown."""
    done, total = job.progress_done, job.progress_total
    if not isinstance(done, int) or not isinstance(total, int) or total <= 0:
        return None
    return min(1.0, max(0.0, done / total))


def _describe(job: Generation) -> str:
    """One line on a job's state, its text from the database escaped (:func:`safe`)."""
    if job.status == "processing":
        share = fraction(job)
        at = "" if share is None else f" {int(share * 10) * 10}%"  # by tenths: a line per tenth, not per write
        if job.cancel_requested_at is not None:
            at += " (cancel requested)"
        return f"processing (attempt {job.attempts}/{job.max_attempts}, {safe(job.worker_id or '?')}){at}"
    if job.status == "pending" and job.attempts:
        return f"pending (retry after attempt {job.attempts}: {safe(job.error_message or 'no reason')})"
    if job.status == "completed":
        took = job.generation_time_seconds
        return "completed" + (f" in {took:.2f}s" if took is not None else "")
    if job.status == "failed":
        kind = "cancelled" if job.cancelled_at is not None else "failed"
        return f"{kind}: {safe(job.error_message or 'no reason given')}"
    return safe(job.status)


class Eta:
    """The time left, from how fast the progress moved since it was first seen."""

    def __init__(self) -> None:
        self._first: tuple[float, float] | None = None

    def seconds(self, share: float, now: float) -> float | None:
        if self._first is None or share < self._first[1]:  # a new attempt starts over
            self._first = (now, share)
            return None
        since, start = self._first
        if share <= start or now <= since:
            return None
        return (now - since) / (share - start) * (1.0 - share)


def bar(share: float, eta: float | None, width: int = 20) -> str:
    """``[#########-----------]  45% ETA 12s``"""
    filled = round(share * width)
    left = "" if eta is None else f" ETA {eta:.0f}s"
    return f"[{'#' * filled}{'-' * (width - filled)}] {share * 100:3.0f}%{left}"


def finish(settings: Settings, jobs: list[Generation], as_json: bool) -> int:
    """Print the outcome of waited-for jobs; exit 1 if any failed.

    A completed job's WAV path, unless another file sits there (its result held under its
    temporary name, or a file another job's id marks: :func:`dgxqueue.outputs.output`, as
    ``show`` and a job handle's ``output_path`` judge it): then its id and why, in ``show``'s
    words; still exit 0, the job completed. A WAV not there yet is still given, its rename
    following the commit. ``as_json``: ``show --json``'s output fields too."""
    if as_json:
        rows = [job_dict(settings, job) for job in jobs]
        for row, job in zip(rows, jobs, strict=True):
            if job.status == "completed":
                row.update(output_fields(job_output(settings, job)))
        print_json(rows[0] if len(rows) == 1 else rows)
    else:
        for job in jobs:
            found = job_output(settings, job) if job.status == "completed" else None
            if found is not None and found.occupied:
                print(f"completed  {safe(job.id)}  {safe(found.reason() or '')}")
            elif job.status == "completed":
                print(f"completed  {safe(output_path(settings, job.file_path) or job.file_path)}")
            else:
                print(f"failed  {safe(job.id)}  {safe(job.error_message or 'no reason given')}")
    return EXIT_JOB_FAILED if any(job.status != "completed" for job in jobs) else EXIT_OK


class Progress:
    """Lines on stderr for status changes; a live counter when stderr is a terminal."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = sys.stderr.isatty() and not quiet
        self.started = time.monotonic()
        self._live_shown = False
        self.eta = Eta()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self._clear()
        print(f"{self.elapsed():7.1f}s  {text}", file=sys.stderr, flush=True)

    def tick(self, summary: str) -> None:
        if self.live:
            sys.stderr.write(f"\r\x1b[K{self.elapsed():7.1f}s  {summary}")
            sys.stderr.flush()
            self._live_shown = True

    def _clear(self) -> None:
        if self._live_shown:
            sys.stderr.write("\r\x1b[K")
            self._live_shown = False

    def done(self) -> None:
        self._clear()
        sys.stderr.flush()


def summary(jobs: Sequence[Generation]) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    order = ("completed", "failed", "processing", "pending")
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


def watch(
    engine: Engine,
    ids: Sequence[str],
    *,
    timeout: float | None,
    progress: Progress,
    alive: Callable[[], str | None] | None = None,
) -> list[Generation]:
    """Read the jobs until every one is completed or failed; returns them in the order of ``ids``.

    ``alive`` is asked on each round; a message from it (the daemon died) stops the wait.
    Raises :class:`CliError` with exit code 75 when ``timeout`` seconds pass first.
    """
    with ChangeListener(engine) as listener:
        return _watch(engine, ids, timeout=timeout, progress=progress, alive=alive, listener=listener)


def _read(engine: Engine, query: sa.Select[Generation]) -> dict[str, Generation]:
    """The jobs ``query`` selects, by id. A pooled connection the server ended between two rounds
    (a restart, pg_terminate_backend, an idle timeout) is made anew as the library's waits do
    (:func:`dgxqueue.jobs.read_reconnecting`); past that window, or on any other error, it is raised."""

    def read() -> dict[str, Generation]:
        with session_scope(engine) as session:
            return {job.id: job for job in session.scalars(query)}

    return read_reconnecting(read, lambda: None, threading.Event().wait)  # the pool drops a lost connection


def _watch(engine: Engine, ids: Sequence[str], *, timeout: float | None, progress: Progress,
           alive: Callable[[], str | None] | None, listener: ChangeListener) -> list[Generation]:
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[str, str] = {}
    query = sa.select(Generation).where(Generation.id.in_(list(ids)))
    while True:
        # Asked first so its news (the daemon is ready) prints before the jobs' changes, but acted
        # on only after the read: a daemon that finished everything and then died is no failure.
        problem = alive() if alive else None
        found = _read(engine, query)
        missing = [job_id for job_id in ids if job_id not in found]
        if missing:
            raise JobNotFoundError(missing[0])
        jobs = [found[job_id] for job_id in ids]
        for job in jobs:
            text = _describe(job)
            if seen.get(job.id) != text:
                seen[job.id] = text
                progress.line(f"{safe(job.id[:SHORT_ID])}  {text}")
        if all(job.status in FINISHED for job in jobs):
            progress.done()
            return jobs
        shares = [share for job in jobs if job.status == "processing" and (share := fraction(job)) is not None]
        if shares:  # the running jobs' mean progress, with the time left at its pace so far
            share = sum(shares) / len(shares)
            progress.tick(f"{summary(jobs)}  {bar(share, progress.eta.seconds(share, time.monotonic()))}")
        else:
            progress.tick(summary(jobs))
        if problem:
            progress.done()
            raise CliError(problem, EX_TEMPFAIL)
        if deadline is not None and time.monotonic() >= deadline:
            progress.done()
            waiting = [job.id for job in jobs if job.status not in FINISHED]
            raise CliError(
                f"timed out after {timeout:g}s waiting for {len(waiting)} job(s) ({summary(jobs)}); "
                f"they keep going: 'dgxqueue wait {safe(waiting[0])}'", EX_TEMPFAIL,
            )
        pause = POLL_SECONDS if deadline is None else min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))
        listener.wait(pause)
