"""What live progress costs: the daemon's no-op throughput and a MusicGen batch's wall time
(the tiny model, on CPU), each with progress on and off, in alternating pairs in one run.

- no-op: a silence backend draining ``--jobs`` jobs in burst mode. On: the backend reports
  (1, 1) for every request and the daemon's progress tick runs; off: the backend reports nothing
  and the tick never runs (``Heartbeat.progress_interval`` infinite).
- MusicGen: one batch of 4 jobs through a daemon on SQLite, with ``decode`` generate and loop. On:
  the per-step stopping criterion (generate) or the watched loop (loop) reports every step and the
  daemon writes the rows once a second; off: neither is installed, as before progress existed.

Each figure is the median of ``--rounds`` pairs, on and off run back to back, with the ratio.
On a shared host those ratios carry the host's noise, so it also prints the parts' own costs,
which that noise hardly moves: a ``report`` call, the stopping criterion's call per decoding
step, and the heartbeat's statement for 4 held jobs with and without their progress.

    .venv/bin/python benchmarks/bench_progress.py [--jobs 3000] [--rounds 5] [--engines sqlite,postgres]
        [--musicgen-seconds 8] [--skip-musicgen]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dgxqueue.daemon import Daemon  # noqa: E402
from dgxqueue.generators import GenerationOutcome, GenerationRequest, Generator, create_generator  # noqa: E402
from dgxqueue.storage import create_generations, get_engine, init_db, session_scope  # noqa: E402
from tests.support.bench import scratch_database  # noqa: E402
from tests.support.daemons import make_settings  # noqa: E402
from workers import musicgen  # noqa: E402
from workers.silence import SilenceGenerator  # noqa: E402

SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def fill(url: str, n: int, model: str = "silence", duration: float = 0.01, rate: int = 8000) -> None:
    specs = [{"prompt": f"house beat take {i % 50}", "model_name": model, "duration_seconds": duration,
              "sample_rate": rate, "channels": 1} for i in range(n)]
    with session_scope(get_engine(url)) as s:
        create_generations(s, specs)


def clear(url: str) -> None:
    """Empty the table and vacuum it, so each run starts on a table without the last one's dead rows."""
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM generations"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM"))


class ReportingSilence(SilenceGenerator):
    """Silence that reports each request done, as a backend with progress does."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        for request in requests:
            request.control.report(1, 1)
        return super().generate(requests)


def drain(url: str, generator: Generator, progress: bool, **worker: Any) -> float:
    """Seconds for a daemon to drain the queue in burst mode."""
    with tempfile.TemporaryDirectory(dir=SHM) as folder:
        settings = make_settings(url, Path(folder) / "outputs", **worker)
        daemon = Daemon(settings, engine=get_engine(url), generator=generator)
        if not progress:
            daemon.heartbeat.progress_interval = float("inf")
        started = time.perf_counter()
        daemon.run(burst=True)
        took = time.perf_counter() - started
    with get_engine(url).connect() as conn:  # a benchmark of failing jobs measures nothing
        rows = conn.execute(sa.text("SELECT status, count(*) FROM generations GROUP BY status")).all()
    statuses: dict[str, int] = {status: n for status, n in rows}
    if set(statuses) != {"completed"}:
        raise SystemExit(f"not every job completed: {statuses}")
    return took


def noop(url: str, jobs: int, progress: bool) -> float:
    clear(url)
    fill(url, jobs)
    generator = ReportingSilence() if progress else SilenceGenerator()
    return jobs / drain(url, generator, progress)


class _Plain:
    """Progress off for MusicGen: no stopping criterion, the loop run unwatched."""

    def __enter__(self) -> None:
        self.criteria, self.watched = musicgen.MusicGenGenerator._criteria, musicgen._run_watched
        musicgen.MusicGenGenerator._criteria = lambda self, criteria: None  # type: ignore[method-assign]
        musicgen._run_watched = lambda session, requests, controls: session.run(requests)

    def __exit__(self, *exc: object) -> None:
        musicgen.MusicGenGenerator._criteria = self.criteria  # type: ignore[method-assign]
        musicgen._run_watched = self.watched


def musicgen_batch(url: str, generator: Generator, seconds: float, progress: bool) -> float:
    clear(url)
    fill(url, 4, model="tiny-musicgen", duration=seconds, rate=32000)
    if progress:
        return drain(url, generator, True, heartbeat_seconds=1.0)
    with _Plain():
        return drain(url, generator, False, heartbeat_seconds=1.0)


def pairs(rounds: int, run: Any) -> tuple[float, float, float, float, float]:
    """(median on, median off, median ratio on/off, min ratio, max ratio) over alternating pairs."""
    on, off, ratios = [], [], []
    for i in range(rounds):
        first, second = (True, False) if i % 2 == 0 else (False, True)
        a, b = run(first), run(second)
        x, y = (a, b) if first else (b, a)
        on.append(x)
        off.append(y)
        ratios.append(x / y)
    return statistics.median(on), statistics.median(off), statistics.median(ratios), min(ratios), max(ratios)


def _per_call(fn: Any, n: int) -> float:
    """Seconds per call of ``fn``, the best of 5 runs of ``n`` calls."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - started) / n)
    return best


def parts(engines: list[str]) -> None:
    """The cost of each part progress adds, alone."""
    import torch

    from dgxqueue.generators import JobControl

    control = JobControl()
    print(f"JobControl.report: {_per_call(lambda: control.report(5, 10), 200_000) * 1e9:.0f} ns a call")
    watch = musicgen._Watch([JobControl() for _ in range(4)], 400, torch)
    ids = torch.zeros((4 * 4, 100), dtype=torch.long)  # 4 requests x 4 codebooks, as generate passes them
    print(f"stopping criterion, batch of 4: {_per_call(lambda: watch(ids, None), 20_000) * 1e6:.1f} us a step")
    for engine in engines:
        with scratch_database(engine) as url:
            init_db(url)
            fill(url, 4)
            plain, with_progress = _heartbeat_costs(url)
            print(f"heartbeat statement, 4 jobs, {engine}: {plain * 1e3:.2f} ms plain, {with_progress * 1e3:.2f} ms "
                  "with progress (at most one a second)")


def _heartbeat_costs(url: str) -> tuple[float, float]:
    from datetime import timedelta

    from dgxqueue.daemon.queue_client import QueueClient

    client = QueueClient(get_engine(url), worker_id="w", models=["silence"], lease=timedelta(seconds=60))
    held = client.claim(4)
    progress = {job.id: (3, 10) for job in held}
    try:
        return _per_call(lambda: client.extend(held), 200), _per_call(lambda: client.extend(held, progress), 200)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--musicgen-seconds", type=float, default=8.0)
    parser.add_argument("--skip-musicgen", action="store_true")
    parser.add_argument("--only-parts", action="store_true", help="only the parts' own costs")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # the daemon's info lines off
    parts(args.engines.split(","))
    if args.only_parts:
        return
    for engine in args.engines.split(","):
        with scratch_database(engine) as url:
            init_db(url)
            on, off, ratio, low, high = pairs(args.rounds, lambda p, url=url: noop(url, args.jobs, p))
            print(f"no-op {engine}: progress on {on:.0f} jobs/s, off {off:.0f} jobs/s, "
                  f"on/off {ratio:.3f} (range {low:.3f}..{high:.3f})", flush=True)
    if args.skip_musicgen:
        return
    from tests.support.tiny_musicgen import build_tiny_musicgen

    with tempfile.TemporaryDirectory() as folder, scratch_database("sqlite") as url:
        init_db(url)
        model = build_tiny_musicgen(Path(folder) / "tiny")
        for decode in ("generate", "loop"):
            generator = create_generator("musicgen", {"model": str(model), "models": ["tiny-musicgen"],
                                                      "max_batch_size": 4, "decode": decode})
            generator.load()
            musicgen_batch(url, generator, args.musicgen_seconds, True)  # warm-up
            on, off, ratio, low, high = pairs(
                args.rounds, lambda p, g=generator: musicgen_batch(url, g, args.musicgen_seconds, p))
            print(f"musicgen tiny CPU batch of 4 x {args.musicgen_seconds:g} s, decode={decode}: progress on "
                  f"{on:.2f} s, off {off:.2f} s, on/off {ratio:.3f} (range {low:.3f}..{high:.3f})", flush=True)


if __name__ == "__main__":
    main()
