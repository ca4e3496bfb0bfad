"""A job that may kill its daemon runs alone, so its batch-mates are never charged for it.

A job is suspect once an attempt of it ended with its lease lost while it ran (its daemon died
or stalled; the lease rescue counts it) or with the time limit (counted with the outcome). A
suspect runs in a backend call of its own, after the other jobs of its claim, with nothing else
in flight: if it kills the daemon again, only its own attempt is spent; the lease rescue gives
back the attempts of the jobs that had not started.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from dgxqueue.daemon.executor import Outcome, Work
from dgxqueue.errors import JobTimeoutError
from dgxqueue.generators import split_into_batches


def split_isolating(work: Sequence[Work], key: Callable[[Work], Hashable], size: int) -> list[list[Work]]:
    """Batches of trusted jobs as the backend groups them, then each suspect alone, the least
    suspect first (the one that killed its daemon most often runs last)."""
    trusted = [w for w in work if not w.job.suspect]
    suspects = sorted((w for w in work if w.job.suspect), key=lambda w: w.job.lease_losses)
    return split_into_batches(trusted, key, size) + [[w] for w in suspects]


def timeout_marks(outcome: Outcome) -> dict[str, Any]:
    """The column values that mark a job whose call overran the time limit as suspect."""
    if isinstance(outcome.error, JobTimeoutError):
        return {"lease_losses": outcome.job.lease_losses + 1}
    return {}
