"""Job handles for producers: submit a job, read where it stands, wait for its end, cancel it.

:func:`submit` takes :func:`~dgxqueue.api.enqueue`'s arguments and returns a :class:`Job`;
:func:`get_job` rebuilds one from an id. A handle holds the row as last read: :meth:`Job.refresh`
reads it again, :meth:`Job.wait` blocks until the job is ``completed`` or ``failed``.

Waiting does not poll the jobs' rows in a loop. On PostgreSQL the waiter LISTENs on the
completion events channel (:data:`~dgxqueue.storage.queue.EVENTS_CHANNEL`) and reads a row
again when an event names it; on SQLite it reads ``PRAGMA data_version`` (a counter that changes
when another connection commits, read without a lock) every :data:`SQLITE_CHECK_SECONDS` and
reads the rows only when it changed. Either way every :data:`RECHECK_SECONDS` the rows are read
anyway, so an outcome no event announced (written by plain SQL, or while the listening
connection was being replaced) is still seen. Each wait uses a connection of its own, closed on
return.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import time
from collections.abc import Callable, Collection, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dgxqueue.api import _engine, default_settings, enqueue
from dgxqueue.config import Settings
from dgxqueue.errors import InvalidStateError, JobNotFoundError, ValidationError, WaitTimeoutError
from dgxqueue.outputs import Output, output
from dgxqueue.storage import admin, session_scope
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import PROCESSING, G
from dgxqueue.storage.queue import EVENTS_CHANNEL
from dgxqueue.storage.reads import require_job

__all__ = ["FINISHED", "ChangeListener", "Job", "Progress", "get_job", "submit", "wait_all", "wait_all_async"]

#: The statuses a job ends in.
FINISHED = frozenset({"completed", "failed"})
#: How often a SQLite waiter reads the change counter (a read of a few bytes, no lock).
SQLITE_CHECK_SECONDS = 0.02
#: How often a waiter reads its jobs' rows whatever it was told: the bound on missing an outcome.
RECHECK_SECONDS = 5.0
#: How long a wait whose connection the server ended keeps connecting again, and its pause between
#: tries: one immediate try lands in a restart's shutdown ('the database system is shutting down').
RECONNECT_SECONDS = 10.0
RECONNECT_PAUSE_SECONDS = 0.5
_T = TypeVar("_T")
_CHUNK = 500  # ids per read: under SQLite's bound-parameter limit

_COLUMNS = (G.c.id, G.c.status, G.c.progress_done, G.c.progress_total, G.c.file_path, G.c.error_message,
            G.c.completed_at, G.c.cancel_requested_at, G.c.attempts, G.c.worker_id)


@dataclass(frozen=True)
class Progress:
    """What a daemon last reported of a running job: ``done`` of ``total`` steps."""

    done: int
    total: int

    @property
    def fraction(self) -> float:
        """``done / total`` between 0 and 1 (0 while the total is unknown)."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 0.0


@dataclass(frozen=True)
class _State:
    status: str
    progress_done: int | None
    progress_total: int | None
    file_path: Any
    error_message: str | None
    completed_at: datetime | None
    cancel_requested_at: datetime | None
    attempts: Any  # with worker_id, the attempt the row completed: its temporary is the one output names
    worker_id: Any


class Job:
    """A handle on one job: its id and its row as last read (:meth:`refresh` reads it again)."""

    def __init__(self, job_id: str, engine: Engine, settings: Settings, state: _State | None = None) -> None:
        self.id = job_id
        self._engine = engine
        self._settings = settings
        self._state = state if state is not None else _read(engine, [job_id]).get(job_id) or _missing(job_id)

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.status!r})"

    def refresh(self) -> Job:
        """Read the row again; returns the handle. :class:`JobNotFoundError` if it was deleted."""
        self._state = _read(self._engine, [self.id]).get(self.id) or _missing(self.id)
        return self

    @property
    def status(self) -> str:
        """``pending``, ``processing``, ``completed`` or ``failed``, as last read."""
        return self._state.status

    @property
    def finished(self) -> bool:
        return self._state.status in FINISHED

    @property
    def progress(self) -> Progress | None:
        """The progress a daemon last reported, as last read (``done`` within 0..``total``);
        None until one reports any."""
        done, total = self._state.progress_done, self._state.progress_total
        # Plain SQL can store text or a float beyond INTEGER on SQLite: that is no progress; nor
        # is a total that is not positive. As the CLI reads it (cli.wait.fraction).
        if type(done) is not int or type(total) is not int or total <= 0:
            return None
        return Progress(min(max(done, 0), total), total)

    @property
    def output(self) -> Output | None:
        """What is at the completed job's path, read from the file system now
        (:func:`dgxqueue.outputs.output`): ``exists``, or ``reason()`` says why not, such as its
        result held under its temporary name while another's file sits at its path, or its folder
        unreadable here so that it cannot be told (``unreadable``). None before
        it completed, or for a path outside the outputs folder (only plain SQL writes one)."""
        if self._state.status != "completed":
            return None
        return output(self._settings.outputs_dir, self.id, self._state.file_path,
                      attempt=self._state.attempts, worker_id=self._state.worker_id)

    @property
    def output_path(self) -> Path | None:
        """Where the WAV file is once the job completed. None before, for a path outside the
        outputs folder, and while what is at its path is not its WAV (another job's, or any file
        while its result is held under its temporary name: :attr:`output` says which). A file
        not there yet is still given: its rename may come a moment after the commit."""
        found = self.output
        return None if found is None or found.occupied else Path(found.path)

    @property
    def error(self) -> str | None:
        """Why the job failed; for a pending job, why its previous attempt did not finish."""
        return self._state.error_message

    @property
    def completed_at(self) -> datetime | None:
        return self._state.completed_at

    @property
    def cancel_requested(self) -> bool:
        """A cancel of the running job was asked for and its daemon has not ended it yet."""
        return self._state.cancel_requested_at is not None

    def wait(self, timeout: float | None = None) -> str:
        """Block until the job is completed or failed, and return that status (the handle is
        refreshed). :class:`~dgxqueue.errors.WaitTimeoutError` after ``timeout`` seconds (None:
        no limit); the job keeps going."""
        wait_all([self], timeout)
        return self.status

    async def wait_async(self, timeout: float | None = None) -> str:
        """:meth:`wait` for a caller in an event loop, awaited without blocking the loop or
        starting a thread (:func:`wait_all_async`). Cancelling the awaiting task ends the wait
        at once and closes its connection."""
        await wait_all_async([self], timeout)
        return self.status

    def cancel(self) -> str:
        """Cancel the job; returns its status afterwards.

        A pending job becomes ``failed`` now ("cancelled by request"). For a processing job,
        ``cancel_requested_at`` is set and the status stays ``processing``: its daemon stops it and
        records the outcome. A finished job raises :class:`~dgxqueue.errors.InvalidStateError`.
        """
        for _ in range(2):  # a pending job claimed meanwhile is asked to stop instead
            try:
                # The CLI's call: on PostgreSQL it also wakes the running job's daemon at once.
                with session_scope(self._engine) as session:
                    admin.cancel_job(session, self.id)
                break
            except InvalidStateError:
                with session_scope(self._engine) as session:
                    if require_job(session, self.id).status != PROCESSING:
                        raise
        return self.refresh().status


def submit(prompt: str, **spec: Any) -> Job:
    """:func:`~dgxqueue.api.enqueue` (the same arguments), returning a :class:`Job` handle."""
    settings = spec.get("settings") or default_settings()
    spec["settings"] = settings
    job_id = enqueue(prompt, **spec)
    return Job(job_id, _engine(spec.get("database_url"), settings), settings)


def get_job(job_id: str, *, database_url: str | None = None, settings: Settings | None = None) -> Job:
    """A handle on an existing job; :class:`~dgxqueue.errors.JobNotFoundError` if there is none."""
    settings = settings or default_settings()
    return Job(job_id, _engine(database_url, settings), settings)


def _missing(job_id: str) -> _State:
    raise JobNotFoundError(job_id)


def _read(engine: Engine, ids: Iterable[str], connection: sa.Connection | None = None, *,
          ended_only: bool = False) -> dict[str, _State]:
    """The rows of ``ids`` that exist, by id; ``ended_only``: only those that have ended (a
    waiter's re-check reads little more than the index while its jobs run)."""
    wanted = list(ids)
    found: dict[str, _State] = {}
    with contextlib.ExitStack() as stack:
        conn = connection if connection is not None else stack.enter_context(engine.connect())
        for start in range(0, len(wanted), _CHUNK):
            query = sa.select(*_COLUMNS).where(G.c.id.in_(wanted[start:start + _CHUNK]))
            if ended_only:
                query = query.where(G.c.status.in_(sorted(FINISHED)))
            for row in conn.execute(query):
                values: Sequence[Any] = row  # _State's fields, in _COLUMNS' order after the id
                found[row[0]] = _State(*values[1:])
        if connection is not None:
            conn.rollback()  # a snapshot ends with the read, so the next read sees new commits
    return found


# --- waiting --------------------------------------------------------------------------------


class ChangeListener:
    """What wakes a waiter: events naming jobs (PostgreSQL), or a changed database (SQLite).

    :meth:`wait` returns the ids announced (PostgreSQL), ``None`` when anything may have changed,
    or an empty set when nothing did; :meth:`stop` (any thread) makes it return at once."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.stopped = False
        self._listen: Any = None
        self._sqlite: Any = None
        self._version: int | None = None
        self._events = profile_of(engine.dialect).waker == "listen"
        if self._events:
            import psycopg

            try:
                self._connect()
            except psycopg.Error:  # a restart as the wait begins: the first wait for events connects
                self._drop_listen()  # again and has the rows read anew, so nothing is missed
        else:
            self._sqlite = engine.raw_connection()
            self._version = self._data_version()

    def _connect(self) -> None:
        import psycopg
        from psycopg import sql

        url = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listen = psycopg.connect(url, autocommit=True, connect_timeout=10)
        self._listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(EVENTS_CHANNEL)))

    def _data_version(self) -> int:
        cursor = self._sqlite.cursor()
        try:
            cursor.execute("PRAGMA data_version")
            return int(cursor.fetchone()[0])
        finally:
            cursor.close()

    def wait(self, timeout: float) -> set[str] | None:
        if self._events:
            return self._wait_events(timeout)
        deadline = time.monotonic() + timeout
        while not self.stopped:
            version = self._data_version()
            if version != self._version:
                self._version = version
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return set()
            self._sleep(min(SQLITE_CHECK_SECONDS, remaining))
        return set()

    def _wait_events(self, timeout: float) -> set[str] | None:
        import psycopg

        try:
            if self._listen is None:  # lost: events meanwhile were missed, so anything may have changed
                self._connect()
                return None
            announced: set[str] = set()
            with selectors.DefaultSelector() as selector:
                selector.register(self._listen.fileno(), selectors.EVENT_READ)
                selector.register(self._read_fd, selectors.EVENT_READ)
                if not self._take(announced):
                    selector.select(timeout)
                    self._take(announced)
            return announced
        except psycopg.Error:  # the server went away: listen again next time, pausing meanwhile
            self._drop_listen()
            self._sleep(min(timeout, 1.0))
            return None

    def _drop_listen(self) -> None:
        if self._listen is not None:
            with contextlib.suppress(Exception):
                self._listen.close()
            self._listen = None

    def _take(self, into: set[str]) -> bool:
        """Add the ids of the events received so far; True if there were any."""
        got = False
        for notify in self._listen.notifies(timeout=0):
            got = True
            with contextlib.suppress(ValueError, TypeError, KeyError):
                into.update(str(event["id"]) for event in json.loads(notify.payload))
        return got

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds``; :meth:`stop` ends it at once."""
        self._sleep(seconds)

    def _sleep(self, seconds: float) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._read_fd, selectors.EVENT_READ)
            selector.select(seconds)

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"x")

    def __enter__(self) -> ChangeListener:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._drop_listen()
        if self._sqlite is not None:
            with contextlib.suppress(Exception):
                self._sqlite.close()
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _engine_of(jobs: Sequence[Job]) -> Engine:
    engines = {id(job._engine): job._engine for job in jobs}
    if len(engines) > 1:
        raise ValueError("wait_all: the jobs are in different databases; wait for each database's jobs apart")
    return next(iter(engines.values()))


@dataclass(frozen=True)
class ReadRows:
    """A step of :func:`wait_steps`: read these jobs' rows (only the ended ones with ``ended_only``)
    and send back ``{id: _State}``."""

    ids: Collection[str]
    ended_only: bool = False


@dataclass(frozen=True)
class Listen:
    """A step of :func:`wait_steps`: wait up to ``seconds`` for a change and send back the ids an
    event named (empty: none came), or None (something changed, or events may have been missed)."""

    seconds: float


WaitSteps = Generator[ReadRows | Listen, Any, list[str]]


def wait_steps(jobs: Sequence[Job], deadline: float | None, timeout: float | None) -> WaitSteps:
    """The one algorithm of :func:`wait_all` and its async twin, without I/O: it yields what to
    read or wait for, is sent the answer, and returns the statuses (or raises, as they document).
    The caller is listening before it starts, so no event between the first read and the first
    wait is missed."""
    by_id = {job.id: job for job in jobs}
    states: dict[str, _State] = yield ReadRows(list(by_id))
    waiting = {job_id for job_id in by_id if _ended(states, job_id) is False}
    checked = time.monotonic()
    while waiting:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            rows = yield ReadRows(set(waiting))  # the handles as they stand now
            if missing := waiting - rows.keys():  # deleted meanwhile: gone, not late
                raise JobNotFoundError(min(missing))
            states.update(rows)
            # One that ended after the last event was taken is done, not late: a timeout naming
            # it would contradict its refreshed handle; none left is a wait that ended in time.
            waiting.difference_update([job_id for job_id in waiting if rows[job_id].status in FINISHED])
            if not waiting:
                break
            _apply(jobs, states)
            raise WaitTimeoutError(timeout or 0.0, sorted(waiting))
        pause = RECHECK_SECONDS - (now - checked)
        if deadline is not None:
            pause = min(pause, deadline - now)
        woke: set[str] | None = yield Listen(max(0.0, pause))
        if time.monotonic() - checked >= RECHECK_SECONDS:
            # Whole rows, whatever was announced: also finds a job deleted meanwhile.
            rows = yield ReadRows(set(waiting))
            checked = time.monotonic()
            if missing := waiting - rows.keys():
                raise JobNotFoundError(min(missing))
            states.update(rows)
            ended = {job_id for job_id in waiting if rows[job_id].status in FINISHED}
        elif woke is None or woke & waiting:
            rows = yield ReadRows(set(waiting) if woke is None else woke & waiting, ended_only=True)
            states.update(rows)
            ended = set(rows)
        else:
            continue
        waiting.difference_update(ended)
    _apply(jobs, states)
    return [job.status for job in jobs]


def wait_all(jobs: Sequence[Job], timeout: float | None = None) -> list[str]:
    """Block until every job of ``jobs`` (one database's) is completed or failed; returns their
    statuses in order, each handle refreshed. :class:`~dgxqueue.errors.WaitTimeoutError` after
    ``timeout`` seconds (the handles then hold the rows as they stand);
    :class:`~dgxqueue.errors.JobNotFoundError` if a job's row is deleted."""
    deadline = deadline_of(timeout)
    if not jobs:
        return []
    engine = _engine_of(jobs)
    steps = wait_steps(jobs, deadline, timeout)
    listener = ChangeListener(engine)  # listening before the first read: nothing is missed
    reads = _BlockingReads(engine, listener)
    try:
        answer: Any = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration as done:
                statuses: list[str] = done.value
                return statuses
            answer = reads.read(step) if isinstance(step, ReadRows) else listener.wait(step.seconds)
    finally:
        reads.close()
        listener.close()


class _BlockingReads:
    """The blocking wait's reads, on one pooled connection held for the wait; one the server
    ended is made anew within :func:`reconnecting`'s window, paced by the listener's pause."""

    def __init__(self, engine: Engine, listener: ChangeListener) -> None:
        self._engine, self._listener = engine, listener
        self._connection: sa.Connection | None = None

    def read(self, step: ReadRows) -> dict[str, _State]:
        return read_reconnecting(lambda: self._read(step), self.close, self._listener.pause)

    def _read(self, step: ReadRows) -> dict[str, _State]:
        if self._connection is None:
            self._connection = self._engine.connect()
        return _read(self._engine, step.ids, self._connection, ended_only=step.ended_only)

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # already lost: closing only returns it to the pool
                self._connection.close()
            self._connection = None


def read_reconnecting(read: Callable[[], _T], lost: Callable[[], None], pause: Callable[[float], object]) -> _T:
    """``read()``, tried again within :func:`reconnecting`'s window when it fails for now: at once,
    then after each ``pause``; ``lost()`` first drops the connection it failed on."""
    until: float | None = None
    while True:
        try:
            return read()
        except sa.exc.DBAPIError as exc:
            lost()
            first = until is None
            until = reconnecting(exc, until)
            if not first:
                pause(RECONNECT_PAUSE_SECONDS)


def reconnecting(exc: sa.exc.DBAPIError, until: float | None) -> float:
    """When a wait whose read failed for now (the server ended its connection: a restart,
    pg_terminate_backend, an idle timeout; or refuses for now: a restart's shutdown, a lock)
    stops trying again: :data:`RECONNECT_SECONDS` after the first failure, at once and then each
    :data:`RECONNECT_PAUSE_SECONDS`. Re-raises ``exc`` for an error that cannot pass, or once that
    time has passed."""
    from dgxqueue.storage.dberrors import is_transient_db_error

    if not (exc.connection_invalidated or is_transient_db_error(exc)):
        raise exc
    if until is None:
        return time.monotonic() + RECONNECT_SECONDS
    if time.monotonic() + RECONNECT_PAUSE_SECONDS > until:
        raise exc
    return until


def deadline_of(timeout: object) -> float | None:
    """The ``time.monotonic()`` a wait of ``timeout`` seconds ends at (None: no limit). A NaN
    compares false with every time, so it would wait for ever: refused, as anything that is
    not a number of seconds, with :class:`~dgxqueue.errors.ValidationError`."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise ValidationError("timeout", timeout, "None (no limit) or a number of seconds")
    return time.monotonic() + timeout


def _ended(states: dict[str, _State], job_id: str) -> bool:
    """The job has ended; :class:`~dgxqueue.errors.JobNotFoundError` if it has no row."""
    state = states.get(job_id)
    if state is None:
        raise JobNotFoundError(job_id)
    return state.status in FINISHED


def _apply(jobs: Sequence[Job], states: dict[str, _State]) -> None:
    for job in jobs:
        if job.id in states:
            job._state = states[job.id]


async def wait_all_async(jobs: Sequence[Job], timeout: float | None = None) -> list[str]:
    """:func:`wait_all` without blocking the event loop or starting a thread
    (:func:`dgxqueue.jobs_async.wait_all_async`); cancelling the awaiting task ends the wait."""
    from dgxqueue.jobs_async import wait_all_async as wait

    return await wait(jobs, timeout)
