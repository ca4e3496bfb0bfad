"""Per-job CPU cost of the executor's file work for a no-op job, against a bare-syscall floor.

Run: ``.venv/bin/python benchmarks/bench_output.py [--jobs 3000] [--rounds 5]``. Fake claimed jobs
for the ``silence`` backend (0.01 s of 8 kHz mono zeros, the job ``bench_daemon.py`` counts) go
through :func:`executor.prepare` and :func:`executor.render` in batches of 1 and of 64, then
each staged file is published (renamed into place, as the daemon does after the commit), into a
fresh tmpfs folder (/dev/shm) per round, so the figures measure CPU, not a disk. A second pass
times the steps one by one through the functions the executor calls. The floor, measured in the
same run, is the least any atomic writer must do per file: open a temporary file O_CREAT|O_EXCL,
write a prebuilt header and payload, fsync, close, rename; plus one folder fsync per batch.
Every figure is the best of ``--rounds`` rounds, in microseconds per job.
"""

from __future__ import annotations

import os

# One core: the daemon renders on one runner thread, and a fixed core steadies the figures.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse
import functools
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dgxqueue import audio
from dgxqueue.daemon import executor, staging
from dgxqueue.storage.claimed import ClaimedJob
from workers.silence import SilenceGenerator

SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
DURATION, RATE = 0.01, 8000
STEPS = ("prepare", "render", "  generate", "  stage_wav", "  measure", "  sync", "publish", "total", "floor")


def make_jobs(n: int) -> list[ClaimedJob]:
    now = datetime.now(UTC)
    ids = [str(uuid.uuid4()) for _ in range(n)]
    return [ClaimedJob(i, "house beat 124 BPM", "silence", DURATION, RATE, 1, f"outputs/{i}.wav", None, 1, 3,
                       now, now) for i in ids]


def batches(jobs: Sequence[ClaimedJob], size: int) -> list[Sequence[ClaimedJob]]:
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def in_fresh_folder(action: Callable[[Path], dict[str, float]]) -> dict[str, float]:
    """Run ``action`` on a new, empty outputs folder (created, as the daemon finds it), then drop it."""
    base = Path(tempfile.mkdtemp(dir=SHM))
    try:
        outputs = base / "outputs"
        outputs.mkdir()
        return action(outputs)
    finally:
        shutil.rmtree(base)


def executor_pass(jobs: Sequence[ClaimedJob], size: int, outputs: Path) -> dict[str, float]:
    generator = SilenceGenerator(max_batch_size=size)
    spent = {"prepare": 0.0, "render": 0.0, "publish": 0.0}
    for chunk in batches(jobs, size):
        started = time.perf_counter()
        work, refused = executor.prepare(chunk, generator)
        prepared = time.perf_counter()
        outcomes = executor.render(generator, work, outputs, "bench")
        rendered = time.perf_counter()
        for outcome in outcomes:
            assert outcome.staged is not None
            outcome.staged.publish()
        spent["publish"] += time.perf_counter() - rendered
        spent["render"] += rendered - prepared
        spent["prepare"] += prepared - started
        assert not refused and all(o.error is None for o in outcomes), (refused, outcomes)
    return spent


def steps_pass(jobs: Sequence[ClaimedJob], size: int, outputs: Path) -> dict[str, float]:
    """The render's steps timed apart: the backend call, the writes, the measurements, the sync."""
    generator = SilenceGenerator(max_batch_size=size)
    spent = dict.fromkeys(("  generate", "  stage_wav", "  measure", "  sync"), 0.0)
    for chunk in batches(jobs, size):
        work, _ = executor.prepare(chunk, generator)
        root = audio.OutputRoot(outputs)
        folders = audio.Folders(root.real)
        located, _ = executor.locate(work, root)
        paths = [path for _, path in located]
        t0 = time.perf_counter()
        results = generator.generate([w.request for w in work])
        t1 = time.perf_counter()
        for path, result, w in zip(paths, results, work, strict=True):
            assert not isinstance(result, BaseException)
            audio.stage_wav(path, result, tag=staging.tag(w.job.id, w.job.attempt, "bench"), folders=folders)
        t2 = time.perf_counter()
        for result in results:
            assert not isinstance(result, BaseException)
            audio.measure(result)
        t3 = time.perf_counter()
        folders.sync()
        folders.close()  # the staged files are left as they are: "publish" is timed above
        t4 = time.perf_counter()
        for key, value in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[key] += value
    return spent


def floor_pass(jobs: Sequence[ClaimedJob], size: int, outputs: Path) -> dict[str, float]:
    """The bare syscalls of an atomic write, names and bytes prepared beforehand."""
    blob = bytes(44 + round(DURATION * RATE) * 2)
    folder = str(outputs)
    names = [(f"{folder}/.{j.id}.wav.0123456789ab.tmp", f"{folder}/{j.id}.wav") for j in jobs]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    started = time.perf_counter()
    for i in range(0, len(names), size):
        for tmp, final in names[i : i + size]:
            fd = os.open(tmp, flags, 0o666)
            os.write(fd, blob)
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    return {"floor": time.perf_counter() - started}


def measure_batch(jobs: Sequence[ClaimedJob], size: int, rounds: int) -> dict[str, float]:
    """Best of ``rounds`` for every step, in microseconds per job."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for run in (executor_pass, steps_pass, floor_pass):
            for key, seconds in in_fresh_folder(functools.partial(run, jobs, size)).items():
                best[key] = min(best.get(key, float("inf")), seconds * 1e6 / len(jobs))
    best["total"] = best["prepare"] + best["render"] + best["publish"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    jobs = make_jobs(args.jobs)
    in_fresh_folder(lambda out: executor_pass(jobs[:200], 64, out))  # warm-up: imports, allocator
    sizes = (1, 64)
    figures = {size: measure_batch(jobs, size, args.rounds) for size in sizes}
    print(f"µs per job, {args.jobs} silence jobs ({DURATION} s, {RATE} Hz mono) on {SHM}, best of {args.rounds}")
    print(f"{'step':12}" + "".join(f"{f'batch {size}':>10}" for size in sizes))
    for step in STEPS:
        print(f"{step:12}" + "".join(f"{figures[size][step]:10.1f}" for size in sizes))
    print(f"{'x floor':12}" + "".join(f"{figures[s]['total'] / figures[s]['floor']:9.1f}x" for s in sizes))


if __name__ == "__main__":
    main()
