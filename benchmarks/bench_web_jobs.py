"""The status page's jobs list on 1,000,000 rows: the first page and a deep page, each beside the
bare SQL of the same page, in one run.

    python benchmarks/bench_web_jobs.py [--rows 1000000] [--engines sqlite,postgresql]

Fills ``generations`` with one INSERT ... SELECT (1% pending, 5% failed, 4 models, a prompt per
row), analyzes it, then times (best and median of 15, after one warm-up):

- ``first``: the newest 50 jobs; ``deep``: 50 jobs after a cursor 90% of the way down the table;
  each through :func:`dgxqueue.storage.browse.jobs_page` and as a bare ``text()`` query of the same
  rows (the floor), and the ratio;
- the same deep page by OFFSET, the pagination the list does not use, for scale;
- filtered first pages (a status, a model, a text search, a time range) through ``jobs_page``;
- the first page through the whole HTTP handler (Starlette's TestClient, in process);
- the overview's read (what each open overview polls every 1.5 s) beside the metrics' depth read,
  with the newest rows finished 100 a second up to now (90,000 in its 15-minute window).

PostgreSQL comes from ``$DGXQ_TEST_PG_URL`` (as in the tests); a private schema is dropped after.
"""

from __future__ import annotations

import argparse
import functools
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dgxqueue.config import load_settings
from dgxqueue.storage import browse, dispose_engines, init_db, reads
from dgxqueue.storage.browse import JobFilter, encode_cursor, jobs_page
from dgxqueue.storage.models import GenerationStatus
from tests.support.bench import scratch_database, timed

PAGE = 50
START = datetime(2024, 1, 1, tzinfo=UTC)
COLUMNS = ("id, prompt, model_name, status, created_at, completed_at, duration_seconds, attempts, max_attempts, "
           "progress_done, progress_total, error_message, worker_id, cancel_requested_at, file_path")


def fill(engine: Engine, rows: int) -> float:
    """``rows`` rows, row n created n seconds after START; returns the seconds it took."""
    status = ("CASE WHEN n % 100 = 0 THEN 'pending' WHEN n % 20 = 3 THEN 'failed' ELSE 'completed' END")
    if engine.dialect.name == "sqlite":
        source = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :rows) SELECT n FROM s"
        # As SQLAlchemy stores a time on SQLite (microseconds included), so the text compares alike.
        created = "datetime('2024-01-01', '+' || n || ' seconds') || '.000000'"
        finished = "datetime(:now, '-' || ((:rows - n) / 100.0) || ' seconds') || '.000000'"
        row_id = "printf('%032d', n)"
        prompt = "'a prompt about ' || n"
    else:
        source = "SELECT n FROM generate_series(1, :rows) AS n"
        created = "timestamptz '2024-01-01 00:00:00+00' + n * interval '1 second'"
        finished = "CAST(:now AS timestamptz) - ((:rows - n) / 100.0) * interval '1 second'"
        row_id, prompt = "lpad(n::text, 32, '0')", "'a prompt about ' || n"
    insert = f"""INSERT INTO generations (id, prompt, model_name, duration_seconds, sample_rate, channels,
        file_path, status, created_at, completed_at, priority, attempts, max_attempts)
        SELECT {row_id}, {prompt}, 'model-' || ((n / 7) % 4), 10.0, 32000, 1, 'outputs/x.wav', {status},
               {created}, CASE WHEN {status} IN ('completed', 'failed') THEN {finished} END, n % 3, 0, 3
          FROM ({source}) AS source"""
    sqlite = engine.dialect.name == "sqlite"
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM generations"))
        # The newest rows finished 100 a second up to now: the overview's last 15 minutes hold 90,000.
        now = datetime.now(UTC)
        conn.execute(sa.text(insert), {"rows": rows, "now": now.replace(tzinfo=None) if sqlite else now})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE generations" if engine.dialect.name == "postgresql" else "ANALYZE"))
    return time.perf_counter() - started


def _line(name: str, ours: tuple[float, float], floor: tuple[float, float] | None = None) -> None:
    text = f"  {name:34} best {ours[0] * 1e3:8.2f} ms, median {ours[1] * 1e3:8.2f} ms"
    if floor is not None:
        text += f"; bare SQL best {floor[0] * 1e3:8.2f} ms -> ratio {ours[0] / floor[0]:.2f}"
    print(text)


def bench(engine: Engine, rows: int) -> None:
    seconds = fill(engine, rows)
    print(f"{engine.dialect.name}: {rows:,} rows (filled in {seconds:.1f} s), pages of {PAGE}")
    sqlite = engine.dialect.name == "sqlite"
    first_sql = sa.text(f"SELECT {COLUMNS} FROM generations ORDER BY created_at DESC, id DESC LIMIT :n")
    deep_sql = sa.text(f"SELECT {COLUMNS} FROM generations WHERE created_at <= :c AND (created_at < :c OR id < :id) "
                       "ORDER BY created_at DESC, id DESC LIMIT :n")
    offset_sql = sa.text(f"SELECT {COLUMNS} FROM generations ORDER BY created_at DESC, id DESC LIMIT :n OFFSET :o")
    # The row 90% of the way down the newest-first list: row number rows/10, created rows/10 s after START.
    deep_n = rows // 10
    deep_at = START + timedelta(seconds=deep_n)
    deep_id = f"{deep_n:032d}"
    stored_at = deep_at.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else deep_at
    cursor = encode_cursor(deep_at, deep_id)
    everything = JobFilter()
    with Session(engine) as session:
        page = jobs_page(session, everything, limit=PAGE, cursor=cursor)
        bare = session.execute(deep_sql, {"c": stored_at, "id": deep_id, "n": PAGE}).all()
        assert [r["id"] for r in page.rows] == [r.id for r in bare], "the deep page differs from its bare SQL"
        _line("first page (jobs_page)", timed(lambda: jobs_page(session, everything, limit=PAGE), 15),
              timed(lambda: session.execute(first_sql, {"n": PAGE + 1}).all(), 15))
        _line("deep page at 90% (jobs_page)",
              timed(lambda: jobs_page(session, everything, limit=PAGE, cursor=cursor), 15),
              timed(lambda: session.execute(deep_sql, {"c": stored_at, "id": deep_id, "n": PAGE + 1}).all(), 15))
        _line("deep page by OFFSET (not used)",
              timed(lambda: session.execute(offset_sql, {"n": PAGE, "o": rows - deep_n}).all(), 3))
        for name, where in [
            ("status=failed", JobFilter(status=GenerationStatus.FAILED)),
            ("status=pending", JobFilter(status=GenerationStatus.PENDING)),
            ("model=model-2", JobFilter(model="model-2")),
            ("search 'about 4242'", JobFilter(text="about 4242")),
            ("search, no match", JobFilter(text="no such words")),
            ("an hour in the middle", JobFilter(since=START + timedelta(seconds=rows // 2),
                                                until=START + timedelta(seconds=rows // 2 + 3600))),
        ]:
            _line(f"first page, {name}", timed(functools.partial(jobs_page, session, where, limit=PAGE), 5))
        _line("overview (browse.overview)", timed(lambda: browse.overview(session, {}), 5),
              timed(lambda: reads.queue_depth(session), 5))
        print("    (overview's floor: reads.queue_depth, the metrics scrape's read, which it includes)")
    _http_first_page(engine)


def _http_first_page(engine: Engine) -> None:
    from starlette.testclient import TestClient

    from dgxqueue.web import WebOptions, create_app

    settings = load_settings(env={}, overrides={"database": {"url": engine.url.render_as_string(hide_password=False)}})
    app = create_app(WebOptions(settings=settings, engine=engine))
    with TestClient(app, base_url="http://127.0.0.1:8470") as client:
        _line("first page, GET /api/jobs (HTTP)", timed(lambda: client.get("/api/jobs").raise_for_status(), 15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--engines", default="sqlite,postgresql")
    args = parser.parse_args()
    for kind in args.engines.split(","):
        with scratch_database(kind) as url:
            init_db(url)
            from dgxqueue.storage import get_engine

            bench(get_engine(url), args.rows)
            dispose_engines()


if __name__ == "__main__":
    main()
