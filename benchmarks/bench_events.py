"""What completion events cost the daemon: no-op throughput on PostgreSQL with the outcome's
``pg_notify`` and without it, in pairs in one run.

Then the finish's statement alone: ``--batches`` jobs claimed and finished through
``storage.queue`` on one connection, the finish timed, with and without events alternately, the
rows put back to pending between (untimed); the medians of each are printed. Its difference is
what events add to each batch's write, free of the daemon's noise.

"Without" is the daemon as it was before events: the finish's statement is compiled from the
bare UPDATE (switched in this process, each variant compiled once). Each pair runs both on
an emptied table, one after the other, in alternating order; the ratio printed is the median of
the pairs' ratios (with its range), because a shared machine's speed drifts within minutes.

    .venv/bin/python benchmarks/bench_events.py [--jobs 3000] [--batches 1,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402
from bench_daemon import clear, daemon_rate, spread  # noqa: E402
from sqlalchemy.engine import Dialect  # noqa: E402

from dgxqueue.storage import engines, queue  # noqa: E402
from dgxqueue.storage.precompiled import Compiled  # noqa: E402
from tests.support.bench import scratch_database  # noqa: E402

_WITH_EVENTS = queue._finish_rows


@functools.lru_cache(maxsize=512)
def _without_events(dialect: Dialect, keys: tuple[str, ...], n: int) -> Compiled:
    """The finish's statement compiled as before events: the bare UPDATE."""
    profile = engines.profile_of(dialect)
    return Compiled.of(queue.finish_rows_statement(profile, keys, 0 if profile.any_count else n), dialect)


def events(on: bool) -> None:
    """Finish with (``on``) or without the outcome's pg_notify from now on; each variant keeps
    its own cache of compiled statements, so switching compiles nothing."""
    queue._finish_rows = _WITH_EVENTS if on else _without_events


def finish_times(url: str, batch: int, rounds: int) -> dict[bool, list[float]]:
    """Seconds per finish of ``batch`` claimed jobs, with and without events, alternately."""
    from bench_daemon import fill

    from dgxqueue.storage import get_engine
    from dgxqueue.storage.models import utcnow
    from dgxqueue.storage.precompiled import HeldConnection
    from dgxqueue.storage.results import Completed

    fill(url, batch)
    engine = get_engine(url)
    link = HeldConnection(engine)
    times: dict[bool, list[float]] = {True: [], False: []}
    reset = sa.text("UPDATE generations SET status = 'pending', worker_id = NULL, attempts = 0, "
                    "completed_at = NULL, lease_expires_at = NULL")
    for i in range(rounds * 2):
        on = i % 2 == 0
        events(on)
        jobs = queue.claim(link, worker_id="bench", models=["silence"], limit=batch, lease=timedelta(minutes=1))
        results = [(job, Completed(utcnow(), 0.01, 1, {})) for job in jobs]
        started = time.perf_counter()
        written = queue.finish(link, worker_id="bench", results=results)
        times[on].append(time.perf_counter() - started)
        assert len(written) == batch
        with engine.begin() as conn:
            conn.execute(reset)
    link.close()
    events(True)
    clear(url)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with scratch_database("postgres") as url:
        from dgxqueue.storage import init_db

        init_db(url)
        for batch in (int(b) for b in args.batches.split(",")):
            rates: dict[bool, list[float]] = {True: [], False: []}
            ratios = []
            for i in range(args.rounds):
                for on in ((False, True) if i % 2 == 0 else (True, False)):
                    events(on)
                    rates[on].append(daemon_rate(url, args.jobs, batch))
                    clear(url)
                ratios.append(rates[True][-1] / rates[False][-1])
            events(True)
            times = finish_times(url, batch, 200)
            print(f"batch {batch:3}: the finish alone, median of 200: without events "
                  f"{statistics.median(times[False]) * 1000:.3f} ms, with events "
                  f"{statistics.median(times[True]) * 1000:.3f} ms", flush=True)
            print(f"batch {batch:3}: without events {statistics.median(rates[False]):7.0f} jobs/s, "
                  f"with events {statistics.median(rates[True]):7.0f} jobs/s (medians of {args.rounds}); "
                  f"with/without {spread(ratios)}", flush=True)


if __name__ == "__main__":
    main()
