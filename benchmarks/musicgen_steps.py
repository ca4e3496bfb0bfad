"""MusicGen decoding steps per second: our decode loop beside ``model.generate``, same model, same run.

    python benchmarks/musicgen_steps.py                  # tiny random model on CPU, batch 1 and 8
    python benchmarks/musicgen_steps.py --threads 2 --frames 200 --rounds 5
    python benchmarks/musicgen_steps.py --compile-step   # the loop's step() eager beside torch.compile

A step is one token for every codebook of every job in the batch. Both sides render the same jobs
(same prompts, ``--frames`` frames each, guidance 3, sampling) from text to audio, so each figure
includes encoding the prompts and decoding the codes to audio; the loop's pure ``step()`` rate is
printed beside it. Each figure is the best of ``--rounds``, the three taking turns, and the load
average is printed with it: on a shared machine the best round is the least disturbed one.

``--compile-step`` measures instead the loop's ``step()`` in milliseconds, eager beside
``compile_step=True`` (one compiled graph per batch size, its compile timed apart as the first step),
every slot busy, the two sessions taking turns.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers

from tests.support.tiny_musicgen import PROMPTS, build_tiny_musicgen
from workers.musicgen_decode import DecodeRequest, DecodeSession, DecodeSettings


def _best(rounds: int, *runs: Callable[[], None]) -> list[float]:
    """The shortest time of each run over ``rounds``, the runs taking turns so that a change of
    load on a shared machine falls on all of them alike."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def measure(model: Any, processor: Any, batch: int, frames: int, rounds: int) -> dict[str, float]:
    """Steps per second of generate, of the loop end to end, and of the loop's steps alone."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    steps = frames + model.decoder.config.num_codebooks // model.decoder.config.audio_channels - 1
    settings = DecodeSettings(do_sample=True, guidance_scale=3.0, temperature=1.0, top_k=250)
    jobs = [DecodeRequest(f"j{i}", p, frames, i, settings) for i, p in enumerate(prompts)]
    inputs = processor(text=prompts, padding=True, return_tensors="pt")

    def by_generate() -> None:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=steps, do_sample=True, guidance_scale=3.0, top_k=250)

    session = DecodeSession(model, processor, slots=batch, max_frames=frames)

    def by_loop() -> None:
        session.run(jobs)

    stepping: list[float] = []

    def loop_steps_only() -> None:
        for job in jobs:
            session.add(job)
        start = time.perf_counter()
        for _ in range(steps - 1):  # the last step decodes audio too
            session.step()
        stepping.append(time.perf_counter() - start)
        while session.busy:
            session.step()

    by_generate()  # warm up both
    by_loop()
    generate_s, loop_s, _ = _best(rounds, by_generate, by_loop, loop_steps_only)
    return {"generate": steps / generate_s, "loop": steps / loop_s, "loop_steps": (steps - 1) / min(stepping)}


def step_ms(model: Any, processor: Any, batch: int, frames: int, rounds: int) -> dict[str, float]:
    """Milliseconds per ``step()`` of an eager and a compiled session, every slot busy (the last step,
    which decodes audio, left out), and the compiled session's first step, which compiles."""
    settings = DecodeSettings(do_sample=True, guidance_scale=3.0, temperature=1.0, top_k=250)
    jobs = [DecodeRequest(f"j{i}", PROMPTS[i % len(PROMPTS)], frames, i, settings) for i in range(batch)]
    sessions = {mode: DecodeSession(model, processor, slots=batch, max_frames=frames, compile_step=mode == "compiled")
                for mode in ("eager", "compiled")}
    steps = frames + model.decoder.config.num_codebooks // model.decoder.config.audio_channels - 1
    spent: dict[str, list[float]] = {mode: [] for mode in sessions}

    def run(mode: str) -> float:
        session = sessions[mode]
        for job in jobs:
            session.add(job)
        start = time.perf_counter()
        session.step()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps - 2):
            session.step()
        spent[mode].append((time.perf_counter() - start) / (steps - 2))
        while session.busy:
            session.step()
        return first

    compile_s = run("compiled")  # the compile, then a warm-up round for eager
    run("eager")
    for times in spent.values():
        times.clear()
    for _ in range(rounds):
        for mode in sessions:
            run(mode)
    return {"eager": 1000 * min(spent["eager"]), "compiled": 1000 * min(spent["compiled"]), "compile_s": compile_s}


def main_compile_step(model: Any, processor: Any, batch_sizes: list[int], frames: int, rounds: int) -> None:
    header = ("batch", "eager ms/step", "compiled ms/step", "eager/compiled", "first step (compile)")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (5, 13, 16, 14, 20), strict=True)) + "  load (1, 5, 15 min)")
    for batch in batch_sizes:
        ms = step_ms(model, processor, batch, frames, rounds)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"{batch:>5}  {ms['eager']:>13.2f}  {ms['compiled']:>16.2f}  {ms['eager'] / ms['compiled']:>13.2f}x  "
              f"{ms['compile_s']:>19.1f}s  {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--frames", type=int, default=100, help="codec frames per job (50 a second)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices gain nothing from more)")
    parser.add_argument("--compile-step", action="store_true", help="step() eager beside compile_step=True instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_musicgen(Path(folder))
        tf: Any = transformers  # untyped: its annotations are partial
        model = tf.MusicgenForConditionalGeneration.from_pretrained(folder).eval()
        processor = tf.AutoProcessor.from_pretrained(folder)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"{args.frames} frames a job, best of {args.rounds}")
    if args.compile_step:
        main_compile_step(model, processor, [int(b) for b in args.batch_sizes.split(",")], args.frames, args.rounds)
        return
    header = ("batch", "generate", "loop", "loop/gen", "loop steps only")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (5, 10, 10, 8, 15), strict=True)) + "  load (1, 5, 15 min)")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rates = measure(model, processor, batch, args.frames, args.rounds)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"{batch:>5}  {rates['generate']:>8.1f}/s  {rates['loop']:>8.1f}/s  "
              f"{rates['loop'] / rates['generate']:>7.2f}x  {rates['loop_steps']:>13.1f}/s  {load}")


if __name__ == "__main__":
    main()
