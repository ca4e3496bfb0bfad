"""The system calls the occupied-path checks add to each job's write, against the write itself.

Run: ``.venv/bin/python benchmarks/bench_occupied_checks.py [folder]`` (default: a new folder under
/tmp). Per job, since the checks landed, the write path makes one more ``lstat`` of the job's path
(the check at the write; the one before the render existed already), one ``fsetxattr`` marking
the temporary with its job's id, and the collision bookkeeping of :class:`Paths`; a ``getxattr``
only where a file is already at the path. Each is timed over N jobs, best of 5, beside the floor:
the write every job makes anyway (create, write a 204-byte WAV, fsync, close, rename).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dgxqueue.audio import OWNER_XATTR, written_by
from dgxqueue.daemon.executor import Paths
from dgxqueue.storage.claimed import ClaimedJob

N = 2000
WAV = b"\0" * 204  # a 0.01 s mono 8 kHz WAV: header and 80 16-bit samples


def best(action: Callable[[], None], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="occupied-bench-"))
    out = folder / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(N)]
    paths = [str(out / f"{job_id}.wav") for job_id in ids]
    owner = [job_id.encode() for job_id in ids]
    run = [0]

    def write() -> None:
        run[0] += 1
        for path in paths:
            temp = f"{path}.{run[0]}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            os.write(fd, WAV)
            os.fsync(fd)
            os.close(fd)
            os.replace(temp, path)

    def write_marked() -> None:
        run[0] += 1
        for path, mark in zip(paths, owner, strict=True):
            temp = f"{path}.{run[0]}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            os.setxattr(fd, OWNER_XATTR, mark)
            os.write(fd, WAV)
            os.fsync(fd)
            os.close(fd)
            os.replace(temp, path)

    def fsetxattr_only() -> float:
        """Only the fsetxattr calls, timed one by one on files opened for them."""
        spent = 0.0
        for path, mark in zip(paths, owner, strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            start = time.perf_counter()
            os.setxattr(fd, OWNER_XATTR, mark)
            spent += time.perf_counter() - start
            os.close(fd)
        return spent

    absent = [f"{p}.absent" for p in paths]

    def lstat_absent() -> None:
        for path in absent:
            with contextlib.suppress(OSError):
                os.lstat(path)

    def getxattr_own() -> None:
        for path, job_id in zip(paths, ids, strict=True):
            written_by(path, job_id)

    jobs = [ClaimedJob.__new__(ClaimedJob) for _ in ids]
    for job, job_id in zip(jobs, ids, strict=True):
        object.__setattr__(job, "id", job_id)

    def bookkeeping() -> None:
        written = Paths(str(out))
        for job, path in zip(jobs, paths, strict=True):
            if written.other(job, path) is None:
                written.add(job, path)

    print(f"{N} jobs in {out} (per job, best of 5)")
    floors, markeds = [], []
    for _ in range(3):  # alternating: the fsync's cost drifts with the disk
        floors.append(best(write, 1))
        markeds.append(best(write_marked, 1))
    floor, marked = min(floors), min(markeds)
    for name, seconds in [("floor: create, write, fsync, close, rename", floor),
                          ("the same with fsetxattr (as now)", marked),
                          ("fsetxattr alone (timed call by call)", min(fsetxattr_only() for _ in range(5))),
                          ("lstat of an absent path", best(lstat_absent)),
                          ("getxattr of the job's own WAV (a file at the path)", best(getxattr_own)),
                          ("collision bookkeeping (Paths.other + add)", best(bookkeeping))]:
        print(f"  {name:52} {seconds / N * 1e6:9.1f} us")
    print(f"  writes alternated, per job (us): plain {[round(t / N * 1e6) for t in floors]},"
          f" marked {[round(t / N * 1e6) for t in markeds]}")


if __name__ == "__main__":
    main()
