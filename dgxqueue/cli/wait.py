"""Waiting for jobs with a progress display on stderr (``wait``, ``enqueue --wait``, ``demo``).

The database is read every half second; nothing spins. Each status change gets a line of its
own; on a terminal a last line also counts the seconds.
"""

from __future__ import annotations

import sys
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
    output_path,
    print_json,
    safe,
)
from dgxqueue.config import Settings
from dgxqueue.errors import JobNotFoundError
from dgxqueue.storage import Generation, session_scope

POLL_SECONDS = 0.5
#: How many characters of an id the progress lines show; ``show``, ``cancel``, ``retry`` and
#: ``wait`` accept them back as a unique prefix.
SHORT_ID = 8


def _describe(job: Generation) -> str:
    """One line on a job's state, its text from the database escaped (:func:`safe`)."""
    if job.status == "processing":
        return f"processing (attempt {job.attempts}/{job.max_attempts}, {safe(job.worker_id or '?')})"
    if job.status == "pending" and job.attempts:
        return f"pending (retry after attempt {job.attempts}: {safe(job.error_message or 'no reason')})"
    if job.status == "completed":
        took = job.generation_time_seconds
        return "completed" + (f" in {took:.2f}s" if took is not None else "")
    if job.status == "failed":
        return f"failed: {safe(job.error_message or 'no reason given')}"
    return safe(job.status)


def finish(settings: Settings, jobs: list[Generation], as_json: bool) -> int:
    """Print the outcome of waited-for jobs; exit 1 if any failed."""
    if as_json:
        rows = [job_dict(settings, job) for job in jobs]
        print_json(rows[0] if len(rows) == 1 else rows)
    else:
        for job in jobs:
            if job.status == "completed":
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
    """Poll until every job is completed or failed; returns them in the order of ``ids``.

    ``alive`` is asked on each round; a message from it (the daemon died) stops the wait.
    Raises :class:`CliError` with exit code 75 when ``timeout`` seconds pass first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[str, str] = {}
    query = sa.select(Generation).where(Generation.id.in_(list(ids)))
    while True:
        # Asked first so its news (the daemon is ready) prints before the jobs' changes, but acted
        # on only after the read: a daemon that finished everything and then died is no failure.
        problem = alive() if alive else None
        with session_scope(engine) as session:
            found = {job.id: job for job in session.scalars(query)}
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
        time.sleep(pause)
