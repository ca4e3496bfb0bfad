"""An attempt's result as the daemon hands it to storage, and the columns its row gets.

The daemon decides what an attempt came to (:class:`Completed`, :class:`Failed`,
:class:`Retried`, :class:`Released`, :class:`Cancelled`); :func:`row_values` turns that into the row's columns,
which :func:`dgxqueue.storage.queue.finish` writes fenced on the attempt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.models import COMPLETED, FAILED, INT_MAX, PENDING


@dataclass(frozen=True)
class Completed:
    """The attempt made its file. The row keeps the ``worker_id`` and ``attempts`` that made it:
    the sweep publishes a temporary only for exactly that attempt. ``finished_at`` None: the
    database's now when the result is written (the daemon's clock may be off)."""

    finished_at: datetime | None
    generation_seconds: float
    file_size: int
    metadata: Mapping[str, Any] | None


@dataclass(frozen=True)
class Failed:
    """The job failed for good. ``timed_out``: its call overran the time limit, which marks the
    job suspect (it runs alone, should it run again). ``finished_at`` None: the database's now
    when the result is written."""

    finished_at: datetime | None
    message: str
    generation_seconds: float | None = None
    timed_out: bool = False


@dataclass(frozen=True)
class Retried:
    """The job goes back to the queue, due at ``run_after``: a time, or a backoff counted from the
    database's now when the result is written (the daemon's clock may be off); its attempt is spent."""

    run_after: datetime | timedelta
    message: str
    timed_out: bool = False


@dataclass(frozen=True)
class Released:
    """The job goes back without spending its attempt (graceful stop, machine fault);
    ``message``: why, in ``error_message``; without it the last error stays."""

    message: str | None = None


@dataclass(frozen=True)
class Cancelled:
    """The job was cancelled while it ran (``cancel_requested_at`` set): failed for good, with
    ``cancelled_at``, never retried. Fenced on the attempt like every result: a completion that
    committed first stands. ``finished_at`` None: the database's now when the result is written."""

    finished_at: datetime | None
    message: str
    generation_seconds: float | None = None


Result = Completed | Failed | Retried | Released | Cancelled

MAX_ERROR_MESSAGE = 10_000
#: The key of a retry's backoff in seconds among a row's values: the write sets ``run_after`` to
#: the database's now plus it, where the other keys are columns set as given.
BACKOFF_SECONDS = "backoff_seconds"
#: The time columns a result may give as None, which the write sets to the database's now.
STAMPED_AT_WRITE = ("completed_at", "cancelled_at")


def storable_text(text: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """An error message as both engines store it: PostgreSQL refuses NUL in text and neither
    driver encodes a lone surrogate, and a message comes from any exception, so a result
    must not fail to write because of its text."""
    text = text[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def row_values(job: ClaimedJob, result: Result) -> dict[str, Any]:
    """The columns ``result`` sets on ``job``'s row (the write is fenced on its attempt)."""
    values: dict[str, Any]
    if isinstance(result, Completed):
        return {"status": COMPLETED, "completed_at": result.finished_at,
                "generation_time_seconds": result.generation_seconds, "file_size_bytes": result.file_size,
                "error_message": None, "metadata": dict(result.metadata or {})}
    if isinstance(result, Released):
        # attempt - 1 undoes exactly the claim's increment (the write is fenced on attempts == attempt).
        values = {"status": PENDING, "attempts": job.attempt - 1, "claimed_at": None, "worker_id": None}
        if result.message is not None:
            values["error_message"] = storable_text(result.message)
        return values
    if isinstance(result, Cancelled):
        return {"status": FAILED, "completed_at": result.finished_at, "cancelled_at": result.finished_at,
                "error_message": storable_text(result.message), "generation_time_seconds": result.generation_seconds}
    if isinstance(result, Failed):
        values = {"status": FAILED, "completed_at": result.finished_at,
                  "error_message": storable_text(result.message),
                  "generation_time_seconds": result.generation_seconds}
    else:
        values = {"status": PENDING, "error_message": storable_text(result.message), "worker_id": None}
        if isinstance(result.run_after, timedelta):
            values[BACKOFF_SECONDS] = result.run_after.total_seconds()
        else:
            values["run_after"] = result.run_after
    if result.timed_out:  # held at the integer's end, as the rescue holds it (plain SQL may leave it there)
        values["lease_losses"] = job.lease_losses if job.lease_losses >= INT_MAX else job.lease_losses + 1
    return values
