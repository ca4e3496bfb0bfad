"""Whose each file beside a job's path is: the temporaries its attempts write, and which completed
jobs' results are still held under them (:func:`unpublished`).

An attempt writes its WAV beside the target as ``.<file name>.<job id>.<attempt>.<worker>.<nonce>.tmp``
(``<worker>``: a hash of the daemon's worker id; ``<nonce>``: random, so a name is never reused),
renamed into place after its outcome commits (:mod:`dgxqueue.daemon.staging`). A rename that
finds another's file at the path (one that appeared after the last check) replaces nothing: the
row stays ``completed`` and the result is *held* under its temporary name until the path is free,
when a daemon's sweep publishes it.

One rule says whether a completed job's result is held: a temporary of the job lies beside its
path, and the file there (if any) is not one the job wrote (its :data:`~dgxqueue.audio.OWNER_XATTR`
does not name it). :func:`unpublished` applies it to many jobs at once (``prune``, ``archive``).

Only the standard library and :mod:`dgxqueue.audio`: the CLI's reads and producers use this module,
and load neither the daemon nor the logging stack.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dgxqueue import audio
from dgxqueue.errors import OutputError

_SAFE_ID = re.compile(r"[0-9A-Za-z-]{1,100}")  # a UUID, as our producers make them, is written as is
_MAX_ENCODED_ID = 160  # leaves a temporary's name room for 49 bytes of the file's name
_ATTEMPT = re.compile(r"-?[0-9]{1,20}")
_HEX = re.compile(r"[0-9a-f]+")
_WORKER_HEX, _NONCE_HEX = 10, 6


@functools.lru_cache(maxsize=16)
def worker_hash(worker_id: str) -> str:
    """A short, stable stand-in for a worker id in file names (ids hold host names, any text)."""
    return hashlib.blake2b(worker_id.encode("utf-8", "surrogatepass"), digest_size=_WORKER_HEX // 2).hexdigest()


def _encode_id(job_id: str) -> str:
    if _SAFE_ID.fullmatch(job_id):
        return job_id
    # Any other id (a row written by plain SQL): base64url, which has no '.' or '/'.
    encoded = "_" + base64.urlsafe_b64encode(job_id.encode("utf-8", "surrogatepass")).rstrip(b"=").decode()
    if len(encoded) > _MAX_ENCODED_ID:
        raise OutputError(f"job id of {len(job_id)} characters is too long to name its temporary file"
                          " (job ids are UUIDs)")
    return encoded


def _decode_id(text: str) -> str | None:
    if _SAFE_ID.fullmatch(text):
        return text
    if not text.startswith("_") or len(text) > _MAX_ENCODED_ID:
        return None
    try:
        raw = base64.urlsafe_b64decode(text[1:] + "=" * (-len(text[1:]) % 4))
        return raw.decode("utf-8", "surrogatepass")
    except (ValueError, binascii.Error):
        return None


def tag(job_id: str, attempt: int, worker_id: str) -> str:
    """The part of a temporary's name that says whose it is; a new nonce each call."""
    return f"{_encode_id(job_id)}.{attempt}.{worker_hash(worker_id)}.{secrets.token_hex(_NONCE_HEX // 2)}"


@dataclass(frozen=True)
class Owner:
    """The attempt a temporary belongs to, read back from its name."""

    job_id: str
    attempt: int
    worker: str  # worker_hash() of its daemon's worker id


def owner(name: str) -> Owner | None:
    """The attempt that wrote the temporary called ``name``; None for any other name."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[:-4].rsplit(".", 4)
    if len(parts) != 5:
        return None
    _, encoded, attempt, worker, nonce = parts
    job_id = _decode_id(encoded)
    if (job_id is None or not _ATTEMPT.fullmatch(attempt) or len(worker) != _WORKER_HEX
            or len(nonce) != _NONCE_HEX or not _HEX.fullmatch(worker + nonce)):
        return None
    return Owner(job_id, int(attempt), worker)


def waiting(folder: str) -> set[str]:
    """The ids of the jobs with a temporary in ``folder`` (none if it cannot be listed)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    return {who.job_id for name in names if name.startswith(".") and (who := owner(name)) is not None}


def _held(target: str, job_id: str, waits_here: bool) -> bool:
    """The rule (see the module): a temporary of the job waits in ``target``'s folder
    (``waits_here``) and the file at ``target``, if any, is not one the job wrote."""
    return waits_here and not audio.written_by(target, job_id)


def unpublished(outputs_dir: Path, jobs: Iterable[tuple[str, str]],
                listed: dict[str, set[str]] | None = None) -> set[str]:
    """Of completed jobs, given as (id, file_path), those whose result is held: it still waits
    beside its path under a temporary name, the file at the path (if any) not theirs (their rename
    found another's file there and kept it, or a crash came before it). Each folder is listed once,
    its jobs kept in ``listed`` (folder -> :func:`waiting`), which a caller asking batch after batch
    passes again."""
    root = audio.OutputRoot(outputs_dir)
    listed = {} if listed is None else listed
    found: set[str] = set()
    for job_id, file_path in jobs:
        try:
            target = root.locate(file_path)
        except OutputError:  # a path outside the outputs folder: no temporary of ours beside it
            continue
        folder = audio.folder_of(target)
        if folder not in listed:  # not setdefault: its argument would list the folder again for every job
            listed[folder] = waiting(folder)
        if _held(target, job_id, job_id in listed[folder]):
            found.add(job_id)
    return found
