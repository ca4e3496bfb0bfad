"""What every subcommand of the ``dgxqueue`` command shares: exit codes, the database, output.

The exit codes are documented in :mod:`dgxqueue.cli`; this module only names them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from dgxqueue.audio import resolve_output_path
from dgxqueue.config import Settings
from dgxqueue.errors import JobNotFoundError, OutputError, ValidationError
from dgxqueue.outputs import Output, output
from dgxqueue.storage import Generation, reads, session_scope
from dgxqueue.storage.database import describe_url, open_queue
from dgxqueue.storage.validation import MAX_TTL_SECONDS
from dgxqueue.terminal import safe as safe  # the CLI modules take it from here

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID_STATE = 4
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

FINISHED = frozenset({"completed", "failed"})


class CliError(Exception):
    """An error the command reports in one line with its own exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Context:
    """The parsed settings and global flags, handed to every subcommand."""

    settings: Settings
    config_path: str | None

    def engine(self, *, create: bool = False) -> Engine:
        return open_engine(self.settings, create=create)


def open_engine(settings: Settings, *, create: bool) -> Engine:
    """The engine of the configured database, at the newest schema.

    ``create``: the producer's rule (``enqueue``): the built-in default location is created on
    first use. Otherwise, and for any other location, a missing or unmigrated database is
    reported (exit 69) and left alone, so a mistyped ``DATABASE_URL`` never leaves an empty
    database behind (:func:`dgxqueue.storage.database.open_queue`).
    """
    try:
        return open_queue(settings.database.url, settings.database, create="default" if create else "never")
    except OSError as exc:  # the SQLite folder or its lock file cannot be created
        raise CliError(f"database {describe_url(settings.database.url)} cannot be opened: {exc}",
                       EX_UNAVAILABLE) from None


# --- parsing command-line values: bad values are bad input (65), not usage errors (2) ------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_number(field: str, text: str | None, kind: type[int] | type[float], *, door: bool = False) -> Any:
    """An integer, or a float: every float option is seconds, so it must be finite and >= 0
    (``--timeout nan`` would never time out, ``-3`` would time out before looking).

    ``door``: the value is a job's field (``duration_seconds``, ``ttl``) whose range the door
    checks and states (:func:`dgxqueue.storage.validate_jobs`: above 0, at most a limit); here it
    is only read, so a refusal never claims a range the door does not allow (0 passed ">= 0" here).
    """
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValidationError(field, text, "an integer" if kind is int else "a number") from None
    if kind is float and not door and not 0 <= value < math.inf:  # also false for nan
        raise ValidationError(field, text, "a finite number >= 0")
    return value


def parse_span(field: str, text: str) -> timedelta:
    """``30d``, ``12h``, ``1h30m``, ``90s``, ``2w``: a non-negative span of time."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValidationError(field, text, "a span such as 30d, 12h, 1h30m, 90s or 2w")
    try:
        return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
    except OverflowError:  # beyond timedelta's 999999999 days
        raise ValidationError(field, text, "a span of less than 10000 years") from None


@dataclass(frozen=True)
class Age:
    """An ``--older-than`` span, read before anything is opened; :meth:`before` turns it into a
    cutoff once the database's now is known (a host's clock may be off)."""

    field: str
    text: str
    span: timedelta

    def before(self, now: datetime) -> datetime:
        """The time this span before ``now``."""
        try:
            return now - self.span
        except OverflowError:  # before year 1
            raise ValidationError(self.field, self.text,
                                  "a span that reaches back no further than the year 1") from None


def parse_age(field: str, text: str) -> Age:
    """A span (see :func:`parse_span`) to count back from the database's now."""
    return Age(field, text, parse_span(field, text))


def parse_when_or_span(field: str, text: str) -> datetime | timedelta:
    """An ISO 8601 time (:func:`parse_when`), or a span from now (``10m``) as itself: the insert
    counts a job's ``run_after`` or ``ttl`` from the database's clock, not this host's."""
    relative = text.strip().removeprefix("+")
    if relative and relative[0].isdigit() and relative[-1].lower() in _UNITS and "-" not in relative:
        span = parse_span(field, relative)
        if span.total_seconds() > MAX_TTL_SECONDS:
            raise ValidationError(field, text, f"a time between the years 1 and 9999, or a span from now of at most"
                                               f" {MAX_TTL_SECONDS // 86400}d")
        return span
    return parse_when(field, text, datetime.now(UTC))


def parse_when(field: str, text: str, now: datetime) -> datetime:
    """An ISO 8601 time (local time unless it has an offset), or a span from now (``10m``)."""
    too_far = "a time between the years 1 and 9999"
    relative = text.strip().removeprefix("+")
    if relative and relative[0].isdigit() and relative[-1].lower() in _UNITS and "-" not in relative:
        try:
            return now + parse_span(field, relative)
        except OverflowError:  # after year 9999
            raise ValidationError(field, text, too_far) from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationError(
            field, text, "an ISO time such as 2025-11-07T10:00 or 2025-11-07T10:00+01:00, or a span "
            "from now such as 10m or 2h"
        ) from None
    try:
        return (when.astimezone() if when.tzinfo is None else when).astimezone(UTC)
    except (OverflowError, ValueError):  # 0001-01-01 east of UTC, 9999-12-31 west of it
        raise ValidationError(field, text, too_far) from None


def parse_json_object(field: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(field, text, f"a JSON object ({exc.msg} at column {exc.colno})") from None
    except RecursionError:  # nested deeper than the parser's recursion limit
        raise ValidationError(field, text, "a JSON object nested less deeply") from None
    except ValueError:  # an integer of more digits than Python converts
        raise ValidationError(field, text, "a JSON object whose integers Python can read") from None
    if not isinstance(value, dict):
        raise ValidationError(field, text, "a JSON object such as '{\"bpm\": 120}'")
    return value


# --- output -----------------------------------------------------------------------------------


def output_path(settings: Settings, file_path: str) -> Path | None:
    """The absolute path of a job's WAV file (None if the path leaves the outputs folder)."""
    if not isinstance(file_path, str):  # a row written by plain SQL: not a path
        return None
    try:
        return resolve_output_path(settings.outputs_dir, file_path)
    except OutputError:
        return None


def job_dict(settings: Settings, job: Generation) -> dict[str, Any]:
    """Every column of a job, JSON-ready, plus ``output_path``."""
    row: dict[str, Any] = {}
    for column in Generation.__table__.columns:
        attribute = "meta" if column.name == "metadata" else column.name
        value = getattr(job, attribute)
        row[column.name] = value.isoformat() if isinstance(value, datetime) else value
    path = output_path(settings, job.file_path)
    row["output_path"] = str(path) if path else None
    return row


def job_output(settings: Settings, job: Generation) -> Output | None:
    """What is at completed ``job``'s path now (:func:`dgxqueue.outputs.output`): its WAV, or
    why not, such as its result held under its temporary name while another's file is there."""
    return output(settings.outputs_dir, job.id, job.file_path, attempt=job.attempts, worker_id=job.worker_id)


def output_fields(found: Output | None) -> dict[str, Any]:
    """``show --json``'s fields for a completed job's output: ``output_exists``, and where its
    result is held (``output_held_at``), whose WAV is at its path (``output_holder``), and what
    could not be read where whether its WAV is there cannot be told (``output_unreadable``)."""
    return {"output_exists": found is not None and found.exists,
            "output_held_at": None if found is None else found.temporary,
            "output_holder": None if found is None else found.holder,
            "output_unreadable": None if found is None or found.unreadable is None else found.unreadable.cause()}


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def seconds_text(value: object) -> str:
    """A duration column's value; one that is not a number (plain SQL) is shown as stored."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}s"
    return "-" if value is None else str(value)


def when_text(value: datetime | None) -> str:
    if not isinstance(value, datetime):  # not a time (a row written by plain SQL): shown as stored
        return "-" if value is None else str(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
          stretch: int | Sequence[int] | None = None) -> str:
    """Columns padded to their widest cell, every cell escaped (:func:`safe`); the ``stretch``
    column(s) are cut to share what the terminal's width leaves them."""
    cells = [[safe(cell) for cell in headers], *[[safe(cell) for cell in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    stretched = [] if stretch is None else [stretch] if isinstance(stretch, int) else list(stretch)
    room = shutil.get_terminal_size((120, 24)).columns - 2 * len(widths)
    room -= sum(w for i, w in enumerate(widths) if i not in stretched)
    # Narrowest first: a column that needs less than its share leaves the rest to the others.
    for n, column in enumerate(sorted(stretched, key=lambda i: widths[i])):
        limit = max(20, room // (len(stretched) - n))
        for row in cells[1:]:
            if len(row[column]) > limit:
                row[column] = row[column][: limit - 1] + "…"
        widths[column] = max(len(row[column]) for row in cells)
        room -= widths[column]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def one_line(text: str) -> str:
    """The first line of a message, escaped (:func:`safe`), so every error fits on one line of
    stderr: messages echo ids, keys and paths from argv, files and the database."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return safe(lines[0]) if lines else ""


# --- job ids: a full id, or a unique prefix of one as ``wait`` and ``demo`` show it ------------

#: The shortest prefix looked up, as git: shorter ones would match too many jobs to be useful.
MIN_ID_PREFIX = 4
_UUID_SHAPE = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_HEX = "0123456789abcdef"
_CANDIDATES_SHOWN = 5


def _id_prefix(text: str) -> str | None:
    """``text`` in lower case if it is the start of a UUID as dgxqueue writes them, else None."""
    prefix = text.strip().lower()
    if not prefix or len(prefix) > len(_UUID_SHAPE):
        return None
    for char, shape in zip(prefix, _UUID_SHAPE, strict=False):
        if (shape == "-") != (char == "-") or (shape == "x" and char not in _HEX):
            return None
    return prefix


def _after_prefix(prefix: str) -> str | None:
    """The least string of hex digits and hyphens above every string starting with ``prefix`` (its
    last digit counted up, with carry), or None when all of them are 'f'. Only digits and letters
    a-f are compared, which sort alike in every collation (punctuation may not)."""
    digits = list(prefix.rstrip("-"))
    while digits:
        last = digits.pop()
        if last == "-":
            continue
        if last != "f":
            return "".join(digits) + _HEX[_HEX.index(last) + 1]
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def resolve_id(engine: Engine, text: str) -> str:
    """The id of the one job whose id is ``text`` or starts with it (at least 4 hex digits).

    No such job: :class:`JobNotFoundError` (exit 3). Several: :class:`CliError` with exit 65,
    listing them, as git answers an ambiguous short hash.
    """
    if "\x00" in text or (not text.isascii() and not _encodable(text)):
        # Undecodable argv bytes arrive as lone surrogates, which neither engine can bind or store.
        raise JobNotFoundError(text)
    with session_scope(engine) as session:
        if reads.get_job(session, text) is not None:  # any id, a row written by plain SQL too
            return text
        prefix = _id_prefix(text)
        if prefix is None:
            raise JobNotFoundError(text)
        if len(prefix.replace("-", "")) < MIN_ID_PREFIX:
            raise ValidationError("id", text, f"a job id, or a unique prefix of one of at least {MIN_ID_PREFIX}"
                                              " hex digits")
        found = reads.job_ids_between(session, prefix, _after_prefix(prefix), _CANDIDATES_SHOWN + 1)
    matches = [job_id for job_id in found if job_id.startswith(prefix)]
    if not matches:
        raise JobNotFoundError(text)
    if len(matches) > 1:
        listed = ", ".join(safe(job_id) for job_id in matches[:_CANDIDATES_SHOWN])
        more = " and more" if len(matches) > _CANDIDATES_SHOWN else ""
        raise CliError(f"id prefix {text!r} is ambiguous: it starts {listed}{more}; give more digits", EX_DATAERR)
    return matches[0]
