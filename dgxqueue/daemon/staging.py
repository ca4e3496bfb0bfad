"""A result is published after its attempt commits, and the sweep.

An attempt writes its WAV beside the target as ``.<file name>.<job id>.<attempt>.<worker>.<nonce>.tmp``
(``<worker>``: a hash of the daemon's worker id; ``<nonce>``: random, so a name is never reused;
the names, and whose each is, are :mod:`dgxqueue.outputs`', re-exported here),
fsynced; its fenced outcome write commits the row; only then is the temporary renamed into place.
An attempt whose write is fenced off, or whose call was abandoned at its time limit, deletes its
temporary and never renames it, so the file at ``file_path`` is always the one the row's
completed attempt made.

A crash can leave temporaries behind. :func:`sweep` settles them, on daemon start and every
lease period after: a temporary of the attempt its row records as completed is renamed into
place (the crash came between the commit and the rename), unless something else is at its path
(never replaced: it stays, logged once, for each later sweep to try again); one of the row's current
``processing`` attempt is kept (that attempt may still commit, expired lease or not, until the
rescuer takes the row back); every other one is deleted. The row is the authority, read after
the folder was listed: an attempt that is neither cannot commit any more. A temporary of a job
no row names is deleted only once it is :data:`UNKNOWN_JOB_GRACE` old: it may be another
queue's (another database sharing the outputs folder), whose attempt may still commit it.
"""

from __future__ import annotations

import enum
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dgxqueue import audio
from dgxqueue.errors import OutputError
from dgxqueue.outputs import Owner as Owner
from dgxqueue.outputs import owner as owner
from dgxqueue.outputs import tag as tag
from dgxqueue.outputs import unpublished as unpublished
from dgxqueue.outputs import waiting as waiting
from dgxqueue.outputs import worker_hash as worker_hash
from dgxqueue.storage.models import COMPLETED, PROCESSING
from dgxqueue.storage.queue import AttemptState

log = structlog.get_logger("dgxqueue.staging")

#: Seconds before the sweep deletes a temporary of a job its database does not know: a deleted
#: row's, or one another queue writing into the same outputs folder has yet to publish.
UNKNOWN_JOB_GRACE = 24 * 3600.0

Lookup = Callable[[Sequence[str]], Mapping[str, AttemptState]]
#: The warnings a daemon's sweeps gave, as (folder, temporary, warning), so that each is logged once
#: while its temporary stays, not every sweep; an entry goes with its temporary.
Warned = set[tuple[str, str, str]]


class Verdict(enum.Enum):
    PUBLISH = "publish"  # the attempt the row records as completed
    KEEP = "keep"  # the row's current attempt: it may still commit
    DELETE = "delete"  # any other: it can never commit


def verdict(state: AttemptState | None, attempt: int, worker: str) -> Verdict:
    """What to do with a temporary of (``attempt``, ``worker``) given its row (None: deleted)."""
    if (state is None or state.attempts != attempt or state.worker_id is None
            or worker_hash(state.worker_id) != worker):
        return Verdict.DELETE
    if state.status == PROCESSING:
        return Verdict.KEEP
    return Verdict.PUBLISH if state.status == COMPLETED else Verdict.DELETE


@dataclass
class Swept:
    """What one sweep did: file paths published, temporaries deleted, temporaries kept."""

    published: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept: int = 0


@dataclass(frozen=True)
class _Found:
    folder: str  # real path (walked without following links)
    name: str
    owner: Owner
    size: int
    mtime: float


def sweep(outputs_dir: Path, lookup: Lookup, warned: Warned | None = None) -> Swept:
    """Publish the temporaries of completed attempts and delete those of dead ones, everywhere
    under ``outputs_dir``. ``lookup`` reads the rows of the job ids found (the daemon's store).

    The folders are walked without following links, and every rename and delete goes through
    the descriptor of a folder reached that way. File system errors are logged, never raised;
    database errors propagate (nothing was changed by then). ``warned``: the warnings about a
    temporary that earlier sweeps gave (see :data:`Warned`), not given again; without it, each
    sweep gives its own.
    """
    swept = Swept()
    root = audio.OutputRoot(outputs_dir)
    fds: dict[str, int] = {}
    try:
        try:
            found = _walk(root.real, fds)
        except OSError as exc:  # out of descriptors, say: the next sweep tries again
            log.warning("sweep: could not list the outputs folder", folder=root.real, error=str(exc))
            return swept
        if warned:  # the temporaries gone since take their warnings with them
            present = {(item.folder, item.name) for item in found}
            warned.difference_update([key for key in warned if key[:2] not in present])
        if not found:
            return swept
        states = lookup(sorted({f.owner.job_id for f in found}))
        published: set[str] = set()
        synced: set[str] = set()
        stale_before = time.time() - UNKNOWN_JOB_GRACE
        for item in sorted(found, key=lambda f: f.mtime, reverse=True):  # the newest first
            state = states.get(item.owner.job_id)
            decision = verdict(state, item.owner.attempt, item.owner.worker)
            if state is None and item.mtime > stale_before:  # maybe another queue's, still to commit
                decision = Verdict.KEEP
            if decision is Verdict.KEEP:
                swept.kept += 1
                continue
            if decision is Verdict.PUBLISH and state is not None and item.owner.job_id not in published:
                target = _publish(root, fds[item.folder], item, state, warned)
                if target is None:
                    continue
                published.add(item.owner.job_id)
                swept.published.append(state.file_path)
                synced.add(item.folder)
                continue
            if _unlink(fds[item.folder], item, warned):
                swept.deleted.append(os.path.join(item.folder, item.name))
        for folder in synced:  # the renames made durable
            try:
                os.fsync(fds[folder])
            except OSError as exc:
                log.warning("sweep: could not sync a folder", folder=folder, error=str(exc))
    finally:
        for fd in fds.values():
            os.close(fd)
    return swept


def _walk(top: str, fds: dict[str, int]) -> list[_Found]:
    """Every temporary of ours under ``top``; ``fds`` gets a descriptor of each folder holding one."""
    found: list[_Found] = []
    if not os.path.isdir(top):
        return found
    for folder, _, files, folder_fd in os.fwalk(top, follow_symlinks=False):
        for name in files:
            who = owner(name) if name.startswith(".") else None
            if who is None:
                continue
            try:
                info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
            except OSError:  # gone meanwhile (published or deleted by its own daemon)
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if folder not in fds:
                fds[folder] = os.dup(folder_fd)
            found.append(_Found(folder, name, who, info.st_size, info.st_mtime))
    return found


def _warn(warned: Warned | None, item: _Found, event: str, **fields: object) -> None:
    """Log a warning about ``item``, unless an earlier sweep gave it (``warned``)."""
    if warned is not None:
        if (item.folder, item.name, event) in warned:
            return
        warned.add((item.folder, item.name, event))
    log.warning(event, **fields)


def _publish(root: audio.OutputRoot, folder_fd: int, item: _Found, state: AttemptState,
             warned: Warned | None = None) -> str | None:
    """Rename a completed attempt's temporary to its row's file; the target, or None if it must
    stay (logged): the row's path no longer leads to this folder, the size is not the row's, or
    something that is not this attempt's result is at the path (never replaced, however late it
    appeared: :func:`audio.put_in_place`)."""
    context = {"job_id": item.owner.job_id, "attempt": item.owner.attempt, "temporary": item.name}
    try:
        target = root.locate(state.file_path)
    except OutputError as exc:
        _warn(warned, item, "sweep: a completed job's file path is not usable; its temporary stays", error=str(exc),
              **context)
        return None
    if audio.folder_of(target) != item.folder:
        _warn(warned, item, "sweep: a completed job's file path leads to another folder; its temporary stays",
              folder=item.folder, file_path=state.file_path, **context)
        return None
    if state.file_size_bytes != item.size:
        _warn(warned, item, "sweep: a completed job's temporary is not the size its row records; it stays",
              size=item.size, recorded=state.file_size_bytes, **context)
        return None
    try:
        audio.put_in_place(folder_fd, item.name, os.path.basename(target), item.owner.job_id)
    except FileNotFoundError:  # its own daemon renamed it meanwhile: the file is this result
        return target
    except FileExistsError:
        _warn(warned, item, "sweep: a completed job's file path holds a file that is not its result; both are left"
              " as they are (move that file away and the next sweep publishes the result)",
              file_path=state.file_path, folder=item.folder, holder=audio.holder(os.path.basename(target), folder_fd),
              **context)
        return None
    except OSError as exc:
        _warn(warned, item, "sweep: could not rename a completed job's temporary", error=str(exc), **context)
        return None
    log.info("sweep: published a result a crash left unrenamed", file_path=state.file_path, **context)
    return target


def _unlink(folder_fd: int, item: _Found, warned: Warned | None = None) -> bool:
    try:
        os.unlink(item.name, dir_fd=folder_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        _warn(warned, item, "sweep: could not delete a stale temporary", temporary=item.name, folder=item.folder,
              error=str(exc))
        return False
    return True
