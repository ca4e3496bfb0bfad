"""A job that kills its daemon, run by real daemon processes: only it is charged and failed."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.storage import Generation, create_generations, get_engine, init_db, session_scope
from dgxqueue.storage.models import utcnow
from tests.support.generators import read_executions
from tests.support.processes import start_worker, wait_until, write_config

KILLING = "tests.support.generators:KillingGenerator"


def rows(url: str) -> dict[str, Generation]:
    with session_scope(get_engine(url)) as s:
        jobs = s.scalars(sa.select(Generation)).all()
        s.expunge_all()
        return {job.id: job for job in jobs}


def leases_ran_out(url: str) -> bool:
    """No running job is under a live lease (a dead daemon's leases have expired)."""
    now = utcnow()  # the database's clock on this one host
    running = [job for job in rows(url).values() if job.status == "processing"]
    return all(job.lease_expires_at is None or job.lease_expires_at < now for job in running)


def test_daemons__a_job_that_kills_its_daemon_is_isolated_and_failed_alone(db_url: str, tmp_path: Path) -> None:
    """A prompt whose render SIGKILLs the daemon, claimed in one batch of 8 with 7 others, daemons
    restarted after each death: the 7 complete, charged only the attempt they shared with it; it
    runs alone after its first kill and fails, saying how many daemons it killed."""
    init_db(db_url)
    spec = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **spec} for p in ["fine"] * 3 + ["kill"] + ["fine"] * 4])
    poison, others = ids[3], ids[:3] + ids[4:]
    log = tmp_path / "executions.log"
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": KILLING},
        "generator.options": {"log_path": str(log)},
        "worker": {"batch_size": 8, "lease_seconds": 1.0, "heartbeat_seconds": 0.2,
                   "rescue_interval_seconds": 0.2, "backoff_base_seconds": 0.0, "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    deaths = 0
    for run in range(8):  # the supervisor: restart after each death, once the dead one's leases ran out
        wait_until(lambda: leases_ran_out(db_url), 30, "the dead daemon's leases to run out")
        worker = start_worker(config, tmp_path / f"worker{run}.log", "--burst")
        code = worker.wait(60)
        if code == -signal.SIGKILL:
            deaths += 1
            continue
        assert code == 0, (tmp_path / f"worker{run}.log").read_text()[-3000:]
        if all(job.status in ("completed", "failed") for job in rows(db_url).values()):
            break
    jobs = rows(db_url)
    assert deaths == 3 and read_executions(log)[poison] == 3
    assert (jobs[poison].status, jobs[poison].attempts, jobs[poison].lease_losses) == ("failed", 3, 3)
    assert "killed its daemon 3 times" in (jobs[poison].error_message or "")
    # Each other job lost one lease, the one it shared with the poison, and completed at its next attempt.
    assert {(jobs[j].status, jobs[j].attempts, jobs[j].lease_losses) for j in others} == {("completed", 2, 1)}


@pytest.mark.parametrize("max_batch_size", [8, 2], ids=["claim-marked", "claim-larger-than-a-call"])
def test_daemons__a_job_whose_validate_kills_its_daemon_fails_alone(db_url: str, tmp_path: Path,
                                                                    max_batch_size: int) -> None:
    """A prompt whose validate() SIGKILLs the daemon, claimed with 7 others, daemons restarted
    after each death: the 7 complete, it fails; the daemons do not die for ever. Also when the
    claim is larger than a backend call (the claim then marks no job started: each call does)."""
    init_db(db_url)
    spec = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **spec} for p in ["fine"] * 3 + ["kill"] + ["fine"] * 4])
    poison, others = ids[3], ids[:3] + ids[4:]
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": "tests.support.generators:ValidateKillingGenerator"},
        "generator.options": {"log_path": str(tmp_path / "executions.log"), "max_batch_size": max_batch_size},
        "worker": {"batch_size": 8, "lease_seconds": 1.0, "heartbeat_seconds": 0.2,
                   "rescue_interval_seconds": 0.2, "backoff_base_seconds": 0.0, "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    for run in range(8):  # the supervisor: restart after each death, once the dead one's leases ran out
        wait_until(lambda: leases_ran_out(db_url), 30, "the dead daemon's leases to run out")
        worker = start_worker(config, tmp_path / f"worker{run}.log", "--burst")
        code = worker.wait(60)
        assert code in (0, -signal.SIGKILL), (tmp_path / f"worker{run}.log").read_text()[-3000:]
        if all(job.status in ("completed", "failed") for job in rows(db_url).values()):
            break
    jobs = rows(db_url)
    assert {jobs[j].status for j in others} == {"completed"}, {j: jobs[j].error_message for j in others}
    assert jobs[poison].status == "failed" and "killed its daemon" in (jobs[poison].error_message or "")


def test_daemons__a_batch_key_that_kills_its_daemon_costs_one_death_even_for_a_claim_larger_than_a_call(
        db_url: str, tmp_path: Path) -> None:
    """A prompt whose batch_key() SIGKILLs the daemon, claimed with 7 others in calls of 2: the
    claim marks its jobs started, so the death is charged to the claim's jobs, which then run
    alone (a suspect is never keyed) and complete. Before, a claim larger than a call marked
    nothing: every death was refunded to all and the restarted daemons died for ever."""
    init_db(db_url)
    spec = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **spec} for p in ["fine"] * 3 + ["kill"] + ["fine"] * 4])
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": "tests.support.generators:BatchKeyKillingGenerator"},
        "generator.options": {"log_path": str(tmp_path / "executions.log"), "max_batch_size": 2},
        "worker": {"batch_size": 8, "lease_seconds": 1.0, "heartbeat_seconds": 0.2,
                   "rescue_interval_seconds": 0.2, "backoff_base_seconds": 0.0, "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    deaths = 0
    for run in range(4):  # the supervisor: restart after each death, once the dead one's leases ran out
        wait_until(lambda: leases_ran_out(db_url), 30, "the dead daemon's leases to run out")
        worker = start_worker(config, tmp_path / f"worker{run}.log", "--burst")
        code = worker.wait(60)
        assert code in (0, -signal.SIGKILL), (tmp_path / f"worker{run}.log").read_text()[-3000:]
        deaths += code == -signal.SIGKILL
        if all(job.status in ("completed", "failed") for job in rows(db_url).values()):
            break
    jobs = rows(db_url)
    assert deaths == 1, deaths
    assert {(jobs[j].status, jobs[j].attempts, jobs[j].lease_losses) for j in ids} == {("completed", 2, 1)}, \
        {j: (jobs[j].status, jobs[j].error_message) for j in ids}
