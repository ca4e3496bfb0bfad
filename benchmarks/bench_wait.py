"""``wait`` on many jobs: how soon after the last outcome it returns, and what the waiting costs.

A waiter process calls :func:`dgxqueue.wait_all` on ``--jobs`` pending jobs; then a daemon
process (``dgxqueue worker --burst``, the scripted test backend, each job a few milliseconds of
simulated work) runs them. The waiter prints when it returned and the CPU seconds its wait took.

Printed per engine:

- latency: the waiter's return minus the moment the last outcome was seen committed by an
  observer thread in this process reading the count of ended jobs every ``OBSERVE_SECONDS``
  (so the latency printed is low by at most that), and, as an upper bound, minus the latest
  ``completed_at`` (the daemon's clock when the last job finished, before its write);
- the waiter's CPU seconds over the wait's wall seconds, beside two references measured in the
  same run: the floor, the CPU of the waiter's own minimum (reading the jobs' rows once, as
  ``wait_all`` on jobs already ended does), and what a busy poll would spend (one CPU second per
  second).

    .venv/bin/python benchmarks/bench_wait.py [--jobs 1000] [--engines sqlite,postgres] [--work 0.003]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dgxqueue.config import load_settings  # noqa: E402
from dgxqueue.storage import get_engine, init_db  # noqa: E402
from dgxqueue.storage.models import G, UTCDateTime, as_utc  # noqa: E402
from tests.support.bench import scratch_database  # noqa: E402
from tests.support.processes import start_worker, worker_config  # noqa: E402

WAITER = """
import json, sys, time
import dgxqueue
from dgxqueue.config import load_settings
settings = load_settings(sys.argv[1], env={})
ids = json.load(open(sys.argv[2]))
jobs = [dgxqueue.get_job(i, settings=settings) for i in ids[:1]]
jobs = [type(jobs[0])(i, jobs[0]._engine, settings) for i in ids]
print("ready", flush=True)
cpu, wall = time.process_time(), time.monotonic()
statuses = dgxqueue.wait_all(jobs, 300)
cpu, wall = time.process_time() - cpu, time.monotonic() - wall
print(json.dumps({"returned": time.time(), "cpu": cpu, "wall": wall, "completed": statuses.count("completed")}))
"""


OBSERVE_SECONDS = 0.002


def observe(url: str, jobs: int, seen: list[float], stop: threading.Event) -> None:
    """Note when every job has ended, reading the count every OBSERVE_SECONDS."""
    ended = sa.select(sa.func.count()).select_from(G).where(G.c.status.in_(("completed", "failed")))
    with get_engine(url).connect() as conn:
        while not stop.is_set():
            if conn.execute(ended).scalar_one() >= jobs:
                seen.append(time.time())
                return
            conn.rollback()
            stop.wait(OBSERVE_SECONDS)


def run_waiter(config: Path, ids_file: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", WAITER, str(config), str(ids_file)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", line
    return process


def result_of(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=600)
    return dict(json.loads(out.strip().splitlines()[-1]))


def measure(url: str, jobs: int, work: float) -> None:
    init_db(url)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        config = worker_config(tmp, url, batch_size=16)
        settings = load_settings(config, env={})
        from dgxqueue.api import enqueue_many

        ids = enqueue_many([{"prompt": f"work:{work}", "model_name": "scripted", "duration_seconds": 0.01,
                             "sample_rate": 8000, "channels": 1} for _ in range(jobs)], settings=settings)
        ids_file = tmp / "ids.json"
        ids_file.write_text(json.dumps(ids))
        waiter = run_waiter(config, ids_file)
        seen: list[float] = []
        stop = threading.Event()
        observer = threading.Thread(target=observe, args=(url, jobs, seen, stop))
        observer.start()
        daemon = start_worker(config, tmp / "daemon.log", "--burst")
        try:
            waited = result_of(waiter)
        finally:
            observer.join(30)
            stop.set()
        assert daemon.wait(600) == 0, (tmp / "daemon.log").read_text()[-2000:]
        assert waited["completed"] == jobs, waited
        with get_engine(url).connect() as conn:
            last = as_utc(conn.execute(sa.select(sa.func.max(G.c.completed_at, type_=UTCDateTime()))).scalar_one())
        latency = waited["returned"] - seen[0]
        bound = waited["returned"] - last.timestamp()
        floor = result_of(run_waiter(config, ids_file))  # every job ended: one read of the rows
    engine = url.split(":", 1)[0].split("+")[0]
    print(f"{engine:10} {jobs} jobs  latency after the last outcome {latency * 1000:5.1f} ms "
          f"(after its job finished: {bound * 1000:5.1f} ms)  "
          f"waiter CPU {waited['cpu']:.3f} s over {waited['wall']:.2f} s ({waited['cpu'] / waited['wall']:.3f} "
          f"CPU-s/s; busy poll: 1.000)  floor (one read of the rows) {floor['cpu']:.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--work", type=float, default=0.003, help="seconds of simulated work per job")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for engine in args.engines.split(","):
        for _ in range(args.rounds):
            with scratch_database(engine) as url:
                measure(url, args.jobs, args.work)


if __name__ == "__main__":
    main()
