"""Machine faults in-process, on real SQLite and PostgreSQL: how they are told from a job's, how
a job that always faults is bounded, and how the outputs check pauses claims."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from dgxqueue import audio
from dgxqueue.config import load_settings
from dgxqueue.daemon import EXIT_MACHINE_FAULT, Daemon, HookChain
from dgxqueue.daemon.diskcheck import look
from dgxqueue.daemon.faults import UNCONFIRMED_REFUNDS
from dgxqueue.errors import ConfigError, OutputError, PermanentGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationRequest
from dgxqueue.machine_faults import machine_fault
from dgxqueue.metrics import DaemonMetrics
from dgxqueue.storage import get_engine
from tests.integration.test_daemon import enqueue, row
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.generators import ScriptedGenerator
from workers.synth import SynthGenerator


def _write_error(folder: Path) -> OutputError:
    """The error a real WAV write into ``folder`` raises."""
    sound = GeneratedAudio(samples=np.zeros((1, 8000), dtype=np.float32), sample_rate=8000)
    with pytest.raises(OutputError) as caught:
        audio.write_wav_atomic(folder / "x.wav", sound)
    return caught.value


def _wrapped(code: int) -> OutputError:
    try:
        try:
            raise OSError(code, "scripted")
        except OSError as exc:
            raise OutputError("could not write x.wav") from exc
    except OutputError as exc:
        return exc


def test_machine_fault__real_writes_to_a_full_or_read_only_disk(tiny_disk: Path, readonly_dir: Path) -> None:
    """A WAV write that fails on a full disk or a read-only file system is the machine's fault."""
    (tiny_disk / "filler").write_bytes(b"\0" * 60 * 1024)
    assert machine_fault(_write_error(tiny_disk)) == "disk_full"
    assert machine_fault(_write_error(readonly_dir)) == "read_only"


@pytest.mark.parametrize(("error", "reason"), [
    (_wrapped(errno.EDQUOT), "disk_full"), (_wrapped(errno.EACCES), "permission"),
    (_wrapped(errno.EPERM), "permission"), (_wrapped(errno.EIO), "io_error"),
    (MemoryError(), "memory"), (PermanentGeneratorError("x").with_traceback(None), None),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "gpu"),
    (RuntimeError("CUDA error: unspecified launch failure\nCompile with TORCH_USE_CUDA_DSA"), "gpu"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), None),
    (RuntimeError("scripted crash"), None), (_wrapped(errno.ENAMETOOLONG), None),
    (OSError(errno.ENOSPC, "a backend's own file"), None), (ValueError("bad prompt"), None),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_machine_fault__rule(error: BaseException, reason: str | None) -> None:
    """Memory, a sick outputs disk (by errno, under the writer's OutputError) and CUDA's sticky
    errors are the machine's; CUDA out-of-memory and anything else stay the job's."""
    assert machine_fault(error) == reason


def test_machine_fault__memory_error_in_a_chain() -> None:
    """A MemoryError that caused another error is still the machine's."""
    try:
        try:
            raise MemoryError
        except MemoryError as exc:
            raise RuntimeError("backend failed") from exc
    except RuntimeError as exc:
        assert machine_fault(exc) == "memory"


def test_machine_fault__job_that_always_faults_fails_after_its_refunds_and_attempts(
        engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """A job whose every call raises MemoryError (a fault no test can confirm): it is given back
    unspent UNCONFIRMED_REFUNDS times, then each fault is charged, so it ends failed after
    UNCONFIRMED_REFUNDS + max_attempts daemon runs, each of which exits 75; the job queued behind
    it then completes on one attempt."""
    bad = enqueue(db_url, "oom", max_attempts=2)
    mate = enqueue(db_url, "fine")
    seen = []
    for _ in range(UNCONFIRMED_REFUNDS + 4):
        daemon = make_daemon(db_url, tmp_path / "outputs", ScriptedGenerator(max_batch_size=1))
        code = daemon.run(burst=True)
        job = row(db_url, bad)
        seen.append((code, job.status, job.attempts))
        if job.status == "failed":
            break
    assert seen == [(EXIT_MACHINE_FAULT, "pending", 0)] * UNCONFIRMED_REFUNDS + [
        (EXIT_MACHINE_FAULT, "pending", 1), (EXIT_MACHINE_FAULT, "failed", 2)]
    assert (row(db_url, bad).error_message or "").startswith(
        f"machine fault (memory) [unconfirmed {UNCONFIRMED_REFUNDS + 2} of {UNCONFIRMED_REFUNDS}] MemoryError")
    assert make_daemon(db_url, tmp_path / "outputs", ScriptedGenerator()).run(burst=True) == 0
    assert (row(db_url, mate).status, row(db_url, mate).attempts) == ("completed", 1)


def test_machine_fault__synth_memory_error_gives_the_job_back_and_exits_75(
        engine: sa.Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in synth meeting a MemoryError: the daemon gives the job back unspent, marked,
    and exits 75, instead of charging the job a transient failure."""
    job_id = enqueue(db_url, "house", model="synth")
    generator = SynthGenerator()

    def render(request: GenerationRequest) -> GeneratedAudio:
        raise MemoryError("Unable to allocate 80.0 GiB")

    monkeypatch.setattr(generator, "render", render)
    assert make_daemon(db_url, tmp_path / "outputs", generator).run(burst=True) == EXIT_MACHINE_FAULT
    job = row(db_url, job_id)
    assert (job.status, job.attempts) == ("pending", 0)
    assert (job.error_message or "").startswith("machine fault (memory) [unconfirmed 1 of")


def test_machine_fault__daemon_unhealthy_and_metric_set(engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """After a machine fault the daemon reports itself unhealthy, sets dgxqueue_machine_fault{reason}
    and gives the job back as 'released'."""
    registry = CollectorRegistry()
    hooks = RecordingHooks()
    job_id = enqueue(db_url, "oom")
    daemon = make_daemon(db_url, tmp_path / "outputs", ScriptedGenerator(),
                         hooks=HookChain([DaemonMetrics(registry, get_engine(db_url)), hooks]))
    assert daemon.run_once() == 1
    assert not daemon.healthy() and daemon.stopping and daemon.exit_code == EXIT_MACHINE_FAULT
    assert registry.get_sample_value("dgxqueue_machine_fault", {"reason": "memory"}) == 1
    assert hooks.outcomes(job_id) == ["released"]
    daemon.shutdown()


def test_outputs_check__pauses_claims_and_resumes(engine: sa.Engine, db_url: str, tmp_path: Path) -> None:
    """Below outputs.min_free_mb nothing is claimed and dgxqueue_claims_paused{reason="disk_low"} is
    1; once the threshold is met again the daemon claims and the gauge drops to 0."""
    outputs = tmp_path / "outputs"
    huge = 1_048_576  # more MiB than this disk has
    settings = load_settings(env={}, overrides={
        "database": {"url": db_url}, "outputs": {"dir": str(outputs), "min_free_mb": huge},
        "metrics": {"enabled": False}})
    registry = CollectorRegistry()
    daemon = Daemon(settings, engine=get_engine(db_url), generator=ScriptedGenerator(),
                    hooks=DaemonMetrics(registry, get_engine(db_url)))
    daemon.outputs_check.interval = 0.0
    job_id = enqueue(db_url, "fine")
    try:
        assert daemon.run_once() == 0 and row(db_url, job_id).status == "pending"
        assert registry.get_sample_value("dgxqueue_claims_paused", {"reason": "disk_low"}) == 1
        daemon.outputs_check.min_free_mb = 0
        assert daemon.run_once() == 1 and row(db_url, job_id).status == "completed"
        assert registry.get_sample_value("dgxqueue_claims_paused", {"reason": "disk_low"}) == 0
    finally:
        daemon.shutdown()


def test_outputs_check__look(tmp_path: Path, readonly_dir: Path, tiny_disk: Path) -> None:
    """A folder not made yet is judged by its parent; read-only and short of space are reported."""
    assert look(tmp_path / "not" / "yet", 0) is None
    problem = look(readonly_dir / "outputs", 0)
    assert problem is not None and problem.reason in ("read_only", "not_writable")
    problem = look(tiny_disk, 1)
    assert problem is not None and problem.reason == "disk_low" and "outputs.min_free_mb = 1" in problem.message
    assert look(tiny_disk, 0) is None


def test_config__outputs_min_free_mb() -> None:
    """outputs.min_free_mb defaults to 256 and refuses a negative value, naming the key."""
    assert load_settings(env={}).outputs.min_free_mb == 256
    with pytest.raises(ConfigError, match=r"outputs\.min_free_mb"):
        load_settings(env={"DGXQUEUE_OUTPUTS_MIN_FREE_MB": "-1"})
