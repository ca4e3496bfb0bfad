"""Results published after their commit, on real SQLite and PostgreSQL: the sweep that settles the
temporaries crashes leave, and the daemon's own publish and discard."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from structlog.testing import capture_logs

from dgxqueue.audio import Folders, read_wav, stage_wav
from dgxqueue.daemon import staging
from dgxqueue.daemon.executor import prepare, render
from dgxqueue.generators import GeneratedAudio
from dgxqueue.storage import Generation, create_generations, get_engine, init_db, queue, session_scope
from dgxqueue.storage.models import utcnow
from dgxqueue.storage.queue import AttemptState
from dgxqueue.storage.results import Completed
from tests.support.chaos import ChaosGenerator
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.generators import ScriptedGenerator
from tests.support.processes import wait_until

AUDIO = GeneratedAudio(samples=np.full((1, 80), 0.5, np.float32), sample_rate=8000)
SIZE = 44 + 80 * 2


def enqueue(url: str, n: int, prompt: str = "fine") -> list[str]:
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [{"prompt": prompt, "model_name": "scripted", "duration_seconds": 0.01,
                                       "sample_rate": 8000, "channels": 1} for _ in range(n)])


def set_row(url: str, job_id: str, **values: Any) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(sa.update(Generation).where(Generation.id == job_id).values(**values))


def lookup(url: str) -> staging.Lookup:
    def states(ids: Sequence[str]) -> dict[str, AttemptState]:
        with session_scope(get_engine(url)) as s:
            return queue.attempt_states(s, ids)
    return states


def stage(outputs: Path, job_id: str, attempt: int, worker: str, name: str | None = None, *,
          publish: bool = False) -> str:
    """A temporary as a daemon leaves it when it dies: written (marked as the job's), fsynced, not
    renamed; or, with ``publish``, renamed into place as after its commit."""
    folders = Folders(str(outputs.resolve()))
    staged = stage_wav(str(outputs / (name or f"{job_id}.wav")), AUDIO, tag=staging.tag(job_id, attempt, worker),
                       folders=folders, owner=job_id)
    staged.publish() if publish else staged.leave()
    folders.release()
    return staged.temp


def test_sweep__publishes_the_completed_attempt_keeps_the_running_one_deletes_the_rest(
        db_url: str, tmp_path: Path) -> None:
    """Temporaries crashes left: the completed attempt's is renamed into place, the running
    attempt's (lease expired, not yet rescued) kept, every dead attempt's deleted; a user's own
    hidden file is not touched."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    done, running, rescued, failed, wrong_size = enqueue(db_url, 5)
    expired = utcnow() - timedelta(minutes=5)
    set_row(db_url, done, status="completed", worker_id="w1", attempts=2, file_size_bytes=SIZE)
    set_row(db_url, running, status="processing", worker_id="w1", attempts=1, lease_expires_at=expired)
    set_row(db_url, rescued, status="pending", worker_id=None, attempts=1)
    set_row(db_url, failed, status="failed", worker_id="w1", attempts=1)
    set_row(db_url, wrong_size, status="completed", worker_id="w1", attempts=1, file_size_bytes=SIZE + 2)
    kept = stage(outputs, running, 1, "w1")
    stage(outputs, done, 2, "w1")
    deleted_job = stage(outputs, "3f0c7d7e-0000-4000-8000-000000000000", 1, "w1")  # a deleted job's, old
    aged = time.time() - staging.UNKNOWN_JOB_GRACE - 60
    os.utime(outputs / deleted_job, (aged, aged))
    dead = [stage(outputs, done, 1, "w1"), stage(outputs, done, 2, "w2"), stage(outputs, running, 1, "w2"),
            stage(outputs, rescued, 1, "w1"), stage(outputs, failed, 1, "w1"), deleted_job]
    odd = stage(outputs, wrong_size, 1, "w1")
    unknown = stage(outputs, "0b9d2f7e-0000-4000-8000-000000000000", 1, "w9")  # no row yet: maybe another queue's
    (outputs / ".notes.tmp").write_text("mine")
    swept = staging.sweep(outputs, lookup(db_url))
    assert swept.published == [f"outputs/{done}.wav"] and swept.kept == 2
    assert sorted(os.path.basename(p) for p in swept.deleted) == sorted(dead)
    assert sorted(os.listdir(outputs)) == sorted([".notes.tmp", f"{done}.wav", kept, odd, unknown])
    assert (outputs / f"{done}.wav").stat().st_size == SIZE


def test_sweep__settles_temporaries_in_subfolders(db_url: str, tmp_path: Path) -> None:
    """A job whose file_path names a subfolder has its temporary there; the sweep finds it."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1)
    set_row(db_url, job_id, status="completed", worker_id="w", attempts=1, file_size_bytes=SIZE,
            file_path="outputs/a/b/song.wav")
    (outputs / "a" / "b").mkdir(parents=True)
    stage(outputs / "a" / "b", job_id, 1, "w", name="song.wav")
    assert staging.sweep(outputs, lookup(db_url)).published == ["outputs/a/b/song.wav"]
    assert os.listdir(outputs / "a" / "b") == ["song.wav"]


def test_sweep__never_acts_through_a_link_out_of_the_outputs_folder(sqlite_db_url: str, tmp_path: Path) -> None:
    """A folder inside outputs that is a link elsewhere is not walked: temporaries there (a dead
    attempt's, a completed one's) stay as they are, nothing is renamed into that place."""
    url = sqlite_db_url
    init_db(url)
    outputs, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    outputs.mkdir()
    elsewhere.mkdir()
    (outputs / "out").symlink_to(elsewhere, target_is_directory=True)
    done, dead = enqueue(url, 2)
    set_row(url, done, status="completed", worker_id="w", attempts=1, file_size_bytes=SIZE,
            file_path="outputs/out/x.wav")
    set_row(url, dead, status="pending", worker_id=None, attempts=1)
    names = sorted([stage(elsewhere, done, 1, "w", name="x.wav"), stage(elsewhere, dead, 1, "w")])
    swept = staging.sweep(outputs, lookup(url))
    assert swept == staging.Swept() and sorted(os.listdir(elsewhere)) == names


def test_render__stages_each_file_without_publishing_it(db_url: str, tmp_path: Path) -> None:
    """After the backend call a result exists only under its attempt's temporary name, beside its
    path; the path itself appears only when the main loop publishes it."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1)
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), worker_id="w")
    [job] = daemon.store.claim(1)
    work, _ = prepare([job], daemon.generator)
    [outcome] = render(daemon.generator, work, outputs, "w")
    assert outcome.error is None and outcome.staged is not None
    [temp] = os.listdir(outputs)
    assert staging.owner(temp) == staging.Owner(job_id, 1, staging.worker_hash("w"))
    outcome.staged.publish()
    assert os.listdir(outputs) == [f"{job_id}.wav"]
    daemon.shutdown()


def test_daemon__a_fenced_result_is_deleted_and_never_replaces_the_file(db_url: str, tmp_path: Path) -> None:
    """A result whose outcome write is fenced off (its row was taken back and completed by another
    attempt meanwhile) is deleted; the completed attempt's file stays."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks, worker_id="late")
    [job] = daemon.store.claim(1)
    work, _ = prepare([job], daemon.generator)
    outcomes = render(daemon.generator, work, outputs, daemon.worker_id)
    outputs.joinpath(f"{job_id}.wav").write_bytes(b"the other attempt's")
    set_row(db_url, job_id, status="completed", worker_id="other", attempts=2, file_size_bytes=19)
    daemon.completer.record(outcomes)
    assert hooks.outcomes(job_id) == ["fenced"]
    assert os.listdir(outputs) == [f"{job_id}.wav"]
    assert outputs.joinpath(f"{job_id}.wav").read_bytes() == b"the other attempt's"
    daemon.shutdown()


def test_daemon__a_result_whose_commit_reply_was_lost_is_published(db_url: str, tmp_path: Path) -> None:
    """The outcome committed but its reply was lost, so the retried write finds the job already
    completed, by this very attempt: the file is published and the job counted completed, not fenced."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks)
    [job] = daemon.store.claim(1)
    work, _ = prepare([job], daemon.generator)
    [outcome] = render(daemon.generator, work, outputs, daemon.worker_id)
    result = Completed(utcnow(), 0.1, outcome.file_size, outcome.metadata)
    assert daemon.store.finish([(job, result)]) == [True]  # the first try, whose reply never came
    daemon.completer.record([outcome])  # the retry
    assert hooks.outcomes(job_id) == ["completed"]
    assert os.listdir(outputs) == [f"{job_id}.wav"]
    assert outputs.joinpath(f"{job_id}.wav").stat().st_size == outcome.file_size
    daemon.shutdown()


def test_daemon__a_result_the_database_refuses_is_recorded_failed_and_never_published(
        db_url: str, tmp_path: Path) -> None:
    """A completed result whose values the database refuses (a size past the column's range) is
    recorded failed instead by the outcome write's last line of defence: its file is deleted, not
    published beside a failed row, and the hooks count it failed."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks)
    [job] = daemon.store.claim(1)
    work, _ = prepare([job], daemon.generator)
    [outcome] = render(daemon.generator, work, outputs, daemon.worker_id)
    daemon.completer.record([dataclasses.replace(outcome, file_size=2**70)])
    assert hooks.outcomes(job_id) == ["failed"]
    assert os.listdir(outputs) == []
    with get_engine(db_url).connect() as conn:
        status, error = conn.execute(
            sa.select(Generation.status, Generation.error_message).where(Generation.id == job_id)).one()
    assert status == "failed" and (error or "").startswith("the outcome could not be stored")
    daemon.shutdown()


def test_daemon__an_attempt_superseded_by_its_own_daemons_new_claim_is_never_recorded(
        db_url: str, tmp_path: Path) -> None:
    """A daemon whose lease lapsed can claim the requeued job again with the same fencing token
    (the rescue refunded an attempt that never started): the earlier attempt's result, arriving
    first, is dropped with its file, and the row and the file are the new attempt's."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1)
    hooks = RecordingHooks()
    generator = ChaosGenerator(models=["scripted"], work_seconds=0.0)
    daemon = make_daemon(db_url, outputs, generator, hooks=hooks)
    [first] = daemon.store.claim(1)
    daemon.claimer.take([first], utcnow())
    daemon.held.next.clear()  # started, as run_once starts what _next holds
    [stale] = render(generator, prepare([first], generator)[0], outputs, daemon.worker_id)
    # The lease lapsed and the rescue gave the attempt back; this daemon claims the job again.
    set_row(db_url, job_id, status="pending", attempts=first.attempt - 1, worker_id=None, lease_expires_at=None)
    [again] = daemon.store.claim(1)
    assert (again.id, again.attempt) == (first.id, first.attempt)
    daemon.claimer.take([again], utcnow())
    daemon.held.next.clear()
    [fresh] = render(generator, prepare([again], generator)[0], outputs, daemon.worker_id)
    daemon.completer.record([stale])
    daemon.completer.record([fresh])
    assert hooks.outcomes(job_id) == ["fenced", "completed"]
    assert os.listdir(outputs) == [f"{job_id}.wav"]
    samples, _ = read_wav(outputs / f"{job_id}.wav")
    with session_scope(get_engine(db_url)) as s:
        row = s.get(Generation, job_id)
        assert row is not None and row.status == "completed" and row.meta is not None
        assert abs(float(np.abs(samples).max()) - row.meta["peak"]) < 2e-4
        assert row.meta["level"] == fresh.metadata["level"]
    daemon.shutdown()


def test_daemon__a_call_abandoned_at_its_time_limit_never_publishes(db_url: str, tmp_path: Path) -> None:
    """A backend call past worker.job_timeout_seconds is charged and given up on; when it returns
    anyway, after another attempt completed the job, its file is deleted, not renamed over that
    attempt's."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1, prompt="block")
    generator = ScriptedGenerator()
    daemon = make_daemon(db_url, outputs, generator, job_timeout_seconds=0.2)
    assert daemon.run_once() == 1
    with get_engine(db_url).connect() as conn:
        charged = conn.execute(sa.select(Generation.status, Generation.attempts).where(Generation.id == job_id)).one()
    assert daemon.runner.busy and tuple(charged) == ("pending", 1)
    outputs.mkdir(exist_ok=True)
    outputs.joinpath(f"{job_id}.wav").write_bytes(b"the next attempt's")
    set_row(db_url, job_id, status="completed", worker_id="next", attempts=2, file_size_bytes=18)
    generator.gate.set()
    wait_until(lambda: not daemon.runner.busy, 10, "the abandoned call to return")
    assert os.listdir(outputs) == [f"{job_id}.wav"]
    assert outputs.joinpath(f"{job_id}.wav").read_bytes() == b"the next attempt's"
    daemon.shutdown()


def test_sweep__leaves_another_queues_temporary_in_a_shared_outputs_folder(sqlite_db_url: str,
                                                                             tmp_path: Path) -> None:
    """Two queues (two databases) write into one outputs folder: one queue's sweep, which finds no
    row for the other's job, does not delete the result that job's attempt is about to commit and
    publish; that result lands at its file_path."""
    theirs, ours = sqlite_db_url, f"sqlite:///{tmp_path / 'ours.db'}"
    init_db(theirs)
    init_db(ours)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(theirs, 1)
    hooks = RecordingHooks()
    daemon = make_daemon(theirs, outputs, ScriptedGenerator(), hooks=hooks, worker_id="theirs")
    neighbour = make_daemon(ours, outputs, ScriptedGenerator(), worker_id="ours")
    try:
        [job] = daemon.store.claim(1)
        work, _ = prepare([job], daemon.generator)
        outcomes = render(daemon.generator, work, outputs, daemon.worker_id)
        neighbour.sweeper.run_once()  # between the staging and the commit
        daemon.completer.record(outcomes)
        assert hooks.outcomes(job_id) == ["completed"]
        assert os.listdir(outputs) == [f"{job_id}.wav"]
        assert outputs.joinpath(f"{job_id}.wav").stat().st_size == outcomes[0].file_size
    finally:
        daemon.shutdown()
        neighbour.shutdown()


def _completed_result_beside_anothers_file(db_url: str, tmp_path: Path,
                                           holder: str | None = None) -> tuple[Path, str, str, Path]:
    """A completed job whose result a crash left under its temporary name, while its path holds a
    file that is not its (``holder``: job ``holder``'s WAV, marked with its id): the outputs
    folder, the job's id, the temporary's name and the path."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    [job_id] = enqueue(db_url, 1)
    set_row(db_url, job_id, status="completed", worker_id="w", attempts=1, file_size_bytes=SIZE)
    temp = stage(outputs, job_id, 1, "w")
    target = outputs / f"{job_id}.wav"
    if holder is None:
        target.write_bytes(b"not this job's")
    else:
        stage(outputs, holder, 1, "w", name=target.name, publish=True)
    return outputs, job_id, temp, target


def test_sweep__never_replaces_a_file_already_at_a_completed_jobs_path(db_url: str, tmp_path: Path) -> None:
    """A completed attempt's temporary, left by a crash, whose path meanwhile holds a file that is
    not its (an archived job's, another queue's, one put there by hand): the sweep leaves both as
    they are. Once that file is moved away, the next sweep publishes the result."""
    outputs, job_id, temp, target = _completed_result_beside_anothers_file(db_url, tmp_path)
    assert staging.sweep(outputs, lookup(db_url)).published == []
    assert sorted(os.listdir(outputs)) == sorted([temp, target.name])
    assert target.read_bytes() == b"not this job's"
    target.rename(tmp_path / "moved.wav")
    assert staging.sweep(outputs, lookup(db_url)).published == [f"outputs/{job_id}.wav"]
    assert os.listdir(outputs) == [target.name] and target.stat().st_size == SIZE


def test_sweep__names_the_job_whose_wav_holds_a_completed_jobs_path(db_url: str, tmp_path: Path) -> None:
    """The file at a completed job's path, which the sweep leaves as it is, is another job's WAV
    (marked with its id): the warning names that job, so the operator knows whose file to move."""
    outputs, job_id, temp, _ = _completed_result_beside_anothers_file(db_url, tmp_path, holder="archived-job")
    with capture_logs() as logs:
        assert staging.sweep(outputs, lookup(db_url)).published == []
    [warning] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warning["temporary"] == temp and warning["holder"] == "archived-job", warning
    assert sorted(os.listdir(outputs)) == sorted([temp, f"{job_id}.wav"])


def test_sweep__replaces_the_jobs_own_wav_whose_completion_the_database_lost(db_url: str, tmp_path: Path) -> None:
    """Attempt 1's WAV was renamed into place and its completion lost by the database (a power cut
    under SQLite's synchronous = NORMAL, a restore); attempt 2 completed and its daemon died before
    the rename. The file at the path is the job's own: the sweep publishes attempt 2's result over
    it, leaving no temporary behind (not both kept for good, logged as another's file)."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    [job_id] = enqueue(db_url, 1)
    stage(outputs, job_id, 1, "w", publish=True)
    set_row(db_url, job_id, status="completed", worker_id="w", attempts=2, file_size_bytes=SIZE)
    stage(outputs, job_id, 2, "w")
    assert staging.sweep(outputs, lookup(db_url)).published == [f"outputs/{job_id}.wav"]
    assert os.listdir(outputs) == [f"{job_id}.wav"]


def test_daemon__a_new_attempt_never_collides_with_its_own_superseded_result_written_behind_it(
        db_url: str, tmp_path: Path) -> None:
    """The earlier attempt's result waits to be written behind the next call when this daemon
    claims the job again (its lease lapsed meanwhile): that result is dropped at its write, so the
    new attempt's path is not another job's. The new attempt completes, never failed as colliding
    with its own job."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    [job_id] = enqueue(db_url, 1)
    hooks = RecordingHooks()
    generator = ChaosGenerator(models=["scripted"], work_seconds=0.0)
    daemon = make_daemon(db_url, outputs, generator, hooks=hooks)
    [first] = daemon.store.claim(1)
    daemon.claimer.take([first], utcnow())
    daemon.held.next.clear()
    [stale] = render(generator, prepare([first], generator)[0], outputs, daemon.worker_id)
    daemon.completer.pending.append(stale)  # as the loop leaves it, to be written behind the next call
    set_row(db_url, job_id, status="pending", worker_id=None, lease_expires_at=None)  # rescued
    [again] = daemon.store.claim(1)
    daemon.claimer.take([again], utcnow())
    daemon.held.next.clear()
    running, _ = daemon._start(prepare([again], generator)[0])
    [fresh] = running.result(timeout=60)
    assert fresh.error is None, fresh.error
    daemon.completer.pending.append(fresh)
    daemon.completer.flush(claim_next=False)
    assert hooks.outcomes(job_id) == ["fenced", "completed"]
    assert os.listdir(outputs) == [f"{job_id}.wav"]
    daemon.shutdown()


def test_daemon__a_result_dropped_for_its_cancel_never_blocks_the_next_calls_job(
        db_url: str, tmp_path: Path) -> None:
    """A result waits to be written behind the next call (``outputs/x.wav``) when the heartbeat
    finds its job's cancel: recorded cancelled now, that result is dropped at its write, never
    published. The next call's job of ``outputs/x.wav/y.wav`` completes with its WAV (before: it
    failed for good as colliding with a file that was then deleted, and neither file was ever
    there)."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    with session_scope(get_engine(db_url)) as s:
        first_id, second_id = create_generations(s, [
            {"prompt": "fine", "model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000,
             "channels": 1, "file_path": path} for path in ("outputs/x.wav", "outputs/x.wav/y.wav")])
    hooks = RecordingHooks()
    generator = ChaosGenerator(models=["scripted"], work_seconds=0.0)
    daemon = make_daemon(db_url, outputs, generator, hooks=hooks)
    claimed = {job.id: job for job in daemon.store.claim(2)}
    daemon.claimer.take(list(claimed.values()), utcnow())
    daemon.held.next.clear()
    [result] = render(generator, prepare([claimed[first_id]], generator)[0], outputs, daemon.worker_id)
    assert result.error is None and result.staged is not None
    daemon.completer.pending.append(result)  # as the loop leaves it, to be written behind the next call
    set_row(db_url, first_id, cancel_requested_at=utcnow())
    daemon.heartbeat.run_once()  # sees the cancel: the first job is recorded cancelled now
    running, _ = daemon._start(prepare([claimed[second_id]], generator)[0])
    [second] = running.result(timeout=60)
    assert second.error is None, second.error
    daemon.completer.pending.append(second)
    daemon.completer.flush(claim_next=False)
    assert hooks.outcomes(second_id) == ["completed"]
    assert read_wav(outputs / "x.wav" / "y.wav")[0].shape == (1, 80)
    assert sorted(os.listdir(outputs)) == ["x.wav"] and os.listdir(outputs / "x.wav") == ["y.wav"]
    daemon.shutdown()


def test_daemon__a_file_that_appears_after_the_commit_is_never_replaced(db_url: str, tmp_path: Path) -> None:
    """A file appears at a job's path after its last check, before the rename that follows the
    commit: the file stays byte for byte, the result stays under its temporary name, an error line
    names the job, the path and what to do; the row stays completed (its result exists, only its
    name waits), and the batch-mate is published. Once the file is moved away, the sweep
    publishes the result."""
    init_db(db_url)
    outputs = tmp_path / "outputs"
    blocked, mate = enqueue(db_url, 2)
    hooks = RecordingHooks()
    daemon = make_daemon(db_url, outputs, ScriptedGenerator(), hooks=hooks, batch_size=2)
    try:
        jobs = daemon.store.claim(2)
        work, _ = prepare(jobs, daemon.generator)
        outcomes = render(daemon.generator, work, outputs, daemon.worker_id)
        target = outputs / f"{blocked}.wav"
        target.write_bytes(b"not this job's")
        with capture_logs() as logs:
            daemon.completer.record(outcomes)
        assert hooks.outcomes(blocked) == ["completed"] and hooks.outcomes(mate) == ["completed"]
        assert target.read_bytes() == b"not this job's"
        [temp] = [name for name in os.listdir(outputs) if name.endswith(".tmp")]
        assert staging.owner(temp) == staging.Owner(blocked, 1, staging.worker_hash(daemon.worker_id))
        assert sorted(os.listdir(outputs)) == sorted([temp, target.name, f"{mate}.wav"])
        [error] = [entry for entry in logs if entry["log_level"] == "error"]
        assert error["job_id"] == blocked and error["path"] == str(target.resolve()) and error["temporary"] == temp
        assert error["holder"] is None  # a file no job of ours wrote names none
        assert "move that file away" in error["event"]
        with get_engine(db_url).connect() as conn:
            status = conn.execute(sa.select(Generation.status).where(Generation.id == blocked)).scalar_one()
        assert status == "completed"
        target.rename(tmp_path / "moved.wav")
        assert staging.sweep(outputs, lookup(db_url)).published == [f"outputs/{blocked}.wav"]
        assert read_wav(target)[0].shape == (1, 80) and (tmp_path / "moved.wav").read_bytes() == b"not this job's"
    finally:
        daemon.shutdown()


def test_sweeper__warns_once_about_a_temporary_that_stays(db_url: str, tmp_path: Path) -> None:
    """A completed job's temporary whose path holds another file stays through sweep after sweep:
    the daemon's sweeper warns about it once, not every lease period. Once it is published (the
    file moved away), its warning is forgotten with it."""
    outputs, job_id, temp, target = _completed_result_beside_anothers_file(db_url, tmp_path)
    daemon = make_daemon(db_url, outputs, ScriptedGenerator())
    try:
        with capture_logs() as logs:
            for _ in range(3):
                daemon.sweeper.run_once()
        warnings = [entry for entry in logs if entry["log_level"] == "warning"]
        assert len(warnings) == 1 and warnings[0]["temporary"] == temp and warnings[0]["job_id"] == job_id
        assert "holds a file that is not its result" in warnings[0]["event"]
        assert sorted(os.listdir(outputs)) == sorted([temp, target.name])
        assert daemon.sweeper.warned == {(str(outputs.resolve()), temp, warnings[0]["event"])}
        target.rename(tmp_path / "moved.wav")
        daemon.sweeper.run_once()
        assert os.listdir(outputs) == [target.name] and target.stat().st_size == SIZE
        daemon.sweeper.run_once()
        assert daemon.sweeper.warned == set()
    finally:
        daemon.shutdown()
