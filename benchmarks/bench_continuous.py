"""Continuous batching against the claim-a-batch loop: time from enqueue to WAV under Poisson arrivals.

    python benchmarks/bench_continuous.py                 # tiny random MusicGen on CPU, SQLite
    python benchmarks/bench_continuous.py --jobs 60 --load 0.7

One run, the same arrival schedule for every mode: a real daemon process (``python -m dgxqueue
worker``) on a fresh SQLite file, fed jobs of mixed durations (0.5, 1, 2 and 4 s) with
exponential gaps, at ``--load`` of the capacity measured first (audio-seconds a full batch of
slots renders per wall second). Modes:

- ``continuous``: ``decode = "loop"``, ``[generator] continuous = true`` (jobs join between steps);
- ``batch-loop``: the same decode loop and slots, claimed and rendered a batch at a time;
- ``batch-generate``: today's default, ``model.generate`` a batch at a time (one length a batch).

Prints p50/p95/max of ``completed_at - created_at`` per mode (both stamped by this machine's clock),
and each mode's wall time from the first arrival to the last completion.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# One torch thread here and in the daemons (they inherit it): on a loaded 2-core machine a second
# thread makes each tiny step wait for it (docs/results/2026-12-06-musicgen-cpu.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

from dgxqueue.config import OutputSettings
from dgxqueue.generators import GeneratedAudio, GenerationRequest
from dgxqueue.storage import create_generations, dispose_engines, get_engine, init_db, session_scope
from tests.support.processes import start_worker, wait_until, write_config
from tests.support.tiny_musicgen import PROMPTS, build_tiny_musicgen
from workers.musicgen import MusicGenGenerator

DURATIONS = (0.5, 1.0, 2.0, 4.0)
MODES = {
    "continuous": ({"decode": "loop"}, True),
    "batch-loop": ({"decode": "loop"}, False),
    "batch-generate": ({"decode": "generate"}, False),
}


def _options(model: Path, slots: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": str(model), "models": ["tiny"], "device": "cpu", "max_batch_size": slots, **extra}


def capacity(model: Path, slots: int) -> float:
    """Audio-seconds per wall second of a full batch of slots through the decode loop."""
    generator = MusicGenGenerator(**_options(model, slots, {"decode": "loop"}))
    generator.load()
    requests = [GenerationRequest(f"c{i}", PROMPTS[i % len(PROMPTS)], "tiny", 2.0, 32000, 1, i) for i in range(slots)]
    generator.generate(requests[:1])  # warm
    started = time.perf_counter()
    outcomes = generator.generate(requests)
    took = time.perf_counter() - started
    assert all(isinstance(o, GeneratedAudio) for o in outcomes), outcomes
    return 2.0 * slots / took


def schedule(jobs: int, rate: float, seed: int) -> list[tuple[float, float]]:
    """(seconds after the start, duration) of each arrival: exponential gaps at ``rate`` per second."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for _ in range(jobs):
        at += rng.expovariate(rate)
        out.append((at, rng.choice(DURATIONS)))
    return out


def run_mode(name: str, model: Path, slots: int, arrivals: list[tuple[float, float]],
             folder: Path) -> tuple[list[float], float]:
    """Feed ``arrivals`` to a daemon in mode ``name``; each job's seconds from enqueue to its WAV,
    and the seconds from the first enqueue to the last WAV."""
    extra, continuous = MODES[name]
    folder.mkdir()
    url = f"sqlite:///{folder / 'queue.db'}"
    init_db(url)
    config = write_config(folder / "config.toml", {
        "database": {"url": url},
        "outputs": {"dir": str(folder / "outputs")},
        "generator": {"name": "musicgen", "continuous": continuous},
        "generator.options": _options(model, slots, extra),
        "worker": {"heartbeat_seconds": 1.0, "poll_interval_seconds": 0.5},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "warning"},
    })
    log = folder / "worker.log"
    worker = start_worker(config, log)
    engine = get_engine(url)
    try:
        wait_until(lambda: _registered(engine), 120, "the daemon to register", alive=worker, interval=0.1)
        ids: list[str] = []
        outputs = OutputSettings(dir=str(folder / "outputs"))
        start = time.monotonic()
        pause = threading.Event()
        for i, (at, seconds) in enumerate(arrivals):
            pause.wait(max(0.0, start + at - time.monotonic()))
            with session_scope(engine) as s:
                ids += create_generations(s, [{
                    "prompt": PROMPTS[i % len(PROMPTS)], "model_name": "tiny", "duration_seconds": seconds,
                    "sample_rate": 32000, "channels": 1}], outputs=outputs)
        wait_until(lambda: _done(engine) == len(ids), 600, "every job", alive=worker, interval=0.2)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT status, created_at, completed_at FROM generations")).all()
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        dispose_engines()
    bad = [r.status for r in rows if r.status != "completed"]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} jobs did not complete ({bad[:3]}); see {log}")
    span = max(_time(r.completed_at) for r in rows) - min(_time(r.created_at) for r in rows)
    return [(_time(r.completed_at) - _time(r.created_at)) for r in rows], span


def _time(value: Any) -> float:
    from datetime import datetime

    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return stamp.timestamp()


def _registered(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(sa.text("SELECT count(*) FROM daemons")).scalar())


def _done(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM generations WHERE status IN ('completed', 'failed')")).scalar() or 0)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--load", type=float, default=0.7, help="offered load, a fraction of the capacity")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_musicgen(Path(tmp) / "model")
        audio_per_second = capacity(model, args.slots)
        rate = args.load * audio_per_second / statistics.mean(DURATIONS)
        arrivals = schedule(args.jobs, rate, args.seed)
        print(f"capacity {audio_per_second:.2f} audio-s/s with {args.slots} slots; load {args.load:.0%}: "
              f"{rate:.2f} jobs/s, {args.jobs} jobs of {', '.join(f'{d:g}' for d in DURATIONS)} s over "
              f"{arrivals[-1][0]:.1f} s")
        print(f"{'mode':16} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'span s':>7}  load (1, 5, 15 min)")
        for name in args.modes.split(","):
            waits, span = run_mode(name, model, args.slots, arrivals, Path(tmp) / name)
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"{name:16} {_quantile(waits, 0.5):7.2f} {_quantile(waits, 0.95):7.2f} {max(waits):7.2f}"
                  f" {span:7.1f}  {load}", flush=True)


if __name__ == "__main__":
    main()
