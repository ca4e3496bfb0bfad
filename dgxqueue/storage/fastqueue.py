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
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Dialect

from dgxqueue.storage import repository
from dgxqueue.storage.driver import Compiled, Cursor, Link, Pending, is_transient_db_error
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.repository import ClaimedJob

Outcome = tuple[str, int, Mapping[str, Any]]  # (job id, attempt, column values)
log = structlog.get_logger("dgxqueue.store")


@functools.lru_cache(maxsize=64)
def _claim(dialect: Dialect, n_models: int, start: bool = False) -> Compiled:
    return Compiled.of(repository.claim_statement(dialect.name, n_models, start), dialect)


@functools.lru_cache(maxsize=512)
def _finish_rows(dialect: Dialect, keys: tuple[str, ...], n: int) -> Compiled:
    # One shape per number of rows on SQLite; on PostgreSQL ``n`` does not change the statement.
    return Compiled.of(repository.finish_rows_statement(dialect.name, keys, n if dialect.name == "sqlite" else 0),
                       dialect)


@functools.lru_cache(maxsize=128)
def _started(dialect: Dialect, n: int, started: bool = True) -> Compiled:
    # One shape per number of jobs on SQLite; on PostgreSQL ``n`` does not change the statement.
    return Compiled.of(
        repository.started_statement(dialect.name, n if dialect.name == "sqlite" else 0, started), dialect)


def claim(
    link: Link, *, worker_id: str, models: Sequence[str], limit: int, lease: timedelta, start: bool = False,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due pending jobs of ``models``, as :func:`repository.claim` does."""
    served = sorted(models)
    statement = _claim(link.dialect, len(served), start)
    params = repository.claim_parameters(worker_id=worker_id, models=served, limit=limit, lease=lease)
    with link.transaction(autocommit=True) as cursor:
        claimed = cursor.submit(statement, params)
    return repository.claimed_jobs(claimed.rows)


def mark_started(link: Link, *, worker_id: str, ids: Sequence[str], started: bool = True) -> set[str]:
    """Record that a backend call starts the held jobs ``ids``, before it does; returns the ids
    marked. One statement a call (:func:`repository.started_statement`), in autocommit on
    PostgreSQL: one round trip, and its commit does not wait for the WAL flush. ``started``
    False clears the marks."""
    if not ids:
        return set()
    statement = _started(link.dialect, len(ids), started)
    params = repository.started_parameters(link.dialect.name, worker_id, ids)
    with link.transaction(autocommit=True) as cursor:
        marked = cursor.submit(statement, params)
    return {row[0] for row in marked.rows}


def finish_many(link: Link, *, worker_id: str, outcomes: Sequence[Outcome]) -> set[str]:
    """Record outcomes, each only if its attempt is still held; returns the ids written.

    The outcomes' values are checked before (the executor refuses metadata the column cannot
    hold); should the database still refuse a value, each outcome is written alone and the one
    refused is recorded failed instead, naming the error (:func:`_finish_one_by_one`)."""
    if not outcomes:
        return set()
    try:
        return _finish_many(link, worker_id, outcomes)
    except Exception as exc:
        if not is_data_error(exc):
            raise
        return _finish_one_by_one(link, worker_id, outcomes, exc)


def _finish_many(link: Link, worker_id: str, outcomes: Sequence[Outcome]) -> set[str]:
    groups = repository.group_by_keys(outcomes)
    # One statement (the usual case: every outcome a completion) runs in autocommit.
    with link.transaction(autocommit=len(groups) == 1, pipeline=len(groups) > 1) as cursor:
        done = _submit_outcomes(cursor, link.dialect, worker_id, groups)
    return {row[0] for pending in done for row in pending.rows}


def is_data_error(exc: BaseException) -> bool:
    """An error a value caused, which writing the same values again cannot get past: the server's
    data exception class (SQLSTATE 22: a number out of range, text it cannot store), the
    driver's DataError, or a value the driver could not convert (SQLite: an integer past 64 bits)."""
    if isinstance(exc, sa.exc.DBAPIError):
        if is_transient_db_error(exc):
            return False
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        return isinstance(exc, sa.exc.DataError) or sqlstate.startswith("22")
    return isinstance(exc, ValueError | TypeError | OverflowError)


def _finish_one_by_one(link: Link, worker_id: str, outcomes: Sequence[Outcome], error: Exception) -> set[str]:
    """Each outcome in a transaction of its own; one the database refuses is recorded failed with
    a message it can store. Only if that write fails too (not the data: the schema, say) does
    the error pass, the batch's error first.

    Returns the ids written as given: a job recorded failed instead is left out, so the caller
    treats its result as not recorded (and never publishes its file) and finds the row failed by
    its own attempt."""
    written: set[str] = set()
    for job_id, attempt, values in outcomes:
        try:
            written |= _finish_many(link, worker_id, [(job_id, attempt, values)])
            continue
        except Exception as exc:
            if not is_data_error(exc):
                raise
            refused = exc
        message = f"the outcome could not be stored: {type(refused).__name__}: {refused}"
        log.error("outcome refused by the database; job recorded failed", job_id=job_id, error=message[:300])
        try:
            _finish_many(link, worker_id, [(job_id, attempt, repository.failed_values(utcnow(), message, None))])
        except Exception as exc:
            raise exc from error
    return written


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
    lease: timedelta, start: bool = False,
) -> tuple[set[str], list[ClaimedJob]]:
    """:func:`finish_many` then :func:`claim`, in one transaction: a daemon that has just finished
    its jobs asks for the next ones with the same commit (on PostgreSQL, the same round trip)."""
    served = sorted(models)
    claim_params = repository.claim_parameters(worker_id=worker_id, models=served, limit=limit, lease=lease)
    try:
        with link.transaction(pipeline=True) as cursor:
            done = _submit_outcomes(cursor, link.dialect, worker_id, repository.group_by_keys(outcomes))
            claimed = cursor.submit(_claim(link.dialect, len(served), start), claim_params)
    except Exception as exc:
        if not is_data_error(exc):
            raise
        # Rolled back, claim included: the outcomes alone, and the next round claims.
        return _finish_one_by_one(link, worker_id, outcomes, exc), []
    return {row[0] for pending in done for row in pending.rows}, repository.claimed_jobs(claimed.rows)


@functools.lru_cache(maxsize=8)
def _error_message(dialect: Dialect) -> Compiled:
    return Compiled.of(repository.error_message_statement(), dialect)


def error_messages(link: Link, ids: Sequence[str]) -> dict[str, str | None]:
    """The ``error_message`` of each of ``ids`` that exists, read on the link's own connection."""
    statement = _error_message(link.dialect)
    with link.transaction(autocommit=True) as cursor:
        found = [(job_id, cursor.submit(statement, {"id": job_id})) for job_id in ids]
    return {job_id: pending.rows[0][0] for job_id, pending in found if pending.rows}
