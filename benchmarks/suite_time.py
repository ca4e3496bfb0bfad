"""Wall time of the whole test suite at two commits, measured back to back in one run on one machine.

    .venv/bin/python benchmarks/suite_time.py BASE [NEW=HEAD] [--rounds 1] [--logs DIR] [--base-tests]

Each commit is checked out into a temporary git worktree that uses this checkout's ``.venv``, and
that commit's own ``scripts/test`` runs there with no arguments (as CI runs it: coverage and the
storage gate included), with ``PYTHONPATH`` set to that worktree so that every daemon and command
the tests start imports that commit's code, and a private ``--basetemp`` (through
``PYTEST_ADDOPTS``). Rounds alternate the order (BASE NEW, then NEW BASE, ...) so that a machine
that speeds up or slows down over the run does not favour one side. For each run it prints the wall
time, the CPU time of the processes it started, the load average sampled every 5 s, and pytest's
summary line; then a Markdown table of every run. Each run's output is kept in ``--logs``.

``--base-tests`` adds a third run to each round: NEW's ``scripts/test`` given only BASE's tests as
NEW holds them (the same test id, or the same ``path::name`` after a parametrisation's id changed, or
the same name where one file alone holds it after a move): what the tests that existed at BASE cost
now, beside the whole suites. The ones it cannot find are counted and listed in ``--logs``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    label: str
    commit: str
    wall: float
    cpu: float
    load: list[float]
    summary: str
    code: int


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def _worktree(commit: str, parent: Path) -> Iterator[Path]:
    folder = parent / commit[:12]
    _git("worktree", "add", "--detach", str(folder), commit)
    try:
        (folder / ".venv").symlink_to((REPO / ".venv").resolve())
        yield folder
    finally:
        _git("worktree", "remove", "--force", str(folder))


def _sample_load(samples: list[float], stop: threading.Event) -> None:
    while not stop.wait(5.0):
        samples.append(os.getloadavg()[0])


def _collect(folder: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    env.pop("DATABASE_URL", None)
    out = subprocess.run([".venv/bin/python", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=folder, env=env, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def _same_tests(base: list[str], new: list[str]) -> tuple[list[str], list[str]]:
    """BASE's tests as NEW holds them, and those of BASE it cannot find."""
    present = set(new)

    def unique(key: Any) -> dict[str, str]:
        found: dict[str, list[str]] = {}
        for test in new:
            found.setdefault(key(test), []).append(test)
        return {k: ids[0] for k, ids in found.items() if len(ids) == 1}

    unparametrised = unique(lambda test: test.split("[")[0])
    moved = unique(lambda test: test.split("::", 1)[1])
    same, lost = [], []
    for test in base:
        match = test if test in present else moved.get(test.split("::", 1)[1])
        if match is None and "[" not in test:
            match = unparametrised.get(test)
        if match is None:
            lost.append(test)
        elif match not in same:
            same.append(match)
    return same, lost


def _run_suite(label: str, commit: str, folder: Path, scratch: Path, logs: Path,
               tests: Path | None = None) -> Run:
    basetemp = scratch / f"bt-{label}"
    env = {**os.environ, "PYTHONPATH": str(folder),
           "PYTEST_ADDOPTS": f"--basetemp={basetemp} -p no:cacheprovider --durations=0 --durations-min=2"}
    env.pop("DATABASE_URL", None)
    load = [os.getloadavg()[0]]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(load, stop), daemon=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    sampler.start()
    log = logs / f"{label}.log"
    with log.open("w") as out:
        command = ["scripts/test"] if tests is None else ["scripts/test", f"@{tests}"]
        code = subprocess.run(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    load.append(os.getloadavg()[0])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = log.read_text(errors="replace")
    found = re.findall(r"^=+ (.*(?:passed|failed|error).*) =+$", text, re.MULTILINE)
    summary = found[-1] if found else "(no pytest summary line)"
    shutil.rmtree(basetemp, ignore_errors=True)
    return Run(label, commit, wall, cpu, load, summary, code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("new", nargs="?", default="HEAD")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "suite-time-logs")
    parser.add_argument("--base-tests", action="store_true", help="also run NEW on BASE's tests alone")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    # Started in the background (nohup ... &), SIGINT arrives ignored and the suites would inherit it;
    # a handler is reset to the default in each child, as at a terminal, where the Ctrl-C tests pass.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    commits = {"base": _git("rev-parse", args.base), "new": _git("rev-parse", args.new)}
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; "
          f"base {commits['base'][:12]}, new {commits['new'][:12]}", flush=True)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="suite-time-") as tmp:
        scratch = Path(tmp)
        with _worktree(commits["base"], scratch) as base_tree, _worktree(commits["new"], scratch) as new_tree:
            trees = {"base": base_tree, "new": new_tree, "same": new_tree}
            commits["same"] = commits["new"]
            tests = None
            if args.base_tests:
                same, lost = _same_tests(_collect(base_tree), _collect(new_tree))
                tests = args.logs / "base-tests.txt"
                tests.write_text("".join(f"{test}\n" for test in same))
                (args.logs / "base-tests-not-found.txt").write_text("".join(f"{test}\n" for test in lost))
                print(f"BASE's tests found in NEW: {len(same)}; not found: {len(lost)} (listed in {args.logs})",
                      flush=True)
            for round_number in range(args.rounds):
                order = ["base", "new"] if round_number % 2 == 0 else ["new", "base"]
                if tests is not None:
                    order.insert(1, "same")
                for side in order:
                    print(f"-- {side} (round {round_number + 1}), load {os.getloadavg()[0]:.2f} ...", flush=True)
                    run = _run_suite(f"{side}-{round_number + 1}", commits[side], trees[side], scratch, args.logs,
                                     tests if side == "same" else None)
                    runs.append(run)
                    print(f"   {run.wall:.1f} s wall, {run.cpu:.1f} s CPU, exit {run.code}, load mean "
                          f"{statistics.fmean(run.load):.2f} (max {max(run.load):.2f}): {run.summary}", flush=True)
    print("\n| run | commit | wall (s) | CPU (s) | load 1-min: start, mean, max | exit | pytest |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run.label} | {run.commit[:12]} | {run.wall:.1f} | {run.cpu:.1f} | {run.load[0]:.2f}, "
              f"{statistics.fmean(run.load):.2f}, {max(run.load):.2f} | {run.code} | {run.summary} |")
    medians = {}
    for side in ("base", "new", "same"):
        walls = [run.wall for run in runs if run.label.startswith(side)]
        if walls:
            medians[side] = statistics.median(walls)
            print(f"{side}: median wall {medians[side]:.1f} s over {len(walls)} run(s)")
    for side in ("new", "same"):
        if side in medians:
            ratio = medians[side] / medians["base"]
            print(f"{side}/base wall: {ratio:.2f} ({(1 - ratio) * 100:.0f}% less time)")


if __name__ == "__main__":
    main()
