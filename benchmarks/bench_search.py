"""Prompt search on 1,000,000 prompts: the search index beside a ``LIKE '%…%'`` scan, in one run.

    python benchmarks/bench_search.py [--rows 1000000] [--engines sqlite,postgresql]

For each engine, fills ``generations`` at head (migration 006's index kept by its triggers or its
GIN index as rows go in) with one INSERT ... SELECT of prompts made from a 40-word vocabulary plus
a word unique to the row (``take<n>``), analyzes it, then times, for a rare, a middling and a
common query, :func:`dgxqueue.storage.search.search_ids` (newest 20) against the same question
asked by ``LIKE`` (every word a substring, newest 20; a ``LIKE`` cannot say "starts a word", so it
may find more), best and median of 7 after a warm-up. It also counts each query's matches.

PostgreSQL comes from ``$DGXQ_TEST_PG_URL`` (as in the tests); a private schema is dropped after.
A benchmark, not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from dgxqueue.storage import dispose_engines, init_db, session_scope
from dgxqueue.storage.models import G
from dgxqueue.storage.search import search_ids
from tests.support.bench import scratch_database, timed

WORDS = ("lofi", "piano", "trap", "bass", "ambient", "strings", "drone", "jazz", "night", "rain", "deep", "house",
         "groove", "techno", "kick", "synth", "pad", "guitar", "acoustic", "folk", "cinematic", "epic", "choir",
         "orchestral", "chill", "hop", "beat", "vinyl", "crackle", "warm", "dark", "bright", "funk", "disco",
         "soul", "organ", "flute", "violin", "cello", "harp")
QUERIES = {"rare": "take123457", "middling": "cello harp vinyl", "common": "lofi piano"}


def fill(engine: Engine, rows: int) -> float:
    """``rows`` prompts in one statement, the index kept as they go in; returns the seconds."""
    n = len(WORDS)
    if engine.dialect.name == "sqlite":
        vocabulary = " UNION ALL ".join(f"SELECT {i}, '{word}'" for i, word in enumerate(WORDS))
        pick = "(SELECT w FROM words WHERE i = {})".format
        source = ("WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :rows), "
                  f"words(i, w) AS ({vocabulary}) ")
        prompt = (f"{pick(f'n % {n}')} || ' ' || {pick(f'(n / {n}) % {n}')} || ' ' || "
                  f"{pick(f'(n * 7 / 3) % {n}')} || ' with ' || {pick(f'(n * 13 / 11) % {n}')} || ' take' || n")
        created, row_id, series = "datetime('2024-01-01', '+' || n || ' seconds')", "printf('%032d', n)", "s"
    else:
        array = "ARRAY[" + ", ".join(f"'{word}'" for word in WORDS) + "]"
        pick = f"({array})[1 + ({{}})]".format
        source = ""
        prompt = (f"{pick(f'n % {n}')} || ' ' || {pick(f'(n / {n}) % {n}')} || ' ' || "
                  f"{pick(f'(n * 7 / 3) % {n}')} || ' with ' || {pick(f'(n * 13 / 11) % {n}')} || ' take' || n")
        created = "timestamptz '2024-01-01 00:00:00+00' + n * interval '1 second'"
        row_id, series = "lpad(n::text, 32, '0')", "generate_series(1, :rows) AS n"
    insert = f"""INSERT INTO generations (id, prompt, model_name, duration_seconds, sample_rate,
        channels, file_path, status, created_at)
        {source}SELECT {row_id}, {prompt}, 'm', 10.0, 32000, 1, 'outputs/x.wav', 'completed', {created}
        FROM {series}"""
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(insert), {"rows": rows})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE generations" if engine.dialect.name == "postgresql" else "ANALYZE"))
    return time.perf_counter() - started


def like_ids(engine: Engine, query: str) -> list[str]:
    """The LIKE scan: every word a substring of the prompt (case ignored), newest 20."""
    conditions = [sa.func.lower(G.c.prompt).like("%" + word + "%") for word in query.lower().split()]
    statement = sa.select(G.c.id).where(*conditions).order_by(G.c.created_at.desc(), G.c.id.desc()).limit(20)
    with engine.connect() as conn:
        return list(conn.execute(statement).scalars())


def count(engine: Engine, query: str) -> int:
    with session_scope(engine) as session:
        return len(search_ids(session, query, limit=100_000))


def run(engine_name: str, rows: int) -> None:
    with scratch_database(engine_name) as url:
        engine = init_db(url)
        seconds = fill(engine, rows)
        print(f"{engine_name:10} {rows:>9,} prompts filled in {seconds:.1f} s (index kept by the inserts)")
        for label, query in QUERIES.items():
            def search(query: str = query) -> list[str]:
                with session_scope(engine) as session:
                    return search_ids(session, query, limit=20)

            found, scanned = search(), like_ids(engine, query)
            best, median = timed(search, 7)
            like_best, like_median = timed(lambda query=query: like_ids(engine, query), repeat=3)  # type: ignore[misc]
            print(f"  {label:8} {query!r:20} {count(engine, query):>7,} matches | search {best * 1e3:8.2f} ms "
                  f"(median {median * 1e3:8.2f}) | LIKE scan {like_best * 1e3:8.1f} ms (median "
                  f"{like_median * 1e3:8.1f}) | {like_best / best:6.0f}x | first ids equal: {found == scanned}")
        dispose_engines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--engines", default="sqlite,postgresql")
    args = parser.parse_args()
    for name in args.engines.split(","):
        run(name.strip(), args.rows)


if __name__ == "__main__":
    main()
