"""The daemon in-process on real SQLite and PostgreSQL: claims, outcomes, retries, fencing, stops."""

from __future__ import annotations

import sqlite3
import threading
import wave
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from dgxqueue.config import DatabaseSettings
from dgxqueue.daemon import EXIT_JOB_TIMEOUT, Daemon, new_worker_id
from dgxqueue.daemon.outages import outage_skips
from dgxqueue.daemon.queue_client import QueueClient
from dgxqueue.storage import (
    Generation,
    cancel_generation,
    create_engine,
    create_generation,
    get_engine,
    get_generation,
    init_db,
    queue,
    session_scope,
)
from dgxqueue.storage.database import sqlite_path
from dgxqueue.storage.models import G, utcnow
from tests.support import queue_calls
from tests.support.daemons import RecordingHooks, make_daemon, make_settings
from tests.support.generators import ScriptedGenerator
from tests.support.processes import wait_until
from workers.silence import SilenceGenerator


def enqueue(url: str, prompt: str, model: str = "scripted", **kw: Any) -> str:
    with session_scope(get_engine(url)) as s:
        return create_generation(s, prompt=prompt, model_name=model, duration_seconds=kw.pop("duration", 0.05),
                                 sample_rate=8000, channels=1, **kw).id


def expire_leases(url: str) -> None:
    """Every lease runs out: as when the daemons holding them died long ago."""
    with get_engine(url).begin() as conn:
        conn.execute(sa.update(Generation).where(Generation.status == "processing")
                     .values(lease_expires_at=utcnow() - timedelta(hours=1)))


def row(url: str, job_id: str) -> Generation:
    with session_scope(get_engine(url)) as s:
        job = get_generation(s, job_id)
        assert job is not None
        return job


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    return tmp_path / "outputs"


def test_daemon__burst_completes_jobs_and_writes_wavs(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A burst run completes every job, writes its WAV and records time, size and measurements."""
    daemon = make_daemon(db_url, outputs, SilenceGenerator(models=["silence"]))
    ids = [enqueue(db_url, f"beat {i}", model="silence", metadata={"bpm": 90}) for i in range(5)]
    assert daemon.run(burst=True) == 0
    for job_id in ids:
        job = row(db_url, job_id)
        assert job.status == "completed" and job.attempts == 1 and job.worker_id == daemon.worker_id
        assert job.completed_at is not None and job.generation_time_seconds is not None
        path = outputs / f"{job_id}.wav"
        assert job.file_size_bytes == path.stat().st_size
        with wave.open(str(path)) as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getnframes()) == (8000, 1, 400)
        assert job.meta is not None and job.meta["bpm"] == 90 and job.meta["peak"] == 0.0


def test_daemon__generator_loads_on_the_thread_that_generates(engine: sa.Engine, db_url: str,
                                                              outputs: Path) -> None:
    """load() and generate() share the runner thread, off the main one: torch's thread pool belongs
    to the thread that first ran parallel work, and two pools made CPU generation 1.6x slower."""
    generator = ScriptedGenerator(max_batch_size=1)
    for i in range(3):
        enqueue(db_url, f"beat {i}")
    assert make_daemon(db_url, outputs, generator).run(burst=True) == 0
    assert generator.threads["generate"] == generator.threads["load"]
    assert len(generator.threads["load"]) == 1 and threading.get_ident() not in generator.threads["load"]


def test_daemon__claims_only_models_it_serves(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A job for a model no daemon serves stays pending; the served one completes."""
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    other = enqueue(db_url, "x", model="musicgen-large")
    mine = enqueue(db_url, "y")
    daemon.run(burst=True)
    assert row(db_url, other).status == "pending"
    assert row(db_url, mine).status == "completed"


def test_daemon__priority_then_age_order(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """Higher priority runs first; equal priorities run oldest first."""
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks, batch_size=1)
    low = enqueue(db_url, "a")
    high = enqueue(db_url, "b", priority=5)
    low2 = enqueue(db_url, "c")
    daemon.run(burst=True)
    assert hooks.claimed == [high, low, low2]


def test_daemon__not_before_is_respected(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A job scheduled in the future is not claimed before its time."""
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    later = enqueue(db_url, "later", run_after=utcnow() + timedelta(hours=1))
    assert daemon.run_once() == 0
    daemon.shutdown()  # closes its connection, which the garbage collector would warn about later
    assert row(db_url, later).status == "pending"


def test_daemon__transient_twice_then_success(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """Two transient failures then success: completed with 3 attempts."""
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    job_id = enqueue(db_url, "transient:2")
    daemon.run(burst=True)
    job = row(db_url, job_id)
    assert (job.status, job.attempts, job.error_message) == ("completed", 3, None)


def test_daemon__transient_until_attempts_spent(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A job failing transiently every time ends failed with its last error after max_attempts."""
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    job_id = enqueue(db_url, "transient:99", max_attempts=2)
    daemon.run(burst=True)
    job = row(db_url, job_id)
    assert job.status == "failed" and job.attempts == 2
    assert "scripted transient failure #2" in (job.error_message or "")


def test_daemon__permanent_error_fails_at_once(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A permanent error fails the job at its first attempt with the backend's message."""
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    job_id = enqueue(db_url, "permanent")
    daemon.run(burst=True)
    job = row(db_url, job_id)
    assert (job.status, job.attempts, job.error_message) == ("failed", 1, "scripted permanent failure")
    assert job.completed_at is not None


def test_daemon__unexpected_error_is_retried_unless_configured(engine: sa.Engine, db_url: str,
                                                               outputs: Path) -> None:
    """An unexpected exception is retried by default, failed at once when configured so."""
    retried = enqueue(db_url, "crash", max_attempts=2)
    make_daemon(db_url, outputs, ScriptedGenerator()).run(burst=True)
    assert (row(db_url, retried).status, row(db_url, retried).attempts) == ("failed", 2)
    assert "RuntimeError: scripted crash" in (row(db_url, retried).error_message or "")
    once = enqueue(db_url, "crash", max_attempts=5)
    make_daemon(db_url, outputs, ScriptedGenerator(), retry_unexpected_errors=False).run(burst=True)
    assert (row(db_url, once).status, row(db_url, once).attempts) == ("failed", 1)


def test_daemon__one_bad_request_fails_only_its_job(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """In one batch, a refused request and a failing one fail alone; the others complete."""
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks)
    good = [enqueue(db_url, "fine") for _ in range(3)]
    bad = enqueue(db_url, "permanent")
    invalid = enqueue(db_url, "invalid")
    assert daemon.run_once() == 5
    assert all(row(db_url, g).status == "completed" for g in good)
    assert row(db_url, bad).status == "failed"
    assert "refused by the scripted backend" in (row(db_url, invalid).error_message or "")


def test_daemon__output_path_outside_outputs_fails_job(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A row whose file_path escapes the outputs folder (inserted by plain SQL) fails without
    reaching the backend, nothing written; the rest of its batch completes."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen)
    job_id = enqueue(db_url, "fine")
    others = [enqueue(db_url, "fine") for _ in range(2)]
    with get_engine(db_url).begin() as conn:
        conn.execute(sa.update(Generation).where(Generation.id == job_id).values(file_path="../escape.wav"))
    daemon.run(burst=True)
    job = row(db_url, job_id)
    assert job.status == "failed" and "outside the outputs folder" in (job.error_message or "")
    assert job.attempts == 1 and gen.executions[job_id] == 0
    assert not (outputs.parent.parent / "escape.wav").exists()
    assert all(row(db_url, other).status == "completed" for other in others)


def test_daemon__file_name_too_long_for_the_file_system_fails_job(engine: sa.Engine, db_url: str,
                                                                  outputs: Path) -> None:
    """A row whose file name is over the 255 bytes a file name may hold (plain SQL; enqueue refuses
    it) fails at once naming its path, nothing written. It used to render, commit ``completed``,
    fail the rename (ENAMETOOLONG) and leave a completed row whose file can never exist."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen)
    job_id, deep, other = enqueue(db_url, "long name"), enqueue(db_url, "long path"), enqueue(db_url, "fine")
    with get_engine(db_url).begin() as conn:
        conn.execute(sa.update(Generation).where(Generation.id == job_id)
                     .values(file_path="outputs/" + "é" * 128 + ".wav"))  # a name of 260 bytes of UTF-8
        conn.execute(sa.update(Generation).where(Generation.id == deep)
                     .values(file_path="outputs/" + "d/" * 2100 + "x.wav"))  # each name short, the path not
    daemon.run(burst=True)
    job = row(db_url, job_id)
    assert job.status == "failed" and "a name of 260 bytes" in (job.error_message or ""), job.error_message
    assert job.attempts == 1 and gen.executions[job_id] == 0
    job = row(db_url, deep)
    assert job.status == "failed" and "over the 4095 bytes a path may have" in (job.error_message or "")
    assert job.attempts == 1 and gen.executions[deep] == 0
    assert row(db_url, other).status == "completed"
    assert sorted(p.name for p in outputs.iterdir()) == [f"{other}.wav"]


def test_daemon__folder_linked_out_while_rendering_is_not_written_through(engine: sa.Engine, db_url: str,
                                                                          outputs: Path) -> None:
    """A folder of the job's path replaced by a link out of the outputs folder while the backend
    renders (the path was checked before): the write is refused and the job fails, nothing lands
    outside. It used to be written through the link."""
    (outputs / "album").mkdir(parents=True)
    outside = outputs.parent / "elsewhere"
    outside.mkdir()

    class RelinksTheFolder(ScriptedGenerator):
        def generate(self, requests: Any) -> Any:  # as someone with write access to outputs/ could
            (outputs / "album").rmdir()
            (outputs / "album").symlink_to(outside, target_is_directory=True)
            return super().generate(requests)

    job_id = enqueue(db_url, "fine", file_path="outputs/album/song.wav")
    assert make_daemon(db_url, outputs, RelinksTheFolder()).run(burst=True) == 0
    job = row(db_url, job_id)
    assert job.status == "failed" and "outside the outputs folder" in (job.error_message or "")
    assert list(outside.iterdir()) == []


def test_daemon__plain_sql_row_is_processed(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A row inserted with only the specification's 15 columns is claimed and completed."""
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    with get_engine(db_url).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO generations (id, prompt, model_name, model_version, duration_seconds, sample_rate,"
            " channels, file_path, file_size_bytes, status, created_at, completed_at,"
            " generation_time_seconds, error_message, metadata) VALUES ('a1b2c3d4-e5f6-7890-abcd-ef1234567890',"
            " 'trap beat', 'scripted', NULL, 0.1, 8000, 2, 'outputs/a1b2c3d4.wav', NULL, 'pending',"
            " '2025-11-07 10:00:00', NULL, NULL, NULL, NULL)"))
    daemon.run(burst=True)
    job = row(db_url, "a1b2c3d4-e5f6-7890-abcd-ef1234567890")
    assert job.status == "completed" and job.attempts == 1
    assert (outputs / "a1b2c3d4.wav").stat().st_size == job.file_size_bytes


@pytest.mark.parametrize("metadata", ["[1, 2]", '"tempo 120"'])
def test_daemon__row_with_non_object_metadata_fails_alone(engine: sa.Engine, db_url: str, outputs: Path,
                                                         metadata: str) -> None:
    """A plain-SQL row whose metadata is JSON but not an object fails at its first attempt, naming
    the field; the jobs claimed with it complete and the daemon keeps running (it used to stop
    on that row at every restart, giving the whole claim back unspent)."""
    good = [enqueue(db_url, "fine") for _ in range(2)]
    with get_engine(db_url).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO generations (id, prompt, model_name, duration_seconds, sample_rate, channels, file_path,"
            " status, created_at, metadata) VALUES ('a1b2c3d4-e5f6-7890-abcd-ef1234567890', 'trap beat', 'scripted',"
            " 0.1, 8000, 1, 'outputs/a1b2c3d4.wav', 'pending', '2025-11-07 10:00:00', :metadata)"),
            {"metadata": metadata})
    assert make_daemon(db_url, outputs, ScriptedGenerator(), batch_size=8).run(burst=True) == 0
    job = row(db_url, "a1b2c3d4-e5f6-7890-abcd-ef1234567890")
    assert (job.status, job.attempts) == ("failed", 1)
    assert job.error_message is not None and job.error_message.startswith("metadata must be a JSON object")
    assert [row(db_url, g).status for g in good] == ["completed", "completed"]


def test_daemon__backend_results_json_cannot_hold_fail_alone(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A backend result that is not audio, or whose metadata JSON cannot hold, fails its own job
    with a message naming it, before its file is written; numpy numbers in metadata are stored as
    plain numbers; the rest of the batch completes and the daemon keeps running."""
    gen = ScriptedGenerator(max_batch_size=8)
    none, nan, nul, numpy, fine = (enqueue(db_url, prompt)
                                   for prompt in ("none", "meta:nan", "meta:nul", "meta:numpy", "fine"))
    assert make_daemon(db_url, outputs, gen, batch_size=8).run(burst=True) == 0
    assert (row(db_url, none).status, row(db_url, none).attempts) == ("failed", 1)
    assert "backend returned NoneType, not GeneratedAudio" in (row(db_url, none).error_message or "")
    assert (row(db_url, nan).status, row(db_url, nan).attempts) == ("failed", 1)
    assert "metadata.tempo=nan" in (row(db_url, nan).error_message or "")
    assert not (outputs / f"{nan}.wav").exists()
    assert (row(db_url, nul).status, row(db_url, nul).attempts) == ("failed", 1)
    assert (row(db_url, nul).error_message or "").startswith("metadata.note holds a NUL character")
    assert not (outputs / f"{nul}.wav").exists()
    stored = row(db_url, numpy)
    assert stored.status == "completed" and stored.meta is not None
    assert (stored.meta["bpm"], stored.meta["bars"]) == (120.0, 8)
    assert row(db_url, fine).status == "completed"


def test_daemon__audio_of_another_length_than_asked_fails(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A result one frame short is not written: the file must hold exactly the frames the job asked
    for (duration x rate); it used to pass within one frame."""
    short = enqueue(db_url, "short", duration=0.05)
    assert make_daemon(db_url, outputs, ScriptedGenerator()).run(burst=True) == 0
    assert (row(db_url, short).status, row(db_url, short).error_message) == (
        "failed", "backend returned 399 frames; the job asked for 400")
    assert not (outputs / f"{short}.wav").exists()


def test_daemon__error_message_any_text_is_stored(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """An error whose message holds a NUL byte, which PostgreSQL text refuses, is stored with the
    byte replaced: the outcome write used to fail and stop the daemon."""
    job_id = enqueue(db_url, "nul")
    assert make_daemon(db_url, outputs, ScriptedGenerator()).run(burst=True) == 0
    assert (row(db_url, job_id).status, row(db_url, job_id).error_message) == ("failed", "scripted\ufffdfailure")


def test_daemon__fenced_write_is_refused(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A daemon whose lease was rescued cannot overwrite the outcome of the attempt that replaced it."""
    hooks_a = RecordingHooks()
    slow = ScriptedGenerator()
    # A is presumed dead, so it must not renew the lease the test expires: with the usual 0.2 s
    # heartbeat a loaded machine let A's heartbeat land between the expiry and the rescue.
    daemon_a = make_daemon(db_url, outputs, slow, hooks=hooks_a, worker_id="A", heartbeat_seconds=15.0)
    job_id = enqueue(db_url, "block")
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon_a.run_once()))
    thread.start()
    assert slow.entered.wait(10)
    # A is presumed dead: its lease is expired from the rescuer's point of view, in the rescue's
    # own transaction. A is alive and heartbeating; given a moment between the two (a loaded
    # machine gave it one), it renewed the lease and the rescue found nothing.
    with session_scope(get_engine(db_url)) as s:
        s.execute(sa.update(Generation).where(Generation.status == "processing")
                  .values(lease_expires_at=utcnow() - timedelta(hours=1)))
        requeued, failed = queue.rescue_expired(s)
    assert requeued == [job_id] and failed == []
    hooks_b = RecordingHooks()
    daemon_b = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks_b, worker_id="B")
    with get_engine(db_url).begin() as conn:  # B runs it as a normal prompt
        conn.execute(sa.update(Generation).where(Generation.id == job_id).values(prompt="fine"))
    assert daemon_b.run_once() == 1
    slow.gate.set()
    thread.join(10)
    assert result == [1]
    assert hooks_b.outcomes(job_id) == ["completed"]
    assert hooks_a.outcomes(job_id) == ["fenced"]
    job = row(db_url, job_id)
    assert (job.status, job.attempts, job.worker_id) == ("completed", 2, daemon_b.worker_id)


def test_daemon__rescue_requeues_then_fails_expired_leases(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """Expired leases of a running job go back to pending while attempts remain, then fail with
    a message that counts the daemons it took down."""
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks)
    job_id = enqueue(db_url, "fine", max_attempts=2)
    for attempt in (1, 2):
        jobs = queue_calls.claim(get_engine(db_url), worker_id="dead", models=["scripted"], limit=1,
                                 lease=timedelta(seconds=1))
        assert queue_calls.mark_started(get_engine(db_url), worker_id="dead", ids=[job_id]) == {job_id}
        assert [(j.attempt, j.lease_losses) for j in jobs] == [(attempt, attempt - 1)]
        expire_leases(db_url)
        daemon.rescuer.run_once()
    job = row(db_url, job_id)
    assert (job.status, job.attempts, job.lease_losses) == ("failed", 2, 2)
    assert "killed its daemon 2 times" in (job.error_message or "")
    assert hooks.rescued == [([job_id], []), ([], [job_id])]


def test_daemon__rescue_requeues_processing_rows_without_a_lease(engine: sa.Engine, db_url: str,
                                                                outputs: Path) -> None:
    """A processing row with no lease (set by plain SQL, or left by a downgrade to 001 and back,
    which drops the column) is held by no daemon: the rescue requeues it, and it completes. It
    used to stay processing for good. Rows under a live lease are left alone."""
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    orphan, held = enqueue(db_url, "fine"), enqueue(db_url, "fine")
    with get_engine(db_url).begin() as conn:
        conn.execute(sa.update(Generation).where(Generation.id == orphan).values(status="processing"))
    [claimed] = queue_calls.claim(get_engine(db_url), worker_id="alive", models=["scripted"], limit=1,
                                  lease=timedelta(hours=1))
    assert claimed.id == held
    daemon.rescuer.run_once()
    assert (row(db_url, held).status, row(db_url, held).worker_id) == ("processing", "alive")
    assert row(db_url, orphan).status == "pending"
    assert daemon.run(burst=True) == 0 and row(db_url, orphan).status == "completed"


def test_daemon__graceful_stop_finishes_running_job(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A stop during a job lets it finish within the grace period; it completes."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen, grace_seconds=60.0)
    job_id = enqueue(db_url, "block")
    thread = threading.Thread(target=daemon.run)
    thread.start()
    assert gen.entered.wait(10)
    daemon.request_stop()
    gen.gate.set()
    thread.join(10)
    assert not thread.is_alive()
    assert row(db_url, job_id).status == "completed"


def test_daemon__stop_after_grace_gives_job_back(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A job still running when the grace ends goes back to pending with its attempt not spent."""
    gen = ScriptedGenerator()
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, grace_seconds=0.0)
    job_id = enqueue(db_url, "block")
    queued = enqueue(db_url, "fine")
    thread = threading.Thread(target=daemon.run)
    thread.start()
    assert gen.entered.wait(10)
    daemon.request_stop()
    thread.join(10)
    gen.gate.set()
    assert not thread.is_alive()
    job = row(db_url, job_id)
    assert (job.status, job.attempts, job.worker_id, job.lease_expires_at) == ("pending", 0, None, None)
    assert hooks.outcomes(job_id) == ["released"]
    assert row(db_url, queued).status in ("pending", "completed")


def test_daemon__time_limit_retries_and_reports_unhealthy(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A job past its time limit is retried with a clear message; the daemon is unhealthy until the call returns."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen, job_timeout_seconds=0.3)
    job_id = enqueue(db_url, "block")
    assert daemon.run_once() == 1
    job = row(db_url, job_id)
    assert job.status == "pending" and "time limit of 0.3 s" in (job.error_message or "")
    assert not daemon.healthy() and daemon.runner.busy
    gen.gate.set()
    deadline = threading.Event()
    for _ in range(500):
        if not daemon.runner.busy:
            break
        deadline.wait(0.01)
    assert daemon.healthy()


def test_daemon__call_ending_at_its_time_limit_keeps_its_outcomes(engine: sa.Engine, db_url: str,
                                                                   outputs: Path) -> None:
    """A call that returns while the loop is busy with its housekeeping, just past its time limit,
    is not then declared overrun: its job completes and the daemon stays healthy."""
    gen = ScriptedGenerator()
    job_id = enqueue(db_url, "block")

    class ReturnsDuringTick(RecordingHooks):
        def on_loop(self, monotonic: float) -> None:  # tick() runs once the first wait (0.25 s) is over
            if gen.entered.is_set() and not gen.gate.is_set():
                gen.gate.set()
                wait_until(lambda: not daemon.runner.busy, 10, "the call to return")

    daemon = make_daemon(db_url, outputs, gen, hooks=ReturnsDuringTick(), job_timeout_seconds=0.1)
    assert daemon.run_once() == 1
    assert (row(db_url, job_id).status, row(db_url, job_id).attempts) == ("completed", 1)
    assert daemon.healthy() and gen.executions[job_id] == 1


def test_daemon__time_limit_charges_its_call_and_gives_the_rest_back(engine: sa.Engine, db_url: str,
                                                                     outputs: Path) -> None:
    """A call past its time limit is charged to its job (JobTimeoutError, attempt spent); the claim's
    batches not started go back unspent, and the daemon stops with EXIT_JOB_TIMEOUT: the stuck call
    may never return. It used to keep the daemon running, wedged, claiming nothing."""
    gen = ScriptedGenerator(max_batch_size=1)
    daemon = make_daemon(db_url, outputs, gen, batch_size=3, job_timeout_seconds=0.3, backoff_base_seconds=60.0)
    stuck = enqueue(db_url, "block")
    later = [enqueue(db_url, "fine"), enqueue(db_url, "fine")]
    try:
        assert daemon.run(burst=False) == EXIT_JOB_TIMEOUT
    finally:
        gen.gate.set()
    job = row(db_url, stuck)
    assert (job.status, job.attempts) == ("pending", 1) and "time limit of 0.3 s" in (job.error_message or "")
    assert [(row(db_url, j).status, row(db_url, j).attempts) for j in later] == [("pending", 0)] * 2
    assert [gen.executions[j] for j in later] == [0, 0]
    assert daemon.held.jobs == [] and daemon.held.next == [] and daemon.completer.pending == []


def test_daemon__leases_renewed_through_a_round_of_short_calls(engine: sa.Engine, db_url: str,
                                                               outputs: Path) -> None:
    """A claim rendered in many backend calls, each shorter than the heartbeat interval but together
    longer than the lease, keeps every lease alive: each job runs once and completes, nothing is
    fenced. Heartbeats used to be timed per call, so these leases expired and the daemon's own
    rescue took its waiting jobs back, to render them again and fence the first outcome."""
    gen = ScriptedGenerator(max_batch_size=1)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, batch_size=8, lease_seconds=1.5,
                         heartbeat_seconds=0.5, rescue_interval_seconds=0.1)
    jobs = [enqueue(db_url, "work:0.25") for _ in range(8)]  # 2 s in all
    assert daemon.run(burst=True) == 0
    assert [gen.executions[j] for j in jobs] == [1] * 8
    assert [hooks.outcomes(j) for j in jobs] == [["completed"]] * 8
    assert {(row(db_url, j).status, row(db_url, j).attempts) for j in jobs} == {("completed", 1)}


def test_daemon__liveness_stops_while_a_call_is_stuck_not_while_loading(engine: sa.Engine, db_url: str,
                                                                       outputs: Path) -> None:
    """Loading the generator (minutes, for a big model) is healthy, however long it takes. A
    call stuck past its time limit stops the loop's liveness hook (the metric the stall alert
    reads) as well as healthy(); they resume once the call returns. The hook used to go on."""
    loading = threading.Event()

    class SlowToLoad(ScriptedGenerator):
        def load(self) -> None:
            super().load()
            loading.wait(10)

    class Loops(RecordingHooks):
        rounds = 0

        def on_loop(self, monotonic: float) -> None:
            self.rounds += 1

    hooks = Loops()
    gen = SlowToLoad()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, job_timeout_seconds=0.3)
    starting = threading.Thread(target=daemon.start)
    starting.start()
    daemon._last_loop -= 3600  # as if the load had taken an hour
    assert daemon.healthy()
    loading.set()
    starting.join(10)
    assert daemon.healthy()
    enqueue(db_url, "block")
    assert daemon.run_once() == 1 and daemon.runner.stuck  # past its time limit, still running
    before = hooks.rounds
    daemon.tick()
    assert hooks.rounds == before and not daemon.healthy()
    gen.gate.set()
    wait_until(lambda: not daemon.runner.busy, 10, "the stuck call to return")
    daemon.tick()
    assert hooks.rounds == before + 1 and daemon.healthy()
    daemon.shutdown()


def test_daemon__heartbeat_extends_lease(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """While a job runs, its lease is pushed forward by heartbeats."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen, lease_seconds=2.0, heartbeat_seconds=0.1)
    job_id = enqueue(db_url, "block")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    assert gen.entered.wait(10)
    first = row(db_url, job_id).lease_expires_at
    assert first is not None
    for _ in range(1000):
        current = row(db_url, job_id).lease_expires_at
        if current is not None and current > first:
            break
        gen.gate.wait(0.01)
    gen.gate.set()
    thread.join(10)
    assert current is not None and current > first


def test_cancel__pending_cancelled_running_asked(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """Cancelling a pending job fails it as cancelled; cancelling a running one asks its daemon
    (tests/integration/test_progress_cancel.py follows it to the end)."""
    gen = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, gen)
    running = enqueue(db_url, "block")
    thread = threading.Thread(target=daemon.run_once)
    thread.start()
    assert gen.entered.wait(10)
    waiting = enqueue(db_url, "fine")
    with session_scope(get_engine(db_url)) as s:
        assert cancel_generation(s, waiting).error_message == "cancelled by request"
        assert cancel_generation(s, running).cancel_requested_at is not None
    gen.gate.set()
    thread.join(10)
    assert row(db_url, waiting).status == "failed"


def test_daemon__new_worker_ids_are_unique(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """Each daemon gets its own instance id."""
    a = make_daemon(db_url, outputs, ScriptedGenerator())
    b = make_daemon(db_url, outputs, ScriptedGenerator())
    assert isinstance(a, Daemon) and a.worker_id != b.worker_id


def test_daemon__metadata_seed_overrides_and_bad_seed_fails(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """metadata.seed reaches the backend as the request's seed; a bad seed fails only its job."""
    gen = ScriptedGenerator()
    seeds: list[int] = []
    original = gen.generate

    def spy(requests):  # type: ignore[no-untyped-def]
        seeds.extend(r.seed for r in requests)
        return original(requests)

    gen.generate = spy  # type: ignore[method-assign]
    daemon = make_daemon(db_url, outputs, gen)
    chosen = enqueue(db_url, "fine", metadata={"seed": 1234})
    bad = enqueue(db_url, "fine")
    with engine.begin() as conn:  # the door refuses it now: a row written by plain SQL
        conn.execute(sa.update(G).where(G.c.id == bad).values(metadata={"seed": -5}))
    daemon.run(burst=True)
    assert seeds == [1234]
    assert row(db_url, chosen).status == "completed"
    job = row(db_url, bad)
    assert job.status == "failed" and "metadata.seed=-5" in (job.error_message or "")


def test_daemon__next_batch_renders_while_outcomes_are_written(engine: sa.Engine, db_url: str,
                                                                outputs: Path) -> None:
    """A claim larger than the backend's batch runs as several backend calls; each call starts
    before the outcomes of the one before are written, so the backend is never idle on the database."""
    calls: list[list[str]] = []
    second_started = threading.Event()

    class Counting(SilenceGenerator):
        def generate(self, requests):  # type: ignore[no-untyped-def]
            calls.append([r.job_id for r in requests])
            if len(calls) == 2:
                second_started.set()
            return super().generate(requests)

    overlapped: list[bool] = []

    class Watching(RecordingHooks):
        def on_job_finished(self, job, outcome, **kw):  # type: ignore[no-untyped-def]
            if calls and job.id in calls[0]:  # the first call's outcomes are being written
                overlapped.append(second_started.wait(10))
            super().on_job_finished(job, outcome, **kw)

    hooks = Watching()
    daemon = make_daemon(db_url, outputs, Counting(models=["silence"], max_batch_size=2), hooks=hooks,
                         batch_size=6)
    ids = [enqueue(db_url, f"beat {i}", model="silence") for i in range(6)]
    assert daemon.run_once() == 6
    assert [len(c) for c in calls] == [2, 2, 2] and sorted(i for c in calls for i in c) == sorted(ids)
    assert overlapped == [True, True]
    assert all(row(db_url, job_id).status == "completed" for job_id in ids)


def test_daemon__prefetch_claims_next_batch_while_one_renders(engine: sa.Engine, db_url: str,
                                                              outputs: Path) -> None:
    """With worker.prefetch the next batch is claimed (and its lease kept) while the current one is
    still in the backend; every job then completes once, at its first attempt."""
    gen = ScriptedGenerator(max_batch_size=2)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, batch_size=2, prefetch=True,
                         lease_seconds=2.0, heartbeat_seconds=0.1)
    blocked = [enqueue(db_url, "block") for _ in range(2)]
    waiting = [enqueue(db_url, "fine") for _ in range(2)]
    later = [enqueue(db_url, "fine") for _ in range(3)]
    thread = threading.Thread(target=daemon.run, kwargs={"burst": True})
    thread.start()
    try:
        assert gen.entered.wait(10)
        wait_until(lambda: all(row(db_url, j).status == "processing" for j in waiting), 10, "the prefetch claim")
        first = {j: row(db_url, j).lease_expires_at for j in waiting}
        assert all(row(db_url, j).worker_id == daemon.worker_id for j in waiting)
        assert all(row(db_url, j).status == "pending" for j in later), "only one batch is prefetched"
        wait_until(lambda: all(row(db_url, j).lease_expires_at > first[j] for j in waiting),  # type: ignore[operator]
                   10, "a heartbeat on the prefetched jobs")
    finally:
        gen.gate.set()
        thread.join(10)
    assert not thread.is_alive()
    for job_id in blocked + waiting + later:
        job = row(db_url, job_id)
        assert (job.status, job.attempts, job.worker_id) == ("completed", 1, daemon.worker_id)
        assert hooks.outcomes(job_id) == ["completed"] and gen.executions[job_id] == 1


def test_daemon__stop_gives_prefetched_jobs_back_unspent(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A stop lets the running batch finish and gives the prefetched one back without spending
    an attempt; nothing is left processing."""
    gen = ScriptedGenerator(max_batch_size=2)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, batch_size=2, prefetch=True, grace_seconds=60.0)
    running = [enqueue(db_url, "block") for _ in range(2)]
    prefetched = [enqueue(db_url, "fine") for _ in range(2)]
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        assert gen.entered.wait(10)
        wait_until(lambda: all(row(db_url, j).status == "processing" for j in prefetched), 10, "the prefetch claim")
        daemon.request_stop()
    finally:
        gen.gate.set()
        thread.join(10)
    assert not thread.is_alive()
    for job_id in running:
        assert (row(db_url, job_id).status, hooks.outcomes(job_id)) == ("completed", ["completed"])
    for job_id in prefetched:
        job = row(db_url, job_id)
        assert (job.status, job.attempts, job.worker_id, job.lease_expires_at) == ("pending", 0, None, None)
        assert hooks.outcomes(job_id) == ["released"] and gen.executions[job_id] == 0


@pytest.mark.parametrize("backend_batch", [1, 3])
def test_daemon__prefetch_burst_runs_each_job_once(engine: sa.Engine, db_url: str, outputs: Path,
                                                   backend_batch: int) -> None:
    """With prefetch, a burst over several claims (and claims split over backend calls, with
    retries re-claimed by the same transaction) writes every outcome once and leaves nothing held."""
    gen = ScriptedGenerator(max_batch_size=backend_batch)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, batch_size=3, prefetch=True)
    fine = [enqueue(db_url, f"beat {i}") for i in range(10)]
    flaky = enqueue(db_url, "transient:1")
    assert daemon.run(burst=True) == 0
    for job_id in fine:
        assert (row(db_url, job_id).status, hooks.outcomes(job_id), gen.executions[job_id]) == (
            "completed", ["completed"], 1)
    assert (row(db_url, flaky).status, row(db_url, flaky).attempts) == ("completed", 2)
    assert hooks.outcomes(flaky) == ["retried", "completed"]
    assert daemon.held.jobs == [] and daemon.held.next == [] and daemon.completer.pending == []


def test_daemon__stuck_backend_gives_prefetched_jobs_back(engine: sa.Engine, db_url: str, outputs: Path) -> None:
    """A call past its time limit is retried; the jobs prefetched during it go back unspent, since
    nothing new can start until the stuck call returns."""
    gen = ScriptedGenerator(max_batch_size=1)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, gen, hooks=hooks, batch_size=1, prefetch=True, job_timeout_seconds=0.3)
    stuck = enqueue(db_url, "block")
    prefetched = enqueue(db_url, "fine")
    try:
        assert daemon.run_once() == 1
        assert hooks.claimed == [stuck, prefetched]
        assert row(db_url, stuck).status == "pending" and "time limit" in (row(db_url, stuck).error_message or "")
        job = row(db_url, prefetched)
        assert (job.status, job.attempts, job.worker_id) == ("pending", 0, None)
        assert hooks.outcomes(prefetched) == ["released"] and daemon.held.jobs == [] and daemon.held.next == []
    finally:
        gen.gate.set()


def impatient_store(engine: sa.Engine, retry_for_seconds: float) -> QueueClient:
    """A queue client for the ScriptedGenerator's daemon that gives up on a locked database soon."""
    return QueueClient(engine, worker_id=new_worker_id(), models=["scripted"], lease=timedelta(seconds=30),
                       retry_for_seconds=retry_for_seconds)


def test_daemon__steps_skip_a_database_outage_and_log_it(sqlite_db_url: str, outputs: Path) -> None:
    """Heartbeat, rescue and giving jobs back, with the database locked past the store's retries:
    each step is skipped and logged (the give-back as an error: the lease rescue returns those
    jobs later), nothing is raised, and the job keeps its lease. Other errors still raise."""
    url = sqlite_db_url
    init_db(url)
    engine = create_engine(url, DatabaseSettings(sqlite_busy_timeout_ms=20))
    hooks = RecordingHooks()
    daemon = Daemon(make_settings(url, outputs), engine=engine, generator=ScriptedGenerator(), hooks=hooks,
                    queue=impatient_store(engine, 0.2))
    job_id = enqueue(url, "x")
    daemon.held.jobs.extend(daemon.store.claim(1))
    locker = sqlite3.connect(str(sqlite_path(url)), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # holds the write lock: every write of the daemon is busy
    try:
        with capture_logs() as logs:
            daemon.heartbeat.run_once()
            daemon.rescuer.run_once()
            daemon.completer.release()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    skipped = {entry["event"]: entry for entry in logs if "error" in entry}
    assert skipped["heartbeat failed: database unavailable"]["log_level"] == "warning"
    assert skipped["rescue skipped: database unavailable"]["log_level"] == "warning"
    released = skipped["could not give jobs back; their leases will expire and be rescued"]
    assert released["log_level"] == "error" and released["jobs"] == [job_id]
    assert "database is locked" in released["error"]
    job = row(url, job_id)
    assert job.status == "processing" and job.worker_id == daemon.worker_id
    # No longer held, so no longer in flight (the gauge counts it off): the rescue has it now.
    assert daemon.held.jobs == [] and hooks.outcomes(job_id) == ["abandoned"]
    with pytest.raises(ValueError, match="a bug"), outage_skips(daemon.log, "not an outage"):
        raise ValueError("a bug")
    daemon.store.close()
    engine.dispose()


def test_daemon__outage_while_a_batch_renders_keeps_it_and_every_outcome(sqlite_db_url: str,
                                                                        outputs: Path) -> None:
    """The database locked past the store's retries while the second backend call renders: writing
    the first call's outcome is put off, not given up. The rendering batch is neither released
    (another daemon would render it again) nor dropped, and once the lock goes both jobs complete,
    each rendered once. A round that cannot write at all keeps its outcomes for the next one."""
    url = sqlite_db_url
    init_db(url)
    engine = create_engine(url, DatabaseSettings(sqlite_busy_timeout_ms=20))
    generator = ScriptedGenerator(max_batch_size=1)
    locker = sqlite3.connect(str(sqlite_path(url)), isolation_level=None, check_same_thread=False)

    class LockOnClaim(RecordingHooks):
        def on_claimed(self, jobs: Any, now: Any) -> None:
            super().on_claimed(jobs, now)
            if len(self.claimed) in (2, 3):  # the jobs are held: now every write of the daemon is busy
                locker.execute("BEGIN IMMEDIATE")

    hooks = LockOnClaim()
    daemon = Daemon(make_settings(url, outputs, batch_size=2), engine=engine, generator=generator, hooks=hooks,
                    queue=impatient_store(engine, 0.2))
    first, second = enqueue(url, "fine"), enqueue(url, "block")
    results: list[int] = []
    with capture_logs() as logs:
        thread = threading.Thread(target=lambda: results.append(daemon.run_once()))
        thread.start()
        try:
            assert generator.entered.wait(10), "the second call never started"
            wait_until(lambda: any(e["event"].startswith("could not write outcomes yet") for e in logs), 10,
                       "the first outcome's write to fail")
            assert row(url, second).status == "processing" and hooks.finished == []
        finally:
            locker.execute("ROLLBACK")
            generator.gate.set()
            thread.join(10)
    assert results == [2]
    assert [row(url, j).status for j in (first, second)] == ["completed", "completed"]
    assert generator.executions == {first: 1, second: 1}
    assert sorted(hooks.finished) == sorted([(first, "completed", None), (second, "completed", None)])

    # A round whose every write fails keeps its outcome and its lease, and the next round writes it.
    third = enqueue(url, "fine")
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):
        daemon.run_once()  # claims the third job (the hook then takes the lock) and renders it
    locker.execute("ROLLBACK")
    assert [o.job.id for o in daemon.completer.pending] == [third] and [j.id for j in daemon.held.jobs] == [third]
    assert row(url, third).status == "processing"
    assert daemon.run_once() == 0 and row(url, third).status == "completed"
    assert generator.executions[third] == 1 and daemon.held.jobs == [] and daemon.completer.pending == []
    daemon.store.close()
    locker.close()
    engine.dispose()


def test_daemon__stop_keeps_finished_jobs_whose_outcomes_it_could_not_write(sqlite_db_url: str,
                                                                            outputs: Path) -> None:
    """A stop whose last outcome write fails leaves that finished job held, for the lease rescue,
    as the log says, and still gives back the claimed job that never ran. Giving the finished job
    back too would refund its attempt and have another daemon render it again."""
    url = sqlite_db_url
    init_db(url)
    engine = create_engine(url, DatabaseSettings(sqlite_busy_timeout_ms=20))
    generator = ScriptedGenerator(max_batch_size=1)
    hooks = RecordingHooks()
    daemon = Daemon(make_settings(url, outputs, batch_size=1, prefetch=True), engine=engine, generator=generator,
                    hooks=hooks, queue=impatient_store(engine, 1.0))
    finished, claimed = enqueue(url, "fine"), enqueue(url, "fine")
    assert daemon.run_once() == 1  # prefetch: the outcome waits for the next round, the next job is held
    assert [o.job.id for o in daemon.completer.pending] == [finished] and [j.id for j in daemon.held.next] == [claimed]
    locker = sqlite3.connect(str(sqlite_path(url)), isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")
    with capture_logs() as logs:
        def unlock_once_the_write_failed() -> None:  # the database is back for the give-back
            wait_until(lambda: any(e["event"].startswith("could not write the last outcomes") for e in logs), 10,
                       "the last write to fail")
            locker.execute("ROLLBACK")

        unlocker = threading.Thread(target=unlock_once_the_write_failed)
        unlocker.start()
        daemon.shutdown()
        unlocker.join(10)
    job = row(url, finished)
    assert (job.status, job.attempts, job.worker_id) == ("processing", 1, daemon.worker_id)
    assert hooks.outcomes(finished) == [] and generator.executions[finished] == 1
    job = row(url, claimed)
    assert (job.status, job.attempts, hooks.outcomes(claimed)) == ("pending", 0, ["released"])
    locker.close()
    engine.dispose()


def writing_behind(db_url: str, outputs: Path, monkeypatch: pytest.MonkeyPatch, *, threshold: float = 1e-9,
                   engine_rule: bool = False, hooks: RecordingHooks | None = None) -> Daemon:
    """A daemon claiming one job at a time whose write-behind threshold is ``threshold`` (the default:
    any backend call is longer). With ``engine_rule`` each engine keeps its own choice (SQLite never
    writes behind); without it both engines write behind, as PostgreSQL does."""
    from dgxqueue.daemon import completer

    monkeypatch.setattr(completer, "HIDE_WRITES_AFTER", threshold)
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(max_batch_size=1), hooks=hooks, batch_size=1)
    if not engine_rule:
        daemon.completer.writes_behind = True
    return daemon


@pytest.mark.parametrize("slow", [True, False], ids=["behind-the-next-render", "with-the-claim"])
def test_daemon__outcomes_written_behind_a_long_render_or_with_the_claim(
    engine: sa.Engine, db_url: str, outputs: Path, monkeypatch: pytest.MonkeyPatch, slow: bool,
) -> None:
    """On PostgreSQL, after a backend call longer than a transaction's fixed cost, the next jobs are
    claimed alone and the outcomes wait to be written while the next call renders; after a shorter
    call, and always on SQLite (one writer lock for every process), they go in the claim's
    transaction. Either way each outcome is written once."""
    hooks = RecordingHooks()
    daemon = writing_behind(db_url, outputs, monkeypatch, threshold=1e-9 if slow else 60.0, engine_rule=True,
                            hooks=hooks)
    first, second = enqueue(db_url, "fine"), enqueue(db_url, "fine")
    assert daemon.run_once() == 1
    assert [job.id for job in daemon.held.next] == [second]
    if slow and engine.dialect.name == "postgresql":
        assert [o.job.id for o in daemon.completer.pending] == [first] and hooks.finished == []
        assert row(db_url, first).status == "processing"
    else:
        assert daemon.completer.pending == [] and hooks.outcomes(first) == ["completed"]
        assert row(db_url, first).status == "completed"
    assert daemon.run_once() == 1
    assert daemon.run_once() == 0 and daemon.completer.pending == [] and daemon.held.jobs == []
    assert [row(db_url, j).status for j in (first, second)] == ["completed", "completed"]
    assert hooks.outcomes(first) == hooks.outcomes(second) == ["completed"]


def test_daemon__stop_writes_outcomes_left_behind_and_gives_claimed_jobs_back(
    engine: sa.Engine, db_url: str, outputs: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop between rounds, with the last outcome waiting to be written behind the next render:
    shutting down writes it and gives the jobs claimed for the next round back unspent."""
    hooks = RecordingHooks()
    daemon = writing_behind(db_url, outputs, monkeypatch, hooks=hooks)
    first, second = enqueue(db_url, "fine"), enqueue(db_url, "fine")
    assert daemon.run_once() == 1
    assert [o.job.id for o in daemon.completer.pending] == [first] and [j.id for j in daemon.held.next] == [second]
    daemon.request_stop()
    daemon.shutdown()
    assert row(db_url, first).status == "completed" and hooks.outcomes(first) == ["completed"]
    job = row(db_url, second)
    assert (job.status, job.attempts, job.worker_id) == ("pending", 0, None)
    assert hooks.outcomes(second) == ["released"] and daemon.held.jobs == []


def test_daemon__a_round_without_a_backend_call_writes_its_outcomes_with_the_claim(
    engine: sa.Engine, db_url: str, outputs: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writing behind needs a render to hide behind: a round whose jobs were all refused writes
    the outcomes left from before, and its own, with the next claim, so a run of bad jobs cannot
    pile up unwritten outcomes."""
    daemon = writing_behind(db_url, outputs, monkeypatch)
    first, refused, third = enqueue(db_url, "fine"), enqueue(db_url, "invalid"), enqueue(db_url, "fine")
    assert daemon.run_once() == 1 and [o.job.id for o in daemon.completer.pending] == [first]
    assert daemon.run_once() == 1  # the refused job: no backend call
    assert daemon.completer.pending == [] and [j.id for j in daemon.held.next] == [third]
    assert row(db_url, first).status == "completed" and row(db_url, refused).status == "failed"
    # Closed, not left to the garbage collector: its last round made no render call, so nothing
    # keeps the daemon alive, and a collected daemon drops its connection unclosed (ResourceWarning).
    daemon.request_stop()
    daemon.shutdown()
