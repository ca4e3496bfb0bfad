"""The producer's hot path: :func:`repository.insert_jobs` on a bare DB-API connection.

The statements are the repository's own Core constructs (the generation INSERT, the prompt upsert,
``pg_notify``), compiled once per dialect by :mod:`driver`. One ``enqueue`` thus costs the driver's
work plus a few dict operations, instead of a Session, a Core execution context and a
statement-cache lookup per statement.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

from dgxqueue.storage import repository
from dgxqueue.storage.driver import Compiled, transaction

_JOB_COLUMNS = (
    "id", "prompt", "model_name", "model_version", "duration_seconds", "sample_rate", "channels",
    "file_path", "status", "created_at", "metadata", "priority", "attempts", "max_attempts", "run_after",
)
_PROMPT_COLUMNS = ("text", "used_count", "first_used_at", "last_used_at")


@dataclass(frozen=True)
class _Statements:
    insert_job: Compiled
    upsert_prompt: Compiled
    notify: Compiled | None


_cache: weakref.WeakKeyDictionary[Dialect, _Statements] = weakref.WeakKeyDictionary()


def _statements(dialect: Dialect) -> _Statements:
    found = _cache.get(dialect)
    if found is None:
        notify = None
        if dialect.name == "postgresql":
            call = sa.select(sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text),
                                               sa.bindparam("model", type_=sa.Text)))
            notify = Compiled.of(call, dialect, ("channel", "model"))
        found = _cache[dialect] = _Statements(
            insert_job=Compiled.of(sa.insert(repository.G), dialect, _JOB_COLUMNS),
            # inline(): no RETURNING of the prompt's id, which nobody reads here.
            upsert_prompt=Compiled.of(
                repository.prompt_upsert(dialect.name).inline(), dialect, _PROMPT_COLUMNS
            ),
            notify=notify,
        )
    return found


def insert_jobs(engine: Engine, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert validated job rows and count their prompts in one committed transaction.

    The same writes as :func:`repository.insert_jobs`. Driver errors come out as SQLAlchemy's
    ``DBAPIError`` subclasses, as they would through a Session; nothing is written on error.
    A pooled connection found dead on the first statement (the server restarted, or ended it
    while idle) is replaced once: nothing can have been written on it.
    """
    if not rows:
        return
    statements = _statements(engine.dialect)
    now = rows[0]["created_at"]
    counts = Counter(str(row["prompt"]) for row in rows) if len(rows) > 1 else {rows[0]["prompt"]: 1}
    prompt_rows = [
        {"text": text, "used_count": n, "first_used_at": now, "last_used_at": now}
        for text, n in sorted(counts.items())  # sorted: concurrent batches lock in one order
    ]
    models = sorted({str(row["model_name"]) for row in rows}) if statements.notify is not None else []
    try:
        _transaction(engine, statements, rows, prompt_rows, models)
    except sa.exc.DBAPIError as exc:
        if not (exc.connection_invalidated and getattr(exc, "before_first_write", False)):
            raise
        _transaction(engine, statements, rows, prompt_rows, models)


def _transaction(engine: Engine, statements: _Statements, rows: Sequence[Mapping[str, Any]],
                 prompt_rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> None:
    with transaction(engine) as cursor:
        cursor.executemany(statements.insert_job, rows)
        cursor.executemany(statements.upsert_prompt, prompt_rows)
        if statements.notify is not None:
            cursor.executemany(statements.notify, [{"channel": repository.NOTIFY_CHANNEL, "model": m} for m in models])
