"""The daemon's database calls, each one short transaction retried through hiccups.

Every call is one of :mod:`dgxqueue.storage.queue`'s operations: claims and results, once or
more per job, on the main loop's own connection; the rarer calls through a Session.

tenacity retries a call when the database is briefly unavailable: SQLite's ``database is
locked``, a PostgreSQL restart, a dropped connection, a serialization failure. Each call is its
own transaction, so a retry repeats the whole of it. Which errors are worth it is
:func:`dgxqueue.storage.dberrors.is_transient_db_error` (the CLI's exit codes use it too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
import tenacity
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dgxqueue.storage import queue, registry
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.database import session_scope
from dgxqueue.storage.dberrors import is_transient_db_error
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.storage.results import Released, Result

T = TypeVar("T")
#: How long a registry write is retried: it records the daemon for operators, and must not hold
#: up the job work behind it (the next heartbeat writes it again).
REGISTRY_RETRY_SECONDS = 2.0
log = structlog.get_logger("dgxqueue.store")
def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    # +1: the plain first try (QueueClient._retry) came before tenacity's attempts.
    log.warning("database call failed, retrying", attempt=state.attempt_number + 1, error=str(exc)[:300])


def _written(results: Sequence[tuple[ClaimedJob, Result]], written: set[str]) -> list[bool]:
    return [job.id in written for job, _ in results]


class _PastDeadline(tenacity.stop.stop_base):
    """Stop retrying once the store's ``deadline`` has passed."""

    def __init__(self, store: QueueClient) -> None:
        self.store = store

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.store.deadline is not None and time.monotonic() >= self.store.deadline


class QueueClient:
    """Claim, heartbeat, finish, release and rescue, for one daemon."""

    def __init__(
        self,
        engine: Engine,
        *,
        worker_id: str,
        models: Iterable[str],
        lease: timedelta,
        retry_for_seconds: float = 15.0,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.models = tuple(sorted(models))
        self.lease = lease
        self._link = HeldConnection(engine)  # the main loop's own connection for claims and outcomes
        #: time.monotonic() after which a failing call is not tried again (a stop sets it)
        self.deadline: float | None = None
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient_db_error),
            wait=tenacity.wait_exponential(multiplier=0.05, max=2.0) + tenacity.wait_random(0, 0.05),
            stop=tenacity.stop_after_delay(retry_for_seconds) | _PastDeadline(self),
            before_sleep=_log_retry,
            sleep=sleep or tenacity.nap.sleep,
            reraise=True,
        )
        self._registry_retrying = self._retrying.copy(
            stop=tenacity.stop_after_delay(min(retry_for_seconds, REGISTRY_RETRY_SECONDS)) | _PastDeadline(self))

    def _retry(self, call: Callable[[], T], retrying: tenacity.Retrying | None = None) -> T:
        """``call()``, retried through transient errors. The first try is a plain call: tenacity's
        bookkeeping is a real share of a fast claim on SQLite, so it starts only on a failure."""
        try:
            return call()
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise
            log.warning("database call failed, retrying", attempt=1, error=str(exc)[:300])
        return (retrying or self._retrying)(call)

    def _run(self, fn: Callable[[Session], T], retrying: tenacity.Retrying | None = None) -> T:
        def attempt() -> T:
            with session_scope(self.engine) as session:
                return fn(session)

        return self._retry(attempt, retrying)

    def close(self) -> None:
        self._link.close()

    def ping(self) -> None:
        self._run(lambda s: s.execute(sa.select(1)).scalar_one())

    # Every lease and due time is the database's clock (see engines.Profile), never the
    # daemon's: no call here takes the time.

    def claim(self, limit: int, *, start: bool = False) -> list[ClaimedJob]:
        """Claim up to ``limit`` jobs; ``start`` marks them started (the next backend call runs them)."""
        return self._retry(lambda: queue.claim(
            self._link, worker_id=self.worker_id, models=self.models, limit=limit, lease=self.lease, start=start,
        ))

    def extend(self, jobs: Sequence[ClaimedJob], progress: queue.Progress | None = None) -> queue.Beat:
        """Refresh the leases of ``jobs`` and write their ``progress``; returns the ids this
        daemon still holds and those whose cancel was asked."""
        pairs = [(job.id, job.attempt) for job in jobs]
        return self._run(lambda s: queue.extend(
            s, worker_id=self.worker_id, jobs=pairs, lease=self.lease, progress=progress,
        ))

    def mark_started(self, jobs: Sequence[ClaimedJob], *, started: bool = True) -> set[str]:
        """Record that a backend call starts ``jobs`` (before it does), or with ``started`` False
        that it does not; returns the ids marked."""
        ids = [job.id for job in jobs]
        return self._retry(lambda: queue.mark_started(self._link, worker_id=self.worker_id, ids=ids,
                                                      started=started))

    def finish(self, results: Sequence[tuple[ClaimedJob, Result]]) -> list[bool]:
        """Record several jobs' results in one transaction; False where the write was fenced off."""
        if not results:
            return []
        written = self._retry(lambda: queue.finish(self._link, worker_id=self.worker_id, results=results))
        return _written(results, written)

    def finish_and_claim(
        self, results: Sequence[tuple[ClaimedJob, Result]], limit: int, *, start: bool = False
    ) -> tuple[list[bool], list[ClaimedJob]]:
        """:meth:`finish`, then claim up to ``limit`` more jobs (``start``: as :meth:`claim`), with
        one commit."""
        written, claimed = self._retry(lambda: queue.finish_and_claim(
            self._link, worker_id=self.worker_id, results=results, models=self.models, limit=limit,
            lease=self.lease, start=start,
        ))
        return _written(results, written), claimed

    def release(self, jobs: Sequence[ClaimedJob], messages: Mapping[str, str] | None = None) -> list[bool]:
        """Give jobs back to the queue without spending their attempt (graceful stop, machine
        fault); ``messages``: the ``error_message`` to leave on some of them, by id."""
        messages = messages or {}
        return self.finish([(job, Released(messages.get(job.id))) for job in jobs])

    def error_messages(self, ids: Sequence[str]) -> dict[str, str | None]:
        """On the held connection: after a machine fault (no file descriptors left) a new one may
        not open."""
        return self._retry(lambda: queue.error_messages(self._link, ids))

    def attempts(self, ids: Sequence[str]) -> dict[str, queue.AttemptState]:
        """Where each of these jobs stands (for the files of its attempts)."""
        return self._run(lambda s: queue.attempt_states(s, ids))

    def rescue(self) -> tuple[list[str], list[str]]:
        def rescue(session: Session) -> tuple[list[str], list[str]]:
            requeued, failed = queue.rescue_expired(session)
            if requeued:
                queue.notify(session, self.models)
            return requeued, failed
        return self._run(rescue)

    def expire(self) -> list[tuple[str, str]]:
        """Fail the pending jobs past their ``expires_at``, whatever their model; (id, model) of each."""
        return self._run(queue.expire_pending)

    def has_work(self) -> bool:
        """Due jobs, or retries waiting out their backoff, for this daemon's models (burst mode)."""
        return self._run(lambda s: queue.has_work(s, self.models))

    def next_due(self) -> timedelta | None:
        """How long until the earliest not-yet-due pending job of this daemon's models is due."""
        return self._run(lambda s: queue.next_due(s, self.models))

    # The registry of live daemons: short retries (REGISTRY_RETRY_SECONDS); the caller logs a failure.

    def register(self, entry: registry.DaemonEntry) -> None:
        self._run(lambda s: registry.register(s, entry, lease=self.lease), self._registry_retrying)

    def refresh_registration(self, holding: Sequence[str]) -> bool:
        ids = list(holding)
        return self._run(lambda s: registry.refresh(s, self.worker_id, ids, lease=self.lease),
                         self._registry_retrying)

    def unregister(self) -> None:
        self._run(lambda s: registry.unregister(s, self.worker_id), self._registry_retrying)

    def forget_dead_daemons(self) -> list[str]:
        return self._run(lambda s: registry.forget_dead(s, lease=self.lease), self._registry_retrying)
