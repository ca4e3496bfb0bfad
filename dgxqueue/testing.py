"""An in-memory queue for tests: :class:`MemoryStore` holds the jobs, :class:`MemoryQueue` is one
daemon's view of it (a :class:`~dgxqueue.daemon.queue_protocol.DaemonQueue`, as
:class:`~dgxqueue.daemon.queue_client.QueueClient` is on a database).

The rows have the ``generations`` table's columns and follow the SQL's rules (claim order and
due-ness, leases and the fencing token, start marks, the rescue's refunds, ``lease_losses`` and
failures, releases, paused models, expiry, dedupe keys), with :attr:`MemoryStore.clock`
standing in for the database's clock: give it a :class:`ManualClock` and time passes when a
test says so. The same conformance suite runs against it, SQLite and PostgreSQL
(``tests/conformance/``), so a daemon tested on it behaves as on a database::

    store = MemoryStore(clock=ManualClock())
    job_id = store.enqueue("a prompt", model_name="synth")
    daemon = Daemon(settings, queue=store.client(worker_id="w", models=["synth"], lease=lease),
                    generator=generator, waker=MemoryWaker(store), clock=store.clock)

What it does not emulate, because in memory it cannot arise: values a column cannot hold (rows
written by plain SQL: a time column holding words, metadata that is not JSON; see
``docs/FAULTS.md``), values an engine refuses in an outcome (each engine's own limits), transient
database errors and their retries, and concurrency beyond one lock (every call is atomic, as each
is one transaction on a database). Producer inserts go through the door's validation
(:func:`dgxqueue.storage.validate_job`) and become rows as the insert makes them
(:func:`dgxqueue.storage.queue.job_row`); ``prompts`` is a counter of uses.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from dgxqueue.daemon.queue_protocol import JobResult
from dgxqueue.storage import JobSpec, validate_job
from dgxqueue.storage.claimed import CLAIM_COLUMNS, ClaimedJob, claimed_jobs
from dgxqueue.storage.models import COMPLETED, FAILED, PENDING, PROCESSING, G, as_utc, utcnow
from dgxqueue.storage.queue import (
    EXPIRED_MESSAGE,
    EXPIRY_GIVEN,
    EXPIRY_TTL,
    RESCUED_CANCEL_MESSAGE,
    RUN_AFTER_DELAY,
    RUN_AFTER_GIVEN,
    AttemptState,
    Beat,
    Progress,
    job_row,
    refused_paths,
)
from dgxqueue.storage.registry import FORGET_AFTER_LEASES, DaemonEntry, LiveDaemon
from dgxqueue.storage.results import BACKOFF_SECONDS, STAMPED_AT_WRITE, Released, row_values
from dgxqueue.storage.validation import path_taken

__all__ = ["ManualClock", "MemoryQueue", "MemoryStore", "MemoryWaker"]

Row = dict[str, Any]

# Each column with its server default (``attempts`` 0, ``max_attempts`` 3, ``lease_losses`` 0),
# read from the table so that a new column needs no edit here.
_BLANK: Row = {
    column.name: int(column.server_default.arg) if isinstance(column.server_default, sa.DefaultClause)
    and isinstance(column.server_default.arg, str) and column.server_default.arg.isdigit() else None
    for column in G.columns
}
# The claim's RETURNING columns, in the order claimed_jobs reads them.
_CLAIMED = tuple(column.name for column in CLAIM_COLUMNS)
#: How far apart created_at stamps rows inserted within one tick of the clock (a ManualClock's).
_STAMP_STEP = timedelta(microseconds=1)


def _expired(row: Row, now: datetime) -> bool:
    return row["expires_at"] is not None and row["expires_at"] <= now


class ManualClock:
    """A clock that moves only when told to (:meth:`advance`): the database's clock in tests."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = as_utc(start) if start is not None else utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta | float) -> None:
        self.now += by if isinstance(by, timedelta) else timedelta(seconds=by)


def _stored(column: str, value: Any) -> Any:
    """``value`` as the column would give it back: times in UTC, metadata as a JSON copy."""
    if column not in _BLANK:
        raise ValueError(f"generations has no column {column!r}")
    if isinstance(value, datetime):
        return as_utc(value)
    if column == "metadata" and value is not None:
        return json.loads(json.dumps(value))
    return value


class MemoryStore:
    """The ``generations`` rows in memory, in insertion order, each call atomic under one lock."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        #: The database's clock: leases, due-ness and the rescue read it (a :class:`ManualClock` in tests).
        self.clock = clock
        #: Every row by id, as the table holds it; read it to check a test's outcome.
        self.jobs: dict[str, Row] = {}
        #: How often each prompt was enqueued (the ``prompts`` table's ``used_count``).
        self.prompts: Counter[str] = Counter()
        #: The paused models (``paused_models``), with their reasons: no claim takes their jobs.
        self.paused: dict[str, str | None] = {}
        #: Counts writes, as SQLite's ``PRAGMA data_version`` does: :class:`MemoryWaker` watches it.
        self.version = 0
        #: The registry of live daemons by id (the ``daemons`` table's rows, lists as tuples).
        self.daemons: dict[str, Row] = {}
        self.lock = threading.RLock()
        #: The newest created_at stamped (the next is at least a microsecond after it).
        self.stamped = datetime.min.replace(tzinfo=UTC)

    def client(self, *, worker_id: str, models: Iterable[str], lease: timedelta) -> MemoryQueue:
        """One daemon's view of the store, as :class:`~dgxqueue.daemon.queue_client.QueueClient`
        is of a database."""
        return MemoryQueue(self, worker_id=worker_id, models=models, lease=lease)

    # --- the producer's side ---

    def insert(self, jobs: Sequence[JobSpec]) -> list[str]:
        """Insert validated jobs as the database's insert makes their rows, and count their
        prompts; all or none. A job whose ``dedupe_key`` an unfinished job holds is not inserted:
        its place in the answer holds the holder's id."""
        rows = [job_row(job) for job in jobs]
        for row in rows:
            del row[EXPIRY_GIVEN], row[RUN_AFTER_GIVEN]  # the row holds them as expires_at, run_after
        with self.lock:
            # created_at and a ttl count from the database's clock, as the insert's do; rows
            # stamped one after another keep their order, as the database's stamp() keeps it.
            inserted = self.clock()
            for row in rows:
                self.stamped = max(inserted, self.stamped + _STAMP_STEP)
                row["created_at"] = self.stamped
                delay = row.pop(RUN_AFTER_DELAY)
                if delay is not None:
                    row["run_after"] = inserted + timedelta(seconds=delay)
                ttl = row.pop(EXPIRY_TTL)
                if ttl is not None:
                    row["expires_at"] = inserted + timedelta(seconds=ttl)
            new = [{**_BLANK, **{key: _stored(key, value) for key, value in row.items()}} for row in rows]
            taken = [row["id"] for row in new if row["id"] in self.jobs]
            if taken or len({row["id"] for row in new}) < len(new):
                raise ValueError(f"duplicate job id: {taken or 'within the batch'}")
            holders = {row["dedupe_key"]: row["id"] for row in self.jobs.values()
                       if row["dedupe_key"] is not None and row["status"] in (PENDING, PROCESSING)}
            # Planned first, written after: a refused path leaves nothing written, as a rollback does.
            ids, expire, insert = [], [], []
            for row in new:
                key = row["dedupe_key"]
                holder = self.jobs.get(holders.get(key, ""))
                if holder is not None and holder["status"] == PENDING and _expired(holder, inserted):
                    expire.append(holder)  # never to run: expired now, as the insert does, and the key is free
                    del holders[key]
                if key is not None and key in holders:
                    ids.append(holders[key])
                    continue
                if key is not None:
                    holders[key] = row["id"]
                insert.append(row)
                ids.append(row["id"])
            self._refuse_taken_paths(jobs, insert, expiring={holder["id"] for holder in expire})
            for holder in expire:
                holder.update(status=FAILED, expired_at=inserted, completed_at=inserted, error_message=EXPIRED_MESSAGE)
            for row in insert:
                self.jobs[row["id"]] = row
                self.prompts[row["prompt"]] += 1
            self.version += 1
            return ids

    def _refuse_taken_paths(self, jobs: Sequence[JobSpec], insert: Sequence[dict[str, Any]],
                            expiring: set[str]) -> None:
        """As the database refuses them: the door's named refusal, then the unique index's. A failed
        job holds no path; nor, for the index, does a holder this insert expires (the door's lookup
        runs before the insert, while that holder is still pending)."""
        held = {row["file_path"]: row for row in self.jobs.values() if row["status"] != FAILED}
        seen: set[str] = set()
        for job in jobs:
            if job.dedupe_key is None and job.file_path in seen:
                raise path_taken(job.file_path, "another job of this batch writes to it too")
            if job.dedupe_key is None:
                seen.add(job.file_path)
            holder = held.get(job.file_path)
            if job.dedupe_key is None and holder is not None:
                raise path_taken(job.file_path, f"job {holder['id']} ({holder['status']}) writes to it")
        paths = [row["file_path"] for row in insert]
        kept = {path for path, row in held.items() if row["id"] not in expiring}
        if len(set(paths)) < len(paths) or kept & set(paths):
            raise path_taken(refused_paths(jobs))

    def enqueue(self, prompt: str, *, priority: int = 0, **fields: Any) -> str:
        """Validate one job as ``dgxqueue.enqueue`` does (default settings) and insert it; its id."""
        job = validate_job(prompt, priority=priority, **fields)
        return self.insert([job])[0]

    def cancel(self, job_id: str) -> Row:
        """:func:`dgxqueue.storage.admin.cancel_job`'s rule: a pending job fails at once, a running
        one gets ``cancel_requested_at`` for its daemon's heartbeat; a finished one refuses."""
        from dgxqueue.errors import InvalidStateError, JobNotFoundError
        from dgxqueue.storage.admin import CANCELLED_MESSAGE

        with self.lock:
            row = self.jobs.get(job_id)
            if row is None:
                raise JobNotFoundError(job_id)
            now = self.clock()
            if row["status"] == PENDING:
                row.update(status=FAILED, error_message=CANCELLED_MESSAGE, completed_at=now,
                           cancel_requested_at=now, cancelled_at=now)
            elif row["status"] == PROCESSING:
                row["cancel_requested_at"] = row["cancel_requested_at"] or now
            else:
                raise InvalidStateError(f"generation {job_id} is already {row['status']}; only pending or running "
                                        "jobs can be cancelled")
            self.version += 1
            return dict(row)

    def reset(self) -> None:
        """Forget every job, prompt and pause."""
        with self.lock:
            self.jobs.clear()
            self.prompts.clear()
            self.paused.clear()
            self.version += 1

    def live_daemons(self, *, include_stale: bool = False) -> list[LiveDaemon]:
        """:func:`dgxqueue.storage.registry.daemons` on the store's registry."""
        with self.lock:
            now = self.clock()
            found = [LiveDaemon(**row, heartbeat_age=max(now - row["heartbeat_at"], timedelta(0)),
                                stale=row["expires_at"] < now) for row in self.daemons.values()]
        return sorted((d for d in found if include_stale or not d.stale), key=lambda d: (d.started_at, d.id))

    # --- the operator's side ---

    def pause(self, model: str, reason: str | None = None) -> bool:
        """:func:`dgxqueue.storage.admin.pause_model`: no claim takes ``model``'s jobs until resumed."""
        with self.lock:
            added = model not in self.paused
            self.paused[model] = reason
            self.version += 1
            return added

    def resume(self, model: str) -> bool:
        """:func:`dgxqueue.storage.admin.resume_model`; the change wakes :class:`MemoryWaker`."""
        with self.lock:
            if model not in self.paused:
                return False
            del self.paused[model]
            self.version += 1
            return True

    # --- the rescuer's side: every daemon's expired leases, and expired pending jobs ---

    def expire(self) -> list[tuple[str, str]]:
        """:func:`dgxqueue.storage.queue.expire_pending`: pending jobs past ``expires_at`` fail unrun."""
        with self.lock:
            now = self.clock()
            rows = [row for row in self.jobs.values() if row["status"] == PENDING and _expired(row, now)]
            for row in rows:
                row.update(status=FAILED, expired_at=now, completed_at=now, error_message=EXPIRED_MESSAGE)
            if rows:
                self.version += 1
            return [(row["id"], row["model_name"]) for row in rows]

    def rescue(self) -> tuple[list[str], list[str]]:
        """:func:`dgxqueue.storage.queue.rescue_expired`'s three updates, in its order."""
        with self.lock:
            now = self.clock()
            expired = [row for row in self.jobs.values() if row["status"] == PROCESSING
                       and (row["lease_expires_at"] is None or row["lease_expires_at"] < now)]
            released = {"status": PENDING, "worker_id": None, "lease_expires_at": None, "run_after": None,
                        "claimed_at": None}
            refunded, requeued, failed, cancelled = [], [], [], []
            for row in expired:
                if row["cancel_requested_at"] is not None:  # its daemon died before stopping it
                    row.update(status=FAILED, worker_id=None, lease_expires_at=None, completed_at=now,
                               cancelled_at=now, error_message=RESCUED_CANCEL_MESSAGE)
                    cancelled.append(row["id"])
            expired = [row for row in expired if row["id"] not in cancelled]
            for row in expired:
                if row["started_at"] is None:  # its daemon died running other jobs
                    row.update(released, attempts=max(row["attempts"] - 1, 0),
                               error_message="lease expired before it started: its daemon died or stalled "
                                             "running other jobs; requeued without spending an attempt")
                    refunded.append(row["id"])
            for row in expired:
                if row["id"] in refunded:
                    continue
                spent = row["attempts"] >= row["max_attempts"]
                losses = row["lease_losses"] + 1
                if not spent or row["lease_losses"] == 0:
                    row.update(released, attempts=row["attempts"] - 1 if spent else row["attempts"],
                               lease_losses=losses, started_at=None,
                               error_message=f"lease lost while it ran: its daemon died or stalled ({losses} "
                                             "time(s)); requeued to run alone")
                    requeued.append(row["id"])
                else:
                    row.update(status=FAILED, worker_id=None, lease_expires_at=None, completed_at=now,
                               lease_losses=losses,
                               error_message=f"killed its daemon {losses} times: its lease expired while it "
                                             "ran alone, on its last attempt")
                    failed.append(row["id"])
            if expired or cancelled:
                self.version += 1
            return [*refunded, *requeued], [*cancelled, *failed]


class MemoryQueue:
    """:class:`~dgxqueue.daemon.queue_protocol.DaemonQueue` on a :class:`MemoryStore`, for one daemon."""

    def __init__(self, store: MemoryStore, *, worker_id: str, models: Iterable[str], lease: timedelta) -> None:
        self.store = store
        self.worker_id = worker_id
        self.models = tuple(sorted(models))
        self.lease = lease
        self.deadline: float | None = None  # nothing here is retried: kept for the daemon's sake
        self.closed = False

    def _held(self, job_id: str, attempt: int | None = None) -> Row | None:
        """The row of ``job_id`` if this daemon holds it (that attempt of it, when given)."""
        row = self.store.jobs.get(job_id)
        if row is None or row["status"] != PROCESSING or row["worker_id"] != self.worker_id:
            return None
        return row if attempt is None or row["attempts"] == attempt else None

    def _claim(self, limit: int, start: bool) -> list[ClaimedJob]:
        now = self.store.clock()
        due = [row for row in self.store.jobs.values()
               if row["status"] == PENDING and row["model_name"] in self.models
               and row["model_name"] not in self.store.paused and not _expired(row, now)
               and (row["run_after"] is None or row["run_after"] <= now)]
        due.sort(key=lambda row: (-row["priority"], row["created_at"]))  # stable: insertion order breaks ties
        chosen = due[:max(0, limit)]
        for row in chosen:
            row.update(status=PROCESSING, worker_id=self.worker_id, attempts=row["attempts"] + 1, claimed_at=now,
                       started_at=now if start else None, lease_expires_at=now + self.lease)
        if chosen:
            self.store.version += 1
        return claimed_jobs([tuple(copy.deepcopy(row[name]) for name in _CLAIMED) for row in chosen])

    def _finish(self, results: Sequence[JobResult]) -> list[bool]:
        written = []
        for job, result in results:
            values = dict(row_values(job, result))
            if BACKOFF_SECONDS in values:  # a backoff counts from the store's clock, the database's
                values["run_after"] = self.store.clock() + timedelta(seconds=values.pop(BACKOFF_SECONDS))
            for key in STAMPED_AT_WRITE:  # a time left to the write: the store's clock, the database's
                if key in values and values[key] is None:
                    values[key] = self.store.clock()
            stored = {key: _stored(key, value) for key, value in values.items()}
            row = self._held(job.id, job.attempt)
            if row is not None and stored.get("status") == PENDING and row["cancel_requested_at"] is not None:
                row = None  # never back to pending once a cancel was asked: the rescue fails it cancelled
            if row is not None:
                row.update(lease_expires_at=None, **stored)
                if row["status"] == COMPLETED and row["progress_total"] is not None:  # as the SQL's CASE
                    row["progress_done"] = row["progress_total"]
            written.append(row is not None)
        if any(written):
            self.store.version += 1
        return written

    def claim(self, limit: int, *, start: bool = False) -> list[ClaimedJob]:
        with self.store.lock:
            return self._claim(limit, start)

    def extend(self, jobs: Sequence[ClaimedJob], progress: Progress | None = None) -> Beat:
        with self.store.lock:
            until = self.store.clock() + self.lease
            held = [row for job in jobs if (row := self._held(job.id, job.attempt)) is not None]
            progress = progress or {}
            for row in held:
                row["lease_expires_at"] = until
                if row["id"] in progress:
                    row["progress_done"], row["progress_total"] = progress[row["id"]]
            return Beat({row["id"] for row in held},
                        {row["id"] for row in held if row["cancel_requested_at"] is not None})

    def mark_started(self, jobs: Sequence[ClaimedJob], *, started: bool = True) -> set[str]:
        # As the SQL: by id and holder, whatever the attempt.
        with self.store.lock:
            now = self.store.clock()
            held = [row for job in jobs if (row := self._held(job.id)) is not None]
            for row in held:
                row["started_at"] = now if started else None
            return {row["id"] for row in held}

    def finish(self, results: Sequence[JobResult]) -> list[bool]:
        with self.store.lock:
            return self._finish(results)

    def finish_and_claim(
        self, results: Sequence[JobResult], limit: int, *, start: bool = False
    ) -> tuple[list[bool], list[ClaimedJob]]:
        with self.store.lock:
            return self._finish(results), self._claim(limit, start)

    def release(self, jobs: Sequence[ClaimedJob], messages: Mapping[str, str] | None = None) -> list[bool]:
        messages = messages or {}
        return self.finish([(job, Released(messages.get(job.id))) for job in jobs])

    def error_messages(self, ids: Sequence[str]) -> dict[str, str | None]:
        with self.store.lock:
            return {job_id: self.store.jobs[job_id]["error_message"] for job_id in ids if job_id in self.store.jobs}

    def attempts(self, ids: Sequence[str]) -> dict[str, AttemptState]:
        with self.store.lock:
            rows = [self.store.jobs[job_id] for job_id in ids if job_id in self.store.jobs]
            return {row["id"]: AttemptState(row["status"], row["worker_id"], row["attempts"], row["file_path"],
                                            row["file_size_bytes"]) for row in rows}

    def rescue(self) -> tuple[list[str], list[str]]:
        return self.store.rescue()

    def expire(self) -> list[tuple[str, str]]:
        return self.store.expire()

    def _pending(self) -> list[Row]:
        jobs = self.store.jobs.values()
        return [row for row in jobs if row["status"] == PENDING and row["model_name"] in self.models
                and row["model_name"] not in self.store.paused]

    def has_work(self) -> bool:
        with self.store.lock:
            now = self.store.clock()
            return any((row["run_after"] is None or row["run_after"] <= now or row["attempts"] > 0)
                       and not _expired(row, now) for row in self._pending())

    def next_due(self) -> timedelta | None:
        with self.store.lock:
            now = self.store.clock()
            later = [row["run_after"] for row in self._pending()
                     if row["run_after"] is not None and row["run_after"] > now]
            return min(later) - now if later else None

    def register(self, entry: DaemonEntry) -> None:
        with self.store.lock:
            now = self.store.clock()
            self.store.daemons[entry.id] = {
                "id": entry.id, "host": entry.host, "pid": entry.pid, "generator": entry.generator,
                "models": tuple(entry.models), "version": entry.version, "started_at": now, "heartbeat_at": now,
                "expires_at": now + self.lease, "holding": (),
            }

    def refresh_registration(self, holding: Sequence[str]) -> bool:
        with self.store.lock:
            row = self.store.daemons.get(self.worker_id)
            if row is None:
                return False
            now = self.store.clock()
            row.update(heartbeat_at=now, expires_at=now + self.lease, holding=tuple(holding))
            return True

    def unregister(self) -> None:
        with self.store.lock:
            self.store.daemons.pop(self.worker_id, None)

    def forget_dead_daemons(self) -> list[str]:
        with self.store.lock:
            cutoff = self.store.clock() - self.lease * (FORGET_AFTER_LEASES - 1)
            gone = [daemon_id for daemon_id, row in self.store.daemons.items() if row["expires_at"] < cutoff]
            for daemon_id in gone:
                del self.store.daemons[daemon_id]
            return gone

    def ping(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class MemoryWaker:
    """The daemon's idle wait (:class:`~dgxqueue.daemon.waker.Waker`) on a :class:`MemoryStore`:
    it returns as soon as the store was written or :meth:`wake` was called. On a
    :class:`ManualClock` an idle wait makes the time pass at once instead, so a daemon waiting
    out a retry's backoff does so in no time."""

    def __init__(self, store: MemoryStore, interval: float = 0.005) -> None:
        self._store = store
        self._interval = interval
        self._seen = store.version
        self._woken = False  # a plain assignment: safe from a signal handler

    def wait(self, timeout: float) -> bool:
        clock = self._store.clock
        deadline = time.monotonic() + timeout
        while not self._changed():
            if isinstance(clock, ManualClock):  # nothing else can happen: let the time pass
                clock.advance(timeout)
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self._interval, left))
        return True

    def _changed(self) -> bool:
        version = self._store.version
        changed = self._woken or version != self._seen
        self._seen, self._woken = version, False
        return changed

    def wake(self) -> None:
        self._woken = True

    def cancels(self) -> set[str]:
        return set()  # the heartbeat reads cancels from the store

    def close(self) -> None:
        pass
