"""A job's ``created_at`` (and its prompt's use times) come from the database's clock at the
insert, not the producer's: claims order by ``created_at``, so a producer whose clock is an hour
slow would jump the queue, and the oldest pending job's age would be an hour off. The same holds for
the times the specification's complete, fail and cancel calls stamp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.storage import queue
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import PAUSED, G, P
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.testing import ManualClock, MemoryStore
from tests.support.db import sqlite_url_at_head
from tests.support.processes import REPO
from tests.support.skew import SKEW_PRELUDE

LEASE = timedelta(seconds=30)
#: Far below the hour of skew, far above the time one producer process takes to start and insert.
SLACK = timedelta(seconds=1)

# Every producer path: enqueue, enqueue_many with and without a dedupe key, create_generation
# (whose returned row must hold the database's created_at) and create_generations.
_PRODUCER = SKEW_PRELUDE + """
import json
import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.storage import create_generation, create_generations, get_engine, session_scope
url, settings = sys.argv[1], load_settings(env={})
ids = [dgxqueue.enqueue("skewed", database_url=url, settings=settings)]
ids += dgxqueue.enqueue_many([{"prompt": "skewed"}, {"prompt": "keyed", "dedupe_key": "k" + sys.argv[2]}],
                             database_url=url, settings=settings)
with session_scope(get_engine(url)) as session:
    made = create_generation(session, "skewed")
    returned = made.created_at.isoformat()
    ids.append(made.id)
    ids += create_generations(session, [{"prompt": "skewed"}])
print(json.dumps({"ids": ids, "returned": returned}))
"""


def _db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        now = conn.execute(sa.select(profile_of(engine.dialect).now())).scalar_one()
    assert isinstance(now, datetime)
    return now


def _produce(url: str, skew: float) -> tuple[list[str], datetime]:
    done = subprocess.run([sys.executable, "-c", _PRODUCER, url, str(skew)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    return answer["ids"], datetime.fromisoformat(answer["returned"])


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["hour-fast", "hour-slow"])
def test_created_at__is_the_database_clock_not_a_skewed_producers(engine: Engine, skew: float) -> None:
    """Each path's created_at, and its prompts' first and last use, lie between the database's
    now before and after the producer ran; create_generation returns the row's stored created_at."""
    before = _db_now(engine)
    ids, returned = _produce(engine.url.render_as_string(hide_password=False), skew)
    after = _db_now(engine)
    with engine.connect() as conn:
        created = dict(conn.execute(sa.select(G.c.id, G.c.created_at).where(G.c.id.in_(ids))).all())
        used = conn.execute(sa.select(P.c.first_used_at, P.c.last_used_at)).all()
    assert len(created) == len(ids) == 5
    for job_id, at in created.items():
        assert before - SLACK <= at <= after + SLACK, (job_id, at, before)
    for first, last in used:
        assert before - SLACK <= first <= last <= after + SLACK, (first, last, before)
    assert returned in created.values()


def test_created_at__a_slow_producers_later_job_is_claimed_after_a_normal_ones(engine: Engine) -> None:
    """A producer with a right clock enqueues first, one an hour slow after it: the claim takes
    the first one first, as the order they were inserted in."""
    url = engine.url.render_as_string(hide_password=False)
    first, _ = _produce(url, 0.0)
    later, _ = _produce(url, -3600.0)
    link = HeldConnection(engine)
    claimed = queue.claim(link, worker_id="w", models=[load_settings(env={}).jobs.default_model],
                          limit=len(first), lease=LEASE)
    assert {job.id for job in claimed} == set(first)
    rest = queue.claim(link, worker_id="w", models=[load_settings(env={}).jobs.default_model],
                       limit=len(later), lease=LEASE)
    assert {job.id for job in rest} == set(later)


def test_created_at__one_batch_is_claimed_in_its_insert_order(engine: Engine) -> None:
    """Jobs inserted in one batch may share a created_at (the database clock's resolution): the
    claim still takes them in the order they were given, one at a time."""
    url = engine.url.render_as_string(hide_password=False)
    settings = load_settings(env={})
    ids = dgxqueue.enqueue_many([{"prompt": f"p{i}"} for i in range(60)], database_url=url, settings=settings)
    link = HeldConnection(engine)
    claimed = [job.id for _ in ids
               for job in queue.claim(link, worker_id="w", models=[settings.jobs.default_model], limit=1, lease=LEASE)]
    assert claimed == ids


@pytest.mark.parametrize("fraction", ["5", "97"])
def test_created_at__sqlite_stamps_after_a_shorter_fraction_written_by_plain_sql(
        tmp_path: Path, sqlite_template: Path, fraction: str) -> None:
    """A row written by plain SQL in the current millisecond with fewer than six fraction digits
    ('...06.8105', i.e. .810500) was read as microsecond 5: the next stamp, .810006, sorted (and
    was claimed) before it. The insert follows it in one transaction, retried until both land in
    one millisecond (SQLite's clock has no finer step)."""
    from dgxqueue.storage.validation import validate_jobs

    url = sqlite_url_at_head(tmp_path, sqlite_template)
    engine = sa.create_engine(url)
    odd_row = sa.text("UPDATE generations SET created_at = strftime('%Y-%m-%d %H:%M:%f', 'now') || :fraction "
                      "WHERE id = :id")
    seed = queue.insert_committed(engine, validate_jobs([{"prompt": "seed"}]))[0]
    for _ in range(1000):
        with engine.connect() as connection:
            transaction = connection.begin()
            connection.execute(odd_row, {"fraction": fraction, "id": seed})
            [job] = queue.insert_jobs(connection, validate_jobs([{"prompt": "next"}]))
            odd, stamped = (connection.execute(sa.select(G.c.created_at).where(G.c.id == i)).scalar_one()
                            for i in (seed, job))
            transaction.rollback()
        if odd.replace(microsecond=odd.microsecond // 1000 * 1000) == stamped.replace(
                microsecond=stamped.microsecond // 1000 * 1000):
            break
    else:
        pytest.fail("never inserted both rows within one millisecond")
    engine.dispose()
    assert stamped > odd


def test_created_at__the_memory_store_stamps_its_clock() -> None:
    """The in-memory queue stands in for the database: created_at is its clock at the insert."""
    clock = ManualClock(datetime(2031, 5, 1, tzinfo=UTC))
    store = MemoryStore(clock=clock)
    job_id = store.enqueue("beat")
    assert store.jobs[job_id]["created_at"] == datetime(2031, 5, 1, tzinfo=UTC)


_PAUSER = SKEW_PRELUDE + """
import dgxqueue
from dgxqueue.config import load_settings
dgxqueue.pause("musicgen-small", "skewed", database_url=sys.argv[1], settings=load_settings(env={}))
"""


def test_paused_at__is_the_database_clock_not_a_skewed_operators(engine: Engine) -> None:
    """A pause recorded by a process whose clock is an hour slow is dated by the database."""
    before = _db_now(engine)
    done = subprocess.run([sys.executable, "-c", _PAUSER, engine.url.render_as_string(hide_password=False), "-3600"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    assert done.returncode == 0, done.stderr
    after = _db_now(engine)
    with engine.connect() as conn:
        paused_at = conn.execute(sa.select(PAUSED.c.paused_at)).scalar_one()
    assert before - SLACK <= paused_at <= after + SLACK, (paused_at, before)


# run_after as a delay, through the library (a timedelta) and the CLI (--not-before 10m, and
# --expires-at 10m, which is a ttl), each a time the database's clock counts from the insert.
_DELAYED = SKEW_PRELUDE + """
import io, contextlib, datetime as dt
import dgxqueue
from dgxqueue.cli import main
from dgxqueue.config import load_settings
url, settings = sys.argv[1], load_settings(env={})
ids = [dgxqueue.enqueue("later", run_after=dt.timedelta(minutes=10), database_url=url, settings=settings)]
ids += dgxqueue.enqueue_many([{"prompt": "later", "run_after": dt.timedelta(minutes=10)}], database_url=url,
                             settings=settings)
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["enqueue", "later", "--not-before", "10m", "--expires-at", "10m"])  # DATABASE_URL: url
assert code == 0, code
print(" ".join(ids))
print(out.getvalue())
"""


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["hour-fast", "hour-slow"])
def test_run_after__a_delay_counts_from_the_database_clock(engine: Engine, skew: float) -> None:
    """run_after as a timedelta (library) or a span (CLI --not-before 10m; --expires-at 10m) is
    the database's now at the insert plus 10 minutes, whatever the producer's clock says."""
    before = _db_now(engine)
    done = subprocess.run([sys.executable, "-c", _DELAYED, engine.url.render_as_string(hide_password=False),
                           str(skew)], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": str(engine.url.render_as_string(
                              hide_password=False))})
    assert done.returncode == 0, done.stderr
    after = _db_now(engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(G.c.id, G.c.run_after, G.c.expires_at)).all()
    assert len(rows) == 3 and set(done.stdout.split()[0:2]) <= {row.id for row in rows}
    ten = timedelta(minutes=10)
    for row in rows:
        assert before + ten - SLACK <= row.run_after <= after + ten + SLACK, (row, before)
    [cli] = [row for row in rows if row.id not in done.stdout.split()[0:2]]
    assert before + ten - SLACK <= cli.expires_at <= after + ten + SLACK, (cli, before)


# The specification's outcomes and a cancel of a pending job, each called by a process whose clock is skewed by argv[2].
_OUTCOMES = SKEW_PRELUDE + """
import json
from dgxqueue.storage import (cancel_generation, complete_generation, create_generation, fail_generation,
                              get_engine, session_scope)
with session_scope(get_engine(sys.argv[1])) as session:
    done, failed, cancelled = (create_generation(session, "p", model_name="m").id for _ in range(3))
with session_scope(get_engine(sys.argv[1])) as session:
    complete_generation(session, done, generation_time=1.0, file_size_bytes=10)
    fail_generation(session, failed, "broken")
    cancel_generation(session, cancelled)
print(json.dumps([done, failed, cancelled]))
"""


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["hour-fast", "hour-slow"])
def test_completed_at__is_the_database_clock_not_a_skewed_callers(engine: Engine, skew: float) -> None:
    """complete_generation and fail_generation stamp ``completed_at`` (prune and archive count
    from it), and cancel_generation its three times, from the database's now, whatever the
    caller's clock says."""
    before = _db_now(engine)
    done = subprocess.run([sys.executable, "-c", _OUTCOMES, engine.url.render_as_string(hide_password=False),
                           str(skew)], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    after = _db_now(engine)
    ids = json.loads(done.stdout)
    times = [G.c.completed_at, G.c.cancel_requested_at, G.c.cancelled_at]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(G.c.id, G.c.status, *times).where(G.c.id.in_(ids))).all()
    assert sorted(row.status for row in rows) == ["completed", "failed", "failed"]
    stamped = [at for row in rows for at in row[2:] if at is not None]
    assert len(stamped) == 5
    for at in stamped:
        assert before - SLACK <= at <= after + SLACK, (rows, before)
