"""Log lines: JSON off a terminal, console on one, one summary line per finished job."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from dgxqueue.config import LoggingSettings
from dgxqueue.hooks import DaemonInfo
from dgxqueue.logs import LogHooks, configure_logging, get_logger
from dgxqueue.storage.claimed import ClaimedJob

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
JOB_KEYS = {"job_id", "model", "attempt", "worker_id"}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "_dgxqueue", False)]:
        root.removeHandler(handler)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def job(job_id: str, attempt: int = 1) -> ClaimedJob:
    return ClaimedJob(job_id, "a prompt", "synth", 10.0, 32000, 1, "outputs/x.wav", None, attempt, 3,
                      T0, T0 + timedelta(seconds=4))


def test_configure_logging__auto_off_a_terminal_writes_json_lines() -> None:
    """Format auto on a non-terminal stream gives JSON with ISO UTC time, level, logger, context."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="auto", level="info"), stream=stream)
    log = get_logger("dgxqueue.test", worker_id="w-1")
    log.info("hello", n=3)
    log.debug("hidden below the level")
    [line] = lines(stream)
    assert line["event"] == "hello" and line["n"] == 3 and line["worker_id"] == "w-1"
    assert line["level"] == "info" and line["logger"] == "dgxqueue.test"
    assert datetime.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)


def test_configure_logging__exceptions_become_structured_tracebacks() -> None:
    """log.exception puts the exception's type, message and frames in the JSON line."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json"), stream=stream)
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError:
        get_logger("t").exception("generation failed", job_id="j")
    [line] = lines(stream)
    [exc] = line["exception"]
    assert exc["exc_type"] == "RuntimeError" and exc["exc_value"] == "CUDA out of memory"
    assert exc["frames"] and "locals" not in exc["frames"][0]


def test_configure_logging__library_records_use_the_same_format() -> None:
    """A standard-library warning (SQLAlchemy, alembic) comes out as a JSON line too."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json"), stream=stream)
    logging.getLogger("sqlalchemy.pool").warning("pool %s", "exhausted")
    [line] = lines(stream)
    assert line["event"] == "pool exhausted" and line["logger"] == "sqlalchemy.pool"
    assert line["level"] == "warning"


def test_configure_logging__auto_on_a_terminal_is_console() -> None:
    """Format auto on a real terminal (a pty) renders readable console lines, not JSON."""
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            configure_logging(LoggingSettings(format="auto"), stream=tty)
            get_logger("dgxqueue.test").info("model loaded", seconds=1.5)
            tty.flush()
        text = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "model loaded" in text and "seconds" in text
    assert not text.lstrip().startswith("{")


def test_configure_logging__console_shows_control_characters_as_escapes() -> None:
    """On the console an escape sequence in a message, a value, a library's record or an
    exception's text (a prompt, a backend's error) is shown, not obeyed; a traceback keeps its
    line breaks. (Before, the console wrote them raw: ESC [2J cleared the operator's screen.)"""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="console"), stream=stream)
    log = get_logger("dgxqueue.test")
    log.warning("refused \x1b[2J", prompt="beat\x1b]0;pwned\x07", model="\u202emusicgen", ids=["a\x1bb"])
    try:
        raise ValueError("bad prompt \x1b[31mred")
    except ValueError:
        log.exception("generation failed")
    logging.getLogger("sqlalchemy.pool").warning("pool \x1b[2J %s", "exhausted")
    text = stream.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, repr(text)
    for shown in (r"refused \x1b[2J", r"prompt=beat\x1b]0;pwned\x07", r"model=\u202emusicgen", r"['a\x1bb']",
                  r"ValueError: bad prompt \x1b[31mred", r"pool \x1b[2J exhausted"):
        assert shown in text, (shown, text)
    assert "Traceback (most recent call last):\n" in text


def test_log_hooks__one_summary_line_per_finished_job_with_context() -> None:
    """Each finished job gives one 'job finished' line with job_id, model, attempt, worker_id, timings."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="info"), stream=stream)
    hooks = LogHooks(worker_id="gpu0")
    hooks.on_start(DaemonInfo("gpu0", "synth", ("synth",), "sqlite", "0.1.0"))
    hooks.on_model_loaded(2.0)
    jobs = [job("a"), job("b"), job("c", attempt=2)]
    hooks.on_claimed(jobs, T0)
    hooks.on_batch(3)
    hooks.on_job_finished(jobs[0], "completed", generation_seconds=1.5, audio_seconds=10.0, error=None)
    hooks.on_job_finished(jobs[1], "failed", generation_seconds=1.5, audio_seconds=None, error="boom")
    hooks.on_job_finished(jobs[2], "retried", generation_seconds=None, audio_seconds=None, error="oom")
    hooks.on_rescued(["d"], ["e"])
    hooks.on_stop()
    logged = lines(stream)
    summaries = [line for line in logged if line["event"] == "job finished"]
    assert [s["job_id"] for s in summaries] == ["a", "b", "c"]
    assert all(s.keys() >= JOB_KEYS and s["worker_id"] == "gpu0" for s in summaries)
    first = summaries[0]
    assert (first["outcome"], first["generation_seconds"], first["queue_wait_seconds"],
            first["audio_seconds"], first["attempt"], first["model"]) == ("completed", 1.5, 4.0, 10.0, 1, "synth")
    assert [s["level"] for s in summaries] == ["info", "warning", "info"]
    assert summaries[1]["error"] == "boom"
    assert [line["event"] for line in logged if "job_id" not in line] == [
        "daemon starting", "model loaded", "daemon stopped"]
    rescued = [line for line in logged if line["event"] == "job rescued"]
    assert [(r["job_id"], r["result"], r["worker_id"]) for r in rescued] == [
        ("d", "requeued", "gpu0"), ("e", "failed", "gpu0")]


def test_log_hooks__claimed_lines_at_debug_carry_job_context() -> None:
    """At debug, each claimed job logs its queue wait with the job's context."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="debug"), stream=stream)
    LogHooks(worker_id="gpu1").on_claimed([job("a")], T0)
    [line] = lines(stream)
    assert line["event"] == "job claimed" and line.keys() >= JOB_KEYS and line["queue_wait_seconds"] == 4.0
