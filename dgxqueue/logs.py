"""Structured logs with structlog: JSON lines under systemd, a readable console on a terminal.

:func:`configure_logging` runs once at start-up. Format ``auto`` writes JSON lines when stdout is
not a terminal (journald keeps them whole) and the console renderer when it is. Every line has an
ISO-8601 UTC timestamp, level, logger name and event; exceptions come out as a structured
traceback in JSON and a readable one on the console. Records from the standard library's
``logging`` (SQLAlchemy, alembic) go through the same renderer.

:class:`LogHooks` turns the daemon's hooks into log lines: one summary line per finished job, and
every line about a job carries ``job_id``, ``model``, ``attempt`` and ``worker_id``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

from dgxqueue.config import LoggingSettings
from dgxqueue.hooks import DaemonInfo, Hooks
from dgxqueue.storage.claimed import ClaimedJob
from dgxqueue.terminal import safe, safe_lines

__all__ = ["LogHooks", "configure_logging", "get_logger", "job_context"]

#: Outcomes that deserve a warning rather than an info line.
WARN_OUTCOMES = frozenset({"failed", "fenced"})


def configure_logging(settings: LoggingSettings | None = None, *, stream: TextIO | None = None) -> None:
    """Send every log line to ``stream`` (stdout) in the configured format, from the given level."""
    settings = settings or LoggingSettings()
    stream = stream if stream is not None else sys.stdout
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    as_json = settings.format == "json" or (settings.format == "auto" and not _isatty(stream))
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        # Structured tracebacks, without locals: they could carry prompts or a database password.
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
        renderer = structlog.processors.JSONRenderer()
    else:
        console = structlog.dev.ConsoleRenderer(
            colors=_isatty(stream), exception_formatter=structlog.dev.plain_traceback)

        def renderer(logger: Any, name: str, event_dict: structlog.typing.EventDict) -> str:
            return console(logger, name, _terminal_safe(logger, name, event_dict))
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda name="", *_: _NamedWriteLogger(stream, str(name)),
        cache_logger_on_first_use=False,  # so a later configure_logging (tests) takes effect
    )
    # Library records (SQLAlchemy, alembic, warnings) in the same format on the same stream.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_dgxqueue", False)]:
        root.removeHandler(old)
    handler._dgxqueue = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))  # libraries are chatty at info
    logging.captureWarnings(True)


def _terminal_safe(logger: Any, name: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """The console's line with every control character in its text shown as an escape: a prompt,
    a model name or a backend's error message may hold an escape sequence. JSON escapes its own."""
    if event_dict.get("exc_info"):  # the traceback as text, its line breaks kept, nothing else
        event_dict = structlog.processors.format_exc_info(logger, name, event_dict)
    return {key: (safe_lines if key in ("exception", "stack") else safe)(value) if isinstance(value, str) else value
            for key, value in event_dict.items()}


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or minimal stream
        return False


def get_logger(name: str, **context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger whose lines carry ``logger=name`` and ``context``."""
    # A lazy proxy: built at its first line, so a module-level logger follows configure_logging().
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name, **context)
    return logger


class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger with a ``name``, which ``add_logger_name`` puts on each line."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def job_context(job: ClaimedJob, worker_id: str) -> dict[str, Any]:
    """The keys every line about ``job`` carries."""
    return {"job_id": job.id, "model": job.model_name, "attempt": job.attempt, "worker_id": worker_id}


class LogHooks(Hooks):
    """Logs the daemon's lifecycle: start, model loaded, one summary per finished job, rescues."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        # bind() builds the logger now, from the configuration in force (configure_logging comes
        # first): a lazy proxy would rebuild it on every line, repeating work the line need not do.
        self.log = get_logger("dgxqueue.daemon").bind(worker_id=worker_id)
        self._debug = self.log.is_enabled_for(logging.DEBUG)

    def on_start(self, info: DaemonInfo) -> None:
        self.log.info("daemon starting", generator=info.generator, models=list(info.models),
                      engine=info.engine, version=info.version)

    def on_model_loaded(self, seconds: float) -> None:
        self.log.info("model loaded", seconds=round(seconds, 3))

    def on_claimed(self, jobs: Sequence[ClaimedJob], now: datetime) -> None:
        if not self._debug:
            return
        for job in jobs:
            self.log.debug("job claimed", **job_context(job, self.worker_id),
                           queue_wait_seconds=_wait(job))

    def on_batch(self, size: int) -> None:
        self.log.debug("batch started", size=size)

    def on_job_finished(self, job: ClaimedJob, outcome: str, *, generation_seconds: float | None,
                        audio_seconds: float | None, error: str | None) -> None:
        method = self.log.warning if outcome in WARN_OUTCOMES else self.log.info
        method("job finished", **job_context(job, self.worker_id), outcome=outcome,
               generation_seconds=generation_seconds, queue_wait_seconds=_wait(job),
               audio_seconds=audio_seconds, error=error)

    def on_rescued(self, requeued: Sequence[str], failed: Sequence[str]) -> None:
        # The rescuer knows only ids here; model and attempt are in the database.
        for job_id in requeued:
            self.log.warning("job rescued", job_id=job_id, result="requeued")
        for job_id in failed:
            self.log.warning("job rescued", job_id=job_id, result="failed")

    def on_stop(self) -> None:
        self.log.info("daemon stopped")


def _wait(job: ClaimedJob) -> float:
    return round(max(0.0, (job.claimed_at - job.created_at).total_seconds()), 3)
