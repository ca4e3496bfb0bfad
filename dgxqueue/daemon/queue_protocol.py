"""What the daemon asks of its queue: :class:`DaemonQueue`, one daemon's view of the jobs table.

Two implementations: :class:`~dgxqueue.daemon.queue_client.QueueClient` on SQLite or PostgreSQL,
and :class:`~dgxqueue.testing.MemoryQueue` in memory, for fast tests. The rules every
implementation keeps are pinned by one conformance suite (``tests/conformance/``):

- A claim takes due pending jobs of the daemon's models, highest ``priority`` first, then oldest;
  it counts an attempt and gives the job a lease, both by the queue's own clock.
- ``(worker_id, attempt)`` is the fencing token: a heartbeat, a start mark or a result applies
  only while this daemon still holds that attempt, so a daemon that lost a lease changes nothing.
- The rescue requeues jobs whose lease expired, refunding the attempt of a job no backend call
  started; a job that was running spends it and is marked (``lease_losses``) to run alone, and is
  failed once its attempts are spent after it already ran alone.
- A release gives a job back without spending its attempt.
- The registry of live daemons (:mod:`dgxqueue.storage.registry`): a registered daemon is live
  for one lease period after its last refresh, then stale; a stale entry is forgotten
  :data:`~dgxqueue.storage.registry.FORGET_AFTER_LEASES` lease periods after its last refresh.
- A heartbeat writes the progress given for held jobs and reports which held jobs have a cancel
  asked (``cancel_requested_at``); a cancelled result fails the job with ``cancelled_at`` set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Protocol

from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.queue import AttemptState, Beat, Progress
from dgxqueue.storage.registry import DaemonEntry
from dgxqueue.storage.results import Result

#: One result to record: the attempt it belongs to (its fencing token) and what it came to.
JobResult = tuple[ClaimedJob, Result]


class DaemonQueue(Protocol):
    """Claim, heartbeat, finish, release and rescue, for one daemon (``worker_id``)."""

    worker_id: str
    #: The models this daemon serves, sorted: it claims no other.
    models: tuple[str, ...]
    #: How long a claim or a heartbeat holds a job.
    lease: timedelta
    #: ``time.monotonic()`` after which a failing call is not tried again (a stop sets it).
    deadline: float | None

    def claim(self, limit: int, *, start: bool = False) -> list[ClaimedJob]:
        """Claim up to ``limit`` due jobs, oldest first; ``start`` marks them started too."""
        ...

    def extend(self, jobs: Sequence[ClaimedJob], progress: Progress | None = None) -> Beat:
        """Refresh the leases of ``jobs`` (fenced on each attempt) and write the ``progress``
        given for some of them, in one statement; returns the ids this daemon still holds and,
        of those, the ones whose cancel was asked."""
        ...

    def mark_started(self, jobs: Sequence[ClaimedJob], *, started: bool = True) -> set[str]:
        """Record that a backend call starts ``jobs`` (or, ``started`` False, that it does not);
        returns the ids marked."""
        ...

    def finish(self, results: Sequence[JobResult]) -> list[bool]:
        """Record results together; False where the write was fenced off."""
        ...

    def finish_and_claim(
        self, results: Sequence[JobResult], limit: int, *, start: bool = False
    ) -> tuple[list[bool], list[ClaimedJob]]:
        """:meth:`finish`, then :meth:`claim`, at once (a retry without backoff may come back)."""
        ...

    def release(self, jobs: Sequence[ClaimedJob], messages: Mapping[str, str] | None = None) -> list[bool]:
        """Give jobs back without spending their attempt; ``messages``: an ``error_message`` to
        leave on some, by id (else the last one stays). False where fenced off."""
        ...

    def error_messages(self, ids: Sequence[str]) -> dict[str, str | None]:
        """The ``error_message`` of each of ``ids`` that exists (a machine fault's tally lives there)."""
        ...

    def attempts(self, ids: Sequence[str]) -> dict[str, AttemptState]:
        """Where each of ``ids`` that exists stands (for the files of its attempts)."""
        ...

    def rescue(self) -> tuple[list[str], list[str]]:
        """Requeue or fail every job whose lease expired, whoever held it; returns the ids
        (requeued, failed)."""
        ...

    def expire(self) -> list[tuple[str, str]]:
        """Fail every pending job past its ``expires_at`` without running it, whatever its model;
        returns (id, model) of each."""
        ...

    def has_work(self) -> bool:
        """Due jobs of this daemon's models, or retries waiting out their backoff."""
        ...

    def next_due(self) -> timedelta | None:
        """How long until the earliest not-yet-due pending job of this daemon's models is due."""
        ...

    def register(self, entry: DaemonEntry) -> None:
        """Record this daemon in the registry (``entry.id`` is ``worker_id``), live for a lease."""
        ...

    def refresh_registration(self, holding: Sequence[str]) -> bool:
        """Keep this daemon's entry live another lease and record the job ids it holds; False if
        the entry is gone (forgotten after a long outage): register again."""
        ...

    def unregister(self) -> None:
        """Remove this daemon's entry (a clean stop)."""
        ...

    def forget_dead_daemons(self) -> list[str]:
        """Delete every daemon's entry stale for long enough (see the registry); their ids."""
        ...

    def ping(self) -> None:
        """Raise if the queue cannot be reached."""
        ...

    def close(self) -> None:
        """Let go of what the queue holds (a connection)."""
        ...
