"""Real-time factor of the synth backend on one CPU core, against a numpy floor.

Run: ``.venv/bin/python benchmarks/bench_synth.py``. For each prompt, duration and channel count it
renders the request (best of a few runs, after one warm-up) and prints the real-time factor
(audio seconds per wall second). The floor, measured in the same run, is the cost of the least
work any renderer must do for that output: one float32 sine of the same shape. The target is 50x.
"""

from __future__ import annotations

import os

# One core, one thread: the figure the issue asks for, not what a BLAS thread pool makes of it.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dgxqueue.generators import GenerationRequest  # noqa: E402
from workers.synth import SynthGenerator  # noqa: E402

TARGET = 50.0
RATE = 32000
PROMPTS = ("dark trap beat 140 BPM in Cm", "lo-fi hip hop, chill", "deep house groove in A minor",
           "ambient drone in D", "jazz trio in Bb")
CASES = ((10.0, 1), (30.0, 1), (30.0, 2), (120.0, 2))


def best_of(runs: int, action: Callable[[], object]) -> float:
    action()  # warm-up: imports, allocator, caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    generator = SynthGenerator()
    generator.load()
    print(f"synth real-time factor on one core, {RATE} Hz (target >= {TARGET:.0f}x)")
    print(f"{'prompt':32} {'secs':>5} {'ch':>2} {'render ms':>10} {'RTF':>7} {'floor ms':>9} {'x floor':>8}")
    worst = float("inf")
    for duration, channels in CASES:
        frames = round(duration * RATE)
        t = np.arange(frames, dtype=np.float32) / np.float32(RATE)

        def floor_sine(t: np.ndarray = t, channels: int = channels) -> object:
            return np.stack([np.sin(np.float32(2 * np.pi * 440) * t) for _ in range(channels)])

        floor = best_of(3, floor_sine)
        for prompt in PROMPTS:
            request = GenerationRequest(job_id="bench", prompt=prompt, model_name="synth", seed=1,
                                        duration_seconds=duration, sample_rate=RATE, channels=channels)
            runs = 2 if duration > 60 else 3
            elapsed = best_of(runs, partial(generator.generate, [request]))
            rtf = duration / elapsed
            worst = min(worst, rtf)
            print(f"{prompt[:32]:32} {duration:5.0f} {channels:2d} {elapsed * 1000:10.1f} {rtf:7.0f}x "
                  f"{floor * 1000:9.2f} {elapsed / floor:7.0f}x")
    verdict = "meets" if worst >= TARGET else "MISSES"
    print(f"worst real-time factor {worst:.0f}x: {verdict} the {TARGET:.0f}x target "
          f"({worst / TARGET:.1f}x of it)")


if __name__ == "__main__":
    main()
