"""What the benchmarks share: a timer of best and median, and a scratch database per engine."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dgxqueue.storage import dispose_engines
from tests.support.db import postgres_schema_url


def timed(step: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeat`` runs of ``step`` after one warm-up."""
    step()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


@contextlib.contextmanager
def scratch_database(engine_name: str) -> Iterator[str]:
    """A URL of an empty database of its own: a SQLite file in a temporary folder
    (``engine_name`` "sqlite") or a PostgreSQL schema of its own (anything else), gone after."""
    if engine_name == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{Path(folder) / 'generations.db'}"
    else:
        with postgres_schema_url() as url:
            yield url
    dispose_engines()
