"""Continuous batching with a real daemon process on the tiny MusicGen, on CPU: jobs join a running
batch and leave it as they finish; cancel, SIGTERM and SIGKILL with jobs in slots."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from dgxqueue import audio
from dgxqueue.config import OutputSettings
from dgxqueue.generators import GeneratedAudio, GenerationRequest, create_generator, seed_for
from dgxqueue.storage import cancel_generation, create_generations, get_engine, init_db, session_scope
from tests.support.processes import start_worker, stop, wait_until, write_config

pytest.importorskip("torch", reason="the musicgen backend needs the extra: pip install .[musicgen]")
pytest.importorskip("transformers", reason="the musicgen backend needs the extra: pip install .[musicgen]")

SLOTS = 4
WAIT = 180.0  # the 2-core test machine is shared: generous bounds, never sleeps


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_musicgen import build_tiny_musicgen

    return build_tiny_musicgen(tmp_path_factory.mktemp("continuous-musicgen"))


def _options(model: Path) -> dict[str, Any]:
    return {"model": str(model), "models": ["tiny"], "device": "cpu", "decode": "loop", "max_batch_size": SLOTS}


def _config(tmp: Path, url: str, model: Path, *, metrics: dict[str, Any] | None = None, name: str = "config.toml",
            **worker: Any) -> Path:
    return write_config(tmp / name, {
        "database": {"url": url},
        "outputs": {"dir": str(tmp / "outputs")},
        "generator": {"name": "musicgen", "continuous": True},
        "generator.options": _options(model),
        "worker": {"lease_seconds": 30.0, "heartbeat_seconds": 0.2, "rescue_interval_seconds": 0.5,
                   "poll_interval_seconds": 0.5, "backoff_base_seconds": 0.0, **worker},
        "metrics": metrics or {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    })


def _enqueue(url: str, tmp: Path, *durations: float) -> list[str]:
    prompts = ["lofi hip hop beat with warm piano", "epic orchestral trailer music", "upbeat synthwave",
               "calm ambient pads", "funky disco groove", "dark techno with a heavy kick"]
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [
            {"prompt": prompts[i % len(prompts)], "model_name": "tiny", "duration_seconds": d, "sample_rate": 32000,
             "channels": 1} for i, d in enumerate(durations)
        ], outputs=OutputSettings(dir=str(tmp / "outputs")))


def _row(url: str, job_id: str) -> sa.RowMapping:
    with get_engine(url).connect() as conn:
        return conn.execute(sa.text(
            "SELECT status, progress_done, progress_total, cancelled_at, completed_at, error_message, attempts,"
            " file_path, prompt, duration_seconds FROM generations WHERE id = :id"), {"id": job_id}).mappings().one()


def _wav(tmp: Path, row: sa.RowMapping) -> Path:
    return audio.resolve_output_path(tmp / "outputs", row["file_path"])


def _frames(tmp: Path, row: sa.RowMapping) -> int:
    return int(audio.read_wav(_wav(tmp, row))[0].shape[-1])


def _started(url: str, job_id: str, worker: subprocess.Popen[bytes]) -> None:
    wait_until(lambda: (r := _row(url, job_id))["status"] == "processing" and (r["progress_done"] or 0) > 0, WAIT,
               f"job {job_id} decoding", alive=worker)


def test_continuous__a_job_joins_the_running_batch_and_leaves_first(db_url: str, tmp_path: Path, model: Path) -> None:
    """Job B, enqueued while the long job A decodes, joins A's running batch and completes before
    A; both WAVs read back at their lengths, and B's samples equal B rendered alone with its seed."""
    init_db(db_url)
    worker = start_worker(_config(tmp_path, db_url, model), tmp_path / "worker.log")
    try:
        (a,) = _enqueue(db_url, tmp_path, 5.0)
        _started(db_url, a, worker)
        (b,) = _enqueue(db_url, tmp_path, 0.5)
        wait_until(lambda: _row(db_url, b)["status"] == "completed", WAIT, "B to complete", alive=worker)
        assert _row(db_url, a)["status"] == "processing", "B waited for A's batch to end"
        wait_until(lambda: _row(db_url, a)["status"] == "completed", WAIT, "A to complete", alive=worker)
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    row_a, row_b = _row(db_url, a), _row(db_url, b)
    assert row_b["completed_at"] < row_a["completed_at"]
    assert _frames(tmp_path, row_a) == 5 * 32000 and _frames(tmp_path, row_b) == 16000
    generator = create_generator("musicgen", _options(model))
    generator.load()
    request = GenerationRequest(job_id=b, prompt=row_b["prompt"], model_name="tiny", duration_seconds=0.5,
                                sample_rate=32000, channels=1, seed=seed_for(b))
    (alone,) = generator.generate([request])
    assert isinstance(alone, GeneratedAudio)
    audio.write_wav_atomic(tmp_path / "alone.wav", alone)
    assert np.array_equal(audio.read_wav(tmp_path / "alone.wav")[0], audio.read_wav(_wav(tmp_path, row_b))[0])


def test_continuous__cancel_of_one_running_job_leaves_the_others_decoding(sqlite_db_url: str, tmp_path: Path,
                                                                         model: Path) -> None:
    """Three jobs decode together; the one cancelled mid-way ends cancelled with no file, the
    other two complete at their lengths after it."""
    url = sqlite_db_url
    init_db(url)
    ids = _enqueue(url, tmp_path, 4.0, 4.0, 4.0)
    worker = start_worker(_config(tmp_path, url, model), tmp_path / "worker.log")
    try:
        for job_id in ids:
            _started(url, job_id, worker)
        with session_scope(get_engine(url)) as s:
            assert cancel_generation(s, ids[1]).status == "processing"
        wait_until(lambda: _row(url, ids[1])["status"] == "failed", WAIT, "the cancelled job to end", alive=worker)
        assert {_row(url, j)["status"] for j in (ids[0], ids[2])} == {"processing"}
        wait_until(lambda: all(_row(url, j)["status"] == "completed" for j in (ids[0], ids[2])), WAIT,
                   "the other two to complete", alive=worker)
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    cancelled = _row(url, ids[1])
    assert cancelled["cancelled_at"] is not None and cancelled["error_message"] == "cancelled by request while it ran"
    assert not _wav(tmp_path, cancelled).exists()
    assert all(_frames(tmp_path, _row(url, j)) == 4 * 32000 for j in (ids[0], ids[2]))


@pytest.mark.parametrize(("grace", "ends"), [(120.0, "completed"), (0.0, "pending")])
def test_continuous__sigterm_during_a_running_batch(sqlite_db_url: str, tmp_path: Path, model: Path, grace: float,
                                                   ends: str) -> None:
    """SIGTERM with jobs in slots: within a long grace they decode to their end and are recorded;
    with none they go back pending, attempt refunded; a job claimed nowhere stays pending. Exit 0."""
    url = sqlite_db_url
    init_db(url)
    ids = _enqueue(url, tmp_path, 3.0, 3.0)
    worker = start_worker(_config(tmp_path, url, model, grace_seconds=grace), tmp_path / "worker.log")
    try:
        for job_id in ids:
            _started(url, job_id, worker)
        (later,) = _enqueue(url, tmp_path, 0.5)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(WAIT) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        stop(worker)
    rows = [_row(url, j) for j in ids]
    assert [r["status"] for r in rows] == [ends, ends]
    if ends == "completed":
        assert all(_frames(tmp_path, r) == 3 * 32000 for r in rows)
    else:
        assert [r["attempts"] for r in rows] == [0, 0]
    assert _row(url, later)["status"] in ("pending", "completed")


def test_continuous__sigkill_jobs_in_slots_are_rescued(sqlite_db_url: str, tmp_path: Path, model: Path) -> None:
    """SIGKILL with jobs in slots: their leases expire, the rescue requeues them, and a second
    daemon renders them (each alone, as suspects), WAVs at their lengths."""
    url = sqlite_db_url
    init_db(url)
    ids = _enqueue(url, tmp_path, 3.0, 3.0)
    config = _config(tmp_path, url, model, lease_seconds=2.0)
    worker = start_worker(config, tmp_path / "worker.log")
    try:
        for job_id in ids:
            _started(url, job_id, worker)
    finally:
        worker.kill()
        worker.wait()
    assert {_row(url, j)["status"] for j in ids} == {"processing"}
    second = start_worker(config, tmp_path / "second.log")
    try:
        wait_until(lambda: all(_row(url, j)["status"] == "completed" for j in ids), WAIT,
                   "the rescued jobs to complete", alive=second)
    finally:
        assert stop(second) == 0, (tmp_path / "second.log").read_text()[-3000:]
    rows = [_row(url, j) for j in ids]
    assert [r["attempts"] for r in rows] == [2, 2]
    assert all(_frames(tmp_path, r) == 3 * 32000 for r in rows)


def _metrics_address(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and str(entry.get("metrics", "")).startswith("http://"):
            return str(entry["metrics"])
    return None


def _samples(address: str, name: str) -> dict[str, float]:
    """``name``'s samples on /metrics, by their label text (``le="4"``; empty for none)."""
    with urllib.request.urlopen(address, timeout=10) as reply:
        text = reply.read().decode()
    found = re.findall(rf"^{name}(?:{{(.*?)}})? (\S+)$", text, flags=re.MULTILINE)
    return {labels: float(value) for labels, value in found}


def test_continuous__batch_size_metric_observes_the_jobs_in_slots_at_each_step(sqlite_db_url: str, tmp_path: Path,
                                                                             model: Path) -> None:
    """dgxqueue_batch_size observes, at each decoding step, how many jobs are in slots: three
    1-second jobs that decode together give one observation of 3 per step (at least the 50 frames
    of a second), none of another size."""
    url = sqlite_db_url
    init_db(url)
    ids = _enqueue(url, tmp_path, 1.0, 1.0, 1.0)  # before the start: one claim, one join, one end
    log = tmp_path / "worker.log"
    worker = start_worker(_config(tmp_path, url, model, metrics={"enabled": True, "port": 0}), log)
    try:
        address = str(wait_until(lambda: _metrics_address(log), WAIT, "the metrics address", alive=worker))
        wait_until(lambda: all(_row(url, j)["status"] == "completed" for j in ids), WAIT, "the jobs to complete",
                   alive=worker)
        count = _samples(address, "dgxqueue_batch_size_count")[""]
        total = _samples(address, "dgxqueue_batch_size_sum")[""]
        buckets = _samples(address, "dgxqueue_batch_size_bucket")
    finally:
        assert stop(worker) == 0, log.read_text()[-3000:]
    assert count >= 50, f"{count:g} steps observed for 1-second jobs"
    assert total == 3 * count
    assert buckets['le="2.0"'] == 0 and buckets['le="4.0"'] == count


def _log_entries(log: Path) -> list[dict[str, Any]]:
    entries = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _ends(log: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The "job finished" entries of ``ids`` in a daemon's log, by job id."""
    return {e["job_id"]: e for e in _log_entries(log) if e.get("event") == "job finished" and e.get("job_id") in ids}


def test_continuous__jobs_whose_lease_was_lost_leave_their_slots(sqlite_db_url: str, tmp_path: Path,
                                                                 model: Path) -> None:
    """Two long jobs decode; their rows are taken as another daemon takes them after a rescue
    (plain SQL: worker, attempt). The daemon frees their slots at its next heartbeat instead of
    decoding audio whose write is sure to be refused: each ends fenced with no audio, its lease
    loss warned once, no file of it left, the rows untouched; a job enqueued after completes."""
    url = sqlite_db_url
    init_db(url)
    ids = _enqueue(url, tmp_path, 20.0, 20.0)
    log = tmp_path / "worker.log"
    worker = start_worker(_config(tmp_path, url, model), log)
    try:
        for job_id in ids:
            _started(url, job_id, worker)
        with get_engine(url).begin() as conn:
            taken = conn.execute(sa.text(
                "UPDATE generations SET worker_id = 'another-daemon', attempts = attempts + 1 WHERE id IN (:a, :b)"
                " AND status = 'processing'"), {"a": ids[0], "b": ids[1]}).rowcount
        assert taken == 2
        wait_until(lambda: len(_ends(log, ids)) == 2, WAIT, "the daemon to let them go", alive=worker)
        (later,) = _enqueue(url, tmp_path, 0.5)
        wait_until(lambda: _row(url, later)["status"] == "completed", WAIT, "a later job to complete", alive=worker)
    finally:
        assert stop(worker) == 0, log.read_text()[-3000:]
    ends = _ends(log, ids)
    assert {e["outcome"] for e in ends.values()} == {"fenced"}
    assert [e["audio_seconds"] for e in ends.values()] == [None, None], "it decoded audio sure to be refused"
    lost = [e for e in _log_entries(log) if str(e.get("event", "")).startswith("lease lost")]
    assert sorted(e["job_id"] for e in lost) == sorted(ids)
    assert [(r["status"], r["attempts"]) for r in map(lambda j: _row(url, j), ids)] == [("processing", 2)] * 2
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [f"{later}.wav"]


def test_continuous__a_suspect_is_not_claimed_while_the_batch_runs(sqlite_db_url: str, tmp_path: Path,
                                                                  model: Path) -> None:
    """A suspect (a job that lost a lease while it ran) runs alone, so it cannot join a running
    batch: while the daemon decodes a long job, a suspect enqueued meanwhile stays pending, free
    for an idle daemon, not held unrun until the batch empties. Then the daemon runs it alone."""
    url = sqlite_db_url
    init_db(url)
    (long,) = _enqueue(url, tmp_path, 30.0)
    worker = start_worker(_config(tmp_path, url, model), tmp_path / "worker.log")
    try:
        _started(url, long, worker)
        (suspect,) = _enqueue(url, tmp_path, 0.5)
        with get_engine(url).begin() as conn:
            conn.execute(sa.text("UPDATE generations SET lease_losses = 1 WHERE id = :id"), {"id": suspect})
        # The spans (monotonic start, end) of consecutive polls that saw the suspect held while the
        # long job ran. The daemon may claim it at once; it must give it back at once, not hold it.
        held: list[list[float]] = []
        seen = [False]  # whether the last poll saw it held

        def long_done() -> bool:
            with get_engine(url).connect() as conn:
                rows: dict[str, str] = {str(k): str(v) for k, v in conn.execute(
                    sa.text("SELECT id, status FROM generations")).all()}
            now = time.monotonic()
            held_now = rows[long] == "processing" and rows[suspect] == "processing"
            if held_now and seen[0]:
                held[-1][1] = now
            elif held_now:
                held.append([now, now])
            seen[0] = held_now
            return rows[long] == "completed"

        wait_until(long_done, WAIT, "the long job to complete", alive=worker)
        wait_until(lambda: _row(url, suspect)["status"] == "completed", WAIT, "the suspect to complete", alive=worker)
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    longest = max((end - start for start, end in held), default=0.0)
    assert longest < 5.0, f"the suspect was held {longest:.1f} s while the batch it cannot join ran"
    assert _row(url, suspect)["attempts"] == 1
