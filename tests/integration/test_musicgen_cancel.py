"""The issue's test: cancel a running MusicGen job inside a batch of 4 on the tiny model, with the
daemon in-process on real SQLite and PostgreSQL, through ``generate`` and through the decode loop.
The other three complete with the audio they would have had; the cancelled one ends within a
heartbeat (or so) of the request, its decoding stopped."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dgxqueue.audio import PCM_SCALE, read_wav
from dgxqueue.generators import GeneratedAudio, GenerationRequest, create_generator, seed_for
from dgxqueue.storage import Generation, cancel_generation, create_generation, get_engine, get_generation, session_scope
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.processes import wait_until

torch = pytest.importorskip("torch", reason="the musicgen extra is not installed: pip install .[musicgen]")
MODEL, RATE, DURATION, HEARTBEAT = "tiny-musicgen", 32000, 8.0, 0.2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_musicgen import build_tiny_musicgen

    return build_tiny_musicgen(tmp_path_factory.mktemp("tiny-musicgen"))


def row(url: str, job_id: str) -> Generation:
    with session_scope(get_engine(url)) as s:
        job = get_generation(s, job_id)
        assert job is not None
        return job


@pytest.mark.parametrize("decode", ["generate", "loop"])
def test_musicgen_daemon__cancel_one_of_a_batch_of_four(decode: str, db_url: str, tmp_path: Path,
                                                       tiny_model: Path) -> None:
    """Three jobs of the batch write the audio the batch renders without a cancel; the fourth,
    cancelled once its progress shows, ends failed, cancelled, within a heartbeat or so, before
    the others, and leaves no file."""
    from tests.support.tiny_musicgen import PROMPTS

    generator = create_generator("musicgen", {"model": str(tiny_model), "models": [MODEL], "max_batch_size": 4,
                                              "decode": decode})
    outputs, hooks = tmp_path / "outputs", RecordingHooks()
    daemon = make_daemon(db_url, outputs, generator, hooks=hooks, heartbeat_seconds=HEARTBEAT)
    with session_scope(get_engine(db_url)) as s:
        ids = [create_generation(s, prompt=PROMPTS[i], model_name=MODEL, duration_seconds=DURATION,
                                 sample_rate=RATE, channels=1).id for i in range(4)]
    # What each job renders when nobody is cancelled: the same batch, straight through the backend.
    reference = generator.generate([GenerationRequest(job_id, PROMPTS[i], MODEL, DURATION, RATE, 1, seed_for(job_id))
                                    for i, job_id in enumerate(ids)])
    victim = ids[2]
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    try:
        wait_until(lambda: (row(db_url, victim).progress_done or 0) > 0, 120, "the batch's progress in the row")
        with session_scope(get_engine(db_url)) as s:
            assert cancel_generation(s, victim).status == "processing"
        asked = time.monotonic()
        wait_until(lambda: row(db_url, victim).status == "failed", 60, "the cancelled job to end")
        took = time.monotonic() - asked
        still = [row(db_url, job_id).status for job_id in ids if job_id != victim]
    finally:
        thread.join(300)
    assert took < HEARTBEAT + 1.5, took
    assert still == ["processing"] * 3  # the cancel did not wait for the batch
    job = row(db_url, victim)
    assert job.cancelled_at is not None and job.error_message == "cancelled by request while it ran"
    assert job.progress_done is not None and job.progress_total is not None
    assert job.progress_done < job.progress_total
    assert not list(outputs.rglob(f"*{victim}*"))
    assert hooks.outcomes(victim) == ["cancelled"]
    for i, job_id in enumerate(ids):
        if job_id == victim:
            continue
        assert row(db_url, job_id).status == "completed"
        samples, _ = read_wav(outputs / f"{job_id}.wav")
        expected = reference[i]
        assert isinstance(expected, GeneratedAudio)
        # The WAV holds 16-bit samples: equal to the reference to within its rounding.
        np.testing.assert_allclose(samples, expected.samples, atol=1.01 / PCM_SCALE, rtol=0)
