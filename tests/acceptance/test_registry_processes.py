"""The registry of live daemons with real daemon processes, on real SQLite and PostgreSQL: a daemon
lists itself while it runs, SIGTERM removes it, SIGKILL leaves it stale and then forgotten;
``dgxqueue workers``, ``stats`` and ``enqueue`` read it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import dgxqueue
from dgxqueue import api
from dgxqueue.storage import get_engine, init_db, session_scope
from dgxqueue.storage.registry import FORGET_AFTER_LEASES, LiveDaemon, daemons
from tests.support import zygote
from tests.support.processes import REPO, start_worker, stop, wait_until, worker_config


def dgxqueue_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("DATABASE_URL", None)
    return zygote.run([sys.executable, "-m", "dgxqueue", "--config", str(config), *args], cwd=REPO, env=env,
                      capture_output=True, text=True, timeout=60)


def registered(url: str, *, include_stale: bool = False) -> list[LiveDaemon]:
    with session_scope(get_engine(url)) as session:
        return daemons(session, include_stale=include_stale)


def test_workers__a_daemon_lists_itself_with_what_it_holds_and_sigterm_removes_it(db_url: str, tmp_path: Path) -> None:
    """A started daemon is listed live with its host, pid, generator, models, version and the job
    it runs (library call, ``workers`` and ``workers --json``); after SIGTERM it is gone."""
    init_db(db_url)
    config = worker_config(tmp_path, db_url)
    process = start_worker(config, tmp_path / "worker.log")
    try:
        job_id = api.enqueue("block", model_name="scripted", duration_seconds=0.01, database_url=db_url)
        [daemon] = wait_until(lambda: [d for d in registered(db_url) if d.holding], 30, "the daemon holding its job",
                              alive=process)
        assert (daemon.host, daemon.pid, daemon.generator, daemon.models, daemon.version, daemon.holding) == (
            socket.gethostname(), process.pid, "scripted", ("scripted",), dgxqueue.__version__, (job_id,))
        assert [d.id for d in api.live_daemons(database_url=db_url)] == [daemon.id]
        listed = json.loads(dgxqueue_cli(config, "workers", "--json").stdout)
        assert [(d["id"], d["pid"], d["models"], d["holding"], d["stale"]) for d in listed] == [
            (daemon.id, process.pid, ["scripted"], [job_id], False)]
        text = dgxqueue_cli(config, "workers")
        assert text.returncode == 0, text.stderr
        header, line = text.stdout.splitlines()
        assert header.split()[:5] == ["ID", "HOST", "PID", "GENERATOR", "MODELS"]
        assert f" {process.pid} " in line and " scripted " in line and "ago" in line and line.endswith(" 1")
        (tmp_path / "release").touch()
    finally:
        assert stop(process) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert registered(db_url, include_stale=True) == []
    assert dgxqueue_cli(config, "workers").stdout.startswith("no live daemons")


def test_workers__a_killed_daemon_goes_stale_then_is_forgotten(db_url: str, tmp_path: Path) -> None:
    """SIGKILL leaves the entry: stale after a lease (shown only with --all, marked stale), then
    deleted by another daemon's rescuer once FORGET_AFTER_LEASES leases have passed since its last
    heartbeat (the exact cutoff is the conformance suite's). The other daemon starts after the
    checks of the stale entry, which a slow CLI call must not race."""
    init_db(db_url)
    lease = 1.0
    short: dict[str, Any] = {"lease_seconds": lease, "heartbeat_seconds": 0.2, "rescue_interval_seconds": 0.2}
    config = worker_config(tmp_path, db_url, models=["doomed"], **short)
    victim = start_worker(config, tmp_path / "victim.log")
    survivor = None
    try:
        [dead] = wait_until(lambda: registered(db_url), 30, "the daemon registered", alive=victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        wait_until(lambda: registered(db_url) == [], 10 * lease, "the entry stale")
        [stale] = registered(db_url, include_stale=True)
        assert (stale.id, stale.stale) == (dead.id, True)
        assert dgxqueue_cli(config, "workers").stdout.startswith("no live daemons")
        header, line = dgxqueue_cli(config, "workers", "--all").stdout.splitlines()
        assert header.split()[-1] == "STATE" and line.split()[-1] == "stale" and f" {victim.pid} " in line
        assert json.loads(dgxqueue_cli(config, "workers", "--all", "--json").stdout)[0]["stale"] is True
        survivor = start_worker(worker_config(tmp_path, db_url, models=["kept"], **short), tmp_path / "survivor.log")
        wait_until(lambda: [d.pid for d in registered(db_url, include_stale=True)] == [survivor.pid],
                   FORGET_AFTER_LEASES * lease + 30, "the stale entry forgotten", alive=survivor)
    finally:
        for process in (victim, survivor):
            if process is not None and process.poll() is None:
                stop(process)


def test_stats_and_enqueue__read_the_live_daemons_per_model(db_url: str, tmp_path: Path) -> None:
    """Two daemons on two models: ``stats`` shows pending jobs per model beside its live daemons;
    ``enqueue`` warns (exit 0, job queued) only for a model no live daemon serves."""
    init_db(db_url)
    daemons_ = [start_worker(worker_config(tmp_path, db_url, models=[model]), tmp_path / f"{model}.log")
                for model in ("m1", "m2")]
    config = worker_config(tmp_path, db_url, models=["m1", "m3"])  # the CLI's: m3 is a known model
    try:
        wait_until(lambda: len(registered(db_url)) == 2, 30, "both daemons registered", alive=daemons_[0])
        later = ("--not-before", "1h")  # pending, not due: the daemons leave them
        quiet = dgxqueue_cli(config, "enqueue", "x", "--model", "m1", *later)
        assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
        warned = dgxqueue_cli(config, "enqueue", "x", "--model", "m3")
        assert warned.returncode == 0 and len(warned.stdout.split()) == 1
        assert warned.stderr.splitlines() == [
            "dgxqueue: warning: no live daemon serves model 'm3' now; the job waits until one starts "
            "('dgxqueue workers' lists the live daemons)"]
        dgxqueue_cli(config, "enqueue", "y", "--model", "m3")
        stats: dict[str, Any] = json.loads(dgxqueue_cli(config, "stats", "--json").stdout)
        assert stats["models"] == {"m1": {"pending": 1, "live_daemons": 1}, "m2": {"pending": 0, "live_daemons": 1},
                                   "m3": {"pending": 2, "live_daemons": 0}}
        text = dgxqueue_cli(config, "stats").stdout
        assert "MODEL" in text and any(line.split()[:3] == ["m3", "2", "0"] and "none serves it" in line
                                       for line in text.splitlines())
    finally:
        for process in daemons_:
            assert stop(process) == 0
