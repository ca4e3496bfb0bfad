"""What completion events cost the daemon: no-op throughput on PostgreSQL with the outcome's
``pg_notify`` and without it, in pairs in one run.

"Without" is the daemon as it was before events: the finish's statement is compiled from the
bare UPDATE (the engine profile's announce switched off in this process). Each pair runs both on
an emptied table, one after the other, in alternating order; the ratio printed is the median of
the pairs' ratios (with its range), because a shared machine's speed drifts within minutes.

    .venv/bin/python benchmarks/bench_events.py [--jobs 3000] [--batches 1,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_daemon import clear, daemon_rate, database, spread  # noqa: E402
from dgxqueue.storage import engines, queue  # noqa: E402

_ANNOUNCE: Any = engines.PostgreSQLProfile.announce


def events(on: bool) -> None:
    """Compile the finish with (``on``) or without its pg_notify from now on."""
    engines.PostgreSQLProfile.announce = _ANNOUNCE if on else engines.Profile.announce  # type: ignore[method-assign]
    queue._finish_rows.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with database("postgres") as url:
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
            print(f"batch {batch:3}: without events {statistics.median(rates[False]):7.0f} jobs/s, "
                  f"with events {statistics.median(rates[True]):7.0f} jobs/s (medians of {args.rounds}); "
                  f"with/without {spread(ratios)}", flush=True)


if __name__ == "__main__":
    main()
