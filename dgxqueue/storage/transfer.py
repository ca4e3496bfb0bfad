"""Moving rows between two databases of dgxqueue's schema: a whole queue (``db copy``) or its
finished generations (``archive``), in batches that a rerun after a kill never duplicates.

Rows are read through the models' types (times as aware datetimes, metadata parsed) and written
with their primary keys, every column the model has: a column a later migration adds is moved
without a change here. A row already at the target is left alone when it is identical (a run that
died after committing it) and refused, never overwritten, when it differs. "Identical" compares
values in a normal form (a time as UTC ISO text, JSON with sorted keys, a float as a float), the
form the per-table checksum is also computed over.

Callers own the engines; each batch is a transaction of its own on each side.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dgxqueue import faultpoints
from dgxqueue.errors import TransferError
from dgxqueue.storage.database import session_scope
from dgxqueue.storage.engines import Profile, profile_of
from dgxqueue.storage.models import COMPLETED, FAILED, PAUSED, G, P, as_utc, uses_after
from dgxqueue.storage.rowvalues import Unreadable, quote, read_json

__all__ = ["COPIED", "FINISHED", "ArchiveReport", "Digest", "archive", "archive_preview", "check_target",
           "copy_queue", "database_identity", "digest", "loaded", "normal", "put_rows", "stored_columns", "verify"]

#: The tables a copy moves, in this order. The registry of live daemons (``daemons``) is not
#: moved: its rows are processes attached to the source, and a copy refuses to run beside any.
COPIED: tuple[sa.Table, ...] = (P, G, PAUSED)
#: The statuses a job never leaves by itself (a cancelled or expired job is a failed one).
FINISHED = (COMPLETED, FAILED)
#: Keys looked up per statement (SQLite limits bound parameters).
_CHUNK = 500

Row = tuple[Any, ...]
#: Called after each batch: table name, rows read so far, rows in the table, rows inserted by it.
Progress = Callable[[str, int, int, int], None]


def _key_column(table: sa.Table) -> sa.Column[Any]:
    (column,) = table.primary_key.columns
    return column


def _key_index(table: sa.Table) -> int:
    return list(table.columns).index(_key_column(table))


def _is_json(column: sa.ColumnElement[Any]) -> bool:
    return isinstance(getattr(column.type, "impl_instance", column.type), sa.JSON)


@functools.cache
def _writable(table: sa.Table) -> sa.Table:
    """``table`` as a copy writes it: a JSON column's None as SQL NULL (``sa.JSON`` would store the
    JSON text 'null', a different value), every other column with its model type."""
    return sa.Table(table.name, sa.MetaData(), *(
        sa.Column(column.name, sa.JSON(none_as_null=True) if _is_json(column) else column.type,
                  primary_key=column.primary_key, autoincrement=False)
        for column in table.columns))


def stored_columns(table: sa.Table) -> list[sa.ColumnElement[Any]]:
    """``table``'s columns as a copy reads them: a JSON column as its stored text, so that SQL NULL
    and the JSON value ``null`` stay apart (the model's type reads both as None)."""
    return [sa.cast(column, sa.Text).label(column.name) if _is_json(column) else column for column in table.columns]


def loaded(table: sa.Table, row: Sequence[Any]) -> Row:
    """A row read by :func:`stored_columns` with its JSON parsed: the JSON ``null`` as
    ``sa.JSON.NULL`` (which the write stores as such), text that is not JSON as Unreadable."""
    return tuple(_json_value(value) if _is_json(column) else value
                 for column, value in zip(table.columns, row, strict=True))


def _json_value(text: Any) -> Any:
    if text is None:
        return None
    value = read_json(text)
    return sa.JSON.NULL if value is None else value


def _normal_value(column: sa.Column[Any], value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Unreadable):
        return {"unreadable": str(value)}
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if _is_json(column):
        return json.dumps(None if value is sa.JSON.NULL else value, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
    if isinstance(column.type, sa.Float) and isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))  # SQLite may hand a whole REAL back as an int
    return value


def normal(table: sa.Table, row: Row) -> tuple[Any, ...]:
    """``row`` (values in ``table.columns`` order) in the form two engines agree on."""
    return tuple(_normal_value(column, value) for column, value in zip(table.columns, row, strict=True))


def _defect(table: sa.Table, row: Row, max_integer: int) -> str | None:
    """Why ``row`` cannot be written exactly at a target whose INTEGER holds up to ``max_integer``:
    a value that is not of its column's type (plain SQL can store anything in SQLite; it reads back
    as rowvalues.Unreadable), or an integer too large there; None when it can."""
    for column, value in zip(table.columns, row, strict=True):
        if value is None:
            continue
        if isinstance(value, Unreadable):
            return f"column {column.name} holds {quote(value)}, not a value of its type"
        if _is_json(column):
            continue
        expected = column.type.python_type
        fits = isinstance(value, int | float) and not isinstance(value, bool) if expected is float \
            else isinstance(value, expected)
        if not fits:
            return f"column {column.name} holds {quote(value)}, not a {expected.__name__}"
        if expected is int and not -max_integer - 1 <= value <= max_integer:
            return f"column {column.name} holds {value}, more than the target's INTEGER holds ({max_integer})"
    return None


def _difference(table: sa.Table, ours: Row, theirs: Row) -> str:
    for column, a, b in zip(table.columns, normal(table, ours), normal(table, theirs), strict=True):
        if a != b:
            return f"{column.name} is {quote(a)} there, {quote(b)} here"
    return "identical"


def _rows_by_key(session: Session, table: sa.Table, keys: Sequence[Any]) -> dict[Any, Row]:
    key, index = _key_column(table), _key_index(table)
    found: dict[Any, Row] = {}
    for start in range(0, len(keys), _CHUNK):
        for row in session.execute(sa.select(*stored_columns(table)).where(key.in_(keys[start:start + _CHUNK]))):
            found[row[index]] = loaded(table, row)
    return found


def put_rows(session: Session, table: sa.Table, rows: Sequence[Row]) -> tuple[list[Row], dict[Any, str]]:
    """Insert each of ``rows`` whose key ``table`` lacks; leave an identical row as it is.

    Returns the rows inserted, and by key why each other row was refused: the target holds it
    differently, or it holds a value the target cannot take as it is. Nothing is overwritten.
    """
    index = _key_index(table)
    profile = profile_of(session.get_bind().dialect)
    refused: dict[Any, str] = {}
    wanted: dict[Any, Row] = {}
    for row in rows:
        reason = _defect(table, row, profile.max_integer)
        if reason is None:
            wanted[row[index]] = row
        else:
            refused[row[index]] = reason
    present = _rows_by_key(session, table, list(wanted))
    for key, there in present.items():
        if normal(table, there) != normal(table, wanted[key]):
            refused[key] = f"the target holds a different row ({_difference(table, there, wanted[key])})"
    if table is G:
        refused.update(_paths_held(session, [row for key, row in wanted.items() if key not in present]))
    new = [row for key, row in wanted.items() if key not in present and key not in refused]
    if new:
        writable = _writable(table)
        names = [column.name for column in table.columns]
        insert = profile.insert(writable).on_conflict_do_nothing(index_elements=[writable.c[_key_column(table).name]])
        try:
            session.connection().execute(insert, [dict(zip(names, row, strict=True)) for row in new])
        except (sa.exc.DataError, sa.exc.IntegrityError) as exc:  # what the checks above cannot foresee
            first, last = new[0][index], new[-1][index]
            cause = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
            which = f"row {quote(first)}" if len(new) == 1 else f"rows {quote(first)} to {quote(last)}"
            raise TransferError(f"{table.name} {which} cannot be written at the target: {cause}") from None
    return new, refused


def _paths_held(session: Session, rows: Sequence[Row]) -> dict[Any, str]:
    """By id, why each of ``rows`` cannot join the target: it holds its file (it has not failed)
    and a job of another id there holds the same file (migration 007's unique index would refuse
    it with the driver's message, naming neither job)."""
    index, path, status = _key_index(G), _column_index(G, "file_path"), _column_index(G, "status")
    holding = {row[path]: row[index] for row in rows
               if isinstance(row[path], str) and not isinstance(row[path], Unreadable) and row[status] != FAILED}
    key = profile_of(session.get_bind().dialect).path_key
    refused: dict[Any, str] = {}
    paths = sorted(holding)
    for start in range(0, len(paths), _CHUNK):
        chunk = paths[start:start + _CHUNK]
        held = session.execute(
            sa.select(G.c.file_path, G.c.id)
            .where(key(G.c.file_path).in_([key(sa.literal(p, sa.Text)) for p in chunk]),
                   G.c.file_path.in_(chunk), G.c.status != FAILED))
        for file_path, holder in held:
            if holder != holding[file_path]:
                refused[holding[file_path]] = (f"its file_path {quote(file_path)} is job {quote(holder)}'s at the "
                                               "target (each job's WAV is its own)")
    return refused


def _column_index(table: sa.Table, name: str) -> int:
    return list(table.columns).index(table.c[name])


def _batches(engine: Engine, table: sa.Table, size: int,
             where: Sequence[sa.ColumnElement[bool]] = ()) -> Iterator[list[Row]]:
    """``table``'s rows in key order, ``size`` at a time, each batch read in a transaction of its
    own (keyset paging: a long copy holds no read transaction open)."""
    key, index = _key_column(table), _key_index(table)
    last: Any = None
    while True:
        query = sa.select(*stored_columns(table)).where(*where).order_by(key).limit(size)
        if last is not None:
            query = query.where(key > last)
        with session_scope(engine) as session:
            rows = [loaded(table, row) for row in session.execute(query)]
        if not rows:
            return
        yield rows
        last = rows[-1][index]


# --- copy -------------------------------------------------------------------------------------


def database_identity(engine: Engine) -> tuple[Any, ...]:
    """Which database ``engine`` reaches, as the database itself tells: a SQLite file's device and
    inode; for PostgreSQL the server's start time (to the microsecond; readable by any role, unlike
    the cluster's system identifier on managed servers), the database and the schema the tables
    are found in. URLs cannot tell: a pooler, a second host name or a ``hostaddr`` reach the same
    database, and an archive into its own source deletes each row it finds "already archived"."""
    with engine.connect() as conn:
        if profile_of(engine.dialect).is_file:
            files = {row[1]: row[2] for row in conn.execute(sa.text("PRAGMA database_list"))}
            if not files.get("main"):
                return ("memory", id(engine))
            stat = os.stat(files["main"])
            return ("file", stat.st_dev, stat.st_ino)
        return ("server", *conn.execute(sa.select(sa.func.pg_postmaster_start_time(), sa.func.current_database(),
                                                  sa.func.current_schema())).one())



@dataclass(frozen=True)
class Digest:
    """A table's row count and the SHA-256 of its rows in normal form, in key order (bytewise)."""

    rows: int
    sha256: str


def digest(session: Session, table: sa.Table) -> Digest:
    """Computed here, not by either engine, so that both sides are hashed alike."""
    profile = profile_of(session.get_bind().dialect)
    query = sa.select(*stored_columns(table)).order_by(profile.byte_order(_key_column(table)))
    hasher, count = hashlib.sha256(), 0
    for row in session.execute(query.execution_options(yield_per=1000)):
        line = json.dumps(normal(table, loaded(table, row)), ensure_ascii=False)
        hasher.update(line.encode("utf-8", "surrogatepass") + b"\n")
        count += 1
    return Digest(count, hasher.hexdigest())


def check_target(source: Engine, target: Engine, batch_size: int = 1000) -> None:
    """Refuse, before anything is written, a target holding a row the source lacks or holds
    differently: it is another queue (or was written to since an earlier copy)."""
    for table in COPIED:
        index = _key_index(table)
        for rows in _batches(target, table, batch_size):
            with session_scope(source) as session:
                theirs = _rows_by_key(session, table, [row[index] for row in rows])
            for row in rows:
                key = row[index]
                if key not in theirs:
                    raise TransferError(
                        f"the target already holds {table.name} row {quote(key)}, which the source does not: "
                        "copy into an empty database, or one that an earlier copy from this source filled; "
                        "nothing was copied")
                if normal(table, row) != normal(table, theirs[key]):
                    raise TransferError(f"the target's {table.name} row {quote(key)} differs from the source's "
                                        f"({_difference(table, row, theirs[key])}); nothing was copied (empty the "
                                        "target with 'dgxqueue db reset' pointed at it, then copy again)")


def _numbered(table: sa.Table) -> bool:
    key = _key_column(table)
    return key.autoincrement is True and isinstance(key.type, sa.Integer)


def copy_queue(source: Engine, target: Engine, *, batch_size: int, progress: Progress) -> dict[str, Digest]:
    """Copy every row of :data:`COPIED` from ``source`` to ``target`` (both at head), then
    :func:`verify`. Idempotent: rows the target holds identically are skipped."""
    check_target(source, target)
    for table in COPIED:
        with session_scope(source) as session:
            total = session.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        done = 0
        for rows in _batches(source, table, batch_size):
            with session_scope(target) as session:
                new, refused = put_rows(session, table, rows)
                if refused:
                    key, reason = next(iter(refused.items()))
                    raise TransferError(f"{table.name} row {quote(key)} cannot be copied: {reason} "
                                        f"({len(refused)} such rows in this batch)")
            done += len(rows)
            progress(table.name, done, total, len(new))
        if _numbered(table):
            with session_scope(target) as session:
                profile_of(target.dialect).follow_ids(session, table)
    return verify(source, target)


def verify(source: Engine, target: Engine) -> dict[str, Digest]:
    """Each table of :data:`COPIED` holds the same rows on both sides, or :class:`TransferError`."""
    digests: dict[str, Digest] = {}
    for table in COPIED:
        with session_scope(source) as session:
            ours = digest(session, table)
        with session_scope(target) as session:
            theirs = digest(session, table)
        if ours != theirs:
            raise TransferError(
                f"verification failed for {table.name}: {ours.rows} rows here (sha256 {ours.sha256[:16]}), "
                f"{theirs.rows} at the target ({theirs.sha256[:16]}); was the source written during the copy? "
                # A rerun copies rows added since but refuses rows changed since (it never
                # overwrites), and every enqueue changes a prompt's count: only an empty target works.
                "Stop its producers and daemons, empty the target ('dgxqueue db reset --yes' with DATABASE_URL "
                "pointed at it), then copy again")
        digests[table.name] = ours
    return digests


# --- archive ----------------------------------------------------------------------------------


def _archivable(profile: Profile, cutoff: datetime, skip: Sequence[Any] = ()) -> list[sa.ColumnElement[bool]]:
    """Finished before ``cutoff`` (by ``completed_at``; by ``created_at`` where a row written by
    plain SQL lacks it, as prune does, comparing another ISO form as the time it names), and not
    one of the keys ``skip`` as stored (a key written by plain SQL may be a blob or a number: its
    text would match nothing)."""
    finished_at = profile.comparable_time(sa.func.coalesce(G.c.completed_at, G.c.created_at))
    where = [G.c.status.in_(FINISHED), finished_at < cutoff]
    if skip:
        where.append(G.c.id.not_in(list(skip)))
    return where


def archive_preview(session: Session, cutoff: datetime) -> dict[str, int]:
    """How many generations of each finished status an archive would move now."""
    profile = profile_of(session.get_bind().dialect)
    query = sa.select(G.c.status, sa.func.count()).where(*_archivable(profile, cutoff)).group_by(G.c.status)
    return {str(status): int(count) for status, count in session.execute(query)}


def count_prompts(session: Session, rows: Sequence[Row]) -> None:
    """Count the archived generations ``rows`` in the archive's ``prompts``: ``used_count`` is
    how many archived jobs used a text, first/last_used_at their earliest and latest creation.
    Called in the transaction that inserts ``rows``, for rows really inserted, so a rerun never
    counts one twice."""
    columns = [column.name for column in G.columns]
    text_at, created_at = columns.index("prompt"), columns.index("created_at")
    uses: dict[str, list[datetime]] = {}
    for row in rows:
        uses.setdefault(row[text_at], []).append(row[created_at])
    if not uses:
        return
    insert = profile_of(session.get_bind().dialect).insert(P)
    given = insert.excluded
    statement = insert.on_conflict_do_update(index_elements=[P.c.text], set_={
        "used_count": uses_after(P.c.used_count, given.used_count),
        "first_used_at": sa.case((given.first_used_at < P.c.first_used_at, given.first_used_at),
                                 else_=P.c.first_used_at),
        "last_used_at": sa.case((given.last_used_at > P.c.last_used_at, given.last_used_at),
                                else_=P.c.last_used_at),
    })
    session.connection().execute(statement, [
        {"text": text, "used_count": len(times), "first_used_at": min(times), "last_used_at": max(times)}
        for text, times in sorted(uses.items())])


@dataclass
class ArchiveReport:
    """What an archive run did: rows moved, rows an earlier run had already inserted (deleted here
    now), and the rows left here, by id, with the reason."""

    moved: int = 0
    already: int = 0
    refused: dict[str, str] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, refused: dict[Any, str]) -> None:
        super().__init__(f"{len(refused)} rows refused")
        self.refused = refused


def archive(source: Engine, target: Engine, cutoff: datetime, *, batch_size: int,
            progress: Callable[[ArchiveReport], None],
            held: Callable[[list[tuple[Any, str, str]]], dict[Any, str]] | None = None) -> ArchiveReport:
    """Move the generations finished before ``cutoff`` from ``source`` to ``target``.
    ``held``: given a batch's (id, status, file_path), the ids that must stay here, each with the
    reason reported.

    Each batch: DELETE ... RETURNING at the source (which locks the rows: nothing changes them
    until this transaction ends), insert them at the target and commit there, then commit the
    deletion. A crash before the target's commit loses both halves; after it, only the
    deletion, and the next run finds the rows identical at the target and deletes them here.
    A row the target holds differently stays here, reported, never overwritten.
    """
    report = ArchiveReport()
    # Rows still to redo one at a time after the archive rejected a batch (a value it cannot
    # hold, such as a NUL character in a prompt for PostgreSQL): the rejected row stays here,
    # reported, instead of failing that batch on every run and archiving nothing after it.
    single = 0
    rows: list[Row] = []
    skip: list[Any] = []  # the refused rows' keys as stored; the report names them as text
    key, status, path = _key_index(G), _column_index(G, "status"), _column_index(G, "file_path")
    while True:
        try:
            with session_scope(source) as here:
                where = _archivable(profile_of(source.dialect), cutoff, skip)
                chosen = sa.select(G.c.id).where(*where).order_by(G.c.id).limit(1 if single else batch_size)
                # The conditions again on the deleted row itself: on PostgreSQL a row changed by a
                # transaction that committed while this DELETE waited for its lock (a failed job
                # retried) is rechecked in its new version, the subquery's choice is not.
                rows = [loaded(G, row) for row in here.execute(
                    sa.delete(G).where(G.c.id.in_(chosen.scalar_subquery()), *where)
                    .returning(*stored_columns(G)))]
                if not rows:
                    # Empty also when another writer (a prune) deleted every chosen row while
                    # this DELETE waited for them: the end only when nothing is left to choose.
                    if here.execute(sa.select(sa.exists().where(*where))).scalar_one():
                        continue
                    return report
                if held is not None and (kept := held([(row[key], row[status], row[path]) for row in rows])):
                    raise _Refused(kept)  # rolled back; the batch is redone without them
                with session_scope(target) as there:
                    new, refused = put_rows(there, G, rows)
                    if refused:
                        raise _Refused(refused)  # both transactions roll back; the batch is redone without them
                    count_prompts(there, new)
                faultpoints.reached(faultpoints.ARCHIVE_STEP)
        except _Refused as exc:
            report.refused.update({str(key): reason for key, reason in exc.refused.items()})
            skip.extend(exc.refused)
            continue
        except TransferError as exc:  # both transactions rolled back
            if len(rows) > 1:
                single = len(rows)
                continue
            report.refused[str(rows[0][_key_index(G)])] = str(exc)
            skip.append(rows[0][_key_index(G)])
            single = max(single - 1, 0)
            continue
        single = max(single - 1, 0)
        report.moved += len(new)
        report.already += len(rows) - len(new)
        progress(report)
