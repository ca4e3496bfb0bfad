"""The queue's statements, compiled once and run on a held DB-API connection (HeldConnection).

A Session and a Core execution context cost more than the statement itself on SQLite, on every
call. The queue's hot calls (:mod:`~dgxqueue.storage.queue`: insert, claim, mark started,
finish) therefore compile their Core constructs once per dialect, together with their bind and
result processors, and run them on the pooled driver connection. Errors come out as
SQLAlchemy's ``DBAPIError`` subclasses, as through a Session, so callers' retry rules are
unchanged. Nothing here writes SQL: it only compiles what the queue builds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql.expression import ClauseElement

from dgxqueue.storage.engines import profile_of

_REQUIRED = object()
_Processor = Callable[[Any], Any]


@dataclass(frozen=True)
class Compiled:
    """One statement compiled for one dialect, with what turns values into driver parameters
    and driver rows back into Python values."""

    sql: str
    positional: bool  # qmark/numeric paramstyles take a tuple, the others a dict
    # (name, processor or None, default): one per parameter, in the statement's order. A default
    # is the value of one of the statement's own literals (the 0 of coalesce(used_count, 0)).
    binds: tuple[tuple[str, _Processor | None, Any], ...]
    dialect: Dialect
    result_types: tuple[Any, ...]  # the type of each RETURNING column
    # Result processors by the driver's type codes (cursor.description), which some need.
    _results: dict[tuple[Any, ...], tuple[_Processor | None, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect, keys: Sequence[str] = ()) -> Compiled:
        """``keys``: the columns an INSERT sets (its ``column_keys``)."""
        compiled: Any = statement.compile(dialect=dialect, column_keys=list(keys) or None)
        processors = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for bind, name in compiled.bind_names.items()
        }
        required = {name for bind, name in compiled.bind_names.items() if bind.required or name in keys}
        params = compiled.params
        order = compiled.positiontup if compiled.positional else list(params)
        binds = tuple(
            (name, processors.get(name), _REQUIRED if name in required else params[name]) for name in order
        )
        result_types = tuple(column.type.dialect_impl(dialect) for column in compiled._result_columns)
        return cls(compiled.string, bool(compiled.positional), binds, dialect, result_types)

    def parameters(self, values: Mapping[str, Any]) -> Any:
        processed = []  # a plain loop: this runs once per statement on the daemon's hot path
        for name, process, default in self.binds:
            value = values[name] if default is _REQUIRED else default
            processed.append(value if process is None else process(value))
        if self.positional:
            return tuple(processed)
        return dict(zip([name for name, _, _ in self.binds], processed, strict=True))

    def rows(self, cursor: Any) -> list[list[Any]]:
        """The rows of a RETURNING statement just run, each value through its column's processor."""
        return self.processed(cursor.description, cursor.fetchall())

    def processed(self, description: Sequence[Any], fetched: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """``fetched`` (a cursor's rows, whatever fetched them: an async cursor too) with each
        value through its column's processor; ``description``: that cursor's."""
        codes = tuple(column[1] for column in description)
        processors = self._results.get(codes)
        if processors is None:
            processors = self._results[codes] = tuple(
                kind.result_processor(self.dialect, code) for kind, code in zip(self.result_types, codes, strict=True)
            )
        rows = [list(row) for row in fetched]
        for i, process in enumerate(processors):
            if process is not None:
                for row in rows:
                    row[i] = process(row[i])
        return rows


class Pending:
    """The rows a submitted statement returns, available once its transaction has committed."""

    def __init__(self, statement: Compiled, raw: Any) -> None:
        self.statement = statement
        self.raw = raw
        self.rows: list[list[Any]] = []

    def resolve(self) -> None:
        self.rows = self.statement.rows(self.raw)
        self.raw.close()


class Cursor:
    """A DB-API cursor that runs :class:`Compiled` statements and remembers which one is running,
    so that an error can name it."""

    def __init__(self, connection: Any, *, pipelined: bool = False) -> None:
        self.connection = connection
        self.pipelined = pipelined
        self.raw = connection.cursor()
        self.current: Compiled | None = None
        self.wrote = False  # a statement has completed: a retry could repeat its effect
        self.pending: list[Pending] = []

    def submit(self, statement: Compiled, values: Mapping[str, Any]) -> Pending:
        """Run a statement with RETURNING. Its rows are read at once, or in a pipelined transaction
        after the commit, so that all its statements and the COMMIT travel in one round trip."""
        self.current = statement
        raw = self.connection.cursor()  # a cursor per statement keeps each one's results
        raw.execute(statement.sql, statement.parameters(values))
        self.wrote = True
        pending = Pending(statement, raw)
        if self.pipelined:
            self.pending.append(pending)
        else:  # SQLite cannot commit while a statement has rows left to step through
            pending.resolve()
        return pending

    def execute(self, statement: Compiled, values: Mapping[str, Any]) -> None:
        self.current = statement
        self.raw.execute(statement.sql, statement.parameters(values))
        self.wrote = True

    def executemany(self, statement: Compiled, rows: Sequence[Mapping[str, Any]]) -> None:
        if len(rows) == 1:
            self.execute(statement, rows[0])
            return
        self.current = statement
        self.raw.executemany(statement.sql, [statement.parameters(row) for row in rows])
        self.wrote = True


class HeldConnection:
    """A pooled connection kept checked out for one thread's repeated hot-path calls (the
    daemon's main loop), which saves a pool checkout and reset per call. A connection found
    broken is given back to the pool as invalid, and the next call checks out a fresh one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._connection: Any = None

    @contextlib.contextmanager
    def transaction(self, *, autocommit: bool = False, pipeline: bool = False) -> Iterator[Cursor]:
        """A cursor; commits when the block succeeds, rolls back otherwise.

        ``autocommit`` (PostgreSQL): the block runs a single statement, which is atomic on its
        own, so the BEGIN and COMMIT round trips are skipped. ``pipeline`` (PostgreSQL): the block
        only :meth:`~Cursor.submit` s statements, sent with the BEGIN and the COMMIT in one round
        trip (psycopg's pipeline mode). A driver error is raised as a
        ``DBAPIError`` whose ``connection_invalidated`` says whether the connection was lost, and
        whose ``before_first_write`` says that no statement of the block had completed.
        """
        dialect = self.dialect
        if self._connection is None:
            self._connection = self._checkout()
        connection = self._connection
        driver: Any = connection.dbapi_connection
        profile = profile_of(dialect)
        autocommit = autocommit and profile.one_round_trip
        pipeline = pipeline and profile.one_round_trip
        cursor = Cursor(connection, pipelined=pipeline)
        pipelined = contextlib.ExitStack()
        try:
            if autocommit:
                driver.autocommit = True
            if pipeline:
                pipelined.enter_context(driver.pipeline())
            if profile.begin is not None:  # SQLite's BEGIN IMMEDIATE (engines.SQLiteProfile says why)
                cursor.raw.execute(profile.begin)
            yield cursor
            if not autocommit:
                connection.commit()
            pipelined.close()
            for pending in cursor.pending:
                pending.resolve()
        except dialect.loaded_dbapi.Error as exc:
            # Out of pipeline mode first: inside it, psycopg answers the rollback with
            # PipelineAborted, which would replace this error (the one that says what failed).
            with contextlib.suppress(dialect.loaded_dbapi.Error):
                pipelined.close()
            disconnected = dialect.is_disconnect(exc, driver, cursor.raw)
            if disconnected:
                # As SQLAlchemy does for a Session: the whole pool's connections of that age are
                # recycled, since a server restart ended every one of them, not just this one.
                self.engine.pool._invalidate(connection, exc)
                self.close()
            else:
                connection.rollback()
            statement = cursor.current.sql if cursor.current else None
            raise _as_sqlalchemy(dialect, exc, statement, disconnected, before_first_write=not cursor.wrote) from exc
        except BaseException:
            with contextlib.suppress(dialect.loaded_dbapi.Error):
                pipelined.close()
            connection.rollback()
            raise
        finally:
            with contextlib.suppress(dialect.loaded_dbapi.Error):  # after an error: already reported
                pipelined.close()
            cursor.raw.close()
            if autocommit and connection.is_valid:
                with contextlib.suppress(dialect.loaded_dbapi.Error):  # a broken one is discarded anyway
                    driver.autocommit = False  # the pool hands out transactional connections

    def _checkout(self) -> Any:
        # Engine.raw_connection() lets the driver's own error through (psycopg's "connection
        # failed" while a server restarts): raised as SQLAlchemy's, so callers' retry rules apply.
        dialect = self.dialect
        try:
            return self.engine.raw_connection()
        except dialect.loaded_dbapi.Error as exc:
            disconnected = dialect.is_disconnect(exc, None, None)
            raise _as_sqlalchemy(dialect, exc, None, disconnected, before_first_write=True) from exc

    def close(self) -> None:
        """Give the connection back to the pool."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _as_sqlalchemy(dialect: Dialect, exc: Exception, statement: str | None, disconnected: bool, *,
                   before_first_write: bool) -> sa.exc.StatementError:
    """The driver's error as SQLAlchemy raises it through a Session, with ``before_first_write``."""
    error = sa.exc.DBAPIError.instance(
        statement, None, exc, dialect.loaded_dbapi.Error, connection_invalidated=disconnected, dialect=dialect,
    )
    error.before_first_write = before_first_write  # type: ignore[attr-defined]
    return error


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[Cursor]:
    """:meth:`HeldConnection.transaction` on a connection checked out for this one transaction."""
    link = HeldConnection(engine)
    try:
        with link.transaction() as cursor:
            yield cursor
    finally:
        link.close()
