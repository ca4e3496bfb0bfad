"""The daemon's hot path: claims and fenced outcomes on a bare DB-API connection.

The repository's statements (the claim is :func:`repository.claim`'s, which tests and tools use
through a Session), compiled once per dialect and shape by :mod:`driver`. On PostgreSQL every call
here runs in one round trip: a single statement in autocommit (instead of BEGIN, the statement,
COMMIT), or several with their BEGIN and COMMIT in a pipeline. A batch's outcomes are one
``UPDATE ... FROM <rows>`` (:func:`repository.finish_rows_statement`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Dialect

from dgxqueue.storage import repository
from dgxqueue.storage.driver import Compiled, Cursor, Link, Pending
from dgxqueue.storage.repository import ClaimedJob

Outcome = tuple[str, int, Mapping[str, Any]]  # (job id, attempt, column values)


@functools.lru_cache(maxsize=64)
def _claim(dialect: Dialect, n_models: int) -> Compiled:
    return Compiled.of(repository.claim_statement(dialect.name, n_models), dialect)


@functools.lru_cache(maxsize=512)
def _finish_rows(dialect: Dialect, keys: tuple[str, ...], n: int) -> Compiled:
    # One shape per number of rows on SQLite; on PostgreSQL ``n`` does not change the statement.
    return Compiled.of(repository.finish_rows_statement(dialect.name, keys, n if dialect.name == "sqlite" else 0),
                       dialect)


def claim(
    link: Link, *, worker_id: str, models: Sequence[str], limit: int, now: datetime, lease: timedelta
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due pending jobs of ``models``, as :func:`repository.claim` does."""
    served = sorted(models)
    statement = _claim(link.dialect, len(served))
    params = repository.claim_parameters(worker_id=worker_id, models=served, limit=limit, now=now, lease=lease)
    with link.transaction(autocommit=True) as cursor:
        claimed = cursor.submit(statement, params)
    return repository.claimed_jobs(claimed.rows)


def finish_many(link: Link, *, worker_id: str, outcomes: Sequence[Outcome]) -> set[str]:
    """Record outcomes, each only if its attempt is still held; returns the ids written."""
    if not outcomes:
        return set()
    groups = repository.group_by_keys(outcomes)
    # One statement (the usual case: every outcome a completion) runs in autocommit.
    with link.transaction(autocommit=len(groups) == 1, pipeline=len(groups) > 1) as cursor:
        done = _submit_outcomes(cursor, link.dialect, worker_id, groups)
    return {row[0] for pending in done for row in pending.rows}


def _submit_outcomes(
    cursor: Cursor, dialect: Dialect, worker_id: str, groups: Mapping[tuple[str, ...], Sequence[Outcome]]
) -> list[Pending]:
    """One ``UPDATE ... FROM <rows> RETURNING id`` per group of outcomes setting the same columns."""
    return [
        cursor.submit(_finish_rows(dialect, keys, len(rows)),
                      repository.finish_rows_parameters(dialect.name, worker_id, keys, rows))
        for keys, rows in groups.items()
    ]


def finish_and_claim(
    link: Link, *, worker_id: str, outcomes: Sequence[Outcome], models: Sequence[str], limit: int,
    now: datetime, lease: timedelta,
) -> tuple[set[str], list[ClaimedJob]]:
    """:func:`finish_many` then :func:`claim`, in one transaction: a daemon that has just finished
    its jobs asks for the next ones with the same commit (on PostgreSQL, the same round trip)."""
    served = sorted(models)
    claim_params = repository.claim_parameters(worker_id=worker_id, models=served, limit=limit, now=now, lease=lease)
    with link.transaction(pipeline=True) as cursor:
        done = _submit_outcomes(cursor, link.dialect, worker_id, repository.group_by_keys(outcomes))
        claimed = cursor.submit(_claim(link.dialect, len(served)), claim_params)
    return {row[0] for pending in done for row in pending.rows}, repository.claimed_jobs(claimed.rows)
