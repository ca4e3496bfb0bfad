"""What a database error means: worth retrying, caused by a value, or the database unavailable.

The daemon's retries (:mod:`dgxqueue.daemon.queue_client`), the fenced finish's one-by-one
fallback (:mod:`dgxqueue.storage.queue`) and the CLI's exit codes all classify errors here.
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

# Serialization failure, deadlock, lock not available; and whole SQLSTATE classes: connection
# exceptions, insufficient resources, operator intervention (shutdowns), system errors.
_RETRYABLE_PGCODES = {"40001", "40P01", "55P03"}
_RETRYABLE_PGCLASSES = {"08", "53", "57", "58"}
# Busy and locked; and the machine's faults under the database file (an I/O error, its disk
# full), which pass once the machine recovers, as a PostgreSQL server's full disk (53100) does.
_SQLITE_TRANSIENT = {5, 6, 10, 13}  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL
# Errors that say the database cannot be used now, as opposed to one statement that failed: the
# transient ones, and what no retry fixes but a command cannot get past either. PostgreSQL:
# authorization (28) and no such database (3D). SQLite primary result codes: no permission, busy,
# locked, read-only, I/O error, corrupt, disk full, cannot open, not a database.
_PG_UNAVAILABLE_CLASSES = {"28", "3D"}
_SQLITE_UNAVAILABLE = {3, 5, 6, 8, 10, 11, 13, 14, 26}


def is_transient_db_error(exc: BaseException) -> bool:
    """Errors worth retrying: lost connections, locks, server restarts, serialization failures, a
    full disk."""
    if isinstance(exc, sa.exc.DBAPIError):
        code = getattr(exc.orig, "sqlite_errorcode", None)
        if code is not None:  # SQLite raises OperationalError for syntax errors too: by its code
            return code & 0xFF in _SQLITE_TRANSIENT
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate:  # the server answered: its code says whether trying again can help (psycopg
            # raises OperationalError for 'index row size exceeds' too, which never passes)
            return sqlstate in _RETRYABLE_PGCODES or sqlstate[:2] in _RETRYABLE_PGCLASSES
        # No code: the connection itself failed (refused, closed, timed out).
        return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))
    return isinstance(exc, sa.exc.TimeoutError)  # pool checkout timed out


def is_data_error(exc: BaseException) -> bool:
    """An error a value caused, which writing the same values again cannot get past: the server's
    data exception class (SQLSTATE 22: a number out of range, text it cannot store), the
    driver's DataError, or a value the driver could not convert (SQLite: an integer past 64 bits)."""
    if isinstance(exc, sa.exc.DBAPIError):
        if is_transient_db_error(exc):
            return False
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        return isinstance(exc, sa.exc.DataError) or sqlstate.startswith("22")
    return isinstance(exc, ValueError | TypeError | OverflowError)


def database_unavailable(exc: sa.exc.DBAPIError | sqlite3.DatabaseError) -> bool:
    """Whether a database error means "database unavailable" rather than a failed statement:
    PostgreSQL reports "index row size exceeds" as an OperationalError too, yet no retry can help."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code & 0xFF in _SQLITE_UNAVAILABLE
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate and sqlstate[:2] in _PG_UNAVAILABLE_CLASSES:
        return True
    return is_transient_db_error(exc)


def violates_unique(exc: BaseException, index: str, column: str) -> bool:
    """Whether ``exc`` is an insert or update refused by the unique index ``index`` on ``column``
    (``table.column``): PostgreSQL names the index, SQLite only the column."""
    if not isinstance(exc, sa.exc.IntegrityError):
        return False
    constraint = getattr(getattr(exc.orig, "diag", None), "constraint_name", None)
    if constraint is not None:
        return bool(constraint == index)
    return (getattr(exc.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_CONSTRAINT_UNIQUE
            and str(exc.orig) == f"UNIQUE constraint failed: {column}")
