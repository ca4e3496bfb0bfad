"""What metrics cost: the queue depth read with 1,000,000 rows, and the hooks per job.

    python benchmarks/bench_metrics.py [--rows 1000000] [--engines sqlite,postgresql]

For each engine and each mix of rows (``typical``: 1% pending, 5% failed, the rest completed;
``backlog``: half of them pending), fills the table with one INSERT ... SELECT, analyzes it, then
times the database part of a scrape (:func:`queue_depth`, best and median of 15) against a floor
measured in the same run: a bare ``SELECT count(*) FROM generations WHERE status = 'pending'``.
It also times a whole ``/metrics`` rendering with the cache off.

Hooks: the calls one job causes (claimed, batch, finished, loop round) on :class:`DaemonMetrics`,
100,000 times, against the no-op floor of one job on SQLite (claim one row and write its outcome,
each in its own transaction, on the daemon's own driver-level path), which is the least a daemon
spends per job.

PostgreSQL comes from ``$DGXQ_TEST_PG_URL`` (as in the tests); a private schema is dropped after.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from functools import partial

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dgxqueue.hooks import DaemonInfo
from dgxqueue.metrics import DaemonMetrics
from dgxqueue.storage import create_generations, init_db, queue, reads, session_scope
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.precompiled import HeldConnection
from dgxqueue.storage.results import Completed
from tests.support.bench import scratch_database, timed

MIXES = {  # (pending every nth row, failed every nth row)
    "typical": (100, 20),
    "backlog": (2, 20),
}


def fill(engine: Engine, rows: int, pending_every: int, failed_every: int) -> float:
    """Insert ``rows`` rows server-side in one statement; returns the seconds it took."""
    status = (f"CASE WHEN n % {pending_every} = 0 THEN 'pending' WHEN n % 10007 = 1 THEN 'processing' "
              f"WHEN n % {failed_every} = 3 THEN 'failed' ELSE 'completed' END")
    if engine.dialect.name == "sqlite":
        source = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :rows) SELECT n FROM s"
        created, row_id = "datetime('2024-01-01', '+' || n || ' seconds')", "printf('%032d', n)"
    else:
        source = "SELECT n FROM generate_series(1, :rows) AS n"
        created = "timestamptz '2024-01-01 00:00:00+00' + n * interval '1 second'"
        row_id = "lpad(n::text, 32, '0')"
    insert = f"""INSERT INTO generations (id, prompt, model_name, duration_seconds, sample_rate, channels,
        file_path, status, created_at, priority, attempts, max_attempts)
        SELECT {row_id}, 'a prompt', 'model-' || ((n / 7) % 4), 10.0, 32000, 1, 'outputs/x.wav', {status},
               {created}, n % 3, 0, 3 FROM ({source}) AS source"""
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM generations"))
        conn.execute(sa.text(insert), {"rows": rows})
    # What autovacuum (PostgreSQL) or the daemon's maintenance (SQLite) leaves in place.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE generations" if engine.dialect.name == "postgresql" else "ANALYZE"))
    return time.perf_counter() - started


def scraped(engine: Engine) -> CollectorRegistry:
    """A registry with a daemon's metrics and the depth cache off, so every scrape reads."""
    registry = CollectorRegistry()
    DaemonMetrics(registry, engine, depth_cache_seconds=0)
    return registry


def bench_depth(engine: Engine, rows: int) -> None:
    floor_sql = sa.text("SELECT count(*) FROM generations WHERE status = 'pending'")
    for mix, (pending_every, failed_every) in MIXES.items():
        fill_seconds = fill(engine, rows, pending_every, failed_every)
        with Session(engine) as session:
            floor = timed(lambda: session.execute(floor_sql).scalar_one(), 15)
            depth_time = timed(lambda: reads.queue_depth(session), 15)
            depth = reads.queue_depth(session)
        scrape = timed(partial(generate_latest, scraped(engine)), 15)
        print(f"{engine.dialect.name:10} {mix:8} {rows:>9,} rows (filled in {fill_seconds:.1f} s): "
              f"depth read best {depth_time[0] * 1e3:6.2f} ms, median {depth_time[1] * 1e3:6.2f} ms; "
              f"floor count(pending) best {floor[0] * 1e3:6.2f} ms -> ratio {depth_time[0] / floor[0]:.2f}; "
              f"whole /metrics median {scrape[1] * 1e3:6.2f} ms")
        print(f"{'':10} {'':8} counts {depth.by_status} (completed estimated: "
              f"{depth.completed_is_estimate}), pending by model {depth.pending_by_model}")


def bench_hooks(engine: Engine, calls: int) -> None:
    metrics = DaemonMetrics(CollectorRegistry(), engine)
    metrics.on_start(DaemonInfo("bench", "synth", ("model-0",), engine.dialect.name, "0"))
    now = datetime.now(UTC)
    job = ClaimedJob("id", "p", "model-0", 10.0, 32000, 1, "x.wav", None, 1, 3, now, now)
    jobs = [job]

    def one_job() -> None:
        metrics.on_claimed(jobs, now)
        metrics.on_batch(1)
        metrics.on_job_finished(job, "completed", generation_seconds=1.5, audio_seconds=10.0, error=None)
        metrics.on_loop(0.0)

    started = time.perf_counter()
    for _ in range(calls):
        one_job()
    hooks = (time.perf_counter() - started) / calls

    lease = timedelta(minutes=5)
    n = 2000
    with session_scope(engine) as session:
        create_generations(session, [{"prompt": "p", "model_name": "floor"}] * n)
    link = HeldConnection(engine)  # the daemon's own hot path: claim one, then write its outcome
    started = time.perf_counter()
    for _ in range(n):
        [claimed] = queue.claim(link, worker_id="w", models=["floor"], limit=1, lease=lease)
        queue.finish(link, worker_id="w", results=[(claimed, Completed(datetime.now(UTC), 0.0, 0, None))])
    floor = (time.perf_counter() - started) / n
    link.close()
    print(f"hooks per job ({calls:,} jobs): {hooks * 1e6:.2f} us; no-op job floor on "
          f"{engine.dialect.name} (claim + finish): {floor * 1e6:.0f} us -> overhead {hooks / floor:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--hook-calls", type=int, default=100_000)
    parser.add_argument("--engines", default="sqlite,postgresql")
    args = parser.parse_args()
    for name in args.engines.split(","):
        with scratch_database(name) as url:
            engine = init_db(url)
            bench_hooks(engine, args.hook_calls)
            bench_depth(engine, args.rows)


if __name__ == "__main__":
    main()
