"""Whose each file beside a job's path is: the temporaries its attempts write, and whether the file
at a completed job's path is its WAV (:func:`output`).

An attempt writes its WAV beside the target as ``.<file name>.<job id>.<attempt>.<worker>.<nonce>.tmp``
(``<worker>``: a hash of the daemon's worker id; ``<nonce>``: random, so a name is never reused),
renamed into place after its outcome commits (:mod:`dgxqueue.daemon.staging`). A rename that
finds another's file at the path (one that appeared after the last check) replaces nothing: the
row stays ``completed`` and the result is *held* under its temporary name until the path is free,
when a daemon's sweep publishes it.

One rule says whether a completed job's result is held: a temporary of the job lies beside its
path, and the file there (if any) is not one the job wrote (its :data:`~dgxqueue.audio.OWNER_XATTR`
does not name it). :func:`output` applies it for ``show``, the status page and a
:class:`~dgxqueue.jobs.Job` handle; :func:`unpublished` for many jobs at once (``prune``, ``archive``).
Where the folder cannot be read (an error other than its absence: permissions, EIO, a link loop),
whether a result is held there cannot be told (:class:`Unreadable`): ``prune`` and ``archive``
keep such a job's row as they keep a held one's, and :func:`output` says so rather than "missing";
so does a mark on the file at the path that cannot be read, which may name any job.

Only the standard library and :mod:`dgxqueue.audio`: the CLI's reads and producers use this module,
and load neither the daemon nor the logging stack.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import os
import re
import secrets
import stat
import time
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


#: Errors that say a path is not there (nothing at it, or a file where a folder is on its way):
#: such a folder truly holds nothing, so no result can wait in it. Any other error says nothing.
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR})


@dataclass(frozen=True)
class Unreadable:
    """A folder that could not be listed, or a file that could not be examined, for another
    reason than its absence (permissions, EIO, a link loop): whether a job's result waits there
    under its temporary name cannot be told, so it is taken as one that might."""

    path: str  # absolute, as located
    error: str  # the error's text, without the path

    def cause(self, relative_to: str | None = None) -> str:
        """What could not be read and why, for a person (``relative_to``: as :meth:`Output.reason`)."""
        shown = self.path if relative_to is None else os.path.relpath(self.path, relative_to)
        return f"{shown} cannot be read ({self.error})"

    def reason(self) -> str:
        """Why a completed job whose folder this is must keep its row (``prune``, ``archive``)."""
        return f"whether its result waits beside its file_path under a temporary name cannot be told: {self.cause()}"


def _unreadable(path: str, exc: OSError) -> Unreadable | None:
    """The one rule for a failed look: None where ``exc`` says ``path`` is absent (it holds
    nothing), else what cannot be told."""
    if exc.errno in _ABSENT:
        return None
    return Unreadable(path, exc.strerror or type(exc).__name__)


def waiting(folder: str) -> set[str] | Unreadable:
    """The ids of the jobs with a temporary in ``folder`` (none if it is absent): a regular file,
    as the sweep publishes and :func:`output` names; a folder, link or FIFO that only bears such a
    name holds no result. :class:`Unreadable` where it cannot be listed, or such an entry's type
    cannot be told."""
    try:
        with os.scandir(folder) as entries:
            return {who.job_id for entry in entries if entry.name.startswith(".")
                    and (who := owner(entry.name)) is not None and _regular(entry)}
    except OSError as exc:
        return _unreadable(folder, exc) or set()


def _regular(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a regular file, not followed if a link (its type from the listing
    where the file system gives it); False if it is gone meanwhile; raises :class:`OSError` if
    its type cannot be told."""
    try:
        return entry.is_file(follow_symlinks=False)
    except FileNotFoundError:
        return False


def _held(mark: bytes | None, job_id: str, waits_here: bool) -> bool:
    """The rule (see the module): a temporary of the job waits beside its path (``waits_here``)
    and the file there, if any, is not one the job wrote (its ``mark`` read, :func:`_mark`)."""
    return waits_here and mark != _own(job_id)


#: What :func:`unpublished` keeps per folder: :func:`waiting`'s answer, so each is listed once.
Listed = dict[str, set[str] | Unreadable]


@dataclass(frozen=True)
class Unpublished:
    """Of completed jobs, those whose row must stay (:func:`unpublished`)."""

    held: frozenset[str]  # their result is held under its temporary name
    unreadable: dict[str, Unreadable]  # whether it is cannot be told: job id -> what could not be read

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.held or job_id in self.unreadable


def unpublished(outputs_dir: Path, jobs: Iterable[tuple[str, str]], listed: Listed | None = None) -> Unpublished:
    """Of completed jobs, given as (id, file_path), those whose result is held: it still waits
    beside its path under a temporary name, the file at the path (if any) not theirs (their rename
    found another's file there and kept it, or a crash came before it); and those whose folder
    cannot be read, unless the file at the path is theirs, or whose temporary waits beside a file
    whose mark cannot be read, since a held result cannot be ruled out there. Each folder is
    listed once, its answer kept in ``listed``, which a caller asking batch after batch passes
    again."""
    root = audio.OutputRoot(outputs_dir)
    listed = {} if listed is None else listed
    held: set[str] = set()
    unreadable: dict[str, Unreadable] = {}
    for job_id, file_path in jobs:
        try:
            target = root.locate(file_path)
        except OutputError:  # a path outside the outputs folder: no temporary of ours beside it
            continue
        folder = audio.folder_of(target)
        if folder not in listed:  # not setdefault: its argument would list the folder again for every job
            listed[folder] = waiting(folder)
        found = listed[folder]
        if not isinstance(found, Unreadable) and job_id not in found:
            continue  # no temporary of the job waits there
        mark = _mark(target)
        if isinstance(found, Unreadable):
            if mark != _own(job_id):  # a temporary of the job cannot be ruled out there
                unreadable[job_id] = found
        elif isinstance(mark, Unreadable):  # one waits, and whether the file there is the job's cannot be told
            unreadable[job_id] = mark
        elif _held(mark, job_id, True):
            held.add(job_id)
    return Unpublished(frozenset(held), unreadable)


def _mark(path: str) -> bytes | Unreadable | None:
    """The mark on the regular file at ``path`` (:func:`dgxqueue.audio.read_mark`): None where
    there is none or nothing is there, :class:`Unreadable` where it cannot be read, since a mark
    that cannot be read may name any job."""
    try:
        return audio.read_mark(path)
    except OSError as exc:
        return _unreadable(path, exc)


def _own(job_id: str) -> bytes:
    return job_id.encode("utf-8", "surrogatepass")


def anothers(path: str, job_id: str) -> bool | Unreadable:
    """Whether the regular file at ``path`` carries another job's mark than ``job_id``'s: that
    job's WAV, never job ``job_id``'s (:func:`output`'s rule), so not one to delete as its;
    :class:`Unreadable` where its mark cannot be read, so that whose it is cannot be told."""
    mark = _mark(path)
    return mark if isinstance(mark, Unreadable) else mark is not None and mark != _own(job_id)

@dataclass(frozen=True)
class Output:
    """What :func:`output` found at a completed job's path."""

    path: str  # the job's file_path, located (absolute, links resolved)
    exists: bool  # the job's WAV is at ``path``, as far as can be told (see :func:`output`)
    temporary: str | None = None  # where its result is held instead (absolute), the file at ``path`` not its
    holder: str | None = None  # the job whose WAV the file at ``path`` is, by its mark, when another
    occupied: bool = False  # something that is not this job's WAV is at ``path``
    unreadable: Unreadable | None = None  # why whether its WAV is at ``path`` cannot be told

    @property
    def held(self) -> bool:
        """Its result waits under its temporary name (:attr:`temporary`) for the path to be free."""
        return self.temporary is not None

    def reason(self, relative_to: str | None = None) -> str | None:
        """Why the job's WAV is not at its path, and what to do, for a person; None when it is.
        ``relative_to``: a folder that the paths named are shown relative to."""
        if self.exists:
            return None

        def shown(path: str) -> str:
            return path if relative_to is None else os.path.relpath(path, relative_to)

        whose = (f"it is job {self.holder}'s WAV" if self.holder is not None
                 else "it is another file, not this job's WAV")
        if self.unreadable is not None:
            cause = self.unreadable.cause(relative_to)
            if self.occupied:
                return (f"the file at {shown(self.path)} is not this job's ({whose}); whether this job's result is "
                        f"held beside it under its temporary name cannot be told: {cause}")
            return (f"whether this job's WAV is at {shown(self.path)}, or its result waits beside it under its "
                    f"temporary name, cannot be told: {cause}")
        if self.temporary is not None and self.occupied:
            return (f"the file at {shown(self.path)} is not this job's ({whose}); this job's result is held under "
                    f"its temporary name {shown(self.temporary)}: move that file away and a daemon's next sweep "
                    "publishes the result")
        if self.temporary is not None:
            return (f"this job's result waits under its temporary name {shown(self.temporary)}, to be renamed to "
                    f"{shown(self.path)} (by its daemon straight after the commit, or else by a daemon's next sweep)")
        if self.occupied:
            return (f"the file at {shown(self.path)} is not this job's ({whose}); this job's was deleted or moved "
                    "since it completed")
        return "the file does not exist (deleted or moved since the job completed)"


#: Why a job has no WAV at its path when :func:`output` found none to look at.
OUTSIDE = "its file path is not inside the outputs folder"


def output(outputs_dir: Path | audio.OutputRoot, job_id: str, file_path: object, *, attempt: object = None,
           worker_id: object = None) -> Output | None:
    """Whether completed job ``job_id``'s WAV is at its ``file_path``, and if not, why; None for a
    path that is not one inside the outputs folder (only plain SQL writes such a row).

    Its result is held (:attr:`Output.temporary`) by :func:`unpublished`'s rule; of several of its
    temporaries, the one of the attempt its row completed (``attempt``, ``worker_id``) is named, or
    else the newest. Otherwise a file at the path counts as the job's unless its mark names another
    job: one without any mark is taken as its own, since WAVs written before the mark existed, or
    copied or restored without extended attributes, carry none (on a file system without them, so
    does every WAV). Anything at the path that is not a regular file is no job's WAV.

    Where the path cannot be examined, its mark read, or the folder listed, for another reason
    than their absence (:class:`Unreadable`: permissions, EIO, a link loop), the job's WAV does
    not count as there, nor as missing: :attr:`Output.unreadable` says what could not be read.

    Reads the file system now: one ``lstat`` and the mark's ``getxattr``, and the folder is listed
    only when the file there does not carry the job's own id.
    """
    if not isinstance(file_path, str):
        return None
    root = outputs_dir if isinstance(outputs_dir, audio.OutputRoot) else audio.OutputRoot(outputs_dir)
    try:
        target = root.locate(file_path)
    except OutputError:
        return None
    try:
        info: os.stat_result | None = os.lstat(target)
    except OSError as exc:
        unknown = _unreadable(target, exc)
        if unknown is not None:  # named by the folder where it cannot be listed either, its usual cause
            listing = _TEMPORARIES.of(audio.folder_of(target))
            return Output(target, exists=False, unreadable=listing if isinstance(listing, Unreadable) else unknown)
        info = None
    mark = _mark(target) if info is not None else None
    if isinstance(mark, Unreadable):  # neither its WAV nor another's, as far as can be told
        return Output(target, exists=False, unreadable=mark)
    if mark == _own(job_id):
        return Output(target, exists=True)  # its own, whatever temporary of an older attempt waits beside it
    temporary = _temporary(audio.folder_of(target), job_id, attempt, worker_id)
    holder = audio.holder(target) if info is not None else None
    if isinstance(temporary, Unreadable):
        return Output(target, exists=False, holder=holder, occupied=_foreign(info, mark), unreadable=temporary)
    if _held(mark, job_id, temporary is not None):
        return Output(target, exists=False, temporary=temporary, holder=holder, occupied=info is not None)
    foreign = _foreign(info, mark)
    return Output(target, exists=info is not None and not foreign, holder=holder, occupied=foreign)


def _foreign(info: os.stat_result | None, mark: bytes | None) -> bool:
    """Whether what ``lstat`` found at the path (``info``, its ``mark``) is no job's WAV or another
    job's: not a regular file, or marked (the job's own mark was ruled out first)."""
    return info is not None and (not stat.S_ISREG(info.st_mode) or mark is not None)


def _temporary(folder: str, job_id: str, attempt: object, worker_id: object) -> str | Unreadable | None:
    """The path of job ``job_id``'s temporary in ``folder``: the one of (``attempt``, ``worker_id``)
    if there is one, else the newest; None if it has none; :class:`Unreadable` where that cannot
    be told."""
    best: tuple[bool, float, str] | None = None
    wanted = worker_hash(worker_id) if isinstance(worker_id, str) else None
    listing = _TEMPORARIES.of(folder)
    if isinstance(listing, Unreadable):
        return listing
    for path, who in listing:
        if who.job_id != job_id:
            continue
        try:
            info = os.lstat(path)
        except OSError as exc:  # published or deleted meanwhile, or not examinable
            unknown = _unreadable(path, exc)
            if unknown is not None:
                return unknown
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        rank = (who.attempt == attempt and who.worker == wanted, info.st_mtime, path)
        if best is None or rank > best:
            best = rank
    return None if best is None else best[2]


class _Listings:
    """The temporaries' names in each folder, listed again only when the folder changed.

    A status page asks :func:`output` for every WAV it serves, and a folder of 30,000 WAVs took 24 ms
    to list each time. A folder's mtime changes with every name added, removed or renamed in it, so
    a listing is reused while the folder's (device, inode, mtime) is the one seen before the listing;
    but a change within the same clock tick as the listing leaves the mtime as it was, so a listing
    is trusted only when it began :data:`_SETTLED_NS` after that mtime (git's rule for racy entries).
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._seen: dict[str, tuple[tuple[int, int, int], list[tuple[str, Owner]]]] = {}

    def of(self, folder: str) -> list[tuple[str, Owner]] | Unreadable:
        """(path, owner) of each entry of ``folder`` named as a temporary; none if it is absent;
        :class:`Unreadable` (never kept) if it cannot be listed."""
        try:
            info = os.stat(folder)
        except OSError as exc:
            return _unreadable(folder, exc) or []
        key = (info.st_dev, info.st_ino, info.st_mtime_ns)
        cached = self._seen.get(folder)
        if cached is not None and cached[0] == key:
            return cached[1]
        began = time.time_ns()
        try:
            with os.scandir(folder) as entries:
                found = [(entry.path, who) for entry in entries
                         if entry.name.startswith(".") and (who := owner(entry.name)) is not None]
        except OSError as exc:
            return _unreadable(folder, exc) or []
        if began - info.st_mtime_ns >= _SETTLED_NS:
            if len(self._seen) >= self._size:
                self._seen.clear()  # folders are few; a page that walks many simply lists again
            self._seen[folder] = (key, found)
        return found


_SETTLED_NS = 2_000_000_000
_TEMPORARIES = _Listings()
