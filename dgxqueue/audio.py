"""Audio output: where a job's WAV goes, how it is written (atomically), and what it measures.

Samples are float32 shaped (channels, frames). On disk they are 16-bit PCM: clipped to [-1, 1],
scaled by 32767 (symmetric, so 1.0 and -1.0 map to +/-32767 and reading back divides by the
same number), rounded and interleaved. NaN becomes 0 and +/-inf become +/-1 before clipping,
because clipping NaN is undefined and one bad sample must not poison a whole file.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import stat
import struct
import threading
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgxqueue import faultpoints
from dgxqueue.errors import OutputError, PathTakenError
from dgxqueue.generators import GeneratedAudio
from dgxqueue.noreplace import rename_noreplace

if TYPE_CHECKING:  # numpy is imported by the functions that use it: the CLI and producers never load it
    import numpy as np
    import numpy.typing as npt

PCM_SCALE = 32767.0
#: ``energy`` maps RMS in dBFS linearly from this floor (0.0) up to 0 dBFS (1.0).
ENERGY_FLOOR_DBFS = -60.0
_CHUNK = 1 << 20  # samples per float64 block when measuring: bounded extra memory
#: The header :mod:`wave` writes for PCM: RIFF size, "fmt " chunk (format, channels, rate,
#: byte rate, block align, bits per sample), then the "data" chunk's size.
_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
_WAVE_FORMAT_PCM = 1
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Reading a located file: no link followed below the outputs folder; O_NONBLOCK so that a FIFO
# swapped in cannot hang the open.
_STEP = _FOLDER | os.O_NOFOLLOW
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NAME_MAX = 255  # bytes in one file name, on every file system Linux writes outputs to
_PATH_MAX = 4096  # bytes in a path given to a system call, its final NUL included (Linux)
#: The extended attribute naming the job whose attempt wrote a WAV, set on its temporary so that it
#: stays through the rename: a file at a job's path that carries the job's own id is that job's
#: output, from an attempt whose completion the database lost (see :func:`taken`).
OWNER_XATTR = "user.dgxqueue.job"
#: The most bytes of an :data:`OWNER_XATTR` value that :func:`holder` names (a UUID takes 36).
HOLDER_MAX = 64
_HOLDER = re.compile(rb"[!-~]{1,%d}" % HOLDER_MAX)  # printable ASCII without spaces: a job id as producers make them


class OutputRoot:
    """The outputs folder, for resolving many jobs' ``file_path`` values against it (one batch).

    Each folder's real path is looked up once per instance and kept, so resolving a batch costs
    one ``lstat`` per file rather than one per path component. Build a new instance per batch:
    a folder re-linked later is only seen by a later instance.
    """

    def __init__(self, outputs_dir: Path) -> None:
        self.root = os.path.abspath(outputs_dir)
        self.parent, self.name = os.path.split(self.root)
        self._real: dict[str, str] = {}  # folder relative to ``parent`` -> its real path

    @property
    def real(self) -> str:
        """The outputs folder's real path (symlinks resolved), looked up once per instance."""
        return self._real_folder(self.name)

    def resolve(self, file_path: str) -> Path:
        """The absolute path for ``file_path`` (see :meth:`locate`)."""
        return Path(self.locate(file_path))

    def locate(self, file_path: str) -> str:
        """The absolute path for ``file_path`` as text, refused unless it lies inside the outputs
        folder. Text, because the daemon passes it straight to ``os`` calls: building and
        re-rendering a :class:`Path` per file was a sixth of the cost of writing a short WAV.

        ``file_path`` is relative to the folder that *holds* the outputs folder (``outputs/x.wav``
        for outputs folder ``outputs``), as in the user's specification. Symlinks are resolved
        first, so a link pointing out of the folder is refused like ``..`` is.
        """
        return self._locate(file_path)[0]

    def place(self, file_path: str, owner: str | None = None) -> tuple[str, bool]:
        """:meth:`locate`'s path, and whether anything (a file, a link, a folder) is there now, by
        ``lstat``: the one :meth:`locate` makes anyway, unless ``file_path`` named a link. A WAV
        that job ``owner`` wrote itself does not count (:func:`taken`)."""
        target, found = self._locate(file_path)
        if found is None:  # a link followed, or a path realpath sorted out: look at where it led
            found = _lstat(target) is not None
        return target, found and not (owner is not None and written_by(target, owner))

    def _locate(self, file_path: str) -> tuple[str, bool | None]:
        """:meth:`locate`'s work, and whether its ``lstat`` found anything there (None: not known)."""
        root = self.root
        if "\x00" in file_path:
            raise OutputError(f"file path {file_path!r} contains a NUL byte (outputs folder {root})")
        if not file_path or file_path.startswith(("/", "\\", "~")):
            raise OutputError(
                f"file path {file_path!r} must be relative to {self.parent} (outputs folder {root})"
            )
        # A name over _NAME_MAX bytes: no file system takes it, and the rename after the commit
        # would fail. (A path of at most _NAME_MAX // 4 characters cannot hold one: the usual case.)
        if len(file_path) > _NAME_MAX // 4 and (longest := max(
                len(part.encode("utf-8", "surrogatepass")) for part in file_path.split("/"))) > _NAME_MAX:
            raise OutputError(f"file path {file_path!r} holds a name of {longest} bytes, over the {_NAME_MAX}"
                              f" bytes a file name may have (outputs folder {root})")
        folder, _, name = file_path.rpartition("/")
        taken: bool | None = None  # not known yet: the lstat below answers it for a plain name
        try:
            resolved_root = self._real_folder(self.name)
            if name in ("", ".", ".."):  # not a file name: let realpath sort the path out
                target = os.path.realpath(os.path.join(self.parent, file_path))
            else:
                # The same answer as realpath of the whole path: the folder is resolved (and
                # cached), and the last component, unless a symlink, needs no resolving.
                target = os.path.join(self._real_folder(folder), name)
                found = _lstat(target)
                if found is not None and stat.S_ISLNK(found.st_mode):
                    target = os.path.realpath(target)
                else:
                    taken = found is not None
        except OSError as exc:  # a link changed while being resolved
            raise OutputError(f"file path {file_path!r} cannot be resolved under {root}: {exc}") from exc
        if not target.startswith(resolved_root + os.sep):
            raise OutputError(f"file path {file_path!r} resolves to {target}, outside the outputs folder {root}")
        if len(target) >= _PATH_MAX // 4 and (size := len(target.encode("utf-8", "surrogatepass"))) >= _PATH_MAX:
            raise OutputError(f"file path {file_path[:80]!r}... resolves to a path of {size} bytes, over the"
                              f" {_PATH_MAX - 1} bytes a path may have (outputs folder {root})")
        return target, taken

    def open_file(self, file_path: str) -> tuple[int, os.stat_result, str]:
        """Open the regular file ``file_path`` names (as :meth:`locate` reads it) for reading:
        its descriptor, its ``fstat`` and its located path; :class:`OutputError` otherwise.

        What is opened is what :meth:`locate` checked, never what a swap put there since: each
        folder of the located path below the outputs folder is opened from its parent's
        descriptor with ``O_NOFOLLOW``, then the file with ``O_NOFOLLOW``, and the opened file
        must be the regular file (same device and inode) that ``lstat`` found at the located path.
        """
        target = self.locate(file_path)
        try:
            located = os.lstat(target)
        except OSError as exc:
            raise OutputError(f"file path {file_path!r} cannot be opened: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(located.st_mode):
            raise OutputError(f"file path {file_path!r} resolves to {target}, which is not a regular file")
        # The located path is real (no link, no "..") and inside the folder: a walk from the folder.
        *folders, name = os.path.relpath(target, self.real).split(os.sep)
        folder_fd = fd = -1
        try:
            folder_fd = os.open(self.real, _FOLDER)
            for folder in folders:
                folder_fd, parent = os.open(folder, _STEP, dir_fd=folder_fd), folder_fd
                os.close(parent)
            fd = os.open(name, _READ, dir_fd=folder_fd)
            opened = os.fstat(fd)
        except OSError as exc:  # ELOOP: a link swapped in after the check
            if fd >= 0:
                os.close(fd)
            raise OutputError(f"file path {file_path!r} cannot be opened: {exc.strerror or exc}") from exc
        finally:
            if folder_fd >= 0:
                os.close(folder_fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (located.st_dev, located.st_ino):
            os.close(fd)
            raise OutputError(f"file path {file_path!r}: {target} was replaced while it was opened")
        return fd, opened, target

    def _real_folder(self, folder: str) -> str:
        real = self._real.get(folder)
        if real is None:  # os.path.realpath: the same answer as Path.resolve() at a third of the cost
            real = self._real[folder] = os.path.realpath(os.path.join(self.parent, folder))
        return real


def taken(path: str, owner: str | None = None) -> bool:
    """Whether anything is at ``path`` (one ``lstat``, no link followed) other than a WAV that job
    ``owner`` wrote: a job's WAV is renamed into place only after its completion commits, so its
    own file at its path while it runs again means the database lost that commit (SQLite's
    ``synchronous = NORMAL`` at a power cut, a failover, a restore), and the job's new result
    replaces it."""
    if _lstat(path) is None:  # absent, or not examinable: the write finds out which, and whose fault it is
        return False
    return owner is None or not written_by(path, owner)


def written_by(path: str, owner: str) -> bool:
    """Whether ``path`` is a regular file (not followed if a link) that job ``owner`` wrote
    (:data:`OWNER_XATTR`); False where it cannot be told (a file system without user attributes)."""
    return _owner_mark(path) == owner.encode("utf-8", "surrogatepass")


def holder(path: str, folder_fd: int | None = None) -> str | None:
    """The job whose WAV the regular file ``path`` is (a name in the folder open as ``folder_fd``,
    if given), as its :data:`OWNER_XATTR` says, for an error or a log to name; None where nothing
    says so. Anyone may set a user attribute: a value that does not look like a job id (printable
    ASCII without spaces, at most :data:`HOLDER_MAX` bytes) is never echoed, so it cannot carry
    control characters into a log or a terminal."""
    mark = _owner_mark(path, folder_fd)
    return mark.decode("ascii") if mark is not None and _HOLDER.fullmatch(mark) else None


def marked(path: str) -> bool:
    """Whether the regular file ``path`` (not followed if a link) carries an :data:`OWNER_XATTR`,
    any job's; False where it cannot be told (a file system without user attributes)."""
    return _owner_mark(path) is not None


def put_in_place(folder_fd: int, temp: str, name: str, owner: str | None) -> None:
    """Rename the temporary ``temp`` to ``name`` (both in the folder open as ``folder_fd``) without
    replacing anything there (:func:`~dgxqueue.noreplace.rename_noreplace`) but a WAV that job
    ``owner`` wrote itself (:func:`taken`), which it replaces.

    :class:`FileExistsError`: something else is there; both stay as they are.
    :class:`FileNotFoundError`: ``temp`` is gone (someone renamed it first).
    """
    try:
        rename_noreplace(temp, name, dir_fd=folder_fd)
    except FileExistsError:
        if owner is None or _owner_mark(name, folder_fd) != owner.encode("utf-8", "surrogatepass"):
            raise
        # Replaced after a look: only a file swapped in for the job's own since then would be lost.
        os.replace(temp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)


def _owner_mark(name: str, folder_fd: int | None = None) -> bytes | None:
    """:func:`read_mark`, None also where the mark cannot be read (the daemon's checks, which
    take such a file for one it did not write)."""
    try:
        return read_mark(name, folder_fd)
    except OSError:
        return None


#: getxattr's errors that say a file carries no mark: none set, or no user attributes on its file system.
_NO_MARK = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


def read_mark(name: str, folder_fd: int | None = None) -> bytes | None:
    """The raw :data:`OWNER_XATTR` of the regular file ``name`` (a path, or a name in the folder
    open as ``folder_fd``), read through the descriptor its own check opened: a link or a FIFO
    swapped in is neither followed nor waited on, nor is a device opened. None where it is not a
    regular file or carries no mark (none set, no user attributes here); :class:`OSError` where
    the file or its mark cannot be read (absent, permissions, EIO), for the caller to judge."""
    if not stat.S_ISREG(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
        return None
    fd = os.open(name, _READ, dir_fd=folder_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            return os.getxattr(fd, OWNER_XATTR)
        except OSError as exc:
            if exc.errno in _NO_MARK:
                return None
            raise
    finally:
        os.close(fd)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:  # as realpath does: what cannot be examined is taken as it is (and as absent)
        return None


def resolve_output_path(outputs_dir: Path, file_path: str) -> Path:
    """The absolute path for one job's ``file_path`` (see :meth:`OutputRoot.resolve`)."""
    return OutputRoot(outputs_dir).resolve(file_path)


def _check_shape(path: str | Path, audio: GeneratedAudio) -> None:
    import numpy as np
    samples = audio.samples
    if not isinstance(samples, np.ndarray) or samples.ndim != 2 or not 1 <= samples.shape[0] <= 64:
        shape = getattr(samples, "shape", None)
        raise OutputError(f"could not write {path}: samples must be shaped (channels, frames), got {shape}")
    # The header holds the byte rate (rate x channels x 2) in 32 bits.
    rate, most = audio.sample_rate, 0xFFFFFFFF // (2 * samples.shape[0])
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or not 1 <= rate <= most:
        raise OutputError(f"could not write {path}: invalid sample rate {rate!r} (an integer in [1, {most}])")


def _clip_as_written(samples: npt.NDArray[np.floating[Any]], full_scale: float) -> float:
    """Clip ``samples`` in place to +/-``full_scale`` (so +/-inf become the limits) and set NaN to
    0, as they are written; return the peak absolute value after."""
    import numpy as np
    if not samples.size:
        return 0.0
    peak = float(np.abs(samples).max())
    if not peak <= full_scale:  # beyond full scale, or NaN (which compares false)
        # maximum/minimum: np.clip's Python wrapper costs more than clipping a short array.
        np.maximum(samples, -full_scale, out=samples)  # NaN stays NaN through both...
        np.minimum(samples, full_scale, out=samples)
        np.copyto(samples, 0.0, where=np.isnan(samples))  # ...until here
        peak = float(np.abs(samples).max())
    return peak


def _wav_bytes(audio: GeneratedAudio) -> bytearray:
    """The whole WAV file for ``audio``: the 44-byte header :mod:`wave` writes, then the PCM.

    Built in one buffer (the samples are converted straight into it) so that writing the file
    is one ``write`` call, without :mod:`wave`'s and a buffered file's per-call overhead.
    """
    import numpy as np
    channels, frames = audio.samples.shape
    size = frames * channels * 2
    wav = bytearray(_HEADER.size + size)
    _HEADER.pack_into(wav, 0, b"RIFF", 36 + size, b"WAVE", b"fmt ", 16, _WAVE_FORMAT_PCM, channels,
                      audio.sample_rate, audio.sample_rate * channels * 2, channels * 2, 16, b"data", size)
    # Scaled first, then clipped to +/-PCM_SCALE: the same float32 values as clipping to +/-1
    # and scaling, and the multiplication makes the copy that is converted in place.
    data = np.multiply(audio.samples, PCM_SCALE, dtype=np.float32)
    _clip_as_written(data, PCM_SCALE)
    # Rounded and cast straight into the file, through a (channels, frames) view of its
    # interleaved (frames, channels) samples.
    pcm = np.ndarray((channels, frames), dtype="<i2", buffer=wav, offset=_HEADER.size, strides=(2, 2 * channels))
    np.rint(data, out=pcm, casting="unsafe")
    return wav


class Folders:
    """The folders one batch writes into, each opened once and kept open until :meth:`close`.

    ``inside``: the real path of a folder every file must land in. A folder's real path is read
    from its open descriptor and checked against it, and every write, rename and fsync goes
    through that descriptor: a folder swapped for a symlink after the job's path was checked
    (while the backend rendered, for minutes) is refused, not written through. The folders
    stay open while anyone holds them (:meth:`hold`, :meth:`release`): the batch that wrote
    them, and each of its :class:`StagedWav` files until it is published or discarded.
    """

    def __init__(self, inside: str | None = None) -> None:
        self.inside = inside
        self._open: dict[str, int] = {}
        self._holders = 1  # whoever made it, until release(); and each StagedWav not yet settled
        self._lock = threading.Lock()

    def open(self, folder: str, target: str) -> int:
        """The descriptor of ``folder`` (made if missing), checked on first use."""
        fd = self._open.get(folder)
        if fd is not None:
            return fd
        try:
            fd = os.open(folder, _FOLDER)
        except FileNotFoundError:  # a new folder: made only now, to spare every file a mkdir call
            os.makedirs(folder, exist_ok=True)
            fd = os.open(folder, _FOLDER)
        try:
            if self.inside is not None:
                _check_inside(fd, folder, self.inside, target)
        except BaseException:
            os.close(fd)
            raise
        self._open[folder] = fd
        return fd

    def sync(self) -> dict[str, OutputError]:
        """fsync every folder opened (their renames become durable); the errors by folder."""
        errors: dict[str, OutputError] = {}
        for folder, fd in self._open.items():
            try:
                _fsync_folder(fd, folder)
            except OutputError as exc:
                errors[folder] = exc
        return errors

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        """One holder fewer; the last one closes the folders."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.close()

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def write_wav_atomic(path: str | Path, audio: GeneratedAudio, *, sync_folder: bool = True,
                     folders: Folders | None = None, replace: bool = True) -> int:
    """Write ``audio`` as 16-bit PCM WAV at ``path`` atomically; return the file size in bytes.

    The data goes to a hidden temporary file in the same folder, is flushed and fsynced, then
    renamed over ``path`` and the folder fsynced, so readers see either no file or the whole
    file. Any OSError (disk full, permission, read-only) removes the temporary file and raises
    :class:`OutputError`; a file already at ``path`` is left as it was. ``replace=False``: a
    file (folder, link) at ``path`` is never replaced, not even one that appears during the
    write: :class:`PathTakenError`, with the temporary removed. ``sync_folder=False``
    leaves the folder's fsync to the caller (:meth:`Folders.sync`, once for a
    whole batch). Missing folders are created. ``folders``: the batch's open folders
    (checked to lie in the outputs folder); without it the folder is opened for this file alone.
    The daemon does not use this: its results wait for their commit (:func:`stage_wav`).
    """
    _check_shape(path, audio)
    data = _wav_bytes(audio)
    target = os.fspath(path)
    name = target.rpartition(os.sep)[2]
    tmp = temporary_name(name, secrets.token_hex(6))
    own = folders is None
    opened = Folders() if folders is None else folders
    try:
        folder_fd = opened.open(folder_of(target), target)
        _write_temporary(folder_fd, tmp, data, path)
        try:
            if replace:
                os.replace(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
            else:
                rename_noreplace(tmp, name, dir_fd=folder_fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # the original error is the one worth reporting
                os.unlink(tmp, dir_fd=folder_fd)
            # Only the rename's: a folder that cannot be made (mkdir's EEXIST) is no file left at the path.
            if isinstance(exc, FileExistsError):
                raise PathTakenError(target, holder=holder(target)) from exc
            raise
        if sync_folder:
            _fsync_folder(folder_fd, target)
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        if own:
            opened.close()
    return len(data)


def temporary_name(name: str, tag: str) -> str:
    """``.<name>.<tag>.tmp``, the name cut so that the whole fits in a file name's 255 bytes."""
    room = _NAME_MAX - len(tag.encode()) - 6  # the two dots and ".tmp"
    if len(name) * 4 > room:  # cut by bytes, never inside a character
        name = name.encode()[:max(0, room)].decode("utf-8", "ignore")
    return f".{name}.{tag}.tmp"


def _write_temporary(folder_fd: int, temp: str, data: bytearray, path: str | Path, owner: str | None = None) -> None:
    """Create ``temp`` (it must not exist), marked as job ``owner``'s (:data:`OWNER_XATTR`), write
    ``data``, fsync and close it; on any error it is removed again and an OSError becomes
    :class:`OutputError`."""
    fd = -1
    created = False
    try:
        # os.open rather than mkstemp: mode 0o666 lets the umask decide, as for any other file.
        fd = os.open(temp, _CREATE, 0o666, dir_fd=folder_fd)
        created = True
        faultpoints.reached("temporary-created")
        if owner is not None:
            with contextlib.suppress(OSError):  # no user attributes here: the file is just not known as its own
                os.setxattr(fd, OWNER_XATTR, owner.encode("utf-8", "surrogatepass"))
        written = os.write(fd, data)
        while written < len(data):  # a regular file takes it all at once, but write() may stop short
            written += os.write(fd, memoryview(data)[written:])
        os.fsync(fd)
        fd, closing = -1, fd  # closed even if close() reports an error
        os.close(closing)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # the original error is the one worth reporting
                os.unlink(temp, dir_fd=folder_fd)
        if isinstance(exc, OSError):
            raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
        raise


def stage_wav(path: str, audio: GeneratedAudio, *, tag: str, folders: Folders, owner: str | None = None) -> StagedWav:
    """Write ``audio`` beside ``path`` under ``.<name>.<tag>.tmp``, fsynced, and leave it there
    for the caller to :meth:`~StagedWav.publish` once the attempt it belongs to has committed.

    The folder's fsync (which makes the temporary's name durable) is the caller's, once a batch
    (:meth:`Folders.sync`); ``folders`` stays open until every staged file is settled. Errors as
    :func:`write_wav_atomic`'s; nothing is left behind.
    """
    _check_shape(path, audio)
    data = _wav_bytes(audio)
    name = path.rpartition(os.sep)[2]
    temp = temporary_name(name, tag)
    try:
        folder_fd = folders.open(folder_of(path), path)
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
    _write_temporary(folder_fd, temp, data, path, owner)
    return StagedWav(folders, folder_fd, path, temp, name, len(data), owner)


class StagedWav:
    """One attempt's WAV, complete and fsynced under a temporary name in its target's folder,
    waiting for the attempt's outcome.

    Exactly one of :meth:`publish` (rename it into place), :meth:`discard` (delete it) and
    :meth:`leave` (keep it for the sweep to settle) takes effect; later calls do nothing. Each
    goes through the folder's descriptor opened (and checked) when the file was written, so a
    folder replaced by a link meanwhile is not followed. ``owner``: the job whose own earlier WAV
    at the path :meth:`publish` may replace (:func:`taken`).
    """

    __slots__ = ("_fd", "_folders", "_settled", "name", "owner", "path", "size", "temp")

    def __init__(self, folders: Folders, folder_fd: int, path: str, temp: str, name: str, size: int,
                 owner: str | None = None) -> None:
        folders.hold()
        self._folders, self._fd = folders, folder_fd
        self.path, self.temp, self.name, self.size, self.owner = path, temp, name, size, owner
        self._settled = False

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    def publish(self) -> None:
        """Rename the file into place, never over anything but the job's own earlier WAV
        (:func:`put_in_place`): what appeared at the path since it was checked stays, and so does
        the temporary (:class:`PathTakenError`), for the sweep to publish once the path is free.
        Its folder is not fsynced here: the temporary's name is durable already, and the sweep
        renames a temporary whose rename a crash lost."""
        if not self._settle():
            return
        try:
            put_in_place(self._fd, self.temp, self.name, self.owner)
        except FileNotFoundError:  # a sweep that read the same committed row renamed it first
            pass
        except FileExistsError as exc:
            raise PathTakenError(self.path, self.temp, holder(self.name, self._fd)) from exc
        except OSError as exc:
            raise OutputError(f"could not rename {self.temp} to {self.path}: {exc.strerror or exc}") from exc
        finally:
            self._folders.release()

    def discard(self) -> None:
        """Delete the file: its attempt's outcome was not recorded, or not as completed."""
        if not self._settle():
            return
        try:
            with contextlib.suppress(OSError):  # what stays is the sweep's to delete
                os.unlink(self.temp, dir_fd=self._fd)
        finally:
            self._folders.release()

    def leave(self) -> None:
        """Keep the file for the sweep (whether its outcome committed is not known here)."""
        if self._settle():
            self._folders.release()


def folder_of(target: str) -> str:
    """The folder a file path names, as :class:`Folders` keys it ("x.wav": the working folder)."""
    folder, sep, _ = target.rpartition(os.sep)
    return folder or sep or "."


def _check_inside(folder_fd: int, folder: str, inside: str, target: str) -> None:
    try:
        real = os.readlink(f"/proc/self/fd/{folder_fd}")  # where the open folder really is
    except OSError:  # no /proc: by name, which narrows the window without closing it
        real = os.path.realpath(folder)
    if real != inside and not real.startswith(inside + os.sep):
        raise OutputError(f"file path {target} now resolves to {real}, outside the outputs folder {inside}:"
                          " a folder was replaced by a link while the job ran")


def _fsync_folder(folder_fd: int, path: str | Path) -> None:
    try:
        os.fsync(folder_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without directory fsync
            raise OutputError(f"could not sync the folder of {path}: {exc.strerror or exc}") from exc


def measure(audio: GeneratedAudio) -> dict[str, float]:
    """Levels of the audio as it will be written (non-finite samples count as written).

    ``peak`` and ``rms`` are absolute, 0..1 of full scale. ``energy`` is RMS in dBFS,
    ``20*log10(rms)``, mapped linearly from -60 dB (0.0) to 0 dB (1.0) and clamped: a
    perceptual loudness scale where quiet ambience sits near 0.3 and a mastered track near 0.8.
    """
    import numpy as np
    flat = np.asarray(audio.samples, dtype=np.float32).reshape(-1)
    n = flat.size
    peak = squares = 0.0
    for start in range(0, n, _CHUNK):  # one pass for anything up to _CHUNK samples
        block = flat[start : start + _CHUNK].astype(np.float64)  # summed in float64
        peak = max(peak, _clip_as_written(block, 1.0))
        squares += float(np.dot(block, block))
    rms = math.sqrt(squares / n) if n else 0.0
    energy = 0.0
    if rms > 0.0:
        dbfs = 20.0 * math.log10(rms)
        energy = min(1.0, max(0.0, (dbfs - ENERGY_FLOOR_DBFS) / -ENERGY_FLOOR_DBFS))
    return {
        "actual_duration_seconds": audio.frames / audio.sample_rate,
        "peak": peak,
        "rms": min(1.0, rms),
        "energy": energy,
    }


def read_wav(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    """Read a 16-bit PCM WAV: float32 samples shaped (channels, frames), and the sample rate."""
    import numpy as np
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.getnframes()
            raw = wav.readframes(frames)
    except (OSError, EOFError, wave.Error) as exc:
        raise OutputError(f"could not read {path}: {exc}") from exc
    if width != 2:
        raise OutputError(f"could not read {path}: {8 * width}-bit samples, expected 16-bit PCM")
    pcm = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    samples = (pcm.T.astype(np.float32) / np.float32(PCM_SCALE)).clip(-1.0, 1.0)
    return np.ascontiguousarray(samples), rate
