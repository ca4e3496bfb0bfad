"""A job that kills its daemon, run by real daemon processes: only it is charged and failed."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from dgxqueue.storage import create_generations, get_engine, init_db, session_scope
from tests.support.generators import read_executions
from tests.support.processes import write_config
from tests.support.supervisor import rows, supervise


def _a_killer_among_seven(db_url: str, tmp_path: Path, generator: str,
                          max_batch_size: int = 8) -> tuple[list[str], Path]:
    """Eight jobs of one claim, the fourth prompted ``kill`` (what ``generator``, a class of
    tests.support.generators, dies on), and a daemon's config with quick leases: the ids and the config."""
    init_db(db_url)
    spec = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}
    with session_scope(get_engine(db_url)) as s:
        ids = create_generations(s, [{"prompt": p, **spec} for p in ["fine"] * 3 + ["kill"] + ["fine"] * 4])
    config = write_config(tmp_path / "config.toml", {
        "database": {"url": db_url},
        "outputs": {"dir": str(tmp_path / "outputs")},
        "generator": {"name": f"tests.support.generators:{generator}"},
        "generator.options": {"log_path": str(tmp_path / "executions.log"), "max_batch_size": max_batch_size},
        "worker": {"batch_size": 8, "lease_seconds": 1.0, "heartbeat_seconds": 0.2,
                   "rescue_interval_seconds": 0.2, "backoff_base_seconds": 0.0, "poll_interval_seconds": 0.2},
        "metrics": {"enabled": False},
    })
    return ids, config


def test_daemons__a_job_that_kills_its_daemon_is_isolated_and_failed_alone(db_url: str, tmp_path: Path) -> None:
    """A prompt whose render SIGKILLs the daemon, claimed in one batch of 8 with 7 others, daemons
    restarted after each death: the 7 complete, charged only the attempt they shared with it; it
    runs alone after its first kill and fails, saying how many daemons it killed."""
    ids, config = _a_killer_among_seven(db_url, tmp_path, "KillingGenerator")
    poison, others = ids[3], ids[:3] + ids[4:]
    codes = supervise(config, db_url, tmp_path, 8)
    jobs = rows(db_url)
    assert set(codes) <= {0, -signal.SIGKILL}, codes
    assert codes.count(-signal.SIGKILL) == 3 and read_executions(tmp_path / "executions.log")[poison] == 3
    assert (jobs[poison].status, jobs[poison].attempts, jobs[poison].lease_losses) == ("failed", 3, 3)
    assert "killed its daemon 3 times" in (jobs[poison].error_message or "")
    # Each other job lost one lease, the one it shared with the poison, and completed at its next attempt.
    assert {(jobs[j].status, jobs[j].attempts, jobs[j].lease_losses) for j in others} == {("completed", 2, 1)}


@pytest.mark.parametrize("max_batch_size", [8, 2], ids=["claim-marked", "claim-larger-than-a-call"])
def test_daemons__a_job_whose_validate_kills_its_daemon_fails_alone(db_url: str, tmp_path: Path,
                                                                    max_batch_size: int) -> None:
    """A prompt whose validate() SIGKILLs the daemon, claimed with 7 others, daemons restarted
    after each death: the 7 complete, it fails; the daemons do not die for ever. Also when the
    claim is larger than a backend call (it once marked no job started, so every death was refunded)."""
    ids, config = _a_killer_among_seven(db_url, tmp_path, "ValidateKillingGenerator", max_batch_size)
    poison, others = ids[3], ids[:3] + ids[4:]
    codes = supervise(config, db_url, tmp_path, 8)
    jobs = rows(db_url)
    assert set(codes) <= {0, -signal.SIGKILL}, codes
    assert {jobs[j].status for j in others} == {"completed"}, {j: jobs[j].error_message for j in others}
    assert jobs[poison].status == "failed" and "killed its daemon" in (jobs[poison].error_message or "")


def test_daemons__a_batch_key_that_kills_its_daemon_costs_one_death_even_for_a_claim_larger_than_a_call(
        db_url: str, tmp_path: Path) -> None:
    """A prompt whose batch_key() SIGKILLs the daemon, claimed with 7 others in calls of 2: the
    claim marks its jobs started, so the death is charged to the claim's jobs, which then run
    alone (a suspect is never keyed) and complete. Before, a claim larger than a call marked
    nothing: every death was refunded to all and the restarted daemons died for ever."""
    ids, config = _a_killer_among_seven(db_url, tmp_path, "BatchKeyKillingGenerator", max_batch_size=2)
    codes = supervise(config, db_url, tmp_path, 4)
    jobs = rows(db_url)
    assert set(codes) <= {0, -signal.SIGKILL} and codes.count(-signal.SIGKILL) == 1, codes
    assert {(jobs[j].status, jobs[j].attempts, jobs[j].lease_losses) for j in ids} == {("completed", 2, 1)}, \
        {j: (jobs[j].status, jobs[j].error_message) for j in ids}
