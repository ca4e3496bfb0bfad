"""A file already at a job's path that the job did not write (an archived job's WAV, another queue's
sharing the folder, one put there by hand) is never replaced: daemons as real processes, on real
SQLite and PostgreSQL. The job is failed alone, as its own input's fault; its batch-mates are
written; the daemon goes on as for any failed job, never as for a machine fault."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from unittest import mock

from dgxqueue.audio import read_wav
from dgxqueue.cli import main
from dgxqueue.storage import dispose_engines, init_db
from tests.acceptance.test_daemon_processes import enqueue, job
from tests.support.generators import read_executions
from tests.support.processes import start_worker, wait_until, worker_config

FOREIGN = b"an archived job's WAV, not this job's"


def retry(config: Path, job_id: str) -> None:
    """``dgxqueue retry`` through ``main()`` in this process (a subprocess costs its start-up)."""
    with mock.patch.dict(os.environ), contextlib.redirect_stdout(io.StringIO()):
        os.environ.pop("DATABASE_URL", None)
        assert main(["--config", str(config), "retry", job_id]) == 0
    dispose_engines()


def burst(config: Path, log: Path) -> None:
    """A ``--burst`` daemon run to its end: exit 0 (a machine fault would be 75)."""
    process = start_worker(config, log, "--burst")
    assert process.wait(180) == 0, log.read_text()[-3000:]


def test_daemon__a_file_already_at_a_jobs_path_fails_that_job_alone_and_stays_as_it_was(
        db_url: str, tmp_path: Path) -> None:
    """Four jobs, a file already at one's path: that job fails before the backend renders it,
    naming the path and what to do; the file's bytes are unchanged; the other three complete and
    read back; the daemon exits 0 (no machine fault). Once the file is moved away, a retry
    completes the job."""
    init_db(db_url)
    names = ["a", "b", "c", "d"]
    ids = [enqueue(db_url, ["fine"], file_path=f"outputs/{name}.wav")[0] for name in names]
    taken = ids[1]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "b.wav").write_bytes(FOREIGN)
    config = worker_config(tmp_path, db_url, batch_size=4)
    log = tmp_path / "worker.log"
    burst(config, log)

    status, attempts, error = job(db_url, taken)
    assert (status, attempts) == ("failed", 1), error
    assert error is not None and "outputs/b.wav" in error and "not this job's" in error
    assert f"dgxqueue retry {taken}" in error and "machine fault" not in error
    assert (outputs / "b.wav").read_bytes() == FOREIGN
    for job_id, name in zip(ids, names, strict=True):
        if job_id != taken:
            assert job(db_url, job_id)[:2] == ("completed", 1)
            samples, rate = read_wav(outputs / f"{name}.wav")
            assert rate == 8000 and samples.shape == (1, 80)
    assert taken not in read_executions(tmp_path / "executions.log"), "rendered although its file was taken"
    assert "machine fault" not in log.read_text()
    assert sorted(p.name for p in outputs.iterdir()) == ["a.wav", "b.wav", "c.wav", "d.wav"]  # no temporary left

    (outputs / "b.wav").rename(tmp_path / "moved.wav")
    retry(config, taken)
    burst(config, log)
    assert job(db_url, taken)[0] == "completed"
    samples, _ = read_wav(outputs / "b.wav")
    assert samples.shape == (1, 80)
    assert (tmp_path / "moved.wav").read_bytes() == FOREIGN


def test_daemon__a_file_that_appears_while_the_job_renders_is_not_replaced(db_url: str, tmp_path: Path) -> None:
    """The file appears at a job's path after the check before the render, while the backend
    renders: the job is failed at the write, the file left as it is; its batch-mate is written
    and the daemon ends its run with exit 0."""
    init_db(db_url)
    [late] = enqueue(db_url, ["block"], file_path="outputs/late.wav")
    [mate] = enqueue(db_url, ["fine"], file_path="outputs/mate.wav")
    outputs = tmp_path / "outputs"
    config = worker_config(tmp_path, db_url, batch_size=2)
    log = tmp_path / "worker.log"
    process = start_worker(config, log, "--burst")
    wait_until(lambda: late in read_executions(tmp_path / "executions.log"), 120, "the job to render", alive=process)
    outputs.mkdir(exist_ok=True)
    (outputs / "late.wav").write_bytes(FOREIGN)
    (tmp_path / "release").touch()
    assert process.wait(120) == 0, log.read_text()[-3000:]
    status, attempts, error = job(db_url, late)
    assert (status, attempts) == ("failed", 1) and error is not None and "outputs/late.wav" in error, error
    assert (outputs / "late.wav").read_bytes() == FOREIGN
    assert job(db_url, mate)[:2] == ("completed", 1)
    assert read_wav(outputs / "mate.wav")[0].shape == (1, 80)
    assert sorted(p.name for p in outputs.iterdir()) == ["late.wav", "mate.wav"]
    assert "machine fault" not in log.read_text()
