"""Whose fault is it: daemons as real processes meet a full disk, a read-only remount, an address-space
limit, a backend's own EMFILE or full scratch disk, a call that never returns, a stopped database
and SIGHUP. The machine's faults never spend
a job's attempt; each daemon that meets one exits with its documented code, for systemd to restart."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.daemon import EXIT_JOB_TIMEOUT, EXIT_MACHINE_FAULT
from dgxqueue.storage import get_engine, init_db
from tests.acceptance.test_daemon_processes import counts, enqueue, job
from tests.support import zygote
from tests.support.generators import read_executions
from tests.support.processes import REPO, SCRIPTED, burst, stop, wait_until, write_config

ROWS = sa.text("SELECT status, attempts, error_message FROM generations ORDER BY created_at")


def rows(url: str) -> list[tuple[str, int, str | None]]:
    with get_engine(url).connect() as conn:
        return [(s, a, e) for s, a, e in conn.execute(ROWS).all()]


def config(tmp: Path, url: str, *, min_free_mb: int = 0, **worker: Any) -> Path:
    """A daemon's settings (the scripted backend), with the outputs check's threshold."""
    return write_config(tmp / f"config-{time.monotonic_ns()}.toml", {
        "database": {"url": url},
        "outputs": {"dir": str(tmp / "outputs"), "min_free_mb": min_free_mb},
        "generator": {"name": SCRIPTED},
        "worker": {"lease_seconds": 30.0, "heartbeat_seconds": 0.2, "rescue_interval_seconds": 0.2,
                   "backoff_base_seconds": 0.0, "poll_interval_seconds": 0.5, **worker},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
        "generator.options": {"log_path": str(tmp / "executions.log"), "release_path": str(tmp / "release")},
    })


def spawn(cfg: Path, log: Path, *args: str, limit_memory: int | None = None) -> subprocess.Popen[bytes]:
    """``python -m dgxqueue worker``; ``limit_memory``: its address space in bytes (RLIMIT_AS)."""
    def limit() -> None:
        assert limit_memory is not None
        resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    with log.open("ab") as out:
        # Without a limit, from the zygote (a preexec_fn makes it a real process).
        return zygote.popen([sys.executable, "-m", "dgxqueue", "--config", str(cfg), "worker", *args],
                            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=None if limit_memory is None else limit)


def mount(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs (CI runs as root): {done.stderr.decode()}")
        pytest.skip("cannot mount a tmpfs (needs root)")


def logged(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.exists() and text in log.read_text()


def assert_given_back(url: str, reason: str) -> None:
    """Nothing failed or left processing; every job not completed is pending with no attempt
    spent, and the jobs of the call that faulted say why."""
    seen = rows(url)
    assert {s for s, _, _ in seen} <= {"completed", "pending"}, seen
    pending = [(a, e) for s, a, e in seen if s == "pending"]
    assert pending and {a for a, _ in pending} == {0}, seen
    assert any((e or "").startswith(f"machine fault ({reason})") for _, e in pending), seen


def test_machine_fault__full_disk_gives_jobs_back_exits_75_then_pauses_until_space_returns(
        sqlite_db_url: str, tmp_path: Path, outputs_disk: Path) -> None:
    """The outputs disk fills mid-run: no job fails or spends an attempt, the daemon exits 75. A
    daemon started then (outputs.min_free_mb = 1) claims nothing and says why, and once space is
    freed it completes every job, without a restart."""
    url = sqlite_db_url
    init_db(url)
    filler = outputs_disk / "filler"
    filler.write_bytes(b"\0" * (2048 - 64) * 1024)  # 64 KiB left: about eight of the 24 files
    enqueue(url, ["fine"] * 24, duration_seconds=0.5)
    first = spawn(config(tmp_path, url), tmp_path / "first.log")
    assert first.wait(60) == EXIT_MACHINE_FAULT, (tmp_path / "first.log").read_text()[-3000:]
    assert_given_back(url, "disk_full")
    assert logged(tmp_path / "first.log", '"reason": "disk_full"')()

    second = spawn(config(tmp_path, url, min_free_mb=1), tmp_path / "second.log")
    try:
        wait_until(logged(tmp_path / "second.log", "not claiming"), 60, "the pause", alive=second)
        assert '"reason": "disk_low"' in (tmp_path / "second.log").read_text()
        assert "processing" not in counts(url) and counts(url).get("failed") is None
        filler.unlink()
        wait_until(lambda: counts(url) == {"completed": 24}, 60, "every job after space returned", alive=second)
    finally:
        code = stop(second)
    assert code == 0


def test_machine_fault__read_only_remount_gives_jobs_back_and_exits_75(
        sqlite_db_url: str, tmp_path: Path, outputs_disk: Path) -> None:
    """The outputs folder is remounted read-only while a batch renders: its writes fail, every
    job goes back unspent and the daemon exits 75. The next daemon pauses on the read-only
    folder and completes every job once it is writable again."""
    url = sqlite_db_url
    init_db(url)
    ids = enqueue(url, ["block"] + ["fine"] * 5)
    first = spawn(config(tmp_path, url), tmp_path / "first.log")
    wait_until(lambda: read_executions(tmp_path / "executions.log")[ids[0]] == 1, 60, "the batch", alive=first)
    subprocess.run(["mount", "-o", "remount,ro", str(outputs_disk)], check=True)
    (tmp_path / "release").touch()
    assert first.wait(60) == EXIT_MACHINE_FAULT, (tmp_path / "first.log").read_text()[-3000:]
    assert_given_back(url, "read_only")
    assert counts(url) == {"pending": 6}

    second = spawn(config(tmp_path, url), tmp_path / "second.log")
    try:
        wait_until(logged(tmp_path / "second.log", '"reason": "read_only"'), 60, "the pause", alive=second)
        assert counts(url) == {"pending": 6}
        subprocess.run(["mount", "-o", "remount,rw", str(outputs_disk)], check=True)
        wait_until(lambda: counts(url) == {"completed": 6}, 60, "every job once writable", alive=second)
    finally:
        code = stop(second)
    assert code == 0


def test_machine_fault__memory_error_gives_the_batch_back_and_exits_75(sqlite_db_url: str, tmp_path: Path) -> None:
    """Under an address-space limit (RLIMIT_AS) the backend meets a real MemoryError: the whole
    batch goes back unspent and the daemon exits 75; a daemon without the limit completes all."""
    url = sqlite_db_url
    init_db(url)
    enqueue(url, ["fine"] * 3 + ["alloc:2048"] + ["fine"] * 4)
    first = spawn(config(tmp_path, url), tmp_path / "first.log", limit_memory=1 << 30)
    assert first.wait(60) == EXIT_MACHINE_FAULT, (tmp_path / "first.log").read_text()[-3000:]
    assert_given_back(url, "memory")
    assert counts(url) == {"pending": 8}
    second = spawn(config(tmp_path, url), tmp_path / "second.log", "--burst")
    assert second.wait(60) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert counts(url) == {"completed": 8}
    assert {a for _, a, _ in rows(url)} == {1}


@pytest.mark.parametrize(("prompt", "reason", "text"), [
    ("oserror:EMFILE", "descriptors", "OSError: [Errno 24] Too many open files"),
    ("scratch:/dev/full", "scratch_disk_full", "OSError: [Errno 28] No space left on device"),
], ids=["emfile", "scratch-enospc"])
def test_machine_fault__a_backends_own_oserror_gives_the_job_back_unconfirmed_and_exits_75(
        db_url: str, tmp_path: Path, prompt: str, reason: str, text: str) -> None:
    """A backend's own plain OSError, not the daemon's WAV write: EMFILE from opening a file of its
    own (no descriptors left), ENOSPC from a real write to a scratch file of its own (/dev/full).
    Both are the machine's, unconfirmed: the job goes back pending with no attempt spent, marked
    ``[unconfirmed 1 of 5]``, the rest of the claim goes back too and the daemon exits 75; the
    outputs folder's test write is not asked about a disk it is not on. (Both were the job's: each
    job of the call was charged three attempts and failed, and the daemon went on, exit 0.)"""
    init_db(db_url)
    [faulty] = enqueue(db_url, [prompt])
    enqueue(db_url, ["fine"] * 3)
    first = tmp_path / "first.log"
    assert burst(config(tmp_path, db_url), first) == EXIT_MACHINE_FAULT, first.read_text()[-3000:]
    status, attempts, error = job(db_url, faulty)
    assert (status, attempts) == ("pending", 0), (status, attempts, error)
    assert (error or "").startswith(f"machine fault ({reason}) [unconfirmed 1 of 5] {text}"), error
    assert {(s, a) for s, a, _ in rows(db_url)} <= {("pending", 0), ("completed", 1)}, rows(db_url)
    assert f'"reason": "{reason}"' in first.read_text()
    assert "test write" not in (error or "")


def test_job_timeout__hanging_prompt_costs_max_attempts_restarts_and_the_queue_moves(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """Three daemons, one prompt that never returns among 20: each daemon that meets it records the
    time limit against it and exits 124 (restarted here, as systemd would); the 20 complete, the
    hanging job fails after its 3 attempts, after exactly 3 such exits. Each abandoning daemon
    used to stay up, wedged, claiming nothing."""
    url = sqlite_db_url
    init_db(url)
    [hanging] = enqueue(url, ["block"], max_attempts=3)
    enqueue(url, [f"fine {i}" for i in range(20)], max_attempts=3)
    cfg = config(tmp_path, url, job_timeout_seconds=1.0, batch_size=1)
    logs = [tmp_path / f"d{i}.log" for i in range(3)]
    daemons = [spawn(cfg, log) for log in logs]
    exits: list[int] = []

    def supervise() -> bool:
        for i, process in enumerate(daemons):
            if process.poll() is not None:  # as systemd's Restart=on-failure
                exits.append(process.returncode)
                logs[i] = tmp_path / f"d{i}-{len(exits)}.log"
                daemons[i] = spawn(cfg, logs[i])
        return counts(url) == {"completed": 20, "failed": 1}

    try:
        wait_until(supervise, 120, "20 completed and the hanging job failed", interval=0.1)
        for i, (process, log) in enumerate(zip(daemons, logs, strict=True)):
            if logged(log, "overran its time limit")():  # met the hanging job last: exiting now
                exits.append(process.wait(30))
                logs[i] = tmp_path / f"d{i}-last.log"
                daemons[i] = spawn(cfg, logs[i])
            # Signals are handled once it is ready.
            wait_until(logged(logs[i], "daemon ready"), 60, "a restarted daemon to start", alive=daemons[i])
    finally:
        codes = [stop(process) for process in daemons]
    assert exits == [EXIT_JOB_TIMEOUT] * 3
    assert codes == [0, 0, 0]
    status, attempts, error = job(url, hanging)
    assert (status, attempts) == ("failed", 3) and "time limit of 1 s" in (error or "")


@pytest.mark.slow
def test_stop__sigterm_while_postgres_is_down_is_bounded_and_the_job_rescued(tmp_path: Path) -> None:
    """SIGTERM while the database is stopped and a job is held: the daemon exits within the grace
    period plus its shutdown's database deadline (it used to retry every call for 15 s, 46-53 s in
    all); its job, left processing, is rescued by another daemon once the lease expires."""
    from dgxqueue.daemon.daemon import SHUTDOWN_DB_SECONDS
    from tests.support.pgcluster import private_cluster

    with private_cluster() as cluster:
        url = cluster.url
        init_db(url)
        [job_id] = enqueue(url, ["block"])
        cfg = config(tmp_path, url, lease_seconds=2.0, grace_seconds=1.0)
        first = spawn(cfg, tmp_path / "first.log")
        wait_until(lambda: read_executions(tmp_path / "executions.log")[job_id] == 1, 60, "the job", alive=first)
        get_engine(url).dispose()
        cluster.stop()
        first.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = first.wait(60)
        took = time.monotonic() - started
        assert code == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert took < 1.0 + SHUTDOWN_DB_SECONDS + 5.0, f"the stop took {took:.1f} s"
        cluster.start()
        assert job(url, job_id)[:2] == ("processing", 1)
        (tmp_path / "release").touch()
        second = spawn(cfg, tmp_path / "second.log")
        try:
            wait_until(lambda: job(url, job_id)[0] == "completed", 60, "the rescued job", alive=second)
        finally:
            assert stop(second) == 0
        assert job(url, job_id)[:2] == ("completed", 2)
        get_engine(url).dispose()


def test_stop__sighup_is_a_graceful_stop(sqlite_db_url: str, tmp_path: Path) -> None:
    """SIGHUP stops the daemon like SIGTERM: the running job finishes and the daemon exits 0. It
    used to kill the daemon outright, leaving its job processing until the lease expired."""
    url = sqlite_db_url
    init_db(url)
    [job_id] = enqueue(url, ["block"])
    process = spawn(config(tmp_path, url, grace_seconds=60.0), tmp_path / "w.log")
    wait_until(lambda: read_executions(tmp_path / "executions.log")[job_id] == 1, 60, "the job", alive=process)
    process.send_signal(signal.SIGHUP)
    wait_until(logged(tmp_path / "w.log", '"stopping"'), 30, "the stop to begin", alive=process)
    (tmp_path / "release").touch()
    assert process.wait(30) == 0, (tmp_path / "w.log").read_text()[-3000:]
    assert job(url, job_id)[:2] == ("completed", 1)


def test_machine_fault__a_refusal_raised_from_none_over_a_backends_oserror_is_the_jobs(
        db_url: str, tmp_path: Path) -> None:
    """A backend's validate() that meets a full disk of its own (a real ENOSPC from /dev/full) and
    refuses the request with ``raise PermanentGeneratorError(...) from None``: it has said the
    OSError is not the story (Python prints no such context either). The job fails at once with
    the backend's message, attempt spent; the others complete and the daemon exits 0. (The walk
    of the chain read the suppressed ``__context__``: scratch_disk_full, the job given back
    unspent 5 times with the daemon exiting 75 each time, then charged as a transient failure.)"""
    init_db(db_url)
    [refused] = enqueue(db_url, ["refuse:/dev/full"])
    enqueue(db_url, ["fine"] * 3)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url), log) == 0, log.read_text()[-3000:]
    assert job(db_url, refused) == ("failed", 1, "scripted: the request is refused")
    assert {(s, a) for s, a, _ in rows(db_url)} == {("failed", 1), ("completed", 1)}, rows(db_url)
