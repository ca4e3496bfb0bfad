"""A backend's ``start()`` that raises as a job joins the running batch (continuous batching), in
real daemon processes on both engines: judged as an error raised from ``generate`` (the retry
policy for an unexpected error, the machine's fault for memory or a full disk), out of memory
(``CapacityError``) given back unspent as from a step, and the jobs beside it unaffected."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from dgxqueue.audio import resolve_output_path
from dgxqueue.daemon import EXIT_MACHINE_FAULT
from dgxqueue.storage import create_generations, get_engine, init_db, session_scope
from tests.support.generators import read_executions
from tests.support.processes import burst, write_config
from tests.support.supervisor import rows

SPEC = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}


def enqueue(url: str, prompts: list[str], **fields: Any) -> list[str]:
    init_db(url)
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [{"prompt": p, **SPEC, **fields} for p in prompts])


def config(tmp_path: Path, url: str, outputs: Path, *, name: str = "config.toml", min_free_mb: int = 0,
           **worker: Any) -> Path:
    """A continuous daemon on the scripted slots (four), logging JSON lines."""
    return write_config(tmp_path / name, {
        "database": {"url": url},
        "outputs": {"dir": str(outputs), "min_free_mb": min_free_mb},
        "generator": {"name": "tests.support.generators:ScriptedSlots", "continuous": True},
        "generator.options": {"log_path": str(tmp_path / "executions.log"), "max_batch_size": 4},
        "worker": {"batch_size": 4, "backoff_base_seconds": 0.0, "heartbeat_seconds": 0.2,
                   "poll_interval_seconds": 0.2, **worker},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    })


def states(url: str, ids: list[str]) -> list[tuple[str, int]]:
    jobs = rows(url)
    return [(jobs[i].status, jobs[i].attempts) for i in ids]


def logged(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("retry", [True, False], ids=["retry-unexpected", "no-retry-unexpected"])
def test_continuous__an_unexpected_error_from_start_is_retried_by_the_retry_policy(
        db_url: str, tmp_path: Path, retry: bool) -> None:
    """start() raising a RuntimeError (a backend's bug, not a verdict on the request) is the job's
    unexpected error, decided as one raised from generate(): its attempt is spent and, while
    ``worker.retry_unexpected_errors``, it is retried (completing once a start passes, failing
    when its attempts are spent), its message naming the error's type; without, it fails at once.
    The jobs joining beside it complete on their first attempt. (It was failed for good at its
    first attempt, whatever the config, its message stripped of the type.)"""
    ids = enqueue(db_url, ["fine", "start-crash:1", "start-crash:9", "fine"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs", retry_unexpected_errors=retry), log) == 0, \
        log.read_text()[-3000:]
    jobs = rows(db_url)
    crashed = "RuntimeError: scripted: start crashed"
    if retry:
        expected = [("completed", 1, None), ("completed", 2, None),
                    ("failed", 2, f"{crashed} (gave up after 2 attempts)"), ("completed", 1, None)]
    else:
        expected = [("completed", 1, None), ("failed", 1, crashed), ("failed", 1, crashed), ("completed", 1, None)]
    assert [(jobs[i].status, jobs[i].attempts, jobs[i].error_message) for i in ids] == expected
    assert any(e.get("event") == "unexpected error in the generator" and e.get("job_id") == ids[2]
               for e in logged(log))


def test_continuous__memory_error_from_start_gives_the_job_back_unspent_and_exits_75(
        db_url: str, tmp_path: Path) -> None:
    """start() raising MemoryError is the machine's fault, as from generate(): the job goes back
    pending with its attempt refunded, marked (unconfirmed 1 of 5), and the daemon claims nothing
    more and exits 75; the jobs that joined beside it complete on their first attempt. The next
    daemon completes the job on its first counted attempt. (It was failed for good at once, and
    the daemon went on.)"""
    ids = enqueue(db_url, ["fine", "start-oom:1", "fine"])
    first = tmp_path / "first.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs"), first) == EXIT_MACHINE_FAULT, \
        first.read_text()[-3000:]
    jobs = rows(db_url)
    assert states(db_url, ids) == [("completed", 1), ("pending", 0), ("completed", 1)]
    assert (jobs[ids[1]].error_message or "").startswith(
        "machine fault (memory) [unconfirmed 1 of 5] MemoryError: scripted: out of memory at a start"), jobs[ids[1]]
    assert any(e.get("event", "").startswith("machine fault") and e.get("reason") == "memory" for e in logged(first))
    second = tmp_path / "second.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs"), second) == 0, second.read_text()[-3000:]
    assert states(db_url, ids) == [("completed", 1)] * 3


def test_continuous__a_full_disk_at_a_start_gives_the_jobs_back_unspent_and_exits_75(
        db_url: str, tmp_path: Path, outputs_disk: Path) -> None:
    """start() failing to write on the full outputs disk (an OutputError caused by ENOSPC, which
    the daemon's test write confirms) is the machine's fault, as a WAV write's: no job spends an
    attempt, the job is marked ``machine fault (disk_full)`` and the daemon exits 75. Once space
    is freed the next daemon completes every job on its first counted attempt. (The job was
    failed for good at once.)"""
    filler = outputs_disk / "filler"
    with filler.open("wb", buffering=0) as out:  # every block of the disk: the daemon's test write fails too
        try:
            while out.write(b"\0" * 65536):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    ids = enqueue(db_url, ["fine", "start-enospc:1", "fine"])
    first = tmp_path / "first.log"
    assert burst(config(tmp_path, db_url, outputs_disk), first) == EXIT_MACHINE_FAULT, first.read_text()[-3000:]
    jobs = rows(db_url)
    assert states(db_url, ids) == [("pending", 0)] * 3
    assert (jobs[ids[1]].error_message or "").startswith(
        "machine fault (disk_full) OutputError: scripted: could not write a start's file"), jobs[ids[1]]
    filler.unlink()
    second = tmp_path / "second.log"
    assert burst(config(tmp_path, db_url, outputs_disk), second) == 0, second.read_text()[-3000:]
    assert states(db_url, ids) == [("completed", 1)] * 3


def test_continuous__out_of_memory_at_a_start_gives_the_job_back_unspent_to_join_again(
        db_url: str, tmp_path: Path) -> None:
    """start() raising CapacityError (out of memory: the backend has fewer slots now) is handled
    as a step's: the job goes back unspent and joins again, and so does a job behind it that no
    slot is left for; every job completes on its first counted attempt. (The job was charged a
    retry, and the job behind it was started into a slot that was gone, failing for good.)"""
    ids = enqueue(db_url, ["fine", "start-capacity:1", "fine", "fine"])
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs"), log) == 0, log.read_text()[-3000:]
    jobs = rows(db_url)
    assert [(jobs[i].status, jobs[i].attempts, jobs[i].error_message) for i in ids] == [("completed", 1, None)] * 4
    back = [e for e in logged(log) if e.get("event", "").startswith("out of memory starting jobs")]
    assert back and ids[1] in back[0]["jobs"] and back[0]["slots"] == 2, back


def test_continuous__out_of_memory_at_a_start_with_no_fewer_slots_is_charged_to_the_job(
        db_url: str, tmp_path: Path) -> None:
    """start() raising CapacityError while the backend has as many slots as before (here at its
    last slot, which it cannot halve) frees nothing to join again: it is the job's transient error,
    retried while attempts remain, then failed, and the daemon's burst ends. The job beside it
    completes. (It was given back unspent at every start and claimed again at once, hundreds of
    claims a second, for ever, charged nothing.)"""
    ids = enqueue(db_url, ["start-capacity:1000000", "fine"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs"), log) == 0, log.read_text()[-3000:]
    jobs = rows(db_url)
    assert states(db_url, ids) == [("failed", 2), ("completed", 1)]
    assert (jobs[ids[0]].error_message or "").endswith("1 slots now (gave up after 2 attempts)"), jobs[ids[0]]
    # Halved from four slots to two, then to one (given back each time), then charged twice.
    assert read_executions(tmp_path / "executions.log")[ids[0]] == 4


def test_continuous__an_error_from_start_whose_str_raises_is_the_jobs_alone(db_url: str, tmp_path: Path) -> None:
    """start() raising an unexpected error whose ``str()`` itself raises is still that job's
    unexpected error, retried by the retry policy, its message naming its type and saying its text
    could not be read; the daemon goes on and the job beside it completes on its first attempt.
    (Judging it read its text: the daemon died, exit 70, giving every job back unspent, and so did
    every daemon after it that met the error, charging no one.)"""
    ids = enqueue(db_url, ["fine", "start-unprintable:1"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs"), log) == 0, log.read_text()[-3000:]
    assert states(db_url, ids) == [("completed", 1), ("completed", 2)]
    retried = [e for e in logged(log) if e.get("job_id") == ids[1] and e.get("outcome") == "retried"]
    assert [e["error"] for e in retried] == [
        "Unprintable: <str() of the error raised ValueError> (attempt 1, retrying)"], retried


def test_continuous__out_of_memory_at_a_step_with_no_fewer_slots_is_a_failed_step(db_url: str, tmp_path: Path) -> None:
    """A step raising CapacityError while the backend has as many slots as before (at its last
    slot) frees nothing to join again: it is a failed step, like any other error from it, whose
    jobs go back marked and run alone, so the job that breaks every step is charged in the end and
    the job that was in its steps completes. (Every job of the step was given back unspent and
    claimed again at once, for ever: the one that broke the step, and the one beside it, which
    never ran to its end.)"""
    ids = enqueue(db_url, ["step-capacity:1000000", "fine"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs"), log) == 0, log.read_text()[-3000:]
    jobs = rows(db_url)
    assert states(db_url, ids) == [("failed", 2), ("completed", 1)]
    assert "given back 5 times already: counted against the job" in (jobs[ids[0]].error_message or ""), jobs[ids[0]]


def test_continuous__a_step_error_whose_str_raises_is_a_failed_step(db_url: str, tmp_path: Path) -> None:
    """A step raising an error whose ``str()`` itself raises is a failed step like any other: its
    jobs go back marked, naming the error's type and saying its text could not be read, each runs
    alone and completes on its first counted attempt. (Logging it read its text: the daemon died,
    exit 70, and so did every daemon after it that met the error.)"""
    ids = enqueue(db_url, ["step-unprintable:1", "fine"])
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, tmp_path / "outputs"), log) == 0, log.read_text()[-3000:]
    assert states(db_url, ids) == [("completed", 1), ("completed", 1)]
    failed = [e for e in logged(log) if e.get("event") == "a decoding step failed: the jobs in slots go back"]
    assert [e["error"] for e in failed] == ["Unprintable: <str() of the error raised ValueError>"], failed


def test_continuous__a_start_that_took_a_slot_then_raised_is_cancelled_and_its_retry_starts_cleanly(
        db_url: str, tmp_path: Path) -> None:
    """start() that puts the request in a slot and then raises (a backend's bug after taking the
    slot): the daemon cancels the job, so the slot is free again. Four jobs claimed after it, every
    slot needed, all start and complete on their first attempt; the job is retried by the retry
    policy and its retry starts cleanly (completing, or failing once its attempts are spent), and
    no WAV is written for the job that failed. (The request stayed in its slot decoding for nobody:
    a later job was started into a slot that was not free, and the retry found its key taken.)"""
    ids = enqueue(db_url, ["start-orphan:1", "start-orphan:9", *["fine"] * 6], max_attempts=2)
    outputs = tmp_path / "outputs"
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, outputs), log) == 0, log.read_text()[-3000:]
    jobs = rows(db_url)
    crashed = "RuntimeError: scripted: start crashed after taking a slot"
    assert [(jobs[i].status, jobs[i].attempts, jobs[i].error_message) for i in ids] == [
        ("completed", 2, None), ("failed", 2, f"{crashed} (gave up after 2 attempts)"),
        *[("completed", 1, None)] * 6]
    assert read_executions(tmp_path / "executions.log")[ids[1]] == 2  # both its starts ran: no duplicate key
    written = sorted(p.relative_to(outputs) for p in outputs.rglob("*.wav"))
    assert written == sorted(resolve_output_path(outputs, jobs[i].file_path).relative_to(outputs)
                             for i in ids if i != ids[1]), written
