"""The daemon with each real backend: WAV files that match their rows, and failures that stay local."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import pytest

from dgxqueue.daemon.daemon import EXIT_MACHINE_FAULT
from dgxqueue.errors import UnknownGeneratorError
from dgxqueue.generators import Generator, create_generator
from dgxqueue.storage import Generation, create_generation, get_engine, get_generation, session_scope
from tests.support.daemons import make_daemon

torch = pytest.importorskip("torch", reason="the musicgen extra is not installed: pip install .[musicgen]")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_musicgen import build_tiny_musicgen

    return build_tiny_musicgen(tmp_path_factory.mktemp("tiny-musicgen"))


BACKENDS: dict[str, tuple[str, dict[str, Any], int]] = {
    # name -> (model_name served, extra generator options, sample rate of its jobs)
    "synth": ("synth", {}, 22050),
    "silence": ("silence", {}, 16000),
    "musicgen": ("tiny-musicgen", {"models": ["tiny-musicgen"], "max_batch_size": 2}, 32000),
    # MusicGen through our decode loop instead of generate.
    "musicgen-loop": ("tiny-musicgen", {"models": ["tiny-musicgen"], "max_batch_size": 2, "decode": "loop"}, 32000),
}


def backend(name: str, tiny_model: Path) -> Generator:
    _, options, _ = BACKENDS[name]
    if name.startswith("musicgen"):
        options = {**options, "model": str(tiny_model)}
    return create_generator(name.partition("-")[0], options)


def enqueue(url: str, model: str, rate: int, duration: float, channels: int = 1, prompt: str = "a beat") -> str:
    with session_scope(get_engine(url)) as s:
        return create_generation(s, prompt=prompt, model_name=model, duration_seconds=duration,
                                 sample_rate=rate, channels=channels).id


def row(url: str, job_id: str) -> Generation:
    with session_scope(get_engine(url)) as s:
        job = get_generation(s, job_id)
        assert job is not None
        return job


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_daemon_backend__wav_headers_match_rows(name: str, sqlite_db_url: str, tmp_path: Path,
                                                tiny_model: Path) -> None:
    """Each backend drains jobs into WAV files whose rate, channels and length match the row."""
    model, _, rate = BACKENDS[name]
    outputs = tmp_path / "outputs"
    daemon = make_daemon(sqlite_db_url, outputs, backend(name, tiny_model))
    jobs = [enqueue(sqlite_db_url, model, rate, duration, channels, f"{name} trap beat 140 BPM in Cm #{i}")
            for i, (duration, channels) in enumerate([(0.5, 1), (1.0, 2), (0.75, 1)])]
    assert daemon.run(burst=True) == 0
    for job_id in jobs:
        job = row(sqlite_db_url, job_id)
        assert job.status == "completed", job.error_message
        path = outputs.parent / job.file_path
        with wave.open(str(path)) as wav:
            assert wav.getframerate() == job.sample_rate and wav.getnchannels() == job.channels
            assert wav.getsampwidth() == 2
            assert abs(wav.getnframes() - job.duration_seconds * job.sample_rate) <= 1
        assert job.file_size_bytes == path.stat().st_size
        assert job.meta is not None and 0.0 <= job.meta["energy"] <= 1.0
        assert abs(job.meta["actual_duration_seconds"] - job.duration_seconds) <= 1 / job.sample_rate
    if name == "synth":
        meta = row(sqlite_db_url, jobs[0]).meta or {}
        assert (meta["bpm"], meta["key"], meta["genre"]) == (140, "Cm", "trap")


def test_daemon_backend__musicgen_over_limit_fails_alone(sqlite_db_url: str, tmp_path: Path,
                                                          tiny_model: Path) -> None:
    """A request above MusicGen's 30 s fails with a message naming the limit; the next job still completes."""
    daemon = make_daemon(sqlite_db_url, tmp_path / "outputs", backend("musicgen", tiny_model))
    too_long = enqueue(sqlite_db_url, "tiny-musicgen", 32000, 40.0)
    fine = enqueue(sqlite_db_url, "tiny-musicgen", 32000, 0.5)
    daemon.run(burst=True)
    failed = row(sqlite_db_url, too_long)
    assert failed.status == "failed" and failed.attempts == 1 and "30" in (failed.error_message or "")
    assert row(sqlite_db_url, fine).status == "completed"


def test_daemon_backend__unknown_backend_lists_the_known_ones() -> None:
    """An unknown backend name fails at start-up with the names that exist."""
    with pytest.raises(UnknownGeneratorError, match="musicgen, silence, synth"):
        create_generator("musicgen-xl")


def test_daemon_backend__full_disk_pauses_claims_and_burst_exits_75(sqlite_db_url: str, tiny_disk: Path) -> None:
    """An outputs disk below outputs.min_free_mb: a burst run claims nothing and exits 75, the job untouched."""
    outputs = tiny_disk / "outputs"
    daemon = make_daemon(sqlite_db_url, outputs, create_generator("synth"), batch_size=1)
    job_id = enqueue(sqlite_db_url, "synth", 8000, 0.25)
    assert daemon.run(burst=True) == EXIT_MACHINE_FAULT
    job = row(sqlite_db_url, job_id)
    assert (job.status, job.attempts) == ("pending", 0)
    assert not outputs.exists() or list(outputs.iterdir()) == []


def test_daemon_backend__wav_larger_than_the_disk_is_given_back_unspent(sqlite_db_url: str, tiny_disk: Path) -> None:
    """With the free-space check off, a WAV the disk cannot hold is the machine's fault (a test write of
    its size fails too): the job goes back unspent and marked, the run exits 75, no partial file is left."""
    outputs = tiny_disk / "outputs"
    daemon = make_daemon(sqlite_db_url, outputs, create_generator("synth"), batch_size=1)
    daemon.outputs_check.min_free_mb = 0
    big = enqueue(sqlite_db_url, "synth", 32000, 4.0)  # 256 KB of PCM on a 64 KiB disk
    assert daemon.run(burst=True) == EXIT_MACHINE_FAULT
    job = row(sqlite_db_url, big)
    assert (job.status, job.attempts) == ("pending", 0)
    assert (job.error_message or "").startswith("machine fault (disk_full)")
    assert list(p for p in tiny_disk.rglob("*") if p.is_file()) == []


def test_daemon_backend__unwritable_outputs_pause_claims(sqlite_db_url: str, readonly_dir: Path) -> None:
    """An outputs folder that cannot be written is the machine's: nothing is claimed, a burst run exits 75,
    the job stays pending unspent and nothing is left behind."""
    daemon = make_daemon(sqlite_db_url, readonly_dir / "outputs", create_generator("synth"))
    job_id = enqueue(sqlite_db_url, "synth", 8000, 0.25)
    assert daemon.run(burst=True) == EXIT_MACHINE_FAULT
    job = row(sqlite_db_url, job_id)
    assert (job.status, job.attempts) == ("pending", 0)
    assert list(readonly_dir.iterdir()) == []
