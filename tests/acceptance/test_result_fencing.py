"""A finished result is written once: daemon processes stalled and killed at every step of
publishing a WAV, on real SQLite and PostgreSQL. The file at ``file_path`` is always the one the
row's completed attempt made, and no temporary outlives the attempt that wrote it. (A call
abandoned at its time limit: tests/integration/test_staging.py, in-process, since the daemon
exits soon after giving up on it.)"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from dgxqueue import faultpoints
from dgxqueue.audio import read_wav
from dgxqueue.storage import create_generations, get_engine, init_db, session_scope
from tests.support.completions import count_completions
from tests.support.generators import pid_level, read_executions
from tests.support.processes import STARTUP_SECONDS, start_worker, stop, wait_ready, wait_until, worker_config

ROW = sa.text("SELECT status, attempts, worker_id, file_path, file_size_bytes, completed_at FROM generations"
              " WHERE id = :id")


Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """start_worker, with every daemon still running at the end killed (a failed test's too)."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(config: Path, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        started.append(start_worker(config, log, env=env))
        return started[-1]

    yield spawn
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(30)


def enqueue(url: str, prompts: list[str]) -> list[str]:
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [{"prompt": p, "model_name": "scripted", "duration_seconds": 0.01,
                                       "sample_rate": 8000, "channels": 1} for p in prompts])


def row(url: str, job_id: str) -> sa.Row[str, int, str | None, str, int | None, object]:
    with get_engine(url).connect() as conn:
        return conn.execute(ROW, {"id": job_id}).one()


def temporaries(outputs: Path) -> list[str]:
    return sorted(p.name for p in outputs.rglob(".*.tmp")) if outputs.exists() else []


def published(url: str, tmp_path: Path, job_id: str) -> bool:
    """Completed, and renamed into place: a reader polling the row may see it completed a moment
    before the file is there (the rename follows the commit)."""
    status, _, _, file_path, _, _ = row(url, job_id)
    return status == "completed" and (tmp_path / file_path).exists()


def pid_of(worker_id: str) -> int:
    """The process id inside a worker id (``host-pid-suffix``)."""
    return int(worker_id.rsplit("-", 2)[1])


def assert_file_is_the_rows(url: str, tmp_path: Path, job_id: str) -> bytes:
    """The job is completed and its file is the completing attempt's: the size its row records,
    readable, at the level of the daemon the row names. Returns the file's bytes."""
    status, _, worker_id, file_path, size, _ = row(url, job_id)
    assert status == "completed" and worker_id is not None
    path = tmp_path / file_path
    data = path.read_bytes()
    assert len(data) == size
    samples, rate = read_wav(path)
    assert rate == 8000 and samples.shape == (1, 80)
    np.testing.assert_allclose(samples, pid_level(pid_of(worker_id)), atol=1 / 32767)
    return data


def completions(url: str) -> dict[str, int]:
    with get_engine(url).connect() as conn:
        return {job_id: n for job_id, n in conn.execute(sa.text("SELECT id, count(*) FROM completions GROUP BY id"))}


def logged(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text()


def test_daemon__a_stalled_attempt_never_replaces_the_finished_file(db_url: str, tmp_path: Path, spawn: Spawn) -> None:
    """A daemon stopped (SIGSTOP) mid-render loses its lease; a second daemon completes the job;
    continued, the first one's result is fenced: the file stays the second attempt's, byte for
    byte, the row unchanged, no temporary left."""
    init_db(db_url)
    [job_id] = enqueue(db_url, ["block pid"])
    lease: dict[str, Any] = {"lease_seconds": 1.0, "heartbeat_seconds": 0.2}
    stalled = spawn(worker_config(tmp_path, db_url, release_path=tmp_path / "release-a", **lease),
                           tmp_path / "a.log")
    wait_ready(stalled, tmp_path / "a.log")
    wait_until(lambda: read_executions(tmp_path / "executions.log")[job_id] == 1, 30, "the job to start",
               alive=stalled)
    stalled.send_signal(signal.SIGSTOP)
    try:
        (tmp_path / "release-b").touch()
        second = spawn(worker_config(tmp_path, db_url, release_path=tmp_path / "release-b", **lease),
                              tmp_path / "b.log")
        wait_ready(second, tmp_path / "b.log")
        wait_until(lambda: published(db_url, tmp_path, job_id), 30, "the second attempt to complete", alive=second)
        finished = row(db_url, job_id)
        assert finished[1] == 2 and finished[2] is not None and pid_of(finished[2]) == second.pid
        data = assert_file_is_the_rows(db_url, tmp_path, job_id)
        (tmp_path / "release-a").touch()  # the stalled render returns as soon as it runs again
    finally:
        stalled.send_signal(signal.SIGCONT)
    wait_until(lambda: logged(tmp_path / "a.log", '"outcome": "fenced"'), 30, "the stalled attempt to be fenced",
               alive=stalled)
    assert stop(stalled) == 0 and stop(second) == 0
    assert (tmp_path / finished[3]).read_bytes() == data
    assert row(db_url, job_id) == finished
    assert temporaries(tmp_path / "outputs") == []


@pytest.mark.parametrize("step", faultpoints.STEPS)
def test_daemon__killed_at_any_step_of_a_write_every_job_completes_once(db_url: str, tmp_path: Path,
                                                                          spawn: Spawn, step: str) -> None:
    """SIGKILL at each step of publishing (temporary created, written but not committed, committed
    but not renamed); a fresh daemon then completes every job exactly once, each file present and
    the one its row's attempt made, and no temporary left."""
    init_db(db_url)
    count_completions(db_url)
    ids = enqueue(db_url, ["pid"] * 3)
    outputs = tmp_path / "outputs"
    config = worker_config(tmp_path, db_url, lease_seconds=1.0, heartbeat_seconds=0.2)
    victim = spawn(config, tmp_path / "victim.log", env={"DGXQ_TEST_KILL_AT": step})
    # Its start-up and one batch: the start-up alone took over 30 s on a loaded machine.
    assert victim.wait(STARTUP_SECONDS + 30) == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-3000:]
    committed = step == "after-commit"
    assert {row(db_url, j)[0] for j in ids} == {"completed" if committed else "processing"}
    assert temporaries(outputs), "the victim died with a temporary written"
    assert not any((tmp_path / row(db_url, j)[3]).exists() for j in ids), "nothing is published before the commit"
    fresh = spawn(config, tmp_path / "fresh.log")
    wait_ready(fresh, tmp_path / "fresh.log")  # the 30 s below are the daemon's, not Python's start-up
    wait_until(lambda: all(published(db_url, tmp_path, j) for j in ids) and not temporaries(outputs),
               30, "every job completed, published, and the temporaries swept", alive=fresh)
    assert stop(fresh) == 0, (tmp_path / "fresh.log").read_text()[-3000:]
    assert completions(db_url) == dict.fromkeys(ids, 1)
    for job_id in ids:
        assert_file_is_the_rows(db_url, tmp_path, job_id)
        assert pid_of(row(db_url, job_id)[2] or "") == (victim.pid if committed else fresh.pid)
    assert temporaries(outputs) == []
