"""Serving the WAV files: only from inside the outputs folder, with range requests.

A path is taken relative to the outputs folder. It is refused (404, the same answer as a missing
file, so the page says nothing of what exists outside) when it has a part the page never links:
an empty, ``.`` or ``..`` part or a hidden name (the daemon's temporaries start with a dot), or a
backslash. Everything else (NUL, links leading out, a link or file swapped in after the check) is
the outputs folder's own containment, :meth:`dgxqueue.audio.OutputRoot.open_file`, which opens
the file the check located and nothing else; the response is read from that descriptor.

Before that, the application asks :func:`dgxqueue.web.views.refusal` whether the address is a
completed job's path whose WAV is not there (its result held under its temporary name, another's
file at the path): 404 saying why, not the other file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from dgxqueue.audio import OutputRoot
from dgxqueue.errors import OutputError

_CHUNK = 1 << 16
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
#: Past any file's size: a position written with more digits is read as this (int() refuses
#: more than 4300 digits, and no file is that large).
_FAR = 10**19
_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".flac": "audio/flac", ".ogg": "audio/ogg"}


class NotServable(Exception):
    """The path names no servable file inside the outputs folder (answered 404)."""


@dataclass(frozen=True)
class OpenedFile:
    fd: int
    size: int
    name: str


def servable(relative: str) -> bool:
    """Whether ``relative`` is a path the page may link: not empty, no empty, ``.``, ``..`` or
    hidden part, no backslash (see the module)."""
    return bool(relative) and "\\" not in relative and all(part and not part.startswith(".")
                                                        for part in relative.split("/"))


def open_output(outputs_dir: Path, relative: str) -> OpenedFile:
    """Open the regular file ``relative`` names inside ``outputs_dir`` for reading (see the module)."""
    if not servable(relative):
        raise NotServable(relative)
    root = OutputRoot(outputs_dir)
    try:  # locate() reads a path relative to the folder holding the outputs folder
        fd, info, target = root.open_file(f"{root.name}/{relative}")
    except OutputError:
        raise NotServable(relative) from None
    return OpenedFile(fd, info.st_size, os.path.basename(target))


def _position(digits: str) -> int | None:
    if not digits:
        return None
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 19 else _FAR


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The first and last byte a ``Range`` header asks for; None to send the whole file (no
    header, another unit, several ranges or a malformed one, which RFC 9110 lets a server
    ignore); ``"unsatisfiable"`` when it starts past the end."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = (_position(text) for text in match.groups())
    if first is None and last is None:
        return None
    if first is None:  # the last N bytes
        assert last is not None
        if last == 0 or size == 0:  # no byte to send (RFC 9110, 14.1.2)
            return "unsatisfiable"
        return max(0, size - last), size - 1
    start = first
    end = size - 1 if last is None else min(last, size - 1)
    if last is not None and last < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


def _chunks(fd: int, start: int, length: int) -> Iterator[bytes]:
    position, left = start, length
    while left > 0:
        data = os.pread(fd, min(_CHUNK, left), position)
        if not data:  # the file shrank meanwhile: end early rather than loop
            return
        position += len(data)
        left -= len(data)
        yield data


class _FileStream(StreamingResponse):
    """The file's bytes from its open descriptor, closed when the response ends however it ends.

    Closed here, not by the chunks' generator: a client that hangs up before the first chunk
    leaves that generator never started, and a never-started generator runs no ``finally``."""

    def __init__(self, fd: int, start: int, length: int, **options: Any) -> None:
        super().__init__(_chunks(fd, start, length), **options)
        self._fd = fd

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # the chunks are read in a worker thread, which has returned by now
            os.close(self._fd)


def file_response(request: Request, outputs_dir: Path, relative: str, *, download: bool) -> Response:
    """The file as a 200, 206 (one range) or 416 response; 404 for any path :func:`open_output` refuses."""
    try:
        opened = open_output(outputs_dir, relative)
    except NotServable:
        return Response("no such file", status_code=404, media_type="text/plain")
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-store"}
    if download:
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(opened.name)}"
    media_type = _TYPES.get(os.path.splitext(opened.name)[1].lower(), "application/octet-stream")
    wanted = parse_range(request.headers.get("range"), opened.size)
    if wanted == "unsatisfiable":
        os.close(opened.fd)
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{opened.size}"})
    status, start, length = 200, 0, opened.size
    if isinstance(wanted, tuple):
        start, end = wanted
        status, length = 206, end - start + 1
        headers["Content-Range"] = f"bytes {start}-{end}/{opened.size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        os.close(opened.fd)
        return Response(status_code=status, headers=headers, media_type=media_type)
    return _FileStream(opened.fd, start, length, status_code=status, headers=headers, media_type=media_type)
