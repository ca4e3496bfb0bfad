"""A job a daemon holds (:class:`ClaimedJob`), read from the claim's row by column name."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from dgxqueue.storage import rowvalues
from dgxqueue.storage.models import G


@dataclass(frozen=True)
class ClaimedJob:
    """A job this daemon now holds; ``attempt`` with ``worker_id`` is its fencing token.

    Each field but ``defect`` is the claimed row's column of the same name (``attempt``: the
    ``attempts`` the claim set): a field added here (before ``defect``, which stays last) is
    returned by the claim."""

    id: str
    prompt: str
    model_name: str
    duration_seconds: float
    sample_rate: int
    channels: int
    file_path: str
    metadata: dict[str, Any] | None
    attempt: int
    max_attempts: int
    created_at: datetime
    claimed_at: datetime
    #: Attempts of this job that ended with its daemon dead or stalled (or the time limit) while
    #: it ran: above 0, the job runs alone.
    lease_losses: int = 0
    #: Why the row cannot run (each bad column named with its value); the daemon fails the job.
    defect: str | None = None

    @property
    def suspect(self) -> bool:
        """It may be what killed or stalled a daemon: it runs in a backend call of its own."""
        return self.lease_losses > 0


_COLUMN_OF = {"attempt": "attempts"}  # a field whose column has another name
_FIELDS = tuple(f.name for f in dataclasses.fields(ClaimedJob))[:-1]  # all but the defect, in order
# The fast path builds a job from the row positionally: that holds while the defect comes last.
assert dataclasses.fields(ClaimedJob)[-1].name == "defect", "ClaimedJob's last field must be its defect"
#: What the claim returns: the job's fields in their order, then the columns only judged (run_after).
CLAIM_COLUMNS: tuple[sa.ColumnElement[Any], ...] = (
    *(G.c[_COLUMN_OF.get(name, name)] for name in _FIELDS), G.c.run_after,
)
_NAMES = (*_FIELDS, "run_after")
_AT = {name: i for i, name in enumerate(_NAMES)}  # a returned column's place, by name
_GLANCE = operator.itemgetter(*(_AT[name] for name in (
    "prompt", "duration_seconds", "sample_rate", "channels", "file_path", "metadata", "max_attempts",
    "created_at", "run_after")))
_LOSSES = _AT["lease_losses"]


def claimed_jobs(rows: Iterable[Sequence[Any]]) -> list[ClaimedJob]:
    """Rows of the claim's RETURNING (:data:`CLAIM_COLUMNS`), oldest job first."""
    jobs = [claimed_job(row) for row in rows]
    jobs.sort(key=lambda j: j.created_at)
    return jobs


def claimed_job(row: Sequence[Any]) -> ClaimedJob:
    """One claimed row. A row the daemon cannot use still becomes a job, with its ``defect``
    said and usable stand-ins in the bad fields, so that its failure is recorded like any other
    result (fenced) while the rest of the claim runs."""
    if rowvalues.usable_at_a_glance(*_GLANCE(row)) and type(row[_LOSSES]) is int:
        return ClaimedJob(*row[:len(_FIELDS)])  # the fields, in the claim's order
    values = dict(zip(_NAMES, row, strict=True))
    defects = _defects(values)
    if defects:
        return _defective_job(values, "; ".join(defects))
    del values["run_after"]
    values["lease_losses"] = _counter(values["lease_losses"])
    return ClaimedJob(**values)


def _counter(value: Any) -> int:
    """A counter column as written: on SQLite plain SQL can store text there, which counts as 0
    rather than stopping the daemon on a comparison."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _defects(values: dict[str, Any]) -> list[str]:
    defects = rowvalues.job_defects(values)
    run_after = values["run_after"]
    if run_after is not None and not isinstance(run_after, datetime):
        defects.append(f"run_after must be a time or NULL, not {rowvalues.quote(run_after)}")
    return defects


def _defective_job(values: dict[str, Any], defect: str) -> ClaimedJob:
    claimed_at: datetime = values["claimed_at"]
    created_at = values["created_at"]
    return ClaimedJob(
        id=values["id"], prompt=str(values["prompt"] or ""), model_name=values["model_name"],
        duration_seconds=0.0, sample_rate=1, channels=1, file_path=str(values["file_path"] or ""), metadata=None,
        attempt=values["attempt"],
        max_attempts=values["attempt"],  # no retry: the row itself is the fault
        created_at=created_at if isinstance(created_at, datetime) else claimed_at, claimed_at=claimed_at,
        defect=defect,
    )
