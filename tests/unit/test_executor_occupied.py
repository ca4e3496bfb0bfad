"""The error of a job whose file_path holds a file already (executor.occupied), on real files."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dgxqueue.audio import OWNER_XATTR
from dgxqueue.daemon.executor import occupied
from dgxqueue.storage.claimed import ClaimedJob

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
FIRST = "0b7f3a52-6d0e-4c5e-9f43-2a1c8e7d9b10"
SECOND = "5d1e0c8a-3b2f-4a6d-8e9c-7f0a1b2c3d4e"
REMEDY = f"Remove or move it, then run `dgxqueue retry {SECOND}`, or enqueue the job again with another file_path"


def _job() -> ClaimedJob:
    return ClaimedJob(SECOND, "a prompt", "synth", 1.0, 8000, 1, "outputs/latest/a.wav", None, 1, 3, T0, T0)


def test_occupied__names_the_job_whose_wav_holds_the_path(tmp_path: Path) -> None:
    """Another job's WAV at the path (its OWNER_XATTR): the error names that job, the path and
    the remedy, so a job of the call before whose rename beat this job's checks is named as its
    collision would have been."""
    target = tmp_path / "a.wav"
    target.write_bytes(b"RIFF")
    os.setxattr(target, OWNER_XATTR, FIRST.encode())
    message = str(occupied(_job(), str(target)))
    assert message == (f"file_path outputs/latest/a.wav already exists ({target}) and is the WAV of job {FIRST}, not"
                       f" this job's; it was left as it is. {REMEDY}")


def test_occupied__without_a_mark_says_what_it_always_said(tmp_path: Path) -> None:
    """A file with no OWNER_XATTR (a user's, another program's), or a folder: no job is named."""
    target = tmp_path / "a.wav"
    target.write_bytes(b"RIFF")
    expected = (f"file_path outputs/latest/a.wav already exists ({target}) and is not this job's output; it was left"
                f" as it is. {REMEDY}")
    assert str(occupied(_job(), str(target))) == expected
    target.unlink()
    target.mkdir()
    os.setxattr(target, OWNER_XATTR, FIRST.encode())  # a folder is no job's WAV, whatever it carries
    assert str(occupied(_job(), str(target))) == expected


@pytest.mark.parametrize("mark", [b"\x1b]0;owned\x07\x1b[2J", b"job\r\nERROR forged", b"j" * 2000,
                                  b"\xc3\x28\xa0\xa1" * 8, b"\x00"],
                         ids=["escapes", "line-breaks", "long", "not-utf8", "nul"])
def test_occupied__a_hostile_mark_is_not_echoed(tmp_path: Path, mark: bytes) -> None:
    """A mark anyone could set (control characters, 2000 bytes, bytes that are not UTF-8): the
    message is the one without a mark, nothing of the value in it."""
    target = tmp_path / "a.wav"
    target.write_bytes(b"RIFF")
    os.setxattr(target, OWNER_XATTR, mark)
    message = str(occupied(_job(), str(target)))
    assert "not this job's output" in message and "WAV of job" not in message
    assert message.isprintable() and len(message) < 400
