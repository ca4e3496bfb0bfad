"""wait_async on real SQLite files and real PostgreSQL: awaited on the loop itself (no thread,
the loop keeps ticking), one connection of its own, closed when the wait ends or is cancelled."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import dgxqueue
from dgxqueue.config import Settings
from dgxqueue.errors import JobNotFoundError, ValidationError, WaitTimeoutError
from dgxqueue.jobs import RECHECK_SECONDS, Job
from dgxqueue.jobs_async import _PostgreSQLChanges
from dgxqueue.storage import (
    complete_generation,
    create_generation,
    dispose_engines,
    fail_generation,
    get_engine,
    init_db,
    session_scope,
)
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.queue import EVENTS_CHANNEL
from tests.support.daemons import make_settings
from tests.support.processes import wait_until

SPEC: dict[str, Any] = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}
TICK = 0.01


def setup(url: str, tmp_path: Path) -> Settings:
    init_db(url)
    return make_settings(url, tmp_path / "outputs")


def connections(url: str) -> int:
    """This process's connections to the database: descriptors open on the SQLite file, or the
    PostgreSQL database's backends (the pool's count as well, and stay). SQLite defers closing a
    connection's descriptor while another connection of the process holds a lock on the file
    (in WAL mode, every open one) and gives it to the next connection opened: one closed wait
    may leave one descriptor open, but waits one after another must not add more."""
    engine = get_engine(url)
    if engine.dialect.name == "sqlite":
        path = os.path.realpath(str(engine.url.database))
        fds = Path("/proc/self/fd").iterdir()
        return sum(1 for fd in fds if _target(fd) == path)
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                                        )).scalar_one())


def _target(fd: Path) -> str | None:
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile (the listing's own descriptor)
        return None


async def ticking(task: asyncio.Task[Any], ticks: int) -> tuple[float, set[int]]:
    """Tick ``ticks`` times beside ``task``: the longest gap between ticks and the thread counts seen."""
    longest, threads = 0.0, set()
    last = time.monotonic()
    for _ in range(ticks):
        await asyncio.sleep(TICK)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
        threads.add(threading.active_count())
        assert not task.done(), task
    return longest, threads


def test_wait_async__waits_on_the_loop_without_a_thread(db_url: str, tmp_path: Path) -> None:
    """While wait_async waits, another coroutine keeps ticking every 10 ms, no thread is started,
    and the wait holds one connection of its own; a cancel of the job (its outcome) ends the
    wait, and the connection is closed."""
    settings = setup(db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    base, threads = connections(db_url), threading.active_count()

    async def main() -> tuple[str, float, set[int], int]:
        waiting = asyncio.create_task(job.wait_async(30))
        longest, seen = await ticking(waiting, 40)
        during = connections(db_url)
        dgxqueue.get_job(job.id, settings=settings).cancel()  # a pending job: failed now, announced
        return await asyncio.wait_for(waiting, 10), longest, seen, during

    for _ in range(3):
        status, longest, seen, during = asyncio.run(main())
        assert status == "failed" and job.status == "failed"
        assert seen == {threads}
        assert longest < 0.25, longest
        assert during > base
        job = dgxqueue.submit("fine", **SPEC, settings=settings)
    _closed(db_url, base)


def test_wait_async__cancelling_the_task_leaves_nothing_behind(db_url: str, tmp_path: Path) -> None:
    """Cancelling the awaiting task ends the wait at once: no thread goes on, its connection closes."""
    settings = setup(db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    base, threads = connections(db_url), threading.active_count()

    async def main() -> float:
        waiting = asyncio.create_task(job.wait_async(60))
        await ticking(waiting, 20)
        assert connections(db_url) > base
        started = time.monotonic()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return time.monotonic() - started

    for _ in range(3):
        assert asyncio.run(main()) < 1.0
        assert threading.active_count() == threads
    _closed(db_url, base)


def _closed(url: str, base: int) -> None:
    """The waits' connections are closed: none is left of the last one but what SQLite defers."""
    deferred = 1 if get_engine(url).dialect.name == "sqlite" else 0
    wait_until(lambda: connections(url) <= base + deferred, 10, "the waits' connections to close")


def test_wait_async__times_out_with_the_handle_refreshed(db_url: str, tmp_path: Path) -> None:
    settings = setup(db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    with get_engine(db_url).begin() as conn:
        conn.execute(sa.text("UPDATE generations SET status = 'processing', progress_done = 3, progress_total = 9"))
    with pytest.raises(WaitTimeoutError) as caught:
        asyncio.run(dgxqueue.wait_all_async([job], 0.3))
    assert caught.value.unfinished == [job.id]
    assert job.status == "processing" and job.progress is not None and job.progress.done == 3


def test_wait_async__a_deleted_job_is_not_found(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job whose row is gone (pruned) before or during the wait raises JobNotFoundError (a
    deletion is announced by no event: the periodic re-check finds it, shortened here)."""
    monkeypatch.setattr("dgxqueue.jobs.RECHECK_SECONDS", 0.5)
    settings = setup(db_url, tmp_path)
    gone, later = (dgxqueue.submit("fine", **SPEC, settings=settings) for _ in range(2))
    delete = sa.text("DELETE FROM generations WHERE id = :id")
    with get_engine(db_url).begin() as conn:
        conn.execute(delete, {"id": gone.id})
    with pytest.raises(JobNotFoundError):
        asyncio.run(gone.wait_async(5))

    async def main() -> None:
        waiting = asyncio.create_task(later.wait_async(30))
        await ticking(waiting, 5)
        with get_engine(db_url).begin() as conn:
            conn.execute(delete, {"id": later.id})
        await waiting

    with pytest.raises(JobNotFoundError):
        asyncio.run(main())


def test_wait_async__many_waiters_at_once_need_no_pool(db_url: str, tmp_path: Path) -> None:
    """Thirty requests waiting at once in one loop (a web app): every wait ends when its job
    does, none waits for a connection from the engine's pool (which holds fewer)."""
    settings = setup(db_url, tmp_path)
    jobs: list[Job] = [dgxqueue.submit(f"fine {i}", **SPEC, settings=settings) for i in range(30)]

    async def main() -> list[str]:
        waiting = asyncio.gather(*(job.wait_async(30) for job in jobs))
        await asyncio.sleep(0.2)
        with get_engine(db_url).begin() as conn:
            conn.execute(sa.text("UPDATE generations SET status = 'completed'"))
        return await asyncio.wait_for(waiting, 20)

    assert asyncio.run(main()) == ["completed"] * 30


def test_wait__a_job_deleted_meanwhile_is_not_found_even_on_timeout(db_url: str, tmp_path: Path) -> None:
    """A wait that times out before its periodic re-read still says the job is gone, not that it
    timed out (the handle would be refreshed from a row that does not exist): sync and async."""
    settings = setup(db_url, tmp_path)
    for wait in ("sync", "async"):
        job = dgxqueue.submit("fine", **SPEC, settings=settings)
        timer = threading.Timer(0.2, _delete, (db_url, job.id))
        timer.start()
        try:
            with pytest.raises(JobNotFoundError):
                if wait == "sync":
                    job.wait(1.0)
                else:
                    asyncio.run(job.wait_async(1.0))
        finally:
            timer.join()


def _delete(url: str, job_id: str) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(sa.text("DELETE FROM generations WHERE id = :id"), {"id": job_id})


@pytest.mark.parametrize("timeout", [float("nan"), "5", True, [1]], ids=["nan", "text", "bool", "list"])
def test_wait__a_timeout_that_is_not_a_number_is_refused(db_url: str, tmp_path: Path, timeout: Any) -> None:
    """A NaN timeout waited for ever (every comparison with it is false): refused, as other
    values that are not a number of seconds, with a ValidationError naming it (sync and async)."""
    settings = setup(db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    with pytest.raises(ValidationError) as caught:
        job.wait(timeout)
    assert caught.value.field == "timeout"
    with pytest.raises(ValidationError) as caught:
        asyncio.run(job.wait_async(timeout))
    assert caught.value.field == "timeout"


def test_wait_async__an_in_memory_sqlite_database_is_waited_on(tmp_path: Path) -> None:
    """A handle on an in-memory SQLite database (one connection, shared by the engine's pool):
    wait_async reads that database, not an empty one of its own, and ends when the job does,
    soon (not at the next whole re-read), as wait does."""
    url = "sqlite://"
    settings = setup(url, tmp_path)
    engine = get_engine(url)
    with session_scope(engine) as session:
        job_id = create_generation(session, "fine", **SPEC).id
    job = Job(job_id, engine, settings)  # after the commit: the pool's one connection is the session's

    async def main() -> tuple[str, float]:
        waiting = asyncio.create_task(job.wait_async(30))
        await ticking(waiting, 5)
        with session_scope(engine) as session:
            complete_generation(session, job.id, generation_time=1.0, file_size_bytes=1)
        done = time.monotonic()
        status = await asyncio.wait_for(waiting, 20)
        return status, time.monotonic() - done

    status, late = asyncio.run(main())
    assert status == "completed" and job.status == "completed"
    assert late < RECHECK_SECONDS / 2


def test_wait_async__the_server_ending_the_listener_mid_wait_is_survived(pg_db_url: str, tmp_path: Path) -> None:
    """The server ends the waiter's LISTEN connection (pg_terminate_backend, as a restart or an
    idle timeout would): the wait listens again, and ends when the job does."""
    settings = setup(pg_db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    engine = get_engine(pg_db_url)
    every = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND backend_type = 'client backend'")  # not an autovacuum worker passing by

    def backends() -> set[int]:
        """This database's backends, the pool's own among them (a pool connection, reused)."""
        with engine.connect() as conn:
            return set(conn.execute(every).scalars())

    ours = backends()

    async def main() -> str:
        waiting = asyncio.create_task(job.wait_async(30))
        while len(new := backends() - ours) != 1:
            await ticking(waiting, 1)
        [listener] = new
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": listener}).scalar_one()
        while not backends() - ours - {listener}:  # connected again
            await ticking(waiting, 1)
        with session_scope(engine) as session:
            complete_generation(session, job.id, generation_time=1.0, file_size_bytes=1)
        return await asyncio.wait_for(waiting, RECHECK_SECONDS / 2)

    assert asyncio.run(main()) == "completed"


def _waiting(job: Job) -> tuple[threading.Thread, list[object]]:
    """``job.wait(30)`` on a thread of its own, started; the list gets what ended it."""
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(job.wait(30))
        except BaseException as exc:  # the test's thread reports what ended the wait
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    return thread, outcome


def _terminate(engine: sa.Engine, pid: int) -> None:
    """End backend ``pid`` as a restart would, and return once the server has let it go."""
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}).scalar_one()


def test_wait_async__the_server_ending_the_connection_before_it_listens_is_survived(
        pg_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server ends the wait's new connection between its connect and its LISTEN (a restart as
    the wait begins): the wait does not raise; its first read connects and listens again, and
    an event then reaches it (it raised 'server closed the connection unexpectedly')."""
    settings = setup(pg_db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    engine = get_engine(pg_db_url)
    profile = type(profile_of(engine.dialect))
    connect = profile.async_connection
    ended: list[int] = []

    async def ended_at_once(self: Any, target: sa.Engine) -> Any:
        connection = await connect(self, target)
        if not ended:
            ended.append(connection.info.backend_pid)
            _terminate(engine, ended[0])
        return connection

    monkeypatch.setattr(profile, "async_connection", ended_at_once)

    async def main() -> set[str] | None:
        changes = _PostgreSQLChanges(engine)
        try:
            await changes.start()
            assert (await changes.read([job.id]))[job.id].status == "pending"
            assert changes._connection.info.backend_pid != ended[0]
            with session_scope(engine) as session:
                complete_generation(session, job.id, generation_time=1.0, file_size_bytes=1)
            return await changes.changed(RECHECK_SECONDS)
        finally:
            await changes.aclose()

    assert asyncio.run(main()) == {job.id}


def test_wait__the_server_ending_the_listener_before_it_listens_is_survived(
        pg_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocking wait: the server ends its LISTEN connection between connect and LISTEN; the
    wait does not raise, and ends when the job does (it raised a bare psycopg error)."""
    import psycopg

    settings = setup(pg_db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    engine = get_engine(pg_db_url)
    connect = psycopg.connect
    ended: list[int] = []

    def ended_at_once(*args: Any, **kwargs: Any) -> Any:
        connection = connect(*args, **kwargs)
        if not ended:
            ended.append(connection.info.backend_pid)
            _terminate(engine, ended[0])
        return connection

    monkeypatch.setattr(psycopg, "connect", ended_at_once)
    thread, outcome = _waiting(job)
    wait_until(lambda: ended or outcome, 10, "the listener's connection ended")
    with session_scope(engine) as session:
        complete_generation(session, job.id, generation_time=1.0, file_size_bytes=1)
    thread.join(30)
    assert outcome == ["completed"]


def test_wait_async__a_read_after_the_server_ended_the_connection_connects_again(
        pg_db_url: str, tmp_path: Path) -> None:
    """The server ends the waiter's connection between two steps, so the next step is a read
    (a re-check), not a listen that would notice: the read connects again and answers."""
    settings = setup(pg_db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    engine = get_engine(pg_db_url)

    async def main() -> dict[str, Any]:
        changes = _PostgreSQLChanges(engine)
        await changes.start()
        try:
            pid = changes._connection.info.backend_pid
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
            rows = await changes.read([job.id])
            assert changes._connection.info.backend_pid != pid
            return rows
        finally:
            await changes.aclose()

    assert asyncio.run(main())[job.id].status == "pending"


def test_wait__the_server_ending_both_its_connections_mid_wait_is_survived(pg_db_url: str, tmp_path: Path) -> None:
    """The blocking wait's LISTEN connection and its read connection are both ended by the
    server (a restart would): the wait connects again and ends when the job does."""
    settings = setup(pg_db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    job._engine.dispose()  # no idle pool connection: every backend but the observer's is the wait's
    observer = sa.create_engine(pg_db_url, poolclass=sa.NullPool)
    every = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND backend_type = 'client backend'")

    def backends() -> set[int]:
        with observer.connect() as conn:
            return set(conn.execute(every).scalars())

    ours = backends()
    thread, outcome = _waiting(job)
    wait_until(lambda: len(backends() - ours) == 2, 10, "the listener and the reader")
    ended = backends() - ours
    with observer.connect() as conn:
        for pid in ended:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    wait_until(lambda: bool(backends() - ours - ended), 10, "listening again")
    with session_scope(observer) as session:
        complete_generation(session, job.id, generation_time=1.0, file_size_bytes=1)
    thread.join(RECHECK_SECONDS * 2)
    observer.dispose()
    assert outcome == ["completed"]


def test_wait_async__a_database_locked_past_the_timeout_ends_the_wait(sqlite_db_url: str, tmp_path: Path) -> None:
    """Another process holds the SQLite file locked (locking_mode EXCLUSIVE, as a maintenance job
    might) for longer than the wait's timeout: each read meets the lock. The wait ends soon after
    its timeout with the lock's error, as wait does after its busy timeout; it retried for ever."""
    settings = setup(sqlite_db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    dispose_engines()  # the pool's connections would keep the holder from taking the lock
    holder = sqlite3.connect(str(get_engine(sqlite_db_url).url.database), isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            asyncio.run(asyncio.wait_for(job.wait_async(0.5), 10))
        assert time.monotonic() - started < 2.0
    finally:
        holder.close()


def test_wait_async__one_check_takes_every_event_already_queued(pg_db_url: str, tmp_path: Path) -> None:
    """A storm of other jobs' completion events (a transaction each) queued before ours: a check
    of the listener takes every event already queued, not the first one (or the first packet)
    alone, so a waiter hears of its job within a check or two, not one check per event."""
    setup(pg_db_url, tmp_path)
    engine = get_engine(pg_db_url)

    async def main() -> int:
        changes = _PostgreSQLChanges(engine)
        await changes.start()
        try:
            with engine.connect() as conn:  # a transaction each, as daemons' outcomes come
                for n in range(3000):
                    conn.execute(sa.select(sa.func.pg_notify(EVENTS_CHANNEL, f'[{{"id": "other-{n}"}}]')))
                    conn.commit()
                conn.execute(sa.select(sa.func.pg_notify(EVENTS_CHANNEL, '[{"id": "ours"}]')))
                conn.commit()
            checks, heard = 0, set()
            while "ours" not in heard and checks < 100:
                checks += 1
                heard |= await changes.changed(5.0) or set()
            return checks
        finally:
            await changes.aclose()

    assert asyncio.run(main()) <= 3  # not one check per event (or per packet) of the storm


def test_wait__a_job_that_ended_by_the_timeouts_last_read_is_not_reported_unfinished(
        db_url: str, tmp_path: Path) -> None:
    """At the deadline the wait reads its jobs once more: one found ended by that read (it ended
    after the last event was taken) was still named unfinished in a WaitTimeoutError whose
    refreshed handle said completed. The algorithm is driven here with the real reads, the row
    updated between the first read and the deadline's, which no timing of a live wait pins."""
    from dgxqueue.jobs import ReadRows, _read, wait_steps

    settings = setup(db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    engine = get_engine(db_url)
    steps = wait_steps([job], time.monotonic(), 0.0)  # the deadline has passed at the first check
    first = next(steps)
    assert isinstance(first, ReadRows)
    last = steps.send(_read(engine, first.ids))
    assert isinstance(last, ReadRows) and set(last.ids) == {job.id}
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE generations SET status = 'completed'"))
    with pytest.raises(StopIteration) as done:
        steps.send(_read(engine, last.ids, ended_only=last.ended_only))
    assert done.value.value == ["completed"] and job.status == "completed"


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
def test_wait_async__reads_in_utf8_whatever_client_encoding_the_database_sets(
        pg_db_url: str, tmp_path: Path, encoding: str) -> None:
    """The database (or PGCLIENTENCODING) sets another client_encoding for new connections: the
    async wait's own connection reads in UTF-8, as the engine's do. It raised 'no equivalent in
    encoding LATIN1' on a non-Latin error message, and under SQL_ASCII read the ids as bytes and
    said the job was not found."""
    settings = setup(pg_db_url, tmp_path)
    job = dgxqueue.submit("fine", **SPEC, settings=settings)
    engine = get_engine(pg_db_url)
    with session_scope(engine) as session:
        fail_generation(session, job.id, "boom ✓ 音")
    with engine.connect() as conn:
        name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET client_encoding = '{encoding}'"))
        conn.commit()
    assert asyncio.run(job.wait_async(RECHECK_SECONDS)) == "failed"
    assert job.error == "boom ✓ 音"
