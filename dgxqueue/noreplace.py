"""Renaming a file into place without ever replacing what is there: :func:`rename_noreplace`.

``os.replace`` destroys whatever appeared at the target since it was last looked at (another
program's file, another daemon's, an operator's). Three ways to rename only onto nothing, tried
in order, each passing to the next where this system lacks it:

- ``renameat2(RENAME_NOREPLACE)`` (Linux 3.15, glibc 2.28), one atomic step. Lacking: no such
  symbol in the C library, ENOSYS (the kernel), EINVAL (a file system without the flag: some
  FUSE and network ones).
- a hard link to the target, then the source unlinked: the link fails if anything is there, and
  the file keeps its inode (its extended attributes too). Lacking: EPERM (vfat, exFAT), ENOTSUP,
  ENOSYS (some FUSE servers) or EMLINK (a file system that allows one link per file).
- look, then ``os.replace``: only where both are lacking. What appears between the two is still
  replaced: a short window, left open only there.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable, Mapping, Sequence

RENAMEAT2 = "renameat2"
LINK = "link"
CHECK = "check"
#: The ways, in the order :func:`rename_noreplace` tries them.
WAYS = (RENAMEAT2, LINK, CHECK)

_RENAME_NOREPLACE = 1  # linux/fs.h


def rename_noreplace(src: str, dst: str, *, dir_fd: int, ways: Sequence[str] = WAYS) -> None:
    """Rename ``src`` to ``dst`` (names in the folder open as ``dir_fd``) unless anything (a file,
    folder, link, FIFO) is at ``dst``: then :class:`FileExistsError`, and both stay as they are.
    :class:`FileNotFoundError`: ``src`` is not there (someone renamed it first). Other errors
    pass as the OSError they are.

    ``ways``: which of :data:`WAYS` to try, in order (tests pick one); each this system lacks
    passes to the next, and the last one's error is raised if it lacks them all.

    A ``dst`` that is ``src`` itself (a link-then-unlink cut short by a crash left both names)
    is finished: ``src`` is unlinked.
    """
    if not ways:
        raise ValueError("no way to rename given")
    for i, way in enumerate(ways):
        attempt, lacking = _WAYS[way]
        try:
            attempt(src, dst, dir_fd)
            return
        except FileExistsError:
            _already_there(src, dst, dir_fd)
            return
        except OSError as exc:
            if exc.errno not in lacking or i == len(ways) - 1:
                raise


def _already_there(src: str, dst: str, dir_fd: int) -> None:
    """After EEXIST: FileNotFoundError if ``src`` is gone, nothing if ``dst`` is ``src`` (its
    extra name unlinked), FileExistsError otherwise."""
    source = os.stat(src, dir_fd=dir_fd, follow_symlinks=False)  # gone: FileNotFoundError, the caller's to judge
    try:
        there: os.stat_result | None = os.stat(dst, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:  # gone meanwhile: still refused, a later try may find it free
        there = None
    if there is not None and (there.st_dev, there.st_ino) == (source.st_dev, source.st_ino):
        os.unlink(src, dir_fd=dir_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


@functools.cache
def _libc_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    import ctypes  # here: only publishing needs it, and most dgxqueue processes never publish

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc before 2.28)
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def _renameat2(src: str, dst: str, dir_fd: int) -> None:
    function = _libc_renameat2()
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in the C library", dst)
    if function(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


def _link(src: str, dst: str, dir_fd: int) -> None:
    os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    # The file is in place now. A source name that stays is a second name of it, which the next
    # rename_noreplace of the same pair removes (see _already_there).
    with contextlib.suppress(OSError):
        os.unlink(src, dir_fd=dir_fd)


def _check_then_replace(src: str, dst: str, dir_fd: int) -> None:
    try:
        os.stat(dst, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


_WAYS: Mapping[str, tuple[Callable[[str, str, int], None], frozenset[int]]] = {
    RENAMEAT2: (_renameat2, frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})),
    LINK: (_link, frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})),
    CHECK: (_check_then_replace, frozenset()),
}
