"""Whose fault a failed write is, told by a real test write; the outputs check on paths it cannot
examine; SQLite's full disk as an outage; a daemon's rescue and its own held jobs; the hard limit
on a stop, in a real process."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from dgxqueue import audio
from dgxqueue.daemon.diskcheck import look
from dgxqueue.daemon.executor import Attempt
from dgxqueue.daemon.faults import UNCONFIRMED_REFUNDS, judge, probe_write, tally, wav_size
from dgxqueue.errors import OutputError, TransientGeneratorError
from dgxqueue.generators import GeneratedAudio
from dgxqueue.storage import get_engine
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.storage.dberrors import is_transient_db_error
from dgxqueue.storage.models import Generation, utcnow
from tests.integration.test_daemon import enqueue, row
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.generators import ScriptedGenerator
from tests.support.processes import REPO


def _job(job_id: str = "j1", seconds: float = 1.0) -> ClaimedJob:
    now = utcnow()
    return ClaimedJob(id=job_id, prompt="p", model_name="m", duration_seconds=seconds, sample_rate=8000,
                      channels=1, file_path="outputs/x.wav", metadata=None, attempt=1, max_attempts=3,
                      created_at=now, claimed_at=now)


def _failed_write(path: Path) -> OutputError:
    sound = GeneratedAudio(samples=np.zeros((1, 8000), dtype=np.float32), sample_rate=8000)
    with pytest.raises(OutputError) as caught:
        audio.write_wav_atomic(path, sound)
    return caught.value


def _none(ids: list[str]) -> dict[str, str | None]:
    return {}


def test_judge__read_only_subfolder_of_a_writable_outputs_folder_is_the_jobs_own(
        tmp_path: Path, readonly_dir: Path) -> None:
    """A write refused by the job's own read-only subfolder, while the outputs folder passes the
    test write: no machine fault; the job's error is recorded as it is."""
    error = _failed_write(readonly_dir / "x.wav")
    outcome = Attempt(_job(), error, 0.0)
    verdict = judge([outcome], tmp_path, _none)
    assert (verdict.reason, verdict.marks, verdict.own) == (None, {}, ["j1"])
    assert verdict.outcomes == [outcome]


def test_judge__outputs_folder_that_fails_the_test_write_is_the_machines(readonly_dir: Path) -> None:
    """The same error with the outputs folder itself read-only: the machine's, the job given back
    marked, with the reason the test write met."""
    verdict = judge([Attempt(_job(), _failed_write(readonly_dir / "x.wav"), 0.0)], readonly_dir, _none)
    assert verdict.reason == "read_only" and verdict.outcomes == []
    assert verdict.marks["j1"].startswith("machine fault (read_only) OutputError")


def test_judge__outputs_folder_replaced_by_a_file_is_the_machines(tmp_path: Path) -> None:
    """A write failing with 'Not a directory' because the outputs folder became a file: the
    machine's fault (not_a_folder), not the job's."""
    outputs = tmp_path / "outputs"
    outputs.write_bytes(b"")
    verdict = judge([Attempt(_job(), _failed_write(outputs / "x.wav"), 0.0)], outputs, _none)
    assert verdict.reason == "not_a_folder" and list(verdict.marks) == ["j1"]


@pytest.mark.parametrize("outputs", ["writable", "missing"])
def test_judge__a_backends_own_full_disk_is_unconfirmed_and_not_put_to_the_test_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outputs: str) -> None:
    """A backend's own write that found its disk full (a plain OSError ENOSPC, a real one from
    /dev/full here) is scratch_disk_full whatever the outputs folder: no test write is made (it
    cannot tell which disk the backend wrote to: a writable outputs folder would clear the job, a
    broken one would name a reason that is not this one); the job is given back unspent, marked
    unconfirmed, and is charged past the bound like memory. (It was the job's: recorded as it was.)"""
    with pytest.raises(OSError) as caught, open("/dev/full", "wb", buffering=0) as scratch:
        scratch.write(b"\0" * 4096)
    assert caught.value.errno == errno.ENOSPC
    folder = tmp_path if outputs == "writable" else tmp_path / "gone"
    probes: list[Path] = []
    monkeypatch.setattr("dgxqueue.daemon.faults.probe_write", lambda f, size: probes.append(f))
    stored: dict[str, str | None] = {}
    for count in range(1, UNCONFIRMED_REFUNDS + 1):
        verdict = judge([Attempt(_job(), caught.value, 0.0)], folder, lambda ids: stored)
        assert (verdict.reason, verdict.outcomes, verdict.own) == ("scratch_disk_full", [], [])
        assert verdict.marks["j1"].startswith(f"machine fault (scratch_disk_full) [unconfirmed {count} of"
                                              f" {UNCONFIRMED_REFUNDS}] OSError: [Errno 28] No space left")
        stored = {"j1": verdict.marks["j1"]}
    [charged] = judge([Attempt(_job(), caught.value, 0.0)], folder, lambda ids: stored).outcomes
    assert isinstance(charged.error, TransientGeneratorError)
    assert probes == []


def test_judge__a_backends_own_emfile_beside_a_failed_wav_write(tmp_path: Path, readonly_dir: Path) -> None:
    """A batch in which one job's backend met EMFILE and another's WAV write failed in a read-only
    subfolder of its own: the write is put to the test and cleared (that job's alone), while the
    EMFILE goes back unspent as descriptors, the daemon's reason."""
    emfile = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    own, other = Attempt(_job("j1"), emfile, 0.0), Attempt(_job("j2"), _failed_write(readonly_dir / "x.wav"), 0.0)
    verdict = judge([own, other], tmp_path, _none)
    assert (verdict.reason, verdict.own, verdict.outcomes) == ("descriptors", ["j2"], [other])
    assert verdict.marks["j1"].startswith("machine fault (descriptors) [unconfirmed 1 of 5] OSError: [Errno 24]")


def test_probe_write__needs_the_whole_size_and_leaves_nothing(tiny_disk: Path) -> None:
    """The test write fails when the disk cannot take the whole file, passes when it can, and
    leaves no file behind either way."""
    small, large = probe_write(tiny_disk, 8 * 1024), probe_write(tiny_disk, 1 << 20)
    assert small is None
    assert large is not None and large.errno == errno.ENOSPC
    assert list(tiny_disk.iterdir()) == []
    assert wav_size(_job(seconds=1.0)) == 44 + 8000 * 2


def test_judge__unconfirmed_faults_counted_in_the_mark_then_charged() -> None:
    """A MemoryError (no test can confirm it) is refunded with its count in the mark until the
    bound; past it, it is charged as a transient failure that keeps counting."""
    job = _job()
    stored: dict[str, str | None] = {}
    for count in range(1, UNCONFIRMED_REFUNDS + 1):
        verdict = judge([Attempt(job, MemoryError(), 0.0)], Path("/nonexistent"), lambda ids: stored)
        assert verdict.reason == "memory" and tally(verdict.marks["j1"]) == count
        stored = {"j1": verdict.marks["j1"]}
    verdict = judge([Attempt(job, MemoryError(), 0.0)], Path("/nonexistent"), lambda ids: stored)
    [charged] = verdict.outcomes
    assert verdict.marks == {} and isinstance(charged.error, TransientGeneratorError)
    assert tally(str(charged.error)) == UNCONFIRMED_REFUNDS + 1
    assert tally("lease expired: requeued") == 0 and tally(None) == 0


def test_outputs_check__a_path_it_cannot_examine_pauses(tmp_path: Path) -> None:
    """A name too long to look up, or an outputs 'folder' that is a file: a not_writable pause,
    not an exception out of the claim loop."""
    too_long = look(tmp_path / ("x" * 300) / "outputs", 0)
    assert too_long is not None and too_long.reason == "not_writable"
    (tmp_path / "file").write_bytes(b"")
    not_a_folder = look(tmp_path / "file", 0)
    assert not_a_folder is not None and not_a_folder.reason == "not_writable"
    assert "not a folder" in not_a_folder.message


def test_is_transient__sqlite_disk_full(tmp_path: Path) -> None:
    """SQLite's 'database or disk is full' (a page limit here, a full disk in life) is an outage
    to wait out, not a failed statement: the daemon keeps its outcomes until it can write them."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/t.db")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x TEXT)"))
    with pytest.raises(sa.exc.OperationalError) as full, engine.begin() as conn:
        conn.execute(sa.text("PRAGMA max_page_count = 3"))
        for _ in range(100):
            conn.execute(sa.text("INSERT INTO t VALUES (:x)"), {"x": "x" * 4000})
    assert "full" in str(full.value) and is_transient_db_error(full.value)
    engine.dispose()


def test_daemon__rescue_leaves_the_jobs_it_holds(db_url: str, tmp_path: Path) -> None:
    """After an outage longer than a lease, the daemon's own rescue refreshes the jobs it holds
    before it rescues: it does not requeue a job it is still running."""
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, tmp_path / "outputs", ScriptedGenerator(), hooks=hooks)
    job_id = enqueue(db_url, "fine")
    daemon.claimer.run_once()
    with get_engine(db_url).begin() as conn:  # the outage outlasted the lease
        conn.execute(sa.update(Generation).where(Generation.id == job_id)
                     .values(lease_expires_at=utcnow() - timedelta(hours=1)))
    daemon.rescuer.run_once()
    job = row(db_url, job_id)
    assert (job.status, job.worker_id, hooks.rescued) == ("processing", daemon.worker_id, [])
    daemon.store.close()


_STUCK = """
import threading, time
from dgxqueue.daemon.hardstop import HardStop
stop = HardStop(lambda: print("last words", flush=True), lambda: 0, poll=0.05)
stop.start()
stop.arm(time.monotonic() + 0.2)
threading.Event().wait()  # as a query the server never answers
"""


def test_hard_stop__ends_a_process_whose_shutdown_hangs() -> None:
    """Past its deadline the hard stop says so and ends the process with the daemon's exit code,
    however the main thread is blocked."""
    done = subprocess.run([sys.executable, "-c", _STUCK], cwd=REPO, capture_output=True, timeout=60)
    assert (done.returncode, done.stdout.decode().strip()) == (0, "last words")
