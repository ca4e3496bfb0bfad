"""The file route's pure parts: reading a Range header, and which paths open."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dgxqueue.web.files import NotServable, open_output, parse_range


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("bytes=0-99", (0, 99)),
    ("bytes=100-", (100, 999)),
    ("bytes=-10", (990, 999)),
    ("bytes=-5000", (0, 999)),  # a suffix longer than the file: all of it
    ("bytes=900-5000", (900, 999)),  # an end past the file: cut to it
    ("bytes=1000-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=5-3", None),  # malformed: ignored, the whole file
    ("bytes=0-1,5-6", None),  # several ranges: the whole file (RFC 9110 allows it)
    ("items=0-5", None),
    ("bytes=-", None),
    ("bytes=abc", None),
])
def test_parse_range__each_form(header: str | None, expected: object) -> None:
    """Each form of a single byte range a browser sends, and what is ignored rather than refused."""
    assert parse_range(header, 1000) == expected


def test_open_output__only_regular_files_inside_the_folder(tmp_path: Path) -> None:
    """A file and a file in a subfolder open; '..', absolute, hidden, NUL, a folder, a missing file
    and symlinks leading out (to a file, to a folder) do not. A symlink inside the folder to a file
    inside it opens (it resolves inside)."""
    outputs = tmp_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "a.wav").write_bytes(b"RIFF....")
    (outputs / "sub" / "b.wav").write_bytes(b"RIFF")
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", outputs / "out.wav")
    os.symlink(tmp_path, outputs / "up")
    os.symlink(outputs / "a.wav", outputs / "alias.wav")
    for good, size in [("a.wav", 8), ("sub/b.wav", 4), ("alias.wav", 8)]:
        opened = open_output(outputs, good)
        os.close(opened.fd)
        assert opened.size == size
    for bad in ["../secret", "/etc/passwd", "sub/../a.wav", ".a.wav.tmp", "a.wav\x00", "sub", "nothing.wav",
                "out.wav", "up/secret", "", "sub//b.wav", "sub\\b.wav"]:
        with pytest.raises(NotServable):
            open_output(outputs, bad)
