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
import secrets
import wave
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dgxqueue.errors import OutputError
from dgxqueue.generators import GeneratedAudio

PCM_SCALE = 32767.0
#: ``energy`` maps RMS in dBFS linearly from this floor (0.0) up to 0 dBFS (1.0).
ENERGY_FLOOR_DBFS = -60.0
_CHUNK = 1 << 20  # samples per float64 block when summing squares: bounded extra memory


def resolve_output_path(outputs_dir: Path, file_path: str) -> Path:
    """The absolute path for a job's ``file_path``, refused unless it lies inside ``outputs_dir``.

    ``file_path`` is relative to the folder that *holds* the outputs folder (``outputs/x.wav``
    for outputs folder ``outputs``), as in the user's specification. Symlinks are resolved first,
    so a link pointing out of the folder is refused like ``..`` is.
    """
    root = Path(os.path.abspath(outputs_dir))
    if "\x00" in file_path:
        raise OutputError(f"file path {file_path!r} contains a NUL byte (outputs folder {root})")
    if not file_path or Path(file_path).is_absolute() or file_path.startswith(("/", "\\", "~")):
        raise OutputError(
            f"file path {file_path!r} must be relative to {root.parent} (outputs folder {root})"
        )
    try:  # os.path.realpath: the same answer as Path.resolve() at a third of the cost per job
        resolved_root = os.path.realpath(root)
        target = os.path.realpath(os.path.join(root.parent, file_path))
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
        raise OutputError(f"file path {file_path!r} cannot be resolved under {root}: {exc}") from exc
    if not target.startswith(resolved_root + os.sep):
        raise OutputError(f"file path {file_path!r} resolves to {target}, outside the outputs folder {root}")
    return Path(target)


def to_pcm16(samples: npt.NDArray[np.float32]) -> bytes:
    """Interleaved little-endian 16-bit PCM bytes for float samples shaped (channels, frames)."""
    data = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(data, -1.0, 1.0, out=data)
    data *= PCM_SCALE
    pcm = np.rint(data).astype("<i2")
    return pcm.T.tobytes()  # (frames, channels) in C order is the interleaved layout


def _check_shape(path: Path, audio: GeneratedAudio) -> None:
    samples = audio.samples
    if not isinstance(samples, np.ndarray) or samples.ndim != 2 or not 1 <= samples.shape[0] <= 64:
        shape = getattr(samples, "shape", None)
        raise OutputError(f"could not write {path}: samples must be shaped (channels, frames), got {shape}")
    if not 1 <= audio.sample_rate <= 0x7FFFFFFF:
        raise OutputError(f"could not write {path}: invalid sample rate {audio.sample_rate}")


def write_wav_atomic(path: Path, audio: GeneratedAudio, *, sync_folder: bool = True) -> int:
    """Write ``audio`` as 16-bit PCM WAV at ``path`` atomically; return the file size in bytes.

    The data goes to a hidden temporary file in the same folder, is flushed and fsynced, then
    renamed over ``path`` and the folder fsynced, so readers see either no file or the whole
    file. Any OSError (disk full, permission, read-only) removes the temporary file and raises
    :class:`OutputError`; a file already at ``path`` is left as it was. ``sync_folder=False``
    leaves the folder's fsync to the caller (:func:`sync_folders`, once for a whole batch).
    """
    _check_shape(path, audio)
    payload = to_pcm16(audio.samples)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = -1
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open rather than mkstemp: mode 0o666 lets the umask decide, as for any other file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "wb") as handle:
            fd = -1  # the file object owns it now
            with wave.open(handle, "wb") as wav:
                wav.setnchannels(audio.channels)
                wav.setsampwidth(2)
                wav.setframerate(audio.sample_rate)
                wav.setnframes(audio.frames)
                wav.writeframes(payload)
            handle.flush()
            os.fsync(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
        os.replace(tmp, path)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # the original error is the one worth reporting
                tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
        raise
    if sync_folder:
        _fsync_dir(path)
    return size


def sync_folders(paths: Iterable[Path]) -> dict[Path, OutputError]:
    """fsync the folder of each path once, making their renames durable; the errors by path."""
    errors: dict[Path, OutputError] = {}
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path)
    for members in by_folder.values():
        try:
            _fsync_dir(members[0])
        except OutputError as exc:
            errors.update((member, exc) for member in members)
    return errors


def _fsync_dir(path: Path) -> None:
    """Make the rename durable. The file is already complete, so only real errors are raised."""
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputError(f"could not sync the folder of {path}: {exc.strerror or exc}") from exc
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without directory fsync
            raise OutputError(f"could not sync the folder of {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(dir_fd)


def measure(audio: GeneratedAudio) -> dict[str, float]:
    """Levels of the audio as it will be written (non-finite samples count as written).

    ``peak`` and ``rms`` are absolute, 0..1 of full scale. ``energy`` is RMS in dBFS,
    ``20*log10(rms)``, mapped linearly from -60 dB (0.0) to 0 dB (1.0) and clamped: a
    perceptual loudness scale where quiet ambience sits near 0.3 and a mastered track near 0.8.
    """
    flat = np.asarray(audio.samples, dtype=np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        flat = np.nan_to_num(flat, nan=0.0, posinf=1.0, neginf=-1.0)
    n = flat.size
    peak = min(1.0, float(np.max(np.abs(flat)))) if n else 0.0
    squares = 0.0
    for start in range(0, n, _CHUNK):
        block = np.clip(flat[start : start + _CHUNK], -1.0, 1.0).astype(np.float64)
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
