"""One job per call, as producers write them, beside the bare driver loop in the same run.

    .venv/bin/python benchmarks/producer_single.py [--jobs 400] [--rounds 7] [--sqlite-only]

For each engine (a temporary SQLite file, WAL, synchronous=NORMAL as dgxqueue sets it; a private
schema on the PostgreSQL server of ``$DGXQ_TEST_PG_URL``), three variants:

- **bare**: the driver alone (sqlite3 / psycopg) on one open connection: INSERT one generation row,
  upsert its prompt, commit; per job. The floor.
- **create_generation**: the specification's ``create_generation`` inside
  ``with get_session(url) as s:``, one job per session (target >= 0.5x bare on PostgreSQL, 0.2x
  on SQLite).
- **enqueue**: ``dgxqueue.enqueue`` one job per call.

The variants alternate in ``--rounds`` rounds of ``--jobs`` jobs each, so background load (a shared
machine) reaches all of them alike; each reports its median round. Ratios are rates: bare's time
per job over the variant's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

import dgxqueue
from dgxqueue.config import load_settings
from dgxqueue.storage import create_generation, dispose_engines, get_session, init_db

PG_ADMIN_URL = os.environ.get("DGXQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PROMPTS = [f"trap beat with heavy 808 bass at {bpm} BPM" for bpm in range(100, 164)]
METADATA = {"bpm": 140, "key": "Cm"}
TARGETS = {"postgresql": 0.5, "sqlite": 0.2}

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

Job = Callable[[int], None]


@contextlib.contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="dgxq-bench-") as folder:
        yield f"sqlite:///{folder}/generations.db"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A URL whose connections use a fresh schema of their own, dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    url = sa.engine.make_url(PG_ADMIN_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with admin.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()


@contextlib.contextmanager
def bare_sqlite(url: str) -> Iterator[Job]:
    path = sa.engine.make_url(url).database
    assert path is not None
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("busy_timeout = 5000", "journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON"):
        conn.execute(f"PRAGMA {pragma}")
    insert, upsert = INSERT_SQL.format(p="?"), UPSERT_SQL.format(p="?")

    def one(i: int) -> None:
        job_id = str(uuid.uuid4())
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ")
        prompt = PROMPTS[i % len(PROMPTS)]
        conn.execute("BEGIN")
        conn.execute(insert, (job_id, prompt, "synth", 8.0, 32000, 1, f"outputs/{job_id}.wav", now,
                              json.dumps(METADATA)))
        conn.execute(upsert, (prompt, now, now))
        conn.execute("COMMIT")

    try:
        yield one
    finally:
        conn.close()


@contextlib.contextmanager
def bare_postgres(url: str) -> Iterator[Job]:
    import psycopg

    parsed = sa.engine.make_url(url)
    options = parsed.query.get("options")
    conn = psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
        dbname=parsed.database, options=options if isinstance(options, str) else None,
    )
    insert, upsert = INSERT_SQL.format(p="%s"), UPSERT_SQL.format(p="%s")

    def one(i: int) -> None:
        job_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        prompt = PROMPTS[i % len(PROMPTS)]
        with conn.cursor() as cur:
            cur.execute(insert, (job_id, prompt, "synth", 8.0, 32000, 1, f"outputs/{job_id}.wav", now,
                                 json.dumps(METADATA)))
            cur.execute(upsert, (prompt, now, now))
        conn.commit()

    try:
        yield one
    finally:
        conn.close()


@contextlib.contextmanager
def spec_create_generation(url: str) -> Iterator[Job]:
    def one(i: int) -> None:
        with get_session(url) as session:
            create_generation(session, PROMPTS[i % len(PROMPTS)], "synth", 8.0, 32000, 1, metadata=METADATA)

    yield one


@contextlib.contextmanager
def api_enqueue(url: str) -> Iterator[Job]:
    settings = load_settings(env={})  # defaults: the benchmark measures the code, not a config

    def one(i: int) -> None:
        dgxqueue.enqueue(PROMPTS[i % len(PROMPTS)], model_name="synth", duration_seconds=8.0, sample_rate=32000,
                         channels=1, metadata=METADATA, database_url=url, settings=settings)

    yield one


def seconds_per_job(job: Job, jobs: int) -> float:
    start = time.perf_counter()
    for i in range(jobs):
        job(i)
    return (time.perf_counter() - start) / jobs


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def measure(engine: str, url: str, jobs: int, rounds: int) -> None:
    init_db(url)
    bare = bare_sqlite if engine == "sqlite" else bare_postgres
    variants = {"bare": bare(url), "create_generation": spec_create_generation(url), "enqueue": api_enqueue(url)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with contextlib.ExitStack() as stack:
        calls = {name: stack.enter_context(variant) for name, variant in variants.items()}
        for call in calls.values():  # engines, pools, schema checks and imports ready before timing
            seconds_per_job(call, 20)
        print(f"\n{engine} ({load()} before)")
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(seconds_per_job(call, jobs))
    medians = {name: statistics.median(values) for name, values in times.items()}
    floor = medians["bare"]
    for name, median in medians.items():
        spread = f"{min(times[name]) * 1e6:,.0f}-{max(times[name]) * 1e6:,.0f}"
        line = (f"  {name:<18} {median * 1e6:8,.0f} us/job  ({spread})  {1 / median:8,.0f} jobs/s"
                f"  {floor / median:5.2f}x bare")
        if name == "create_generation":
            target = TARGETS[engine]
            line += f"  (target >= {target:.2f}x: {'ok' if floor / median >= target else 'MISSED'})"
        print(line)
    print(f"  ({load()} after)")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs per variant per round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median counts")
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, sqlalchemy {sa.__version__}, "
          f"{args.rounds} rounds of {args.jobs} jobs per variant, medians (min-max)")
    with sqlite_database() as url:
        measure("sqlite", url, args.jobs, args.rounds)
    dispose_engines()
    if not args.sqlite_only:
        with postgres_database() as url:
            measure("postgresql", url, args.jobs, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
