"""Jobs validated inside their backend call (a claim larger than a call), run by real daemon
processes: a cancel, a hanging validate (timed out, or met by a stop), an unexpected error from
validate on every path."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.daemon.daemon import SHUTDOWN_DB_SECONDS
from dgxqueue.storage import cancel_generation, create_generations, get_engine, init_db, session_scope
from tests.support.generators import read_executions
from tests.support.processes import burst, start_worker, stop, wait_until, write_config
from tests.support.supervisor import rows, supervise

SPEC = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}


def test_daemon__a_job_cancelled_before_its_call_never_reaches_the_backend(db_url: str, tmp_path: Path) -> None:
    """A claim of three in calls of one: the second job, cancelled while the first call runs
    (its validate not run yet), is recorded cancelled and never rendered."""
    init_db(db_url)
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **SPEC} for p in ["block", "fine", "fine"]])
    log, release = tmp_path / "executions.log", tmp_path / "release"
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": "tests.support.generators:ScriptedGenerator"},
        "generator.options": {"log_path": str(log), "release_path": str(release), "max_batch_size": 1},
        "worker": {"batch_size": 3, "heartbeat_seconds": 0.2, "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    worker = start_worker(config, tmp_path / "worker.log")
    try:
        wait_until(lambda: read_executions(log)[ids[0]] == 1, 30, "the first call to run", alive=worker)
        with session_scope(get_engine(db_url)) as s:
            assert cancel_generation(s, ids[1]).status == "processing"
        wait_until(lambda: rows(db_url)[ids[1]].cancelled_at is not None and rows(db_url)[ids[1]].status == "failed",
                   30, "the cancel to be recorded", alive=worker)
        release.touch()
        wait_until(lambda: rows(db_url)[ids[2]].status == "completed", 30, "the last job", alive=worker)
    finally:
        assert stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert read_executions(log)[ids[1]] == 0
    assert rows(db_url)[ids[0]].status == "completed"


@pytest.mark.parametrize("max_batch_size", [2, 4], ids=["claim-larger-than-a-call", "claim-marked"])
def test_daemons__a_validate_that_hangs_is_timed_out_and_fails_alone(db_url: str, tmp_path: Path,
                                                                      max_batch_size: int) -> None:
    """A claim of four (in calls of two, or in one call), one job's validate() never returning:
    the claim marked its jobs started, so its validate runs with the claim, on the runner's thread,
    where the time limit ends it (exit 124) charging that job alone; then it runs alone, validated
    inside its own call, where the time limit ends it again until it fails. The others complete on
    their first attempt, never charged, and the daemons stop a bounded number of times, each by
    the time limit. (Validated on the main loop, it stalled the loop until the watchdog killed it,
    which charged all four as jobs that killed their daemon.)"""
    init_db(db_url)
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **SPEC, "max_attempts": 3}
                                     for p in ["fine", "hang", "fine", "fine"]])
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": "tests.support.generators:ValidateHangingGenerator"},
        "generator.options": {"log_path": str(tmp_path / "executions.log"), "max_batch_size": max_batch_size},
        "worker": {"batch_size": 4, "job_timeout_seconds": 1.0, "lease_seconds": 1.0, "heartbeat_seconds": 0.2,
                   "rescue_interval_seconds": 0.2, "backoff_base_seconds": 0.0,
                   "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    codes = supervise(config, db_url, tmp_path, 8, watchdog=8)
    jobs = rows(db_url)
    assert codes.count(124) == 3 and -signal.SIGKILL not in codes, codes
    assert (jobs[ids[1]].status, jobs[ids[1]].attempts) == ("failed", 3)
    assert "time limit of 1 s" in (jobs[ids[1]].error_message or "")
    assert {(jobs[j].status, jobs[j].attempts, jobs[j].lease_losses) for j in ids if j != ids[1]} == {
        ("completed", 1, 0)}
    first = (tmp_path / "worker0.log").read_text()
    assert f"the generator's validate() of job {ids[1]} did not return" in first, first[-3000:]


@pytest.mark.parametrize("continuous", [False, True], ids=["batch", "continuous"])
def test_daemon__sigterm_while_a_validate_hangs_gives_up_on_it_at_the_grace(db_url: str, tmp_path: Path,
                                                                            continuous: bool) -> None:
    """SIGTERM while one job's validate() never returns (validated with its claim, or as it joins
    the running batch): the stop gives up on it when the grace period ends, as on any backend call,
    logs that this validate() of that job did not return, and exits 0 well before the shutdown's
    database deadline; the three jobs of the claim are pending again, unspent and unmarked, the
    hanging one included (a stop is no fault of the job's; its time limit charges it, above).
    On the main loop, it stalled the loop: the hard stop ended the process grace + 15 s after the
    signal, logging that a database call never returned, and left the jobs processing to the lease
    rescue, which charged all three as jobs that killed their daemon."""
    init_db(db_url)
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **SPEC} for p in ["fine", "hang", "fine"]])
    executions, log, grace = tmp_path / "executions.log", tmp_path / "worker.log", 1.0
    name = "ValidateHangingSlots" if continuous else "ValidateHangingGenerator"
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": f"tests.support.generators:{name}", "continuous": continuous},
        "generator.options": {"log_path": str(executions), "max_batch_size": 4},
        "worker": {"batch_size": 4, "grace_seconds": grace, "lease_seconds": 30.0, "heartbeat_seconds": 0.2,
                   "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    })
    worker = start_worker(config, log)
    try:
        # Logged by the validate that then hangs: the daemon is ready, and its signals handled.
        wait_until(lambda: read_executions(executions)[ids[1]] == 1, 60, "the validate to hang", alive=worker)
        worker.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        bound = grace + SHUTDOWN_DB_SECONDS  # its database calls answer: nothing but the grace to wait for
        try:
            code: int | None = worker.wait(bound)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - sent
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log.read_text()
    assert code == 0, f"exit {code} {took:.1f} s after SIGTERM (bound {bound:g} s): {text[-2000:]}"
    assert f"the generator's validate() of job {ids[1]} did not return" in text, text[-2000:]
    assert "a database call never returned" not in text
    jobs = rows(db_url)
    assert {j: (jobs[j].status, jobs[j].attempts, jobs[j].lease_losses) for j in ids} == dict.fromkeys(
        ids, ("pending", 0, 0))


@pytest.mark.parametrize("continuous", [False, True], ids=["batch", "continuous"])
def test_daemon__an_unexpected_error_from_validate_is_retried_on_every_path(db_url: str, tmp_path: Path,
                                                                            continuous: bool) -> None:
    """validate() raising something other than a refusal (a RuntimeError: a backend's bug, not a
    verdict on the request) is the job's unexpected error on every path, retried by the retry
    policy (``worker.retry_unexpected_errors``) until its attempts are spent: for a job validated
    with its claim and for a suspect (``lease_losses``) validated alone in its own call, with
    continuous batching as without. A suspect joining a running batch was failed for good at its
    first attempt, its message stripped of the error's type."""
    init_db(db_url)
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": "validate-crash", **SPEC, "max_attempts": 2} for _ in range(2)])
    with get_engine(db_url).begin() as conn:  # it lost a lease before: it runs alone
        conn.execute(sa.text("UPDATE generations SET lease_losses = 1 WHERE id = :id"), {"id": ids[0]})
    log = tmp_path / "worker.log"
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": "tests.support.generators:ScriptedSlots", "continuous": continuous},
        "generator.options": {"log_path": str(tmp_path / "executions.log"), "max_batch_size": 4},
        "worker": {"batch_size": 4, "backoff_base_seconds": 0.0, "heartbeat_seconds": 0.2,
                   "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    assert burst(config, log) == 0, log.read_text()[-3000:]
    jobs = rows(db_url)
    expected = ("failed", 2, "RuntimeError: scripted: validate crashed (gave up after 2 attempts)")
    assert {j: (jobs[j].status, jobs[j].attempts, jobs[j].error_message) for j in ids} == dict.fromkeys(ids, expected)
