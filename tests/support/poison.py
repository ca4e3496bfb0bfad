"""Rows no producer of ours writes, inserted by plain SQL through the driver (sqlite3, psycopg)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
import sqlalchemy as sa

from dgxqueue.storage.database import sqlite_path


class Poison(NamedTuple):
    """One bad value in one column, and what the job's error must name."""

    job_id: str
    column: str
    value: Any
    named: str  # the failed job's error_message contains it


# What either engine accepts in its column.
COMMON = [
    Poison("neg-duration", "duration_seconds", -5.0, "duration_seconds"),
    Poison("inf-duration", "duration_seconds", float("inf"), "duration_seconds"),
    Poison("rate-zero", "sample_rate", 0, "sample_rate"),
    Poison("channels-99", "channels", 99, "channel"),
    Poison("empty-prompt", "prompt", "", "prompt"),
    Poison("blank-path", "file_path", "  ", "file_path"),
    Poison("attempts-zero", "max_attempts", 0, "max_attempts"),
    Poison("metadata-list", "metadata", "[1, 2]", "metadata"),
    Poison("metadata-overflow", "metadata", '{"x": 1e400}', "metadata.x"),
    Poison("metadata-nul", "metadata", '{"a": "\\u0000"}', "metadata.a"),
]
# What only SQLite stores: anything in any column.
SQLITE = [
    Poison("metadata-quotes", "metadata", "{'bpm': 90}", "metadata"),
    Poison("created-epoch", "created_at", 1733480000, "created_at"),
    Poison("created-words", "created_at", "tomorrow 10:00", "created_at"),
    Poison("run-after-epoch", "run_after", 1733480000, "run_after"),
    Poison("run-after-words", "run_after", "tomorrow 10:00", "run_after"),
    Poison("rate-text", "sample_rate", "fast", "sample_rate"),
    Poison("prompt-blob", "prompt", b"\xff\xfe", "prompt"),
    Poison("path-blob", "file_path", b"outputs/blob.wav", "file_path"),
    Poison("attempts-text", "max_attempts", "x", "max_attempts"),
]
# What PostgreSQL accepts and Python cannot hold.
POSTGRES = [
    Poison("created-minus-infinity", "created_at", "-infinity", "created_at"),
    Poison("created-year-10000", "created_at", "10000-01-01", "created_at"),
    Poison("nan-duration", "duration_seconds", float("nan"), "duration_seconds"),
]


def row(job_id: str, **values: Any) -> dict[str, Any]:
    """A pending job of model ``synth`` as a producer would write it, with ``values`` over it."""
    return {"id": job_id, "prompt": "plain sql", "model_name": "synth", "duration_seconds": 0.2,
            "sample_rate": 8000, "channels": 1, "file_path": f"outputs/{job_id}.wav", "status": "pending",
            "created_at": "2025-11-07 10:00:00", **values}


def poison_rows(poisons: Sequence[Poison]) -> list[dict[str, Any]]:
    return [row(p.job_id, **{p.column: p.value}) for p in poisons]


@contextlib.contextmanager
def _driver(url: str) -> Iterator[tuple[Any, str]]:
    """A bare DB-API connection to ``url``'s database (and schema), and its placeholder."""
    path = sqlite_path(url)
    if path is not None:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            yield conn, "?"
            conn.commit()
        return
    parsed = sa.engine.make_url(url)
    with psycopg.connect(host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database,
                         options=str(parsed.query.get("options", ""))) as conn:
        yield conn, "%s"


def insert(url: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT each row (its own columns) in one transaction."""
    with _driver(url) as (conn, mark):
        for values in rows:
            columns = ", ".join(values)  # column names of this module, never input
            conn.execute(f"INSERT INTO generations ({columns}) VALUES ({', '.join([mark] * len(values))})",
                         list(values.values()))


def execute(url: str, sql: str) -> list[tuple[Any, ...]]:
    with _driver(url) as (conn, _):
        cursor = conn.execute(sql)
        return list(cursor.fetchall()) if cursor.description else []
