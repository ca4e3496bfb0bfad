"""Reading a column's value never raises, and a claimed row's unusable values are named."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from dgxqueue.storage.rowvalues import Unreadable, job_defects, read_json, read_time

GOOD: dict[str, Any] = {
    "prompt": "lo-fi", "duration_seconds": 1.0, "sample_rate": 8000, "channels": 1,
    "file_path": "outputs/x.wav", "metadata": {"bpm": 90}, "max_attempts": 3,
    "created_at": datetime(2025, 11, 7, 10, tzinfo=UTC),
}


@pytest.mark.parametrize("stored", [1733480000, 1.5, "tomorrow 10:00", b"\xff", "2025-13-45 10:00:00"])
def test_read_time__what_is_not_a_time_comes_back_as_its_text(stored: object) -> None:
    """An epoch number, words, bytes or an impossible date read as Unreadable, not an error."""
    value = read_time(stored)
    assert isinstance(value, Unreadable) and value == Unreadable.of(stored)


def test_read_time__times_as_sqlite_stores_them_are_aware_utc() -> None:
    """The stored text (naive, UTC) and an aware datetime both come back aware in UTC."""
    assert read_time("2025-11-07 10:00:00.000000") == datetime(2025, 11, 7, 10, tzinfo=UTC)
    assert read_time(None) is None


@pytest.mark.parametrize("stored", ["{'bpm': 90}", "[" * 100_000, "1" * 5000, 123])
def test_read_json__what_is_not_json_comes_back_as_its_text(stored: object) -> None:
    """Single quotes, nesting past the recursion limit, an integer past Python's digit limit and a
    number stored in the column all read as Unreadable."""
    value = read_json(stored)
    assert isinstance(value, Unreadable) and value == str(stored)


@pytest.mark.parametrize(("column", "value"), [
    ("prompt", ""), ("prompt", b"\xff"), ("duration_seconds", -1.0), ("duration_seconds", float("inf")),
    ("duration_seconds", "10"), ("sample_rate", 0), ("sample_rate", "fast"), ("channels", True),
    ("file_path", None), ("metadata", Unreadable("{'bpm': 90}")), ("metadata", [1, 2]),
    ("max_attempts", 0), ("max_attempts", "x"), ("created_at", Unreadable("tomorrow")),
])
def test_job_defects__each_names_its_column_and_value(column: str, value: object) -> None:
    """A bad value gives exactly one defect, which starts with the column's name."""
    found = job_defects({**GOOD, column: value})
    assert len(found) == 1 and found[0].startswith(column + " must be"), found


def test_job_defects__a_long_value_is_quoted_cut() -> None:
    """A message quotes at most 80 characters of the value."""
    [found] = job_defects({**GOOD, "metadata": Unreadable("x" * 10_000)})
    assert len(found) < 200 and found.endswith("…")
