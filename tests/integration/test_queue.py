"""The queue's operations (storage.queue on storage.precompiled) on real SQLite and PostgreSQL: the
rows they write, their fencing, and how their errors are classified."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.storage import (
    create_generations,
    get_engine,
    get_generation,
    init_db,
    queue,
    session_scope,
)
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.dberrors import is_transient_db_error
from dgxqueue.storage.models import Generation, utcnow
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.storage.results import Completed, Failed, Retried

LEASE = timedelta(seconds=60)


def fill(engine: sa.Engine, n: int, **kw: Any) -> list[str]:
    """``n`` jobs, oldest first: one transaction each, so that their creation times differ."""
    ids: list[str] = []
    for i in range(n):
        spec = {"prompt": f"p{i}", "model_name": "m", "duration_seconds": 1.0, "sample_rate": 8000, "channels": 1}
        with session_scope(engine) as s:
            ids += create_generations(s, [{**spec, **kw}])
    return ids


def claim(link: HeldConnection, limit: int, worker: str = "w") -> list[ClaimedJob]:
    return queue.claim(link, worker_id=worker, models=["m"], limit=limit, lease=LEASE)


def test_claim__returns_the_rows_as_the_session_path_reads_them(engine: sa.Engine) -> None:
    """Types come back through the column processors: aware datetimes, JSON as dicts."""
    ids = fill(engine, 3, metadata={"bpm": 120, "tags": ["a"]}, priority=2)
    link = HeldConnection(engine)
    jobs = claim(link, 2)
    link.close()
    assert [job.id for job in jobs] == ids[:2]
    with session_scope(engine) as s:
        for job in jobs:
            stored = get_generation(s, job.id)
            assert stored is not None and stored.status == "processing" and stored.worker_id == "w"
            assert job.metadata == {"bpm": 120, "tags": ["a"]} and job.attempt == stored.attempts == 1
            assert job.created_at == stored.created_at and job.created_at.tzinfo is not None
            assert job.claimed_at == stored.claimed_at
            assert (job.prompt, job.duration_seconds, job.sample_rate) == (stored.prompt, 1.0, 8000)


def test_finish__mixed_results_each_fenced(engine: sa.Engine) -> None:
    """Completions, failures and retries of one batch (three statement shapes) are all written; a
    result whose attempt is no longer held is refused and not reported as written."""
    fill(engine, 4)
    link = HeldConnection(engine)
    done, failed, retried, stale = claim(link, 4)
    now = utcnow()
    later = now + timedelta(minutes=5)
    written = queue.finish(link, worker_id="w", results=[
        (done, Completed(now, 1.5, 1234, {"peak": 0.5})),
        (failed, Failed(now, "boom", 0.1)),
        (retried, Retried(later, "again")),
        (dataclasses.replace(stale, attempt=stale.attempt + 1), Completed(now, 1.0, 1, {})),  # not our attempt
    ])
    link.close()
    assert written == {done.id, failed.id, retried.id}
    with session_scope(engine) as s:
        rows = {job.id: get_generation(s, job.id) for job in (done, failed, retried, stale)}
        assert all(r is not None for r in rows.values())
        d, f, r, st = (rows[j.id] for j in (done, failed, retried, stale))
        assert d is not None and (d.status, d.file_size_bytes, d.generation_time_seconds) == ("completed", 1234, 1.5)
        assert d.meta == {"peak": 0.5} and d.worker_id == "w" and d.completed_at == now
        assert f is not None and (f.status, f.error_message) == ("failed", "boom")
        assert r is not None and (r.status, r.run_after, r.error_message) == ("pending", later, "again")
        assert st is not None and (st.status, st.worker_id) == ("processing", "w")


def test_finish_and_claim__records_and_claims_in_one_transaction(engine: sa.Engine) -> None:
    """The next jobs are claimed with the results; a fenced result does not stop the claim."""
    ids = fill(engine, 5)
    link = HeldConnection(engine)
    first = claim(link, 2)
    now = utcnow()
    written, following = queue.finish_and_claim(
        link, worker_id="w", results=[
            (first[0], Completed(now, 1.0, 10, {})),
            (dataclasses.replace(first[1], attempt=first[1].attempt + 5), Completed(now, 1.0, 10, {})),  # fenced
        ], models=["m"], limit=2, lease=LEASE,
    )
    assert written == {first[0].id}
    assert [job.id for job in following] == ids[2:4]
    _, last = queue.finish_and_claim(link, worker_id="w", results=[
        (job, Completed(now, 1.0, 10, {})) for job in following
    ], models=["m"], limit=10, lease=LEASE)
    assert [job.id for job in last] == ids[4:]
    _, none = queue.finish_and_claim(link, worker_id="w", results=[
        (job, Completed(now, 1.0, 10, {})) for job in last
    ], models=["m"], limit=10, lease=LEASE)
    link.close()
    assert none == []
    with session_scope(engine) as s:
        statuses = [getattr(get_generation(s, i), "status", None) for i in ids]
    assert statuses == ["completed", "processing", "completed", "completed", "completed"]


def test_finish_and_claim__two_links_never_share_a_job(engine: sa.Engine) -> None:
    """Two daemons alternating chained claims: every job is claimed exactly once."""
    ids = fill(engine, 40)
    links = {name: HeldConnection(engine) for name in ("a", "b")}
    held = {name: claim(link, 3, worker=name) for name, link in links.items()}
    seen = [job.id for jobs in held.values() for job in jobs]
    while any(held.values()):
        for name, link in links.items():
            now = utcnow()
            _, held[name] = queue.finish_and_claim(
                link, worker_id=name, results=[
                    (job, Completed(now, 0.1, 1, {})) for job in held[name]
                ], models=["m"], limit=3, lease=LEASE,
            )
            seen += [job.id for job in held[name]]
    for link in links.values():
        link.close()
    assert sorted(seen) == sorted(ids)


def test_link__replaces_a_connection_the_server_ended(pg_db_url: str) -> None:
    """A held connection killed server-side fails one call as a lost connection (so the daemon's
    retry takes over); the next call checks out a fresh one."""
    init_db(pg_db_url)
    engine = get_engine(pg_db_url)
    fill(engine, 2)
    link = HeldConnection(engine)
    assert len(claim(link, 1)) == 1
    with link.transaction() as cursor:
        cursor.raw.execute("SELECT pg_backend_pid()")
        pid = cursor.raw.fetchone()[0]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    with pytest.raises(sa.exc.DBAPIError) as lost:
        claim(link, 1)
    assert lost.value.connection_invalidated and is_transient_db_error(lost.value)
    assert len(claim(link, 1)) == 1
    link.close()


def test_is_transient__sqlite_busy_yes_syntax_error_no(tmp_path: Path) -> None:
    """SQLite reports both a held lock and a syntax error as OperationalError: only the lock is
    worth retrying (a retried syntax error would spin for the whole retry window)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/t.db", connect_args={"timeout": 0})
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sa.exc.OperationalError) as locked, engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        assert "locked" in str(locked.value) and is_transient_db_error(locked.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with pytest.raises(sa.exc.OperationalError) as syntax, engine.begin() as conn:
        conn.execute(sa.text("UPDATE t SET"))
    assert not is_transient_db_error(syntax.value)
    engine.dispose()


@pytest.mark.parametrize(("errcode", "transient"), [
    ("program_limit_exceeded", False), ("undefined_table", False), ("serialization_failure", True),
    ("lock_not_available", True), ("admin_shutdown", True), ("too_many_connections", True),
])
def test_is_transient__postgres_by_its_sqlstate(pg_db_url: str, errcode: str, transient: bool) -> None:
    """The server's SQLSTATE decides, not the driver's exception class: psycopg raises
    OperationalError for 'index row size exceeds' (program_limit_exceeded), which no retry can
    pass, as for a shutdown, which a retry outlasts."""
    engine = sa.create_engine(pg_db_url)
    raise_it = f"DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{errcode}'; END $$"
    with pytest.raises(sa.exc.DBAPIError) as raised, engine.connect() as conn:
        conn.execute(sa.text(raise_it))
    assert is_transient_db_error(raised.value) is transient
    engine.dispose()


def test_claim__aware_times_round_trip(engine: sa.Engine) -> None:
    """The claim time and the lease, computed by the database, read back as aware UTC times on
    both engines, the lease exactly its length after the claim."""
    fill(engine, 1)
    link = HeldConnection(engine)
    before = utcnow()
    (job,) = queue.claim(link, worker_id="w", models=["m"], limit=1, lease=LEASE)
    link.close()
    assert job.claimed_at.tzinfo is not None and abs(job.claimed_at - before) < timedelta(seconds=30)
    with session_scope(engine) as s:
        stored = get_generation(s, job.id)
        assert stored is not None and stored.claimed_at == job.claimed_at
        assert stored.lease_expires_at == job.claimed_at + LEASE


def test_finish__a_large_batch_is_written_whole(engine: sa.Engine) -> None:
    """100 completions (past psycopg's 50-parameter query cache, and 800 SQLite binds) in one call."""
    fill(engine, 100)
    link = HeldConnection(engine)
    jobs = claim(link, 100)
    now = utcnow()
    written = queue.finish(link, worker_id="w", results=[
        (job, Completed(now, 0.5, i, {"i": i})) for i, job in enumerate(jobs)
    ])
    link.close()
    assert written == {job.id for job in jobs}
    with session_scope(engine) as s:
        sizes = {job.id: getattr(get_generation(s, job.id), "file_size_bytes", None) for job in jobs}
    assert sizes == {job.id: i for i, job in enumerate(jobs)}


def test_link__an_unreachable_server_is_a_transient_sqlalchemy_error() -> None:
    """Checking out a connection while the server is down (or starting up) raises SQLAlchemy's
    OperationalError, which the daemon retries, not the driver's own, which would stop it."""
    engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test", connect_args={"connect_timeout": 5})
    link = HeldConnection(engine)
    with pytest.raises(sa.exc.OperationalError) as down:
        claim(link, 1)
    assert is_transient_db_error(down.value) and getattr(down.value, "before_first_write", False)
    engine.dispose()


def test_extend__one_statement_for_every_job_still_held(engine: sa.Engine) -> None:
    """A heartbeat pushes the lease of each job this daemon still holds at that attempt, in one
    statement for hundreds of jobs, and names the ones it lost: taken over by another daemon,
    or claimed again as a later attempt."""
    fill(engine, 3)
    link = HeldConnection(engine)
    held, stolen, retried = claim(link, 3)
    link.close()
    far = timedelta(days=365)
    with session_scope(engine) as s:
        s.execute(sa.update(Generation).where(Generation.id == stolen.id).values(worker_id="other"))
        s.execute(sa.update(Generation).where(Generation.id == retried.id).values(attempts=2))
    with session_scope(engine) as s:
        kept = queue.extend(s, worker_id="w", jobs=[(j.id, j.attempt) for j in (held, stolen, retried)], lease=far).held
    assert kept == {held.id}
    with session_scope(engine) as s:
        leases = {j.id: getattr(get_generation(s, j.id), "lease_expires_at", None) for j in (held, stolen, retried)}
    extended = {job_id for job_id, until in leases.items() if until and until > utcnow() + far / 2}
    assert extended == {held.id}
    many = fill(engine, 600)
    link = HeldConnection(engine)
    claimed = claim(link, 600)
    link.close()
    with session_scope(engine) as s:
        assert queue.extend(s, worker_id="w", jobs=[(j.id, j.attempt) for j in claimed], lease=far).held == set(many)
