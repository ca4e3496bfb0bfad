"""Values as rows really hold them: read without failing, checked before they are used or stored.

A row written by plain SQL may hold anything SQLite stores (text in a time column, an epoch
number, metadata that is not JSON) or what PostgreSQL accepts but Python cannot represent (the
time ``infinity``, a year past 9999, a JSON number past a float's range). Reading such a value
never raises: it comes back as :class:`Unreadable`, its raw text, which reads for humans show
as it is and the daemon turns into that job's failure (:func:`job_defects`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

#: How much of a bad value a message quotes.
QUOTE_LIMIT = 80


class Unreadable(str):
    """A stored value that is not of its column's type, kept as its raw text. Code that computes
    with a column checks the type first; code that shows it prints the text."""

    __slots__ = ()

    @classmethod
    def of(cls, value: object) -> Unreadable:
        if isinstance(value, bytes | bytearray | memoryview):
            return cls(bytes(value).decode("utf-8", "replace"))
        return cls(value)


def quote(value: object) -> str:
    """``value`` as a message quotes it: ``repr``, cut to :data:`QUOTE_LIMIT` characters."""
    text = repr(str(value) if isinstance(value, Unreadable) else value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT - 1] + "…"


def read_time(value: object) -> datetime | Unreadable | None:
    """A time column's value, timezone-aware in UTC; a naive value is UTC already. SQLite hands
    over the stored text (or whatever else was stored), PostgreSQL a datetime or, through
    :func:`register_postgresql_loaders`, an :class:`Unreadable` it could not convert."""
    if value is None:
        return None
    if isinstance(value, datetime):
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # year 1 at +05:00 is before year 1 in UTC: shown as stored
            return Unreadable(value.isoformat())
    if isinstance(value, str) and not isinstance(value, Unreadable):
        try:
            return read_time(datetime.fromisoformat(value))
        except ValueError:
            pass
    return Unreadable.of(value)


def read_json(value: object) -> Any:
    """The metadata column's value (read as text) parsed, or :class:`Unreadable` when it is not
    JSON. A number past a float's range parses as an infinity, which the executor refuses
    before it could be written back."""
    if value is None:
        return None
    if not isinstance(value, str) or isinstance(value, Unreadable):
        return Unreadable.of(value)
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # ValueError: also an integer of too many digits
        return Unreadable(value)


# --- a claimed row's columns, as the daemon needs them -------------------------------------


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bad(column: str, value: object, expected: str) -> str:
    return f"{column} must be {expected}, not {quote(value)}"


def usable_at_a_glance(prompt: Any, duration: Any, sample_rate: Any, channels: Any, file_path: Any,
                       metadata: Any, max_attempts: Any, created_at: Any, run_after: Any) -> bool:
    """True for a row as our producers write it: the claim's fast path, a strict subset of what
    :func:`job_defects` accepts, which judges the rest."""
    return (
        type(prompt) is str and bool(prompt.strip())
        # SQLite returns a whole REAL as an integer through RETURNING
        and (type(duration) is float or type(duration) is int) and 0 < duration < math.inf
        and type(sample_rate) is int and sample_rate > 0 and type(channels) is int and channels > 0
        and type(file_path) is str and bool(file_path.strip()) and (metadata is None or type(metadata) is dict)
        and type(max_attempts) is int and max_attempts > 0 and type(created_at) is datetime
        and (run_after is None or type(run_after) is datetime)
    )


def job_defects(values: Mapping[str, Any]) -> list[str]:
    """What makes a claimed row unusable, one message per column naming it and its value.

    The ranges a backend accepts are its own ``validate``'s business; this checks what every
    backend may rely on: the types, and values no job can mean."""
    found: list[str] = []
    prompt = values["prompt"]
    if not isinstance(prompt, str) or isinstance(prompt, Unreadable) or not prompt.strip():
        found.append(_bad("prompt", prompt, "non-empty text"))
    duration = values["duration_seconds"]
    if not _number(duration) or duration <= 0:
        found.append(_bad("duration_seconds", duration, "a finite number of seconds above 0"))
    for column in ("sample_rate", "channels"):
        value = values[column]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            found.append(_bad(column, value, "a positive integer"))
    path = values["file_path"]
    if not isinstance(path, str) or isinstance(path, Unreadable) or not path.strip():
        found.append(_bad("file_path", path, "a relative path inside the outputs folder"))
    metadata = values["metadata"]
    if isinstance(metadata, Unreadable):
        found.append(_bad("metadata", metadata, "JSON"))
    elif metadata is not None and not isinstance(metadata, dict):
        found.append(_bad("metadata", metadata, "a JSON object"))
    max_attempts = values["max_attempts"]
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        found.append(_bad("max_attempts", max_attempts, "an integer of at least 1"))
    created = values["created_at"]
    if not isinstance(created, datetime):
        found.append(_bad("created_at", created, "a time such as '2025-11-07 10:00:00'"))
    return found


# --- PostgreSQL: the driver converts times itself ------------------------------------------


def register_postgresql_loaders(connection: Any) -> None:
    """Make ``connection`` (psycopg) read ``timestamptz`` values Python cannot hold (infinity, a
    year past 9999 or before 1) as :class:`Unreadable` instead of failing the whole fetch."""
    from psycopg import DataError
    from psycopg.types.datetime import TimestamptzLoader

    class LenientTimestamptzLoader(TimestamptzLoader):
        def load(self, data: Any) -> Any:
            try:
                return super().load(data)
            except DataError:
                return Unreadable.of(data)

    connection.adapters.register_loader("timestamptz", LenientTimestamptzLoader)
