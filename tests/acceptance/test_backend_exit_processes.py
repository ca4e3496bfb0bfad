"""A backend whose code raises SystemExit (a library calling ``sys.exit()``), KeyboardInterrupt or
GeneratorExit, in real daemon processes on both engines: from a job's method it is that job's
unexpected error, judged by the retry policy, and the daemon serves on; from ``load()`` the daemon
exits non-zero, saying what raised it. (The daemon exited 0 silently, which systemd's
``Restart=on-failure`` does not restart, or 130, or with a traceback; its jobs went back unspent.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dgxqueue.cli.common import EX_SOFTWARE
from dgxqueue.storage import create_generations, get_engine, init_db, session_scope
from tests.support.processes import burst, write_config
from tests.support.supervisor import rows

SPEC = {"model_name": "scripted", "duration_seconds": 0.01, "sample_rate": 8000, "channels": 1}


def enqueue(url: str, prompts: list[str], **fields: Any) -> list[str]:
    init_db(url)
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [{"prompt": p, **SPEC, **fields} for p in prompts])


def config(tmp_path: Path, url: str, generator: str = "ScriptedGenerator", *, continuous: bool = False,
           **worker: Any) -> Path:
    """A daemon on a scripted backend, one job a call (four slots with ``continuous``), logging JSON lines."""
    return write_config(tmp_path / "config.toml", {
        "database": {"url": url},
        "outputs": {"dir": str(tmp_path / "outputs"), "min_free_mb": 0},
        "generator": {"name": f"tests.support.generators:{generator}", "continuous": continuous},
        "generator.options": {"log_path": str(tmp_path / "executions.log"), "max_batch_size": 4 if continuous else 1},
        "worker": {"batch_size": 4 if continuous else 1, "backoff_base_seconds": 0.0, "heartbeat_seconds": 0.2,
                   "poll_interval_seconds": 0.2, **worker},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    })


def outcomes(url: str, ids: list[str]) -> list[tuple[str, int, str | None]]:
    jobs = rows(url)
    return [(jobs[i].status, jobs[i].attempts, jobs[i].error_message) for i in ids]


def logged(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("retry", [True, False], ids=["retry-unexpected", "no-retry-unexpected"])
def test_daemon__system_exit_from_generate_is_the_jobs_unexpected_error(db_url: str, tmp_path: Path,
                                                                        retry: bool) -> None:
    """generate() raising SystemExit(0) spends its job's attempt as an unexpected error: retried
    while ``worker.retry_unexpected_errors`` (completing once a call passes, failing when its
    attempts are spent), failed at once without; the jobs beside it complete on their first
    attempt and the burst drains the queue. (The daemon exited 0 at the first one, its job given
    back unspent and the rest left pending.)"""
    ids = enqueue(db_url, ["fine", "exit-0:1", "exit-0:9", "fine"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, retry_unexpected_errors=retry), log) == 0, log.read_text()[-3000:]
    if retry:
        expected = [("completed", 1, None), ("completed", 2, None),
                    ("failed", 2, "SystemExit: 0 (gave up after 2 attempts)"), ("completed", 1, None)]
    else:
        expected = [("completed", 1, None), ("failed", 1, "SystemExit: 0"), ("failed", 1, "SystemExit: 0"),
                    ("completed", 1, None)]
    assert outcomes(db_url, ids) == expected
    assert any(e.get("event") == "unexpected error in the generator" and e.get("job_id") == ids[2]
               for e in logged(log))


@pytest.mark.parametrize(("prompt", "expected"), [
    ("interrupt:1", ("completed", 2, None)),
    ("generator-exit:1", ("completed", 2, None)),
    ("validate-exit", ("failed", 2, "SystemExit: 0 (gave up after 2 attempts)")),
    ("key-exit", ("failed", 2, "SystemExit: 0 (gave up after 2 attempts)")),
], ids=["keyboard-interrupt-from-generate", "generator-exit-from-generate", "system-exit-from-validate",
        "system-exit-from-batch-key"])
def test_daemon__a_backend_exit_from_a_jobs_method_is_that_jobs_error(
        db_url: str, tmp_path: Path, prompt: str, expected: tuple[str, int, str | None]) -> None:
    """KeyboardInterrupt or GeneratorExit from generate(), SystemExit(0) from validate() or
    batch_key(): the job's unexpected error, retried by the retry policy, while the jobs beside it
    complete and the burst ends drained, exit 0. (KeyboardInterrupt ended the daemon with 130,
    GeneratorExit with a traceback, SystemExit with exit 0, the job given back unspent every time.)"""
    ids = enqueue(db_url, ["fine", prompt, "fine"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url), log) == 0, log.read_text()[-3000:]
    assert outcomes(db_url, ids) == [("completed", 1, None), expected, ("completed", 1, None)]
    name = prompt.split(":")[0]
    error = {"interrupt": "KeyboardInterrupt: KeyboardInterrupt", "generator-exit": "GeneratorExit: GeneratorExit",
             "validate-exit": "SystemExit: 0", "key-exit": "SystemExit: 0"}[name]
    retried = [e["error"] for e in logged(log) if e.get("job_id") == ids[1] and e.get("outcome") == "retried"]
    assert retried == [f"{error} (attempt 1, retrying)"], retried


def test_continuous__system_exit_from_start_is_the_jobs_unexpected_error(db_url: str, tmp_path: Path) -> None:
    """start() raising SystemExit(0) as a job joins the running batch is that job's unexpected
    error, as from generate(): retried, completing once a start passes or failing when its attempts
    are spent; the jobs joining beside it complete on their first attempt. (The daemon exited 0.)"""
    ids = enqueue(db_url, ["fine", "start-exit:1", "start-exit:9", "fine"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, "ScriptedSlots", continuous=True), log) == 0, log.read_text()[-3000:]
    assert outcomes(db_url, ids) == [("completed", 1, None), ("completed", 2, None),
                                     ("failed", 2, "SystemExit: 0 (gave up after 2 attempts)"), ("completed", 1, None)]


def test_continuous__system_exit_from_a_step_is_a_failed_step(db_url: str, tmp_path: Path) -> None:
    """A decoding step raising SystemExit(0) is a failed step, as any error from step(): its jobs go
    back marked and run alone, so the job that breaks every step is charged in the end and the job
    beside it completes; the log names the step and what it raised. (The daemon exited 0.)"""
    ids = enqueue(db_url, ["step-exit:1000000", "fine"], max_attempts=2)
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, "ScriptedSlots", continuous=True), log) == 0, log.read_text()[-3000:]
    jobs = rows(db_url)
    assert [(jobs[i].status, jobs[i].attempts) for i in ids] == [("failed", 2), ("completed", 1)]
    message = jobs[ids[0]].error_message or ""
    assert "raised SystemExit(0)" in message and "given back 5 times already: counted against the job" in message, \
        message
    assert any(e.get("event", "").startswith(f"the generator's step() of job {ids[0]} raised SystemExit(0)")
               for e in logged(log))


def test_daemon__system_exit_at_load_exits_non_zero_naming_it(db_url: str, tmp_path: Path) -> None:
    """load() raising SystemExit(0) (no job to charge) ends the worker with exit 70, not 0, so
    systemd restarts it: a log line and the error line name load() and SystemExit(0). The job
    waiting stays pending, unspent. (The worker exited 0 and said nothing.)"""
    ids = enqueue(db_url, ["fine"])
    log = tmp_path / "worker.log"
    assert burst(config(tmp_path, db_url, "ExitingLoad"), log) == EX_SOFTWARE, log.read_text()[-3000:]
    assert outcomes(db_url, ids) == [("pending", 0, None)]
    assert any(e.get("event", "").startswith("the generator's load() raised SystemExit(0)") for e in logged(log))
    assert "dgxqueue: error: the generator's load() raised SystemExit(0)" in log.read_text()
