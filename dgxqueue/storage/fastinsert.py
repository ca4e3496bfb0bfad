"""The producer's hot path: :func:`repository.insert_jobs` on a bare DB-API connection.

The statements are the repository's own Core constructs (the generation INSERT, the prompt upsert,
``pg_notify``), compiled once per dialect together with their bind processors, then run on the
pooled driver connection. One ``enqueue`` thus costs the driver's work plus a few dict operations,
instead of a Session, a Core execution context and a statement-cache lookup per statement.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql.expression import ClauseElement

from dgxqueue.storage import repository

_JOB_COLUMNS = (
    "id", "prompt", "model_name", "model_version", "duration_seconds", "sample_rate", "channels",
    "file_path", "status", "created_at", "metadata", "priority", "attempts", "max_attempts", "run_after",
)
_PROMPT_COLUMNS = ("text", "used_count", "first_used_at", "last_used_at")


@dataclass(frozen=True)
class _Compiled:
    """One statement compiled for one dialect, with what turns values into driver parameters."""

    sql: str
    positional: bool  # qmark/numeric paramstyles take a tuple, the others a dict
    # (name, processor or None, default): one per parameter, in the statement's order. A default
    # is the value of one of the statement's own literals (the 0 of coalesce(used_count, 0)).
    binds: tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect, keys: Sequence[str]) -> _Compiled:
        compiled: Any = statement.compile(dialect=dialect, column_keys=list(keys))
        processors = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for bind, name in compiled.bind_names.items()
        }
        params = compiled.params
        order = compiled.positiontup if compiled.positional else list(params)
        binds = tuple(
            (name, processors.get(name), _REQUIRED if name in keys else params[name]) for name in order
        )
        return cls(compiled.string, bool(compiled.positional), binds)

    def parameters(self, values: Mapping[str, Any]) -> Any:
        processed = [
            (name, value if process is None else process(value))
            for name, process, default in self.binds
            for value in (values[name] if default is _REQUIRED else default,)
        ]
        if self.positional:
            return tuple(value for _, value in processed)
        return dict(processed)


_REQUIRED = object()


@dataclass(frozen=True)
class _Statements:
    insert_job: _Compiled
    upsert_prompt: _Compiled
    notify: _Compiled | None


_cache: weakref.WeakKeyDictionary[Dialect, _Statements] = weakref.WeakKeyDictionary()


def _statements(dialect: Dialect) -> _Statements:
    found = _cache.get(dialect)
    if found is None:
        notify = None
        if dialect.name == "postgresql":
            call = sa.select(sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text),
                                               sa.bindparam("model", type_=sa.Text)))
            notify = _Compiled.of(call, dialect, ("channel", "model"))
        found = _cache[dialect] = _Statements(
            insert_job=_Compiled.of(sa.insert(repository.G), dialect, _JOB_COLUMNS),
            # inline(): no RETURNING of the prompt's id, which nobody reads here.
            upsert_prompt=_Compiled.of(
                repository.prompt_upsert(dialect.name).inline(), dialect, _PROMPT_COLUMNS
            ),
            notify=notify,
        )
    return found


def _run(cursor: Any, statement: _Compiled, rows: Sequence[Mapping[str, Any]]) -> None:
    if len(rows) == 1:
        cursor.execute(statement.sql, statement.parameters(rows[0]))
    else:
        cursor.executemany(statement.sql, [statement.parameters(row) for row in rows])


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
    dialect = engine.dialect
    connection = engine.raw_connection()
    cursor = connection.cursor()
    current: _Compiled = statements.insert_job
    try:
        _run(cursor, current, rows)
        current = statements.upsert_prompt
        _run(cursor, current, prompt_rows)
        if statements.notify is not None:
            current = statements.notify
            _run(cursor, current, [{"channel": repository.NOTIFY_CHANNEL, "model": m} for m in models])
        connection.commit()
    except dialect.loaded_dbapi.Error as exc:
        disconnected = dialect.is_disconnect(exc, connection.dbapi_connection, cursor)
        if disconnected:
            connection.invalidate(exc)
        else:
            connection.rollback()
        error = sa.exc.DBAPIError.instance(
            current.sql, None, exc, dialect.loaded_dbapi.Error,
            connection_invalidated=disconnected, dialect=dialect,
        )
        error.before_first_write = current is statements.insert_job  # type: ignore[attr-defined]
        raise error from exc
    except BaseException:
        connection.rollback()
        raise
    finally:
        cursor.close()
        connection.close()  # back to the pool
