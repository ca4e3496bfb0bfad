"""Pause, resume and expiry with real daemon processes (and the commands), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from dgxqueue import api
from dgxqueue.cli.common import EX_DATAERR
from dgxqueue.storage import get_database_stats, get_engine, init_db, session_scope
from dgxqueue.storage.validation import MAX_PAUSE_REASON_LENGTH, MAX_TTL_SECONDS
from tests.acceptance.test_cli import Cli
from tests.acceptance.test_daemon_processes import enqueue, job
from tests.support import zygote
from tests.support.daemons import make_settings
from tests.support.generators import read_executions
from tests.support.processes import ignores, start_worker, stop, wait_until, worker_config


def test_daemon__stops_claiming_a_paused_model_and_resumes(db_url: str, tmp_path: Path) -> None:
    """A running daemon finishes the job it holds when its model is paused, claims no new job of
    that model (while it still claims another model's, enqueued later), and claims it once resumed."""
    init_db(db_url)
    settings = make_settings(db_url, tmp_path / "outputs")
    log = tmp_path / "executions.log"
    [running] = enqueue(db_url, ["block"])
    config = worker_config(tmp_path, db_url, models=["other", "scripted"])
    worker = start_worker(config, tmp_path / "worker.log")
    wait_until(lambda: read_executions(log).get(running) == 1, 30, "the blocking job to start", alive=worker)
    api.pause("scripted", "test", database_url=db_url, settings=settings)
    [held] = enqueue(db_url, ["held"])
    [later] = enqueue(db_url, ["later"], model_name="other")
    (tmp_path / "release").touch()
    wait_until(lambda: job(db_url, running)[0] == "completed", 30, "the running job to finish", alive=worker)
    wait_until(lambda: job(db_url, later)[0] == "completed", 30, "the other model's job", alive=worker)
    assert job(db_url, held)[0] == "pending" and held not in read_executions(log)
    api.resume("scripted", database_url=db_url, settings=settings)
    wait_until(lambda: job(db_url, held)[0] == "completed", 30, "the resumed job", alive=worker)
    assert stop(worker) == 0


def test_burst_worker__exits_when_its_only_jobs_are_paused(db_url: str, tmp_path: Path) -> None:
    """``worker --burst`` does not wait on a paused model's jobs: it exits 0, leaving them pending."""
    init_db(db_url)
    settings = make_settings(db_url, tmp_path / "outputs")
    [held] = enqueue(db_url, ["held"])
    api.pause("scripted", database_url=db_url, settings=settings)
    worker = start_worker(worker_config(tmp_path, db_url), tmp_path / "worker.log", "--burst")
    assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert job(db_url, held)[0] == "pending"


def test_cli__pause_resume_and_stats(cli: Cli) -> None:
    """``dgxqueue pause``/``resume`` change the pause and say what they did; ``stats`` lists it."""
    cli.ok("db", "upgrade")
    assert cli.ok("pause", "synth", "--reason", "new GPU").strip() == "paused: synth"
    assert cli.ok("pause", "synth").strip() == "already paused (reason updated): synth"
    assert "paused: synth" in cli.ok("stats")
    assert json.loads(cli.ok("stats", "--json"))["paused_models"] == {"synth": None}
    assert json.loads(cli.ok("resume", "synth", "--json")) == {"model": "synth", "paused": False, "was_paused": True}
    assert cli.ok("resume", "synth").strip() == "was not paused: synth"
    assert "paused" not in cli.ok("stats")
    assert cli("pause").returncode == 2


def test_cli__a_pause_reason_is_limited_and_shown_escaped(cli: Cli) -> None:
    """A reason past MAX_PAUSE_REASON_LENGTH is refused naming ``reason`` (its control characters
    escaped in the message), nothing paused; control characters of a stored reason reach the
    terminal as escapes, not as the sequences they are (through main(), as a subprocess costs)."""
    cli.ok("db", "upgrade")
    refused = cli.here("pause", "synth", "--reason", "\x1b]0;owned\x07" + "x" * MAX_PAUSE_REASON_LENGTH)
    assert refused.returncode == EX_DATAERR and refused.stdout == ""
    assert "reason=" in refused.stderr and "\\x1b]0;owned\\x07" in refused.stderr and "\x1b" not in refused.stderr
    assert json.loads(cli.here("stats", "--json").stdout)["paused_models"] == {}
    assert cli.here("pause", "synth", "--reason", "GPU\x1b[2J swap\r\nfake: line\u202e").returncode == 0
    shown = cli.here("stats").stdout
    assert "paused: synth (GPU\\x1b[2J swap\\x0d\\x0afake: line\\u202e)" in shown
    assert not any(char in shown for char in "\x1b\r\u202e")


def test_daemon__fails_an_expired_pending_job_without_running_it(db_url: str, tmp_path: Path) -> None:
    """A job still pending at its expires_at (here: its model paused) is failed as expired by a
    running daemon's rescuer, never run; stats count it apart."""
    init_db(db_url)
    settings = make_settings(db_url, tmp_path / "outputs")
    api.pause("scripted", database_url=db_url, settings=settings)
    job_id = api.enqueue("gone", model_name="scripted", duration_seconds=0.01, sample_rate=8000, channels=1,
                         ttl=0.5, database_url=db_url, settings=settings)
    worker = start_worker(worker_config(tmp_path, db_url), tmp_path / "worker.log")
    wait_until(lambda: job(db_url, job_id)[0] == "failed", 30, "the job to expire", alive=worker)
    assert stop(worker) == 0
    _, attempts, error = job(db_url, job_id)
    assert attempts == 0 and error is not None and "expired" in error
    assert job_id not in read_executions(tmp_path / "executions.log")
    with session_scope(get_engine(db_url)) as session:
        stats = get_database_stats(session)
    assert stats["expired_generations"] == 1 and stats["failed_generations"] == 1


def test_cli__enqueue_with_an_expiry(cli: Cli) -> None:
    """``--ttl`` and ``--expires-at`` set the job's expires_at; a bad one is bad input naming it."""
    cli.ok("db", "upgrade")
    row = json.loads(cli.ok("enqueue", "beat", "--ttl", "10m", "--json"))
    assert row["expires_at"] is not None
    row = json.loads(cli.ok("enqueue", "beat", "--expires-at", "2099-01-01T00:00+00:00", "--json"))
    assert row["expires_at"].startswith("2099-01-01T00:00:00")
    refused = cli("enqueue", "beat", "--ttl", "-5")
    assert refused.returncode == 65 and "ttl" in refused.stderr
    refused = cli("enqueue", "beat", "--ttl", "60", "--expires-at", "1h")
    assert refused.returncode == 65 and "ttl" in refused.stderr


def test_cli__enqueue_ttl_and_duration_refusals_state_the_real_range(cli: Cli) -> None:
    """A refused --ttl or --duration says what passes: -1 said "a finite number >= 0", yet 0 was
    refused too (by the door, whose rule is above 0 and at most a limit); every refusal now states it."""
    for flag, field, allowed in (("--ttl", "ttl", f"(0, {MAX_TTL_SECONDS}]"),
                                 ("--duration", "duration_seconds", "(0, 300]")):
        for value in ("-1", "0", "nan", "inf"):
            refused = cli.here("enqueue", "beat", flag, value)
            assert refused.returncode == EX_DATAERR, refused.stderr
            assert field in refused.stderr and allowed in refused.stderr and ">= 0" not in refused.stderr, \
                (flag, value, refused.stderr)
    refused = cli.here("demo", "--duration", "-1")
    assert refused.returncode == EX_DATAERR and "(0, 300]" in refused.stderr, refused.stderr
    assert not cli.db.exists()


@pytest.mark.parametrize(("quiet", "signum", "code"), [
    (["--quiet"], signal.SIGINT, 130), ([], signal.SIGINT, 130),
    (["--quiet"], signal.SIGTERM, 143), (["--quiet"], signal.SIGHUP, 129),
])
def test_cli__enqueue_wait_interrupted_leaves_the_job_id_on_screen(cli: Cli, quiet: list[str], signum: int,
                                                                   code: int) -> None:
    """Ctrl-C during `enqueue --wait` (no daemon: the job waits) ends it with 130 and the job's
    full id on screen, still queued: it said only 'interrupted', and the progress lines (none
    with --quiet) show 8 characters, so the job could not be found again. SIGTERM (a CI job
    cancelled, timeout(1), a supervisor) and SIGHUP (a closed terminal) too, exiting 128 + N as
    the demo does: they killed it with no id said."""
    cli.ok("db", "upgrade")
    log = cli.folder / "enqueue.err"
    with log.open("wb") as err:
        waiting = zygote.popen(cli.command("enqueue", "beat", "--wait", *quiet), cwd=cli.folder, env=cli.env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        # The warning that no daemon serves the model comes once the job is queued, before the wait.
        wait_until(lambda: "warning" in log.read_text(), 60, "the job to be queued",
                   alive=waiting)
        waiting.send_signal(signum)
        out, _ = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == code, log.read_text()
    [row] = json.loads(cli.ok("list", "--json"))
    assert row["status"] == "pending"
    assert row["id"] in out + log.read_text(), out + log.read_text()
    assert "Traceback" not in log.read_text()


def test_cli__enqueue_wait_under_nohup_outlives_a_sighup(cli: Cli) -> None:
    """``nohup dgxqueue enqueue --wait`` starts with SIGHUP ignored, so that a closed terminal does
    not stop it: the wait turned SIGHUP into an interrupt anyway (the kernel's mask of the process
    showed it caught, not ignored), and a SIGHUP exited 129. It stays ignored; SIGTERM still stops
    the wait (143)."""
    cli.ok("db", "upgrade")
    log = cli.folder / "enqueue.err"
    with log.open("wb") as err:
        waiting = zygote.popen(cli.command("enqueue", "beat", "--wait", "--quiet"), cwd=cli.folder, env=cli.env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        wait_until(lambda: "warning" in log.read_text(), 60, "the job to be queued",
                   alive=waiting)
        assert ignores(waiting.pid, signal.SIGHUP), Path(f"/proc/{waiting.pid}/status").read_text()
        waiting.send_signal(signal.SIGHUP)
        waiting.send_signal(signal.SIGTERM)
        out, _ = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 143, log.read_text()
    [row] = json.loads(cli.ok("list", "--json"))
    assert "stopped by SIGTERM" in log.read_text() and row["id"] in out + log.read_text(), log.read_text()


def test_cli__enqueue_with_a_dedupe_key(cli: Cli) -> None:
    """``--dedupe-key`` prints the unfinished holder's id instead of queueing another job."""
    cli.ok("db", "upgrade")
    first = cli.enqueue("beat", "--dedupe-key", "click-1")
    assert cli.enqueue("beat", "--dedupe-key", "click-1") == first
    assert cli.enqueue("beat", "--dedupe-key", "click-2") != first
    assert cli("enqueue", "beat", "--dedupe-key", "").returncode == 65
