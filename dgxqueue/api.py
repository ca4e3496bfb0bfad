"""The producer's front door: ``enqueue`` one job or ``enqueue_many`` in one transaction; and
``live_daemons``, the registry of the daemons serving the queue.

Each call opens its own transaction on the process-wide engine of its database and commits it
before returning, so the returned ids are durable (as far as the engine's settings make them).
The first call on a database checks it (:func:`dgxqueue.storage.database.open_queue`): only the
built-in default location is created on first use; any other database must exist at the newest
schema (``dgxqueue db upgrade``), else :class:`~dgxqueue.errors.SchemaError`. Later calls skip
that check. A pooled connection the server has ended (it restarted, or closed it while idle) is
replaced, and the call tried once more: nothing was written on it.

Settings: pass ``settings`` to choose them; otherwise :func:`dgxqueue.config.load_settings` is run
once per process and reused while ``$DGXQUEUE_CONFIG``, that file's modification time,
``$DATABASE_URL`` and the ``DGXQUEUE_*`` variables stay the same.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from dgxqueue.config import Settings, load_settings
from dgxqueue.storage import admin, get_engine, queue, reads, registry, search, session_scope
from dgxqueue.storage.database import open_queue
from dgxqueue.storage.models import Generation, GenerationStatus
from dgxqueue.storage.registry import LiveDaemon
from dgxqueue.storage.validation import JobSpec, validate_job, validate_jobs

__all__ = ["enqueue", "enqueue_many", "live_daemons", "pause", "paused_models", "resume", "search_generations"]

_lock = threading.Lock()
_settings_cache: dict[tuple[Any, ...], Settings] = {}
_ready_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # schema checked at head


def _settings_key() -> tuple[Any, ...]:
    """What load_settings() depends on: the DGXQUEUE_* and DATABASE_URL variables, the file's mtime."""
    # os.environ decodes every variable on iteration, on every call; on POSIX its bytes mapping
    # can be filtered as it is.
    raw = getattr(os.environ, "_data", None)
    items: Iterable[tuple[Any, Any]] = raw.items() if isinstance(raw, dict) else os.environ.items()
    variables = tuple(sorted(
        (k, v) for k, v in items if k[:9] in (b"DGXQUEUE_", "DGXQUEUE_") or k in (b"DATABASE_URL", "DATABASE_URL")
    ))
    config = os.environ.get("DGXQUEUE_CONFIG")
    mtime: int | None = None
    if config:
        try:
            mtime = os.stat(config).st_mtime_ns
        except OSError:
            mtime = None  # load_settings reports the missing file
    return (mtime, variables)


def default_settings() -> Settings:
    """``load_settings()``, cached per process until the environment or the config file changes."""
    key = _settings_key()
    settings = _settings_cache.get(key)
    if settings is None:
        settings = load_settings()
        with _lock:
            _settings_cache.clear()  # keep only the current one
            _settings_cache[key] = settings
    return settings


def _engine(database_url: str | None, settings: Settings) -> Engine:
    engine = get_engine(database_url or settings.database.url, settings.database)
    if engine not in _ready_engines:
        open_queue(database_url or settings.database.url, settings.database, create="default")
        with _lock:
            _ready_engines.add(engine)
    return engine


def enqueue(
    prompt: str,
    *,
    model_name: str | None = None,
    duration_seconds: float | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
    file_path: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    priority: int = 0,
    run_after: datetime | timedelta | None = None,
    max_attempts: int | None = None,
    model_version: str | None = None,
    expires_at: datetime | None = None,
    ttl: float | None = None,
    dedupe_key: str | None = None,
    database_url: str | None = None,
    settings: Settings | None = None,
) -> str:
    """Queue one generation and count its prompt, committed; returns its id (a UUID v4).

    Left-out fields take the configured defaults (``jobs.default_*``). ``expires_at`` (a
    timezone-aware datetime) or ``ttl`` (seconds from now): a job still pending then is failed as
    expired without being run. ``run_after``: not before this datetime, or this timedelta after
    the insert (by the database's clock, as a ``ttl``). ``dedupe_key``: while an unfinished (pending or processing) job
    holds the key, that job's id comes back and nothing is inserted. Bad input raises
    :class:`~dgxqueue.errors.ValidationError` and writes nothing.
    """
    settings = settings or default_settings()
    engine = _engine(database_url, settings)
    job = validate_job(prompt, model_name=model_name, duration_seconds=duration_seconds, sample_rate=sample_rate,
                       channels=channels, file_path=file_path, metadata=metadata, model_version=model_version,
                       priority=priority, run_after=run_after, max_attempts=max_attempts,
                       expires_at=expires_at, ttl=ttl, dedupe_key=dedupe_key,
                       limits=settings.jobs, outputs=settings.outputs)
    return queue.insert_committed(engine, [job])[0]


def enqueue_many(
    specs: Iterable[Mapping[str, Any] | JobSpec],
    *,
    database_url: str | None = None,
    settings: Settings | None = None,
) -> list[str]:
    """Queue many generations in one transaction (all or none); returns their ids in order.

    Each spec holds the keyword arguments of :func:`enqueue` (``prompt`` required), or is a
    :class:`~dgxqueue.storage.JobSpec` validated already. Every spec is validated before anything
    is written: one bad spec raises :class:`~dgxqueue.errors.ValidationError` and writes nothing.
    """
    settings = settings or default_settings()
    engine = _engine(database_url, settings)
    jobs = validate_jobs(specs, limits=settings.jobs, outputs=settings.outputs)
    return queue.insert_committed(engine, jobs)  # one transaction, retried once on a connection found dead


def live_daemons(
    *, include_stale: bool = False, database_url: str | None = None, settings: Settings | None = None,
) -> list[LiveDaemon]:
    """The daemons registered on the queue's database, oldest first: live ones (refreshed within
    their lease), and with ``include_stale`` also those whose entry went stale (marked ``stale``).
    Each says its host, pid, generator, models, version, start, last heartbeat and the job ids it
    holds (see :mod:`dgxqueue.storage.registry`)."""
    settings = settings or default_settings()
    with session_scope(_engine(database_url, settings)) as session:
        return registry.daemons(session, include_stale=include_stale)


def pause(model: str, reason: str | None = None, *, database_url: str | None = None,
          settings: Settings | None = None) -> bool:
    """Stop every daemon claiming ``model``, from its next claim; jobs already running finish.
    Returns False if it was paused already (``reason`` then replaces the one recorded)."""
    settings = settings or default_settings()
    with session_scope(_engine(database_url, settings)) as session:
        return admin.pause_model(session, model, reason)


def resume(model: str, *, database_url: str | None = None, settings: Settings | None = None) -> bool:
    """Let daemons claim ``model`` again; idle ones are woken at once on PostgreSQL, and notice
    the change by themselves on SQLite. Returns False if it was not paused."""
    settings = settings or default_settings()
    with session_scope(_engine(database_url, settings)) as session:
        return admin.resume_model(session, model)


def paused_models(*, database_url: str | None = None, settings: Settings | None = None) -> dict[str, str | None]:
    """Each paused model with its reason."""
    settings = settings or default_settings()
    with session_scope(_engine(database_url, settings)) as session:
        return reads.paused_models(session)


def search_generations(
    query: str, *, status: GenerationStatus | str | None = None, model: str | None = None, limit: int = 100,
    offset: int = 0, database_url: str | None = None, settings: Settings | None = None,
) -> list[Generation]:
    """The generations whose prompt has, for every word of ``query``, a word starting with it
    (case ignored, punctuation ignored, nothing in ``query`` read as syntax), newest first;
    optionally of one ``status`` and one ``model``. The same rows on SQLite and PostgreSQL
    (:mod:`dgxqueue.storage.search` defines a word); a query of punctuation only finds nothing. An
    empty query raises :class:`~dgxqueue.errors.ValidationError` naming the field ``search``."""
    settings = settings or default_settings()
    with session_scope(_engine(database_url, settings)) as session:
        return search.search_jobs(session, query, status=status, model=model, limit=limit, offset=offset)
