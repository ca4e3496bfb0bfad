"""MusicGen batching throughput: one batched ``generate`` against sequential calls, same run.

    python benchmarks/bench_musicgen.py                  # tiny random model on CPU; target >= 3x
    python benchmarks/bench_musicgen.py --size small     # musicgen-small's geometry, for a GPU

``--size small`` builds a randomly initialised model of musicgen-small's shape (decoder 24 layers,
hidden 1024, 16 heads; t5-base-sized encoder, though with the tiny tokenizer's vocabulary) and
prints audio-seconds per wall second for batch sizes 1, 4 and 16, in half precision on CUDA.
``--daemon N`` then drains N such jobs through the real daemon (SQLite, claims of the largest batch
size, WAVs written) and prints its throughput beside the bare ``generate`` floor of the same run.
Nothing is downloaded: the model is built in a temporary folder and loaded with ``from_pretrained``
like production loads ``facebook/musicgen-small``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgxqueue.daemon import Daemon
from dgxqueue.daemon.runner import Runner
from dgxqueue.generators import GeneratedAudio, GenerationRequest
from dgxqueue.storage import create_generations, get_all_generations, get_engine, init_db, session_scope
from tests.support.daemons import make_settings
from tests.support.tiny_musicgen import (
    PROMPTS,
    SMALL_CODEC,
    SMALL_DECODER,
    SMALL_TEXT,
    build_tiny_musicgen,
)
from workers.musicgen import MusicGenGenerator


def _requests(count: int, seconds: float) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"job-{i}", PROMPTS[i % len(PROMPTS)], "bench", seconds, 32000, 1, i)
        for i in range(count)
    ]


def _timed(generator: MusicGenGenerator, batches: list[list[GenerationRequest]]) -> float:
    """Wall seconds to render every batch, one ``generate`` call each (GPU work included)."""
    sync = generator._torch.cuda.synchronize if generator._device.startswith("cuda") else lambda: None
    sync()
    start = time.perf_counter()
    for batch in batches:
        outcomes = generator.generate(batch)
        if not all(isinstance(o, GeneratedAudio) for o in outcomes):
            raise SystemExit(f"generation failed: {outcomes}")
    sync()
    return time.perf_counter() - start


def bench_tiny(folder: Path, batch: int, seconds: float, repeats: int, device: str) -> None:
    path = build_tiny_musicgen(folder)
    generator = MusicGenGenerator(model=str(path), models=["bench"], device=device, max_batch_size=batch)
    generator.load()
    requests = _requests(batch, seconds)
    _timed(generator, [requests[:1]])  # warm-up: first-call allocations and lazy imports
    # Interleaved, best of each: other work on a shared machine only ever adds time.
    timings = [
        (_timed(generator, [requests]), _timed(generator, [[r] for r in requests])) for _ in range(repeats)
    ]
    batched = min(t[0] for t in timings)
    sequential = min(t[1] for t in timings)
    print(f"tiny model on {generator._device}, {batch} prompts x {seconds:g} s, best of {repeats}")
    print(f"  one batch of {batch}:     {batched:.3f} s")
    print(f"  {batch} sequential calls: {sequential:.3f} s")
    print(f"  batched throughput: {sequential / batched:.2f}x (target >= 3x)")


def bench_small(folder: Path, sizes: list[int], seconds: float, device: str, daemon_jobs: int) -> None:
    # Every torch call on one thread, the one the daemon then generates on: torch's CPU thread
    # pool belongs to the thread that first uses it, and a second pool slows the calls down.
    runner = Runner()
    path = runner.submit(lambda: build_tiny_musicgen(
        folder, decoder=SMALL_DECODER, text_encoder=SMALL_TEXT, codec=SMALL_CODEC)).result()
    generator = MusicGenGenerator(model=str(path), models=["bench"], device=device, max_batch_size=max(sizes))

    def timed(batch: int, audio: float) -> float:
        return runner.submit(lambda: _timed(generator, [_requests(batch, audio)])).result()

    runner.submit(generator.load).result()
    torch = generator._torch
    cuda = generator._device.startswith("cuda")
    params = sum(p.numel() for p in generator._model.parameters()) / 1e6
    dtype = next(generator._model.parameters()).dtype
    print(f"musicgen-small geometry ({params:.0f}M parameters, random) on {generator._device}, {dtype}")
    timed(1, min(seconds, 1.0))  # warm-up
    walls: dict[int, float] = {}
    for size in sizes:
        timed(size, min(seconds, 1.0))  # this shape's first-call allocations
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        walls[size] = timed(size, seconds)
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
        print(
            f"  batch {size:>2} x {seconds:g} s: {walls[size]:.2f} s wall, "
            f"{size * seconds / walls[size]:.2f} audio-seconds per second{memory}"
        )
    if daemon_jobs:
        batch = max(sizes)
        bare = min(walls[batch], timed(batch, seconds))
        _daemon(folder, generator, runner, daemon_jobs, batch, seconds, bare=bare)


def _daemon(folder: Path, generator: MusicGenGenerator, runner: Runner, jobs: int, batch: int, seconds: float,
            *, bare: float) -> None:
    """Drain ``jobs`` through the real daemon (SQLite, burst mode) and print where its time went.

    The floor is the best of two bare ``generate`` calls of the batch: one call's wall time swings
    widely on a shared GPU host, so the daemon is also judged by its own overhead, its wall time
    less the ``generate`` calls it recorded.
    """
    url = f"sqlite:///{folder}/bench.db"
    outputs = folder / "outputs"
    init_db(url)
    with session_scope(get_engine(url)) as s:
        create_generations(s, [{"prompt": PROMPTS[i % len(PROMPTS)], "model_name": "bench",
                                "duration_seconds": seconds, "sample_rate": 32000} for i in range(jobs)])
    settings = make_settings(url, outputs, batch_size=batch, heartbeat_seconds=5.0)
    daemon = Daemon(settings, engine=get_engine(url), generator=generator, runner=runner)  # it loaded the model
    start = time.perf_counter()
    if daemon.run(burst=True) != 0:
        raise SystemExit("the daemon exited non-zero")
    elapsed = time.perf_counter() - start
    with session_scope(get_engine(url)) as s:
        rows = get_all_generations(s, limit=jobs)
        done = sum(r.status == "completed" for r in rows)
        # A job's generation time is its batch's generate call plus writing its own file; a batch
        # is the jobs of one claim, so its call took (at most) the least of them.
        batches: dict[object, float] = {}
        for r in rows:
            batches[r.claimed_at] = min(batches.get(r.claimed_at, math.inf), r.generation_time_seconds or 0.0)
        calls = sorted(batches.values())
    wavs = sorted(outputs.rglob("*.wav"))
    if done != jobs or len(wavs) != jobs:
        raise SystemExit(f"the daemon completed {done} jobs and wrote {len(wavs)} WAVs for {jobs} jobs")
    silent = sum(_silent_tail(path, 0.5) for path in wavs)
    rate = jobs * seconds / elapsed
    print(f"  daemon, {jobs} jobs x {seconds:g} s claimed {batch} at a time: {elapsed:.2f} s wall, "
          f"{rate:.2f} audio-seconds per second, {rate / (batch * seconds / bare):.2f}x the best bare batch "
          f"({bare:.2f} s)")
    print(f"  its generate calls: {', '.join(f'{c:.2f} s' for c in calls)}; outside them "
          f"{elapsed - sum(calls):.2f} s ({(elapsed - sum(calls)) / elapsed:.1%}): claims, WAVs, outcomes; "
          f"{silent} of {jobs} WAVs end in 0.5 s of digital silence")


def _silent_tail(path: Path, seconds: float) -> bool:
    """Whether the file ends in exact zeros: what padding would leave if generation stopped early."""
    with wave.open(str(path)) as wav:
        frames = min(wav.getnframes(), round(seconds * wav.getframerate()))
        wav.setpos(wav.getnframes() - frames)
        return not any(wav.readframes(frames))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--seconds", type=float, help="audio per prompt (tiny: 1, small: 10)")
    parser.add_argument("--batch", type=int, default=8, help="tiny: prompts per batch")
    parser.add_argument("--batch-sizes", default="1,4,16", help="small: comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="tiny: timed repeats (best of)")
    parser.add_argument("--device", help="auto, cpu or cuda (tiny: cpu, small: auto)")
    parser.add_argument("--daemon", type=int, default=0, metavar="JOBS",
                        help="small: also drain JOBS jobs through the daemon")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-musicgen-") as tmp:
        if args.size == "tiny":
            bench_tiny(Path(tmp), args.batch, args.seconds or 1.0, args.repeats, args.device or "cpu")
        else:
            sizes = [int(s) for s in args.batch_sizes.split(",")]
            bench_small(Path(tmp), sizes, args.seconds or 10.0, args.device or "auto", args.daemon)


if __name__ == "__main__":
    main()
