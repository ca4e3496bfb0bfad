"""dgxqueue.audio on real files: atomic WAV writes, output path confinement, level measurements."""

from __future__ import annotations

import io
import math
import os
import resource
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dgxqueue import audio as audio_module
from dgxqueue.audio import (
    Folders,
    OutputRoot,
    measure,
    read_wav,
    resolve_output_path,
    write_wav_atomic,
)
from dgxqueue.errors import OutputError
from dgxqueue.generators import GeneratedAudio

QUANTUM = 1 / 32767


def _audio(channels: int = 2, frames: int = 4410, rate: int = 44100, seed: int = 0) -> GeneratedAudio:
    rng = np.random.default_rng(seed)
    samples = rng.uniform(-1, 1, (channels, frames)).astype(np.float32)
    return GeneratedAudio(samples=samples, sample_rate=rate)


def _sine(amplitude: float, freq: float = 1000.0, rate: int = 48000, seconds: float = 1.0) -> GeneratedAudio:
    t = np.arange(round(rate * seconds)) / rate
    return GeneratedAudio(samples=(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None, :],
                          sample_rate=rate)


def test_write__reads_back_frames_rate_channels_and_values(tmp_path: Path) -> None:
    """A written WAV has the audio's rate, channels and frames, and values within int16 rounding."""
    audio = _audio(channels=2, frames=4411, rate=44100)
    path = tmp_path / "out.wav"
    size = write_wav_atomic(path, audio)
    assert size == path.stat().st_size == 44 + 4411 * 2 * 2
    with wave.open(str(path), "rb") as wav:
        header = (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes())
    assert header == (2, 2, 44100, 4411)
    samples, rate = read_wav(path)
    assert rate == 44100 and samples.dtype == np.float32 and samples.shape == (2, 4411)
    assert np.max(np.abs(samples - audio.samples)) <= QUANTUM / 2 + 1e-7


def test_write__mono_interleaving_and_full_scale(tmp_path: Path) -> None:
    """Stereo frames interleave left then right, and +/-1.0 map to +/-32767."""
    samples = np.array([[1.0, 0.5, -1.0], [-1.0, 0.0, 0.25]], dtype=np.float32)
    path = tmp_path / "lr.wav"
    write_wav_atomic(path, GeneratedAudio(samples=samples, sample_rate=8000))
    with wave.open(str(path), "rb") as wav:
        raw = np.frombuffer(wav.readframes(3), dtype="<i2")
    assert raw.tolist() == [32767, -32767, 16384, 0, -32767, 8192]


@pytest.mark.parametrize(("channels", "frames", "rate"),
                         [(1, 0, 8000), (1, 1, 8000), (1, 801, 22050), (2, 3, 44100), (2, 4411, 48000),
                          (3, 5, 96000)])
def test_write__file_is_byte_for_byte_what_the_wave_module_writes(
    tmp_path: Path, channels: int, frames: int, rate: int
) -> None:
    """Header and interleaved PCM equal wave's output for the documented conversion, odd counts too."""
    samples = np.random.default_rng(frames).uniform(-1.5, 1.5, (channels, frames)).astype(np.float32)
    samples.flat[::7] = np.nan
    samples.flat[3::11] = np.inf
    samples.flat[5::13] = -np.inf
    clipped = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    expected = io.BytesIO()
    with wave.open(expected, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.rint(clipped * np.float32(32767)).astype("<i2").T.tobytes())
    path = tmp_path / "x.wav"
    assert write_wav_atomic(path, GeneratedAudio(samples=samples, sample_rate=rate)) == len(expected.getvalue())
    assert path.read_bytes() == expected.getvalue()


def test_write__clips_and_zeroes_non_finite_samples(tmp_path: Path) -> None:
    """Samples beyond full scale are clipped; NaN becomes 0 and +/-inf become +/-1."""
    samples = np.array([[2.0, -3.0, np.nan, np.inf, -np.inf, 0.25]], dtype=np.float32)
    path = tmp_path / "clip.wav"
    write_wav_atomic(path, GeneratedAudio(samples=samples, sample_rate=8000))
    back, _ = read_wav(path)
    np.testing.assert_allclose(back[0], [1.0, -1.0, 0.0, 1.0, -1.0, 0.25], atol=QUANTUM)


def test_write__creates_folders_and_replaces_whole_file_without_leftovers(tmp_path: Path) -> None:
    """Parent folders are created, a second write replaces the first, and no temporary file stays."""
    path = tmp_path / "outputs" / "a" / "b" / "x.wav"
    write_wav_atomic(path, _audio(frames=1000))
    write_wav_atomic(path, _audio(channels=1, frames=10))
    assert os.listdir(path.parent) == ["x.wav"]
    samples, _ = read_wav(path)
    assert samples.shape == (1, 10)


def test_write__folder_that_cannot_be_created_fails_cleanly(readonly_dir: Path) -> None:
    """A missing folder under a read-only one is an OutputError naming the path; nothing is left."""
    target = readonly_dir / "new" / "x.wav"
    with pytest.raises(OutputError, match=f"could not write {target}"):
        write_wav_atomic(target, _audio())
    assert list(readonly_dir.iterdir()) == []


def test_write__refuses_samples_of_the_wrong_shape(tmp_path: Path) -> None:
    """One-dimensional samples are an OutputError, and nothing is written."""
    bad = GeneratedAudio(samples=np.zeros(100, np.float32), sample_rate=8000)
    with pytest.raises(OutputError, match=r"\(channels, frames\)"):
        write_wav_atomic(tmp_path / "bad.wav", bad)
    assert list(tmp_path.iterdir()) == []


def test_write__read_only_folder_fails_cleanly(readonly_dir: Path) -> None:
    """Writing into a read-only folder raises OutputError naming the path, and leaves no file."""
    target = readonly_dir / "x.wav"
    with pytest.raises(OutputError, match=f"could not write {target}") as caught:
        write_wav_atomic(target, _audio())
    assert isinstance(caught.value.__cause__, OSError)
    assert list(readonly_dir.iterdir()) == []


def test_write__disk_full_fails_cleanly(tiny_disk: Path) -> None:
    """ENOSPC on a full tmpfs raises OutputError saying so, and leaves neither target nor temp file."""
    target = tiny_disk / "big.wav"
    with pytest.raises(OutputError, match="No space left on device"):
        write_wav_atomic(target, _audio(channels=2, frames=48000, rate=48000))  # 192 KB > 64 KiB
    assert list(tiny_disk.iterdir()) == []


def test_write__disk_full_keeps_the_previous_file(tiny_disk: Path) -> None:
    """A failed rewrite leaves the earlier complete file exactly as it was."""
    target = tiny_disk / "x.wav"
    write_wav_atomic(target, _audio(channels=1, frames=1000))
    before = target.read_bytes()
    with pytest.raises(OutputError):
        write_wav_atomic(target, _audio(channels=2, frames=48000, rate=48000))
    assert target.read_bytes() == before and os.listdir(tiny_disk) == ["x.wav"]


def test_write__file_size_limit_fails_cleanly(tmp_path: Path) -> None:
    """A write cut short by the file-size limit (EFBIG, no root needed) fails cleanly, nothing left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))  # Python ignores SIGXFSZ: write() fails
    try:
        with pytest.raises(OutputError, match="File too large"):
            write_wav_atomic(tmp_path / "x.wav", _audio(frames=44100))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_resolve__file_path_is_relative_to_the_outputs_parent(tmp_path: Path) -> None:
    """'outputs/x.wav' and nested folders resolve inside the outputs folder."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    assert resolve_output_path(outputs, "outputs/x.wav") == outputs.resolve() / "x.wav"
    assert resolve_output_path(outputs, "outputs/2024/01/y.wav") == outputs.resolve() / "2024/01/y.wav"


@pytest.mark.parametrize(
    "file_path",
    ["../x.wav", "outputs/../x.wav", "outputs/../../etc/passwd", "/etc/passwd", "x.wav", "outputs",
     "outputs/a\x00.wav", "", "outputs/sub/../../x.wav"],
)
def test_resolve__refuses_paths_outside_outputs(tmp_path: Path, file_path: str) -> None:
    """'..', absolute paths, NUL bytes and paths beside the outputs folder are refused."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(OutputError, match="outputs"):
        resolve_output_path(outputs, file_path)


def test_resolve__refuses_symlink_escapes(tmp_path: Path) -> None:
    """A symlinked folder or file inside outputs that points outside is refused; one inside is fine."""
    outputs, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    outputs.mkdir()
    elsewhere.mkdir()
    (outputs / "dir-out").symlink_to(elsewhere)
    (outputs / "file-out.wav").symlink_to(elsewhere / "victim.wav")
    (outputs / "dir-in").symlink_to(outputs / "real", target_is_directory=True)
    for escape in ("outputs/dir-out/x.wav", "outputs/file-out.wav"):
        with pytest.raises(OutputError, match=f"outside the outputs folder {outputs}"):
            resolve_output_path(outputs, escape)
    assert resolve_output_path(outputs, "outputs/dir-in/x.wav") == outputs.resolve() / "real" / "x.wav"


def test_resolve__outputs_folder_may_itself_be_a_symlink(tmp_path: Path) -> None:
    """When the outputs folder is a link (to a bigger disk), paths inside its target are allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "outputs").symlink_to(disk)
    assert resolve_output_path(tmp_path / "outputs", "outputs/x.wav") == disk.resolve() / "x.wav"


def test_resolve__one_root_resolves_many_paths_like_one_call_each(tmp_path: Path) -> None:
    """An OutputRoot (one per batch) answers and refuses exactly as resolve_output_path does."""
    outputs, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    (outputs / "real").mkdir(parents=True)
    elsewhere.mkdir()
    (outputs / "dir-out").symlink_to(elsewhere)
    (outputs / "dir-in").symlink_to(outputs / "real", target_is_directory=True)
    (outputs / "file-in.wav").symlink_to(outputs / "real" / "y.wav")
    root = OutputRoot(outputs)
    for file_path in ("outputs/x.wav", "outputs/dir-in/x.wav", "outputs/real/../x.wav", "outputs/file-in.wav",
                      "outputs//new/./x.wav", "outputs/dir-in/../x.wav"):
        assert root.resolve(file_path) == resolve_output_path(outputs, file_path) == Path(
            os.path.realpath(tmp_path / file_path))
    for file_path in ("outputs/dir-out/x.wav", "outputs/dir-in/../../x.wav", "outputs/..", "outputs/real/.."):
        with pytest.raises(OutputError, match="outside the outputs folder"):
            root.resolve(file_path)


def test_place__says_whether_anything_is_at_the_located_path(tmp_path: Path) -> None:
    """OutputRoot.place answers as locate does, and whether the located path holds anything: a
    file, a folder or a link counts; a link in file_path's place is followed (its target is
    the located path), so a dangling one inside the folder leaves that path free."""
    outputs = tmp_path / "outputs"
    (outputs / "folder.wav").mkdir(parents=True)
    (outputs / "file.wav").write_bytes(b"x")
    (outputs / "to-file.wav").symlink_to(outputs / "file.wav")
    (outputs / "dangling.wav").symlink_to(outputs / "nowhere.wav")
    root = OutputRoot(outputs)
    real = os.path.realpath(outputs)
    for file_path, located, taken in [
        ("outputs/new.wav", "new.wav", False), ("outputs/file.wav", "file.wav", True),
        ("outputs/folder.wav", "folder.wav", True), ("outputs/to-file.wav", "file.wav", True),
        ("outputs/dangling.wav", "nowhere.wav", False), ("outputs/sub/new.wav", "sub/new.wav", False),
        ("outputs/folder.wav/.", "folder.wav", True),
    ]:
        assert root.place(file_path) == (os.path.join(real, located), taken) and root.locate(file_path) == \
            os.path.join(real, located), file_path


def test_resolve__a_new_root_sees_folders_linked_since(tmp_path: Path) -> None:
    """Real paths are kept per OutputRoot only: one built later sees a folder swapped for a link."""
    outputs, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    (outputs / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    OutputRoot(outputs).resolve("outputs/sub/x.wav")
    (outputs / "sub").rmdir()
    (outputs / "sub").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="outside the outputs folder"):
        OutputRoot(outputs).resolve("outputs/sub/x.wav")


def test_open_file__opens_only_what_the_check_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OutputRoot.open_file serves a file, one in a subfolder and one through a link inside the
    folder; a swap between the containment check and the open (the file for a link leading out,
    a subfolder for such a link, the file for another file) is refused, never followed."""
    outputs, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    (outputs / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for folder in (outputs, outputs / "sub", elsewhere):
        (folder / "a.wav").write_bytes(b"inside" if folder != elsewhere else b"secret")
    (outputs / "alias.wav").symlink_to(outputs / "sub" / "a.wav")
    for file_path, located in [("outputs/a.wav", outputs / "a.wav"), ("outputs/sub/a.wav", outputs / "sub" / "a.wav"),
                               ("outputs/alias.wav", outputs / "sub" / "a.wav")]:
        fd, info, target = OutputRoot(outputs).open_file(file_path)
        assert os.pread(fd, 100, 0) == b"inside" and info.st_size == 6 and target == os.path.realpath(located)
        os.close(fd)

    def file_to_link() -> None:
        (outputs / "a.wav").unlink()
        (outputs / "a.wav").symlink_to(elsewhere / "a.wav")

    def folder_to_link() -> None:
        (outputs / "sub").rename(tmp_path / "moved")
        (outputs / "sub").symlink_to(elsewhere)

    def file_to_other_file() -> None:
        (outputs / "b.wav").write_bytes(b"other")
        (outputs / "b.wav").replace(outputs / "a.wav")

    real_open = os.open
    # A link is not followed (O_NOFOLLOW: nothing outside is even opened); a file is compared.
    for file_path, swap, refusal in [("outputs/a.wav", file_to_link, "cannot be opened"),
                                     ("outputs/sub/a.wav", folder_to_link, "cannot be opened"),
                                     ("outputs/a.wav", file_to_other_file, "was replaced")]:
        swaps = [swap]

        def swapping(*args: Any, **kwargs: Any) -> int:
            while swaps:  # once, at the first open: after the check located the file
                swaps.pop()()
            return real_open(*args, **kwargs)

        (outputs / "a.wav").unlink()
        (outputs / "a.wav").write_bytes(b"inside")
        monkeypatch.setattr(os, "open", swapping)  # the module calls os.open
        with pytest.raises(OutputError, match=refusal):
            OutputRoot(outputs).open_file(file_path)
        monkeypatch.undo()
        assert not swaps
    for refused in ("outputs/sub", "outputs/nothing.wav", "outputs/../elsewhere/a.wav", "outputs/sub/a.wav"):
        with pytest.raises(OutputError):  # a folder, a missing file, "..", a link leading out now
            OutputRoot(outputs).open_file(refused)


def test_measure__known_sine() -> None:
    """A 0.5-amplitude sine: peak 0.5, RMS 0.5/sqrt(2), energy from its dBFS, exact duration."""
    levels = measure(_sine(0.5, seconds=1.0))
    rms = 0.5 / math.sqrt(2)
    assert levels["actual_duration_seconds"] == 1.0
    assert levels["peak"] == pytest.approx(0.5, abs=1e-6)
    assert levels["rms"] == pytest.approx(rms, rel=1e-5)
    assert levels["energy"] == pytest.approx((20 * math.log10(rms) + 60) / 60, rel=1e-5)


def test_measure__silence_full_scale_and_nan() -> None:
    """Silence measures 0 everywhere; a full-scale square has energy 1; NaN counts as silence."""
    assert measure(GeneratedAudio(np.zeros((2, 100), np.float32), 8000)) == {
        "actual_duration_seconds": 100 / 8000, "peak": 0.0, "rms": 0.0, "energy": 0.0}
    square = GeneratedAudio(np.array([[1.0, -1.0] * 50], np.float32), 8000)
    assert measure(square)["energy"] == 1.0 and measure(square)["rms"] == 1.0
    nan = GeneratedAudio(np.full((1, 10), np.nan, np.float32), 8000)
    assert measure(nan)["rms"] == 0.0


def test_measure__quiet_audio_maps_to_low_energy() -> None:
    """-60 dBFS RMS and below is energy 0; -30 dBFS is 0.5."""
    assert measure(_sine(0.001 * math.sqrt(2)))["energy"] == pytest.approx(0.0, abs=1e-4)
    assert measure(_sine(10 ** (-30 / 20) * math.sqrt(2)))["energy"] == pytest.approx(0.5, abs=1e-4)


def test_measure__in_blocks_as_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured in small blocks (as huge arrays are), the levels are those of one pass."""
    samples = np.random.default_rng(3).uniform(-1.3, 1.3, (2, 1001)).astype(np.float32)
    samples[0, 10], samples[1, 500], samples[1, 999] = np.nan, np.inf, -np.inf
    audio = GeneratedAudio(samples, 8000)
    whole = measure(audio)
    monkeypatch.setattr(audio_module, "_CHUNK", 97)
    assert measure(audio) == pytest.approx(whole, rel=1e-12)
    written = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0).astype(np.float64)
    assert whole["peak"] == 1.0 and whole["rms"] == pytest.approx(math.sqrt(np.mean(written**2)), rel=1e-12)


def test_read__refuses_non_16_bit_files(tmp_path: Path) -> None:
    """An 8-bit WAV is refused with a clear OutputError rather than misread."""
    path = tmp_path / "8bit.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(bytes(10))
    with pytest.raises(OutputError, match="16-bit"):
        read_wav(path)


def test_folders__a_batch_writes_inside_its_folder_and_nowhere_else(tmp_path: Path) -> None:
    """Through one Folders, files land in their folders (made when missing) and the folders sync;
    a folder whose real path is outside ``inside`` (a link out) is refused, nothing written there."""
    root, outside = tmp_path / "outputs", tmp_path / "elsewhere"
    outside.mkdir()
    (root / "one").mkdir(parents=True)
    (root / "out").symlink_to(outside, target_is_directory=True)
    folders = Folders(str(root.resolve()))
    try:
        for path in (root / "one" / "a.wav", root / "one" / "b.wav", root / "new" / "c.wav"):
            write_wav_atomic(path, _audio(), sync_folder=False, folders=folders)
        with pytest.raises(OutputError, match="outside the outputs folder"):
            write_wav_atomic(root / "out" / "d.wav", _audio(), sync_folder=False, folders=folders)
        assert folders.sync() == {}
    finally:
        folders.close()
    assert sorted(p.name for p in root.rglob("*.wav")) == ["a.wav", "b.wav", "c.wav"]
    assert list(outside.iterdir()) == [] and read_wav(root / "new" / "c.wav")[1] == 44100


@pytest.mark.parametrize("name", ["a" * 236 + ".wav", "\u00e9" * 118 + ".wav"], ids=["ascii", "two-byte"])
def test_write_wav_atomic__longest_file_names(tmp_path: Path, name: str) -> None:
    """A file name of 240 bytes, valid on the file system, is written: its temporary name (the
    same with 19 bytes more) used to be too long, and the job failed for good."""
    assert len(name.encode()) == 240
    size = write_wav_atomic(tmp_path / name, _audio(frames=100))
    assert (tmp_path / name).stat().st_size == size and [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("rate", [0, 0x7FFFFFFF, 44100.0, "44100"], ids=["zero", "byte-rate-overflow", "float", "text"])
def test_write_wav_atomic__a_rate_the_header_cannot_hold_is_an_output_error(tmp_path: Path, rate: object) -> None:
    """The header holds the byte rate (rate x channels x 2) in 32 bits: a stereo rate past that,
    or a rate that is not an integer, is an OutputError naming it (struct.error escaped before)."""
    samples = np.zeros((2, 10), np.float32)
    with pytest.raises(OutputError, match="invalid sample rate"):
        write_wav_atomic(tmp_path / "x.wav", GeneratedAudio(samples, rate))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_write_wav_atomic__bare_file_name_and_text_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare file name is written (and its folder synced) in the working folder; text paths work
    like Paths."""
    monkeypatch.chdir(tmp_path)
    size = write_wav_atomic(Path("bare.wav"), _audio(frames=100))
    assert (tmp_path / "bare.wav").stat().st_size == size
    assert write_wav_atomic(str(tmp_path / "text.wav"), _audio(frames=100)) == size


HOSTILE_MARKS = [b"\x1b[2J\x1b[31mjob\x07", b"job\nfake log line", b"a b", b"j" * (audio_module.HOLDER_MAX + 1),
                 b"\xff\xfejob", "j\u00f6b".encode(), b""]


def test_holder__names_the_job_whose_mark_the_regular_file_carries(tmp_path: Path) -> None:
    """audio.holder reads OWNER_XATTR of a regular file, by path or by name in a folder's
    descriptor; a file without one, a folder, a link (never followed, even to a marked file) and
    nothing at all give None."""
    marked, plain, folder = tmp_path / "marked.wav", tmp_path / "plain.wav", tmp_path / "folder.wav"
    marked.write_bytes(b"x")
    plain.write_bytes(b"x")
    folder.mkdir()
    os.setxattr(marked, audio_module.OWNER_XATTR, b"0b7f3a52-6d0e-4c5e-9f43-2a1c8e7d9b10")
    os.setxattr(folder, audio_module.OWNER_XATTR, b"job-of-a-folder")
    (tmp_path / "link.wav").symlink_to(marked)
    assert audio_module.holder(str(marked)) == "0b7f3a52-6d0e-4c5e-9f43-2a1c8e7d9b10"
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert audio_module.holder("marked.wav", fd) == "0b7f3a52-6d0e-4c5e-9f43-2a1c8e7d9b10"
        assert audio_module.holder("link.wav", fd) is None
    finally:
        os.close(fd)
    for other in [plain, folder, tmp_path / "link.wav", tmp_path / "absent.wav"]:
        assert audio_module.holder(str(other)) is None, other


@pytest.mark.parametrize("mark", HOSTILE_MARKS, ids=["escapes", "newline", "space", "long", "not-utf8", "non-ascii",
                                                     "empty"])
def test_holder__a_mark_that_is_not_a_job_id_is_never_echoed(tmp_path: Path, mark: bytes) -> None:
    """Anyone may set a user attribute: control characters, spaces, more than HOLDER_MAX bytes,
    bytes that are not printable ASCII give None rather than text for a log or a terminal; the
    longest accepted mark is named whole."""
    target = tmp_path / "x.wav"
    target.write_bytes(b"x")
    os.setxattr(target, audio_module.OWNER_XATTR, mark)
    assert audio_module.holder(str(target)) is None
    os.setxattr(target, audio_module.OWNER_XATTR, b"j" * audio_module.HOLDER_MAX)
    assert audio_module.holder(str(target)) == "j" * audio_module.HOLDER_MAX
