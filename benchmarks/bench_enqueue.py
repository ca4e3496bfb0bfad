"""Enqueue throughput through the public API, next to the bare-SQL rate measured in the same run.

    .venv/bin/python benchmarks/bench_enqueue.py [--seconds 2] [--batch 1000] [--sqlite-only]

For each engine (a temporary SQLite file in WAL mode with synchronous=NORMAL, and a private schema
on the PostgreSQL server of ``$DGXQ_TEST_PG_URL``):

- **bare SQL**: the driver alone (sqlite3 / psycopg), one transaction per job holding the same work
  as one enqueue: an INSERT of the generation row and the prompt upsert. This is the floor.
- **enqueue**: ``dgxqueue.enqueue()`` one job per call (one transaction each); target >= 50% of bare.
- **enqueue_many**: ``dgxqueue.enqueue_many()`` in batches; target >= 20,000 rows/s on SQLite.

Every phase starts on an empty, migrated database of its own and runs for about ``--seconds`` in
all, split into ``--rounds`` interleaved rounds; the best round of each phase is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.storage import dispose_engines, init_db
from tests.support.db import postgres_schema_url

PROMPTS = [f"trap beat with heavy 808 bass at {bpm} BPM" for bpm in range(100, 164)]
METADATA = {"bpm": 140, "key": "Cm", "genre": "trap"}
SINGLE_TARGET = 0.5
BATCH_TARGET_SQLITE = 20_000.0

INSERT_SQL = (
    "INSERT INTO generations (id, prompt, model_name, model_version, duration_seconds, sample_rate, "
    "channels, file_path, status, created_at, metadata, priority, attempts, max_attempts, run_after) "
    "VALUES ({p}, {p}, {p}, NULL, {p}, {p}, {p}, {p}, 'pending', {p}, {p}, 0, 0, 3, NULL)"
)
UPSERT_SQL = (
    "INSERT INTO prompts (text, used_count, first_used_at, last_used_at) VALUES ({p}, 1, {p}, {p}) "
    "ON CONFLICT (text) DO UPDATE SET used_count = coalesce(prompts.used_count, 0) + "
    "excluded.used_count, last_used_at = excluded.last_used_at"
)


def rate(run_one: Callable[[int], int], seconds: float) -> float:
    """Call ``run_one(i)`` (which returns the rows it wrote) for ``seconds``; rows per second."""
    rows, i = 0, 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        rows += run_one(i)
        i += 1
        if i % 16 == 0 and time.perf_counter() >= deadline:
            break
    return rows / (time.perf_counter() - start)


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="dgxq-bench-") as folder:
        yield f"sqlite:///{folder}/generations.db"


@contextmanager
def postgres_database() -> Iterator[str]:
    with postgres_schema_url() as url:
        yield url
        dispose_engines()


def bare_sqlite(url: str, seconds: float) -> float:
    path = sa.engine.make_url(url).database
    assert path is not None
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("busy_timeout = 5000", "journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON"):
        conn.execute(f"PRAGMA {pragma}")
    insert, upsert = INSERT_SQL.format(p="?"), UPSERT_SQL.format(p="?")
    meta = json.dumps(METADATA)

    def one(i: int) -> int:
        job_id = str(uuid.uuid4())
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ")
        prompt = PROMPTS[i % len(PROMPTS)]
        conn.execute("BEGIN")
        conn.execute(insert, (job_id, prompt, "synth", 8.0, 32000, 1, f"outputs/{job_id}.wav", now, meta))
        conn.execute(upsert, (prompt, now, now))
        conn.execute("COMMIT")
        return 1

    try:
        return rate(one, seconds)
    finally:
        conn.close()


def bare_postgres(url: str, seconds: float) -> float:
    import psycopg

    parsed = sa.engine.make_url(url)
    options = parsed.query.get("options")
    conn = psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
        dbname=parsed.database, options=options if isinstance(options, str) else None,
    )
    insert, upsert = INSERT_SQL.format(p="%s"), UPSERT_SQL.format(p="%s")
    meta = json.dumps(METADATA)

    def one(i: int) -> int:
        job_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        prompt = PROMPTS[i % len(PROMPTS)]
        with conn.cursor() as cur:
            cur.execute(insert, (job_id, prompt, "synth", 8.0, 32000, 1, f"outputs/{job_id}.wav", now, meta))
            cur.execute(upsert, (prompt, now, now))
        conn.commit()
        return 1

    try:
        return rate(one, seconds)
    finally:
        conn.close()


def single(url: str, seconds: float) -> float:
    settings = load_settings(env={})  # defaults: the benchmark measures the code, not a config

    def one(i: int) -> int:
        dgxqueue.enqueue(PROMPTS[i % len(PROMPTS)], metadata=METADATA, database_url=url, settings=settings)
        return 1

    return rate(one, seconds)


def batched(url: str, seconds: float, batch: int) -> float:
    settings = load_settings(env={})  # defaults: the benchmark measures the code, not a config

    def one(i: int) -> int:
        specs = [{"prompt": PROMPTS[(i + k) % len(PROMPTS)], "metadata": METADATA} for k in range(batch)]
        return len(dgxqueue.enqueue_many(specs, database_url=url, settings=settings))

    return rate(one, seconds)


Database = Callable[[], AbstractContextManager[str]]
Phase = Callable[[str, float], float]


def measure(database: Database, phases: list[Phase], seconds: float, rounds: int) -> list[float]:
    """Each phase on its own fresh database, interleaved in ``rounds``; the best rate of each.

    Interleaving exposes every phase to the same background load (other processes, fsync stalls
    on PostgreSQL), and the best round is the least disturbed one.
    """
    with ExitStack() as stack:
        urls = [stack.enter_context(database()) for _ in phases]
        for url in urls:
            init_db(url)
            # engine, pool and schema check ready before timing
            dgxqueue.enqueue("warm up", database_url=url, settings=load_settings(env={}))
        best = [0.0] * len(phases)
        for _ in range(rounds):
            for i, (phase, url) in enumerate(zip(phases, urls, strict=True)):
                best[i] = max(best[i], phase(url, seconds / rounds))
        return best


def report(engine: str, bare: float, one: float, many: float, batch: int) -> None:
    print(f"\n{engine}")
    print(f"  bare SQL (driver only)  {bare:>10,.0f} jobs/s   floor")
    print(f"  enqueue()               {one:>10,.0f} jobs/s   {one / bare:5.2f} x bare   "
          f"(target >= {SINGLE_TARGET:.2f} x)  {'ok' if one / bare >= SINGLE_TARGET else 'MISSED'}")
    line = f"  enqueue_many({batch})     {many:>10,.0f} rows/s   {many / bare:5.2f} x bare"
    if engine == "sqlite":
        verdict = "ok" if many >= BATCH_TARGET_SQLITE else "MISSED"
        line += f"   {many / BATCH_TARGET_SQLITE:5.2f} x target {BATCH_TARGET_SQLITE:,.0f}/s  {verdict}"
    print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each phase")
    parser.add_argument("--batch", type=int, default=1000, help="jobs per enqueue_many call")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the best counts")
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, sqlalchemy {sa.__version__}, "
          f"{os.cpu_count()} CPUs, {args.seconds:g} s per phase in {args.rounds} interleaved rounds "
          "(best round shown)")

    engines: list[tuple[str, Database, Phase]] = [
        ("sqlite", sqlite_database, bare_sqlite),
    ]
    if not args.sqlite_only:
        engines.append(("postgresql", postgres_database, bare_postgres))
    for name, database, bare_phase in engines:
        bare, one, many = measure(
            database, [bare_phase, single, lambda url, seconds: batched(url, seconds, args.batch)],
            args.seconds, args.rounds,
        )
        report(name, bare, one, many, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
