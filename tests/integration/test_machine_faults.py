"""Machine faults in-process, on real SQLite and PostgreSQL: how they are told from a job's, how
a job that always faults is bounded, and how the outputs check pauses claims."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
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
from dgxqueue.errors import ConfigError, OutputError, PermanentGeneratorError, TransientGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationRequest
from dgxqueue.machine_faults import PROBED_REASONS, REASONS, detached_machine_fault, machine_fault
from dgxqueue.metrics import DaemonMetrics
from dgxqueue.storage import get_engine
from tests.integration.test_daemon import enqueue, row
from tests.support.daemons import RecordingHooks, make_daemon
from tests.support.generators import ScriptedGenerator
from tests.support.processes import REPO
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
    (ValueError("bad prompt"), None),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_machine_fault__rule(error: BaseException, reason: str | None) -> None:
    """Memory, a sick outputs disk (by errno, under the writer's OutputError) and CUDA's sticky
    errors are the machine's; CUDA out-of-memory and anything else stay the job's."""
    assert machine_fault(error) == reason


#: A backend's own plain OSError, by errno: its process's resources and a full disk of its own are
#: the machine's; a file of its own missing or refused, an I/O error or a read-only disk of its own, an
#: OSError without an errno: the job's (no rule says what they mean to the machine).
BACKEND_OWN = [
    (errno.ENOMEM, "memory"), (errno.EMFILE, "descriptors"), (errno.ENFILE, "descriptors"),
    (errno.ENOSPC, "scratch_disk_full"), (errno.EDQUOT, "scratch_disk_full"),
    (errno.ENOENT, None), (errno.EACCES, None), (errno.EIO, None), (errno.EROFS, None), (None, None),
]


def _raised(make: Callable[[], BaseException], cause: BaseException | None = None, *,
            implicit: bool = False) -> BaseException:
    """``make()`` raised (with its traceback): from ``cause``, or during its handling."""
    try:
        if cause is None:
            raise make()
        try:
            raise cause
        except BaseException as inner:
            if implicit:
                raise make()  # the implicit chain, __context__, is what is tested
            raise make() from inner
    except BaseException as exc:
        return exc


def _own(code: int | None) -> OSError:
    return OSError(code, os.strerror(code)) if code is not None else OSError("no errno")


@pytest.mark.parametrize(("code", "reason"), BACKEND_OWN, ids=lambda v: v if isinstance(v, str) else
                         errno.errorcode.get(v, str(v)) if isinstance(v, int) else "none")
def test_machine_fault__a_backends_own_oserror(code: int | None, reason: str | None) -> None:
    """A plain OSError a backend raises itself (opening a model or cache file, writing a scratch
    file), not the daemon's OutputError: ENOMEM is memory, EMFILE/ENFILE descriptors, ENOSPC/EDQUOT
    a scratch disk full; the same at any link of the chain, as the explicit cause or the implicit
    context of the error the backend raises, two links down too. Any other errno stays the job's.
    (Only under an OutputError were they the machine's: a backend's own was charged to the job.)"""
    own = _raised(lambda: _own(code))
    assert machine_fault(own) == reason
    assert machine_fault(_raised(lambda: RuntimeError("could not load the model"), _own(code))) == reason
    assert machine_fault(_raised(lambda: ValueError("cache miss"), _own(code), implicit=True)) == reason
    inner = _raised(lambda: TransientGeneratorError("render failed"), _own(code))
    assert machine_fault(_raised(lambda: PermanentGeneratorError("gave up"), inner)) == reason


def _suppressed(make: Callable[[], BaseException], context: BaseException) -> BaseException:
    """``make()`` raised ``from None`` while ``context`` was being handled."""
    try:
        try:
            raise context
        except BaseException:
            raise make() from None
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("context", [_own(errno.ENOSPC), _own(errno.EMFILE), _own(errno.ENOMEM), MemoryError(),
                                     RuntimeError("CUDA error: an illegal memory access was encountered")],
                         ids=["enospc", "emfile", "enomem", "memory-error", "gpu"])
def test_machine_fault__a_context_suppressed_by_from_none_is_not_read(context: BaseException) -> None:
    """``raise PermanentGeneratorError(...) from None`` while handling a machine-looking error: the
    raiser said the context is not the story (a traceback does not show it), so the refusal is the
    job's; the same context not suppressed is still the machine's. (The walk read __context__
    regardless: a backend's refusal of a bad request was given back 5 times, the daemon exiting 75
    each time, then charged as a transient failure.)"""
    assert machine_fault(_suppressed(lambda: PermanentGeneratorError("refused"), context)) is None
    assert detached_machine_fault(_suppressed(lambda: ValueError("bad prompt"), context)) is None
    assert machine_fault(_raised(lambda: ValueError("bad prompt"), context, implicit=True)) is not None


def test_machine_fault__the_wav_writes_errnos_stay_probed() -> None:
    """Under the daemon's OutputError a full disk stays disk_full (put to the outputs folder's test
    write), not scratch_disk_full; the resource errnos are the same reasons either way."""
    assert machine_fault(_wrapped(errno.ENOSPC)) == "disk_full"
    assert machine_fault(_wrapped(errno.EDQUOT)) == "disk_full"
    assert machine_fault(_wrapped(errno.EMFILE)) == "descriptors"
    assert machine_fault(_wrapped(errno.ENOMEM)) == "memory"
    assert "scratch_disk_full" not in PROBED_REASONS and "descriptors" not in PROBED_REASONS
    assert set(REASONS) >= PROBED_REASONS | {"memory", "descriptors", "scratch_disk_full", "gpu"}


def test_detached_machine_fault__a_backends_own_oserror() -> None:
    """A backend raising ``detached_machine_fault(exc)`` after its except block: the plain OSError
    that was the cause comes back alone, without its traceback, and still reads as the machine's."""
    error = _raised(lambda: RuntimeError("could not open the cache"), _own(errno.EMFILE))
    culprit = detached_machine_fault(error)
    assert isinstance(culprit, OSError) and culprit.errno == errno.EMFILE
    assert (culprit.__traceback__, culprit.__cause__, culprit.__context__) == (None, None, None)
    assert machine_fault(culprit) == "descriptors"
    assert detached_machine_fault(_raised(lambda: _own(errno.ENOENT))) is None


def test_machine_fault__memory_error_in_a_chain() -> None:
    """A MemoryError that caused another error is still the machine's."""
    try:
        try:
            raise MemoryError
        except MemoryError as exc:
            raise RuntimeError("backend failed") from exc
    except RuntimeError as exc:
        assert machine_fault(exc) == "memory"


def test_machine_fault__every_reason_is_named_where_operators_read_them() -> None:
    """Each reason the rule gives is listed in the metric's help, the README's list for exit 75
    and the architecture notes, scratch_disk_full included (it was none of them)."""
    registry = CollectorRegistry()
    DaemonMetrics(registry, sa.create_engine("sqlite://"))
    [family] = [m for m in registry.collect() if m.name == "dgxqueue_machine_fault"]
    readme, architecture = (REPO / "README.md").read_text(), (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for reason in REASONS:
        assert reason in family.documentation, reason
        assert f"`{reason}`" in readme and f"`{reason}`" in architecture, reason


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
