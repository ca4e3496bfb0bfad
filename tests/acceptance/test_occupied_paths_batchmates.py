"""A job's path is blocked only by a batch-mate that writes its file: daemons as real processes, on
real SQLite and PostgreSQL. A batch-mate that fails, or is cancelled before the call, never puts
anything at its path (a failed job holds no path), so the job beside it is not its collision."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgxqueue.audio import read_wav
from dgxqueue.storage import init_db
from tests.acceptance.test_daemon_processes import enqueue, job
from tests.acceptance.test_occupied_paths import burst
from tests.support.processes import worker_config


@pytest.mark.parametrize(("first_path", "second_path"), [
    ("outputs/x.wav", "outputs/x.wav/y.wav"),
    ("outputs/2026/a.wav", "outputs/latest/a.wav"),
], ids=["folder", "link"])
def test_daemon__a_batch_mate_that_fails_never_blocks_the_job_beside_it(
        db_url: str, tmp_path: Path, first_path: str, second_path: str) -> None:
    """The first job of the batch fails in the backend (permanently: it never writes, and holds no
    path); the second, whose path would collide with the first's file, completes with its WAV
    (before: it failed for good, 'collides with the file of job ...', a file nobody ever wrote)."""
    init_db(db_url)
    [first] = enqueue(db_url, ["permanent"], file_path=first_path)
    [second] = enqueue(db_url, ["fine"], file_path=second_path)
    outputs = tmp_path / "outputs"
    (outputs / "2026").mkdir(parents=True)
    (outputs / "latest").symlink_to("2026")
    config = worker_config(tmp_path, db_url, batch_size=2)
    log = tmp_path / "worker.log"
    burst(config, log)

    status, _, error = job(db_url, first)
    assert status == "failed" and error is not None and "scripted permanent failure" in error, error
    status, attempts, error = job(db_url, second)
    assert (status, attempts) == ("completed", 1), error
    assert read_wav(tmp_path / second_path)[0].shape == (1, 80)
