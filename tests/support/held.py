"""A completed job's result held under its temporary name, as a refused rename leaves it: the
temporary of the job's attempt, carrying the job's id as a daemon writes it, and another file at
its path (real files, real extended attributes)."""

from __future__ import annotations

import os
from pathlib import Path

from dgxqueue.audio import OWNER_XATTR, temporary_name
from dgxqueue.outputs import tag

RESULT = b"RIFF this job's result, held"
FOREIGN = b"RIFF another job's WAV, not this job's"


def mark(path: Path, job_id: str) -> None:
    """Mark ``path`` as job ``job_id``'s WAV, as a daemon marks its temporaries."""
    os.setxattr(path, OWNER_XATTR, job_id.encode())


def temporary(target: Path, job_id: str, attempt: int = 1, worker_id: str = "box-1", data: bytes = RESULT) -> Path:
    """Job ``job_id``'s temporary beside ``target``, of (``attempt``, ``worker_id``), marked as its."""
    path = target.parent / temporary_name(target.name, tag(job_id, attempt, worker_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    mark(path, job_id)
    return path


def hold(target: Path, job_id: str, other: str | None, attempt: int = 1, worker_id: str = "box-1") -> Path:
    """Job ``job_id``'s result held beside ``target``, another file there (marked as job
    ``other``'s, or unmarked for None); the temporary's path."""
    held = temporary(target, job_id, attempt, worker_id)
    target.write_bytes(FOREIGN)
    if other is not None:
        mark(target, other)
    return held
