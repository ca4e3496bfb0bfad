"""Two jobs of one backend call whose paths lead to one file, or where one's file would be a
folder on the other's path: daemons as real processes, on real SQLite and PostgreSQL. Neither
check before the render nor the one before the write sees the other (nothing is at the path until
the commits), so both used to be staged, committed completed and renamed."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from dgxqueue.audio import read_wav
from dgxqueue.storage import dispose_engines, init_db
from tests.acceptance.test_daemon_processes import enqueue, job
from tests.acceptance.test_occupied_paths import FOREIGN, burst
from tests.support.processes import worker_config


def test_daemon__two_jobs_of_one_batch_whose_paths_lead_to_one_file_never_share_it(
        db_url: str, tmp_path: Path) -> None:
    """``outputs/latest`` is a link to ``outputs/2026``: ``2026/a.wav`` and ``latest/a.wav`` are one
    file. The first job of the batch completes and its WAV stays its own; the second fails alone,
    naming the path, not as a machine fault (before: both completed, and the first job's row named
    the second's audio)."""
    init_db(db_url)
    [first] = enqueue(db_url, ["fine"], file_path="outputs/2026/a.wav", duration_seconds=0.01)
    [second] = enqueue(db_url, ["fine"], file_path="outputs/latest/a.wav", duration_seconds=0.02)
    outputs = tmp_path / "outputs"
    (outputs / "2026").mkdir(parents=True)
    (outputs / "latest").symlink_to("2026")
    config = worker_config(tmp_path, db_url, batch_size=2)
    log = tmp_path / "worker.log"
    burst(config, log)

    assert job(db_url, first)[:2] == ("completed", 1)
    assert read_wav(outputs / "2026" / "a.wav")[0].shape == (1, 80), "the first job's WAV was replaced"
    status, attempts, error = job(db_url, second)
    assert (status, attempts) == ("failed", 1), error
    assert error is not None and "outputs/latest/a.wav" in error and "machine fault" not in error
    assert sorted(p.name for p in (outputs / "2026").iterdir()) == ["a.wav"]  # no temporary left
    assert "machine fault" not in log.read_text()


def test_daemon__a_job_whose_file_would_be_a_batch_mates_folder_fails_and_the_other_keeps_its_file(
        db_url: str, tmp_path: Path) -> None:
    """``outputs/x.wav`` and ``outputs/x.wav/y.wav`` in one batch: the second's write would make the
    folder ``x.wav``, over which the first's WAV can never be renamed (before: the first was
    recorded completed and its file never appeared). The first completes with its file; the second
    fails alone, as its own input's fault."""
    init_db(db_url)
    [first] = enqueue(db_url, ["fine"], file_path="outputs/x.wav")
    [second] = enqueue(db_url, ["fine"], file_path="outputs/x.wav/y.wav")
    outputs = tmp_path / "outputs"
    config = worker_config(tmp_path, db_url, batch_size=2)
    log = tmp_path / "worker.log"
    burst(config, log)

    assert job(db_url, first)[:2] == ("completed", 1), job(db_url, first)
    assert read_wav(outputs / "x.wav")[0].shape == (1, 80)
    status, attempts, error = job(db_url, second)
    assert (status, attempts) == ("failed", 1), error
    assert error is not None and "outputs/x.wav/y.wav" in error
    assert sorted(p.name for p in outputs.iterdir()) == ["x.wav"]
    assert "machine fault" not in log.read_text()


def _copy_sqlite(source: Path, target: Path) -> None:
    """``source``'s committed state into ``target`` (SQLite's online backup: consistent, WAL included)."""
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def test_daemon__a_jobs_own_wav_whose_completion_the_database_lost_is_not_charged_to_the_job(
        sqlite_db_url: str, tmp_path: Path) -> None:
    """The database loses a job's committed completion after its WAV was renamed into place: what
    SQLite's default ``synchronous = NORMAL`` in WAL mode allows at a power cut (the rename
    persisted, the commit's WAL frame did not), an asynchronous replica's failover, a restore. The
    job runs again and finds its own WAV at its path: it must complete again, not fail for good as
    if the file were another's (the machine's fault charged to the job)."""
    init_db(sqlite_db_url)
    [own] = enqueue(sqlite_db_url, ["fine"], file_path="outputs/own.wav")
    [other] = enqueue(sqlite_db_url, ["fine"], file_path="outputs/other.wav")
    database = Path(sqlite_db_url.removeprefix("sqlite:///"))
    dispose_engines()
    _copy_sqlite(database, tmp_path / "before.db")
    outputs = tmp_path / "outputs"
    config = worker_config(tmp_path, sqlite_db_url, batch_size=2)
    log = tmp_path / "worker.log"
    burst(config, log)
    assert job(sqlite_db_url, own)[:2] == ("completed", 1)
    dispose_engines()

    _copy_sqlite(tmp_path / "before.db", database)  # the completions are lost; the WAVs stay
    (outputs / "other.wav").unlink()
    (outputs / "other.wav").write_bytes(FOREIGN)  # and a file nobody wrote is at the other's path
    assert job(sqlite_db_url, own)[0] == "pending"
    burst(config, log)
    status, attempts, error = job(sqlite_db_url, own)
    assert (status, attempts) == ("completed", 1), error
    assert read_wav(outputs / "own.wav")[0].shape == (1, 80)
    status, _, error = job(sqlite_db_url, other)
    assert status == "failed" and error is not None and "not this job's" in error, error
    assert (outputs / "other.wav").read_bytes() == FOREIGN


@pytest.mark.parametrize(("first_path", "second_path", "frames"), [
    ("outputs/x.wav", "outputs/x.wav/y.wav", 80),
    ("outputs/2026/a.wav", "outputs/latest/a.wav", 80),
], ids=["folder", "link"])
def test_daemon__a_job_of_the_next_call_never_collides_with_a_result_still_to_be_published(
        db_url: str, tmp_path: Path, first_path: str, second_path: str, frames: int) -> None:
    """Two jobs of one round rendered in two backend calls (the backend takes one job a call): the
    first call's outcome is written, and its file renamed, while the second call renders, so the
    second job's checks may run before or after that rename. The second fails, naming the first
    either way (before the rename as a collision; after it, latest/a.wav is taken by a WAV that
    carries the first's id); the first keeps its WAV (before: x.wav was recorded completed with no
    file ever, its rename blocked by the folder the second made; or latest/a.wav's WAV replaced
    2026/a.wav's)."""
    init_db(db_url)
    [first] = enqueue(db_url, ["fine"], file_path=first_path, duration_seconds=0.01)
    [second] = enqueue(db_url, ["fine"], file_path=second_path, duration_seconds=0.02)
    outputs = tmp_path / "outputs"
    (outputs / "2026").mkdir(parents=True)
    (outputs / "latest").symlink_to("2026")
    config = worker_config(tmp_path, db_url, batch_size=2)
    config.write_text(config.read_text().replace("[generator.options]\n", "[generator.options]\nmax_batch_size = 1\n"))
    log = tmp_path / "worker.log"
    burst(config, log)

    assert job(db_url, first)[:2] == ("completed", 1)
    assert read_wav(tmp_path / first_path)[0].shape == (1, frames)
    status, attempts, error = job(db_url, second)
    assert (status, attempts) == ("failed", 1), error
    assert error is not None and second_path in error and first in error
    assert "machine fault" not in log.read_text()
