"""The daemon's no-op hot loop through the hand-written statement layer and through plain Core.

Decides issue 16's question about :mod:`dgxqueue.storage.precompiled` (then ``storage/driver.py``):
does running the daemon's hot statements on a plain SQLAlchemy Core ``Connection``
(``connection.execute(statement, params)``, SQLAlchemy's compiled cache) cost more than 20% of
no-op throughput at batch 64, compared with the
hand-written layer (:mod:`~dgxqueue.storage.queue` on :class:`~dgxqueue.storage.precompiled.HeldConnection`)?

Each engine, each batch size, runs three loops over the same pre-inserted jobs, alternating
(ABCABC..., the order rotated each round so that a drifting machine favours none):

- **floor**: a bare DB-API loop (sqlite3 / psycopg) running the same compiled statements with
  the same transaction shapes, rows fetched raw: no queue can do the same work for less.
- **(a) hand-written**: ``queue.claim`` once, then ``queue.finish_and_claim`` until the
  queue is empty, as the daemon's rounds do with a no-op generator (each claim marks its jobs
  started, so no ``mark_started`` statement runs).
- **(b) Core**: :class:`CoreQueue`, the same calls on one held Core ``Connection`` with the
  queue's own statement builders: a sketch of what replacing the hand-written layer takes.

Every round starts from an emptied, vacuumed table refilled with the same number of pending jobs;
after each loop the benchmark checks that every job was completed. SQLite is a real file in WAL
mode as :func:`dgxqueue.storage.database.create_engine` configures it; PostgreSQL is a throwaway
database on the server of ``$DGXQ_TEST_PG_URL``, created and dropped here.

    .venv/bin/python benchmarks/driver_decision.py [--jobs 20000] [--jobs-batch-1 2000] [--rounds 5]
        [--engines sqlite,postgres] [--write-behind]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgxqueue.config import DatabaseSettings
from dgxqueue.storage import create_generations
from dgxqueue.storage import queue as jobs_queue
from dgxqueue.storage.claimed import ClaimedJob, claimed_jobs
from dgxqueue.storage.database import create_engine, ensure_schema, session_scope
from dgxqueue.storage.engines import Profile, profile_of
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.precompiled import Compiled, HeldConnection
from dgxqueue.storage.queue import Row, claim, finish, finish_and_claim
from dgxqueue.storage.results import Completed, Result, row_values

PG_ADMIN_URL = os.environ.get("DGXQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MODEL = "silence"
MODELS = [MODEL]
LEASE = timedelta(seconds=300)
WORKER = "bench"
Outcome = tuple[ClaimedJob, Result]
#: One loop over the filled queue: (engine, batch) -> jobs completed; raises if one was fenced.
Loop = Callable[[Engine, int], int]


#: A stand-in job and result: what a completion's row write sets does not depend on the job.
_SOME_JOB = ClaimedJob("x", "p", MODEL, 0.01, 8000, 1, "outputs/x.wav", None, 1, 3, utcnow(), utcnow())
_DONE = Completed(utcnow(), 0.0, 0, None)


def outcomes_of(jobs: Sequence[ClaimedJob]) -> list[Outcome]:
    """A no-op generator's results, as the daemon's completer records them."""
    now = utcnow()
    return [(job, Completed(now, 0.0001, 204, {"peak": 0.0, "rms": 0.0})) for job in jobs]


# --- (a) the hand-written layer ------------------------------------------------------------------


def hand_written(engine: Engine, batch: int) -> int:
    link = HeldConnection(engine)
    done = 0
    try:
        claimed = claim(link, worker_id=WORKER, models=MODELS, limit=batch, lease=LEASE, start=True)
        while claimed:
            outcomes = outcomes_of(claimed)
            written, claimed = finish_and_claim(link, worker_id=WORKER, results=outcomes, models=MODELS,
                                                limit=batch, lease=LEASE, start=True)
            if len(written) != len(outcomes):
                raise AssertionError("an outcome was fenced off")
            done += len(written)
    finally:
        link.close()
    return done


def hand_written_behind(engine: Engine, batch: int) -> int:
    """The write-behind shape (claim alone, outcomes alone), which the daemon takes on PostgreSQL
    when a backend call outlasts a transaction."""
    link = HeldConnection(engine)
    done = 0
    try:
        claimed = claim(link, worker_id=WORKER, models=MODELS, limit=batch, lease=LEASE, start=True)
        while claimed:
            outcomes = outcomes_of(claimed)
            claimed = claim(link, worker_id=WORKER, models=MODELS, limit=batch, lease=LEASE, start=True)
            done += len(finish(link, worker_id=WORKER, results=outcomes))
    finally:
        link.close()
    return done


# --- (b) plain SQLAlchemy Core --------------------------------------------------------------------


def core_engine(url: str) -> Engine:
    """dgxqueue's engine, plus SQLAlchemy's documented recipe for SQLite transactions: the driver
    left in autocommit and each ``begin()`` emitting ``BEGIN IMMEDIATE``, as the hand-written
    layer does (Python's sqlite3 would otherwise not open a transaction before ``WITH ... UPDATE``,
    and a deferred one can fail with SQLITE_BUSY_SNAPSHOT when it turns into a write)."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


class CoreQueue:
    """The queue's claim, finish and finish_and_claim on one held Core ``Connection``.

    The statements are the queue's, executed with ``Connection.execute`` (SQLAlchemy's
    compiled cache, bind and result processing, error translation). On PostgreSQL a single
    statement runs with the connection switched to AUTOCOMMIT for the call, as ``HeldConnection`` does;
    several run between BEGIN and COMMIT, each its own round trip (Core reads a statement's
    rows as it runs it, so it cannot use psycopg's pipeline mode)."""

    def __init__(self, engine: Engine, *, values_as_text: bool = False) -> None:
        self.values_as_text = values_as_text and engine.dialect.name == "sqlite"
        self.connection = engine.connect()
        self.profile = profile_of(engine.dialect)
        self.postgresql = self.profile.one_round_trip
        self.isolation = self.connection.default_isolation_level

    def close(self) -> None:
        self.connection.close()

    def _single(self, statement: sa.Executable, params: Mapping[str, Any]) -> Sequence[sa.Row[Any]]:
        connection = self.connection
        if not self.postgresql:
            with connection.begin():
                return connection.execute(statement, params).all()
        connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            with connection.begin():  # no BEGIN or COMMIT is sent in AUTOCOMMIT
                return connection.execute(statement, params).all()
        finally:
            connection.execution_options(isolation_level=self.isolation)

    def _finish_statements(self, outcomes: Sequence[Outcome]) -> list[tuple[sa.Executable, dict[str, Any]]]:
        build = _values_as_text if self.values_as_text else jobs_queue.finish_rows_statement
        return [
            (build(self.profile, keys, 0 if self.postgresql else len(rows)),
             jobs_queue.finish_rows_parameters(self.profile, WORKER, keys, rows))
            for keys, rows in jobs_queue.group_rows(jobs_queue.rows_of(outcomes)).items()
        ]

    def claim(self, limit: int, start: bool) -> list[ClaimedJob]:
        statement = jobs_queue.claim_statement(self.profile, len(MODELS), start)
        params = jobs_queue.claim_parameters(worker_id=WORKER, models=MODELS, limit=limit, lease=LEASE)
        return claimed_jobs(self._single(statement, params))

    def finish_many(self, outcomes: Sequence[Outcome]) -> set[str]:
        statements = self._finish_statements(outcomes)
        if len(statements) == 1:
            return {row[0] for row in self._single(*statements[0])}
        with self.connection.begin():
            return {row[0] for statement, params in statements
                    for row in self.connection.execute(statement, params)}

    def finish_and_claim(self, outcomes: Sequence[Outcome], limit: int, start: bool) -> tuple[set[str],
                                                                                            list[ClaimedJob]]:
        connection = self.connection
        claim_statement = jobs_queue.claim_statement(self.profile, len(MODELS), start)
        claim_params = jobs_queue.claim_parameters(worker_id=WORKER, models=MODELS, limit=limit, lease=LEASE)
        with connection.begin():
            written = {row[0] for statement, params in self._finish_statements(outcomes)
                       for row in connection.execute(statement, params)}
            claimed = connection.execute(claim_statement, claim_params).all()
        return written, claimed_jobs(claimed)


@functools.lru_cache(maxsize=512)
def _values_as_text(profile: Profile, keys: tuple[str, ...], n: int) -> sa.TextualSelect:
    """The SQLite outcome write as ``text()`` of its own SQL, with its typed binds: SQLAlchemy
    does not cache a statement holding a multi-row ``VALUES`` (it compiles it on every call),
    and this says how much of Core's cost is that recompilation."""
    statement = jobs_queue.finish_rows_statement(profile, keys, n)
    compiled: Any = statement.compile(dialect=sqlite_dialect(paramstyle="named"))
    binds = [sa.bindparam(name, compiled.params[name], type_=bind.type) for bind, name in compiled.bind_names.items()]
    return sa.text(compiled.string).bindparams(*binds).columns(sa.column("id", sa.Text))


def core(engine: Engine, batch: int) -> int:
    return _core(CoreQueue(engine), batch)


def core_values_as_text(engine: Engine, batch: int) -> int:
    return _core(CoreQueue(engine, values_as_text=True), batch)


def _core(queue: CoreQueue, batch: int) -> int:
    done = 0
    try:
        claimed = queue.claim(batch, True)
        while claimed:
            outcomes = outcomes_of(claimed)
            written, claimed = queue.finish_and_claim(outcomes, batch, True)
            if len(written) != len(outcomes):
                raise AssertionError("an outcome was fenced off")
            done += len(written)
    finally:
        queue.close()
    return done


def core_behind(engine: Engine, batch: int) -> int:
    queue = CoreQueue(engine)
    done = 0
    try:
        claimed = queue.claim(batch, True)
        while claimed:
            outcomes = outcomes_of(claimed)
            claimed = queue.claim(batch, True)
            done += len(queue.finish_many(outcomes))
    finally:
        queue.close()
    return done


CORE_LOOPS = (core, core_values_as_text, core_behind)  # they run on core_engine()'s engine


# --- the floor: bare DB-API ----------------------------------------------------------------------


def _floor_statements(engine: Engine, batch: int) -> tuple[str, Any, Callable[[int], Compiled], tuple[str, ...]]:
    """The claim's SQL and parameters, and the outcome write's SQL by number of rows, as the daemon
    compiles them; and the columns a completion sets."""
    dialect = engine.dialect
    profile = profile_of(dialect)
    claim_sql = Compiled.of(jobs_queue.claim_statement(profile, len(MODELS), True), dialect)
    claim_params = claim_sql.parameters(jobs_queue.claim_parameters(worker_id=WORKER, models=MODELS, limit=batch,
                                                                    lease=LEASE))
    keys = tuple(sorted(row_values(_SOME_JOB, _DONE)))
    shapes: dict[int, Compiled] = {}

    def finish_sql(n: int) -> Compiled:
        n = 0 if profile.any_count else n
        if n not in shapes:
            shapes[n] = Compiled.of(jobs_queue.finish_rows_statement(profile, keys, n), dialect)
        return shapes[n]

    finish_sql(batch)
    return claim_sql.sql, claim_params, finish_sql, keys


def floor(engine: Engine, batch: int) -> int:
    """The same statements and transaction shapes on a bare driver connection, rows read raw:
    what the work itself costs, with the least Python a queue could wrap it in."""
    claim_sql, claim_params, finish_sql, keys = _floor_statements(engine, batch)
    dialect = engine.dialect.name
    profile = profile_of(engine.dialect)

    def finish_params(rows: Sequence[Sequence[Any]]) -> Any:
        values = row_values(_SOME_JOB, Completed(utcnow(), 0.0001, 204, {"peak": 0.0, "rms": 0.0}))
        outcomes: list[Row] = [(row[0], row[8], values) for row in rows]
        return finish_sql(len(rows)).parameters(jobs_queue.finish_rows_parameters(profile, WORKER, keys, outcomes))

    done = 0
    if dialect == "sqlite":
        settings = DatabaseSettings()
        conn = sqlite3.connect(str(engine.url.database), isolation_level=None,
                               timeout=settings.sqlite_busy_timeout_ms / 1000)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {settings.sqlite_synchronous}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(claim_sql, claim_params).fetchall()
            conn.execute("COMMIT")
            while rows:
                conn.execute("BEGIN IMMEDIATE")
                written = conn.execute(finish_sql(len(rows)).sql, finish_params(rows)).fetchall()
                claimed = conn.execute(claim_sql, claim_params).fetchall()
                conn.execute("COMMIT")
                if len(written) != len(rows):
                    raise AssertionError("an outcome was fenced off")
                done += len(written)
                rows = claimed
        finally:
            conn.close()
        return done

    import psycopg

    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as pg:
        rows = pg.execute(claim_sql, claim_params).fetchall()  # one statement: autocommit
        while rows:
            with pg.pipeline(), pg.transaction():  # BEGIN, both statements and COMMIT: one round trip
                finished = pg.execute(finish_sql(len(rows)).sql, finish_params(rows))
                claiming = pg.execute(claim_sql, claim_params)
            written = finished.fetchall()
            if len(written) != len(rows):
                raise AssertionError("an outcome was fenced off")
            done += len(written)
            rows = claiming.fetchall()
    return done


# --- the harness -----------------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str) -> Iterator[str]:
    """A migrated, empty database: a SQLite file in a temporary folder, or a throwaway PostgreSQL
    database."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{folder}/bench.db"
            _migrate(url)
            yield url
        return
    name = f"dgxq_driver_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        _migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()


def refill(engine: Engine, jobs: int) -> None:
    """An empty, vacuumed table with ``jobs`` pending jobs and fresh statistics: each loop starts
    on the same table, without the dead rows of the one before."""
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM generations"))
        conn.execute(sa.text("DELETE FROM prompts"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM"))
    specs = [{"prompt": f"house beat 124 BPM take {i % 50}", "model_name": MODEL, "duration_seconds": 0.01,
              "sample_rate": 8000, "channels": 1} for i in range(jobs)]
    with session_scope(engine) as session:
        for start in range(0, jobs, 5000):
            create_generations(session, specs[start:start + 5000])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))


def completed(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM generations WHERE status = 'completed'")).scalar_one())


Rates = dict[str, list[float]]  # jobs per second of each loop, one figure a run


def timed(loop: Loop, engine: Engine, plain: Engine, jobs: int, batch: int) -> tuple[float, float]:
    """One ``loop`` on ``engine`` over a queue refilled with ``jobs`` jobs (through ``plain``,
    dgxqueue's own engine): jobs per second of wall-clock time and per second of this process's
    CPU time."""
    refill(plain, jobs)
    started, cpu_started = time.perf_counter(), time.process_time()
    done = loop(engine, batch)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if done != jobs or completed(plain) != jobs:
        raise AssertionError(f"{loop.__name__}: {done} jobs done, {completed(plain)} completed, of {jobs}")
    return jobs / elapsed, jobs / cpu


def measure(url: str, jobs: int, batch: int, rounds: int, contenders: dict[str, Loop]) -> tuple[Rates, Rates]:
    """``rounds`` runs of each contender, alternating, the order rotated each round; each loop
    first runs once untimed on a small queue so that every statement is compiled and cached.
    Returns the wall-clock rates and the CPU-time rates."""
    on_core, plain = core_engine(url), create_engine(url)
    wall: Rates = {name: [] for name in contenders}
    cpu: Rates = {name: [] for name in contenders}
    try:
        for loop in contenders.values():
            timed(loop, on_core if loop in CORE_LOOPS else plain, plain, 3 * batch, batch)
        names = list(contenders)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                loop = contenders[name]
                rate, cpu_rate = timed(loop, on_core if loop in CORE_LOOPS else plain, plain, jobs, batch)
                wall[name].append(rate)
                cpu[name].append(cpu_rate)
    finally:
        plain.dispose()
        on_core.dispose()
    return wall, cpu


def report(title: str, rates: Rates, pairs: list[tuple[str, str]]) -> None:
    print(f"  {title}")
    print(f"    {'loop':<34}{'median':>9}   runs")
    for name, values in rates.items():
        runs = " ".join(f"{v:.0f}" for v in values)
        print(f"    {name:<34}{statistics.median(values):>9.0f}   {runs}")
    for b, a in pairs:
        per_round = [vb / va for vb, va in zip(rates[b], rates[a], strict=True)]
        print(f"    {b} / {a}: {statistics.median(rates[b]) / statistics.median(rates[a]):.3f} (medians);"
              f" per round median {statistics.median(per_round):.3f}, range {min(per_round):.3f}-{max(per_round):.3f}")
    print("    to the floor (medians): " + ", ".join(
        f"{name} {statistics.median(rates[name]) / statistics.median(rates['floor']):.3f}"
        for name in rates if name != "floor"))


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs a run at batch 64")
    parser.add_argument("--jobs-batch-1", type=int, default=2_000, help="jobs a run at batch 1")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each loop, alternating")
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--write-behind", action="store_true",
                        help="also the claim-alone, outcomes-alone shape (the daemon's on PostgreSQL for long calls)")
    args = parser.parse_args()
    print(f"load average at start: {_load()} ({os.cpu_count()} CPUs); SQLAlchemy {sa.__version__}")
    for kind in args.engines.split(","):
        contenders: dict[str, Loop] = {"floor": floor, "hand-written (a)": hand_written, "core (b)": core}
        pairs = [("core (b)", "hand-written (a)")]
        if kind == "sqlite":
            contenders["core, VALUES as text (b*)"] = core_values_as_text
            pairs.append(("core, VALUES as text (b*)", "hand-written (a)"))
        if args.write_behind:
            contenders |= {"hand-written (a), write-behind": hand_written_behind,
                           "core (b), write-behind": core_behind}
            pairs.append(("core (b), write-behind", "hand-written (a), write-behind"))
        with database(kind) as url:
            for batch, jobs in ((64, args.jobs), (1, args.jobs_batch_1)):
                before = _load()
                wall, cpu = measure(url, jobs, batch, args.rounds, contenders)
                print(f"\n== {kind}, batch {batch}, {jobs} jobs a run, {args.rounds} runs each"
                      f" (load average before {before}, after {_load()})")
                report("jobs/s, wall clock (the rule's measure)", wall, pairs)
                report("jobs per CPU-second of this process (steadier under load; not the server's work)", cpu,
                       pairs)
    print(f"\nload average at end: {_load()}")


if __name__ == "__main__":
    main()
