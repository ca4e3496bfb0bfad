"""Staged results on real files: whose each temporary is, what becomes of it, and its folder's lifetime."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dgxqueue.audio import Folders, read_wav, stage_wav, write_wav_atomic
from dgxqueue.daemon import staging
from dgxqueue.daemon.staging import Owner, Verdict, owner, tag, verdict, worker_hash
from dgxqueue.errors import OutputError, PathTakenError
from dgxqueue.generators import GeneratedAudio
from dgxqueue.outputs import Listed
from dgxqueue.storage.queue import AttemptState

UUID = "0b7f3a52-6d0e-4c5e-9f43-2a1c8e7d9b10"


def _audio(frames: int = 100) -> GeneratedAudio:
    return GeneratedAudio(samples=np.full((1, frames), 0.5, np.float32), sample_rate=8000)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("job_id", [UUID, "a/b.c", "\u00fcn\u00efcode \u2603", "x" * 101, "-", "_x"],
                         ids=["uuid", "slash-dot", "unicode", "long", "dash", "underscore"])
@pytest.mark.parametrize("attempt", [1, 12, -3])
def test_owner__reads_back_job_attempt_and_worker_from_any_name(tmp_path: Path, job_id: str, attempt: int) -> None:
    """A temporary's name gives back its job id (any text, as a row by plain SQL may hold), its
    attempt and its worker, however the file's own name reads."""
    for name in ("x.wav", "a.b.c.wav", "\u00e9" * 127 + ".x", "a" * 251 + ".wav"):
        temp = f".{name}.{tag(job_id, attempt, 'host-1-abc')}.tmp"
        assert owner(temp) == Owner(job_id, attempt, worker_hash("host-1-abc"))


@pytest.mark.parametrize("name", ["a" * 251 + ".wav", "\u00e9" * 125 + ".wav", "x.wav"],
                         ids=["ascii", "two-byte", "short"])
def test_stage_wav__the_temporary_name_fits_and_names_its_attempt(tmp_path: Path, name: str) -> None:
    """The temporary of a file of any valid name (up to 255 bytes) fits a file name, lies beside
    its target, and says whose it is; the target is not written until it is published."""
    folders = Folders(str(tmp_path))
    staged = stage_wav(str(tmp_path / name), _audio(), tag=tag("_" + "y" * 100, 7, "w"), folders=folders)
    folders.release()
    [temp] = os.listdir(tmp_path)
    assert len(temp.encode()) <= 255 and owner(temp) == Owner("_" + "y" * 100, 7, worker_hash("w"))
    assert not (tmp_path / name).exists() and (tmp_path / temp).stat().st_size == staged.size
    staged.publish()
    assert os.listdir(tmp_path) == [name] and read_wav(tmp_path / name)[1] == 8000


def test_tag__an_id_too_long_to_name_a_file_is_an_output_error() -> None:
    """A job id no file name can hold (ids are UUIDs; a row by plain SQL may hold anything) fails
    that job with an OutputError naming the id's length."""
    with pytest.raises(OutputError, match="job id of 121 characters is too long"):
        tag("\u00e9" * 121, 1, "w")


@pytest.mark.parametrize("name", [".notes.tmp", "x.a.1.0123456789.abcdef.tmp", ".x.a.1.0123456789.abcdeg.tmp",
                                  ".x.a.one.0123456789.abcdef.tmp", ".x.a!.1.0123456789.abcdef.tmp",
                                  ".x.a.1.012345678.abcdef.tmp", ".x.a.1.0123456789.abcdef.wav"])
def test_owner__other_names_are_not_ours(name: str) -> None:
    """Names the daemon did not make (a user's hidden file, a broken field) are never taken for ours."""
    assert owner(name) is None


def _state(status: str, worker_id: str | None = "w", attempts: int = 2) -> AttemptState:
    return AttemptState(status, worker_id, attempts, "outputs/x.wav", 144)


@pytest.mark.parametrize(("state", "attempt", "worker", "expected"), [
    (_state("completed"), 2, "w", Verdict.PUBLISH),
    (_state("completed"), 1, "w", Verdict.DELETE),  # an earlier attempt
    (_state("completed"), 2, "v", Verdict.DELETE),  # the same number, another daemon's (after a give-back)
    (_state("completed", worker_id=None), 2, "w", Verdict.DELETE),  # completed before worker ids were kept
    (_state("processing"), 2, "w", Verdict.KEEP),  # may still commit, expired lease or not
    (_state("processing"), 1, "w", Verdict.DELETE),
    (_state("failed"), 2, "w", Verdict.DELETE),
    (_state("pending", worker_id=None, attempts=2), 2, "w", Verdict.DELETE),  # rescued
    (None, 2, "w", Verdict.DELETE),  # the job was deleted
])
def test_verdict__publish_the_completed_attempt_keep_the_running_one_delete_the_rest(
        state: AttemptState | None, attempt: int, worker: str, expected: Verdict) -> None:
    """The row decides: its completed attempt's file is published, its running attempt's kept."""
    assert verdict(state, attempt, worker_hash(worker)) is expected


def test_staged_wav__settles_once_and_the_last_one_closes_the_folders(tmp_path: Path) -> None:
    """publish, discard and leave each take effect once; the batch's folder descriptors stay open
    until its last staged file is settled, then close."""
    before = _open_fds()
    folders = Folders(str(tmp_path))
    published, discarded, left = (
        stage_wav(str(tmp_path / f"{n}.wav"), _audio(), tag=tag(UUID, i, "w"), folders=folders)
        for i, n in enumerate(("published", "discarded", "left"), 1)
    )
    folders.release()  # the batch is done; its three files still hold the folder
    assert _open_fds() == before + 1
    published.publish()
    discarded.discard()
    discarded.publish()  # settled already: nothing happens
    assert _open_fds() == before + 1
    left.leave()
    left.discard()
    assert _open_fds() == before
    names = sorted(os.listdir(tmp_path))
    assert names[1:] == ["published.wav"] and owner(names[0]) == Owner(UUID, 3, worker_hash("w"))


def test_staged_wav__publish_after_the_sweep_did_it_is_no_error(tmp_path: Path) -> None:
    """A sweep that read the committed row may rename the temporary first: publishing then is a no-op."""
    folders = Folders(str(tmp_path))
    staged = stage_wav(str(tmp_path / "x.wav"), _audio(), tag=tag(UUID, 1, "w"), folders=folders)
    folders.release()
    os.replace(tmp_path / staged.temp, tmp_path / "x.wav")
    staged.publish()
    assert os.listdir(tmp_path) == ["x.wav"]


def test_sweep__an_absent_outputs_folder_is_nothing_to_do(tmp_path: Path) -> None:
    """Before the first job, the outputs folder does not exist: the sweep neither fails nor asks the database."""
    def lookup(ids: object) -> dict[str, AttemptState]:
        raise AssertionError("nothing to look up")

    assert staging.sweep(tmp_path / "outputs", lookup) == staging.Swept()


@pytest.mark.parametrize("kind", ["file", "folder", "link"])
def test_staged_wav__publish_never_replaces_what_appeared_at_the_path(tmp_path: Path, kind: str) -> None:
    """Something appears at the path after its last check (another program's file, a folder a
    nested path made, a link): publish raises PathTakenError naming the path and the temporary,
    leaves it exactly as it was and keeps the temporary; the folder is released all the same."""
    before = _open_fds()
    folders = Folders(str(tmp_path))
    staged = stage_wav(str(tmp_path / "x.wav"), _audio(), tag=tag(UUID, 1, "w"), folders=folders, owner=UUID)
    folders.release()
    target = tmp_path / "x.wav"
    if kind == "file":
        target.write_bytes(b"someone else's")
    elif kind == "folder":
        (target / "y.wav").parent.mkdir()
    else:
        target.symlink_to("elsewhere.wav")
    with pytest.raises(PathTakenError) as caught:
        staged.publish()
    assert (caught.value.path, caught.value.temporary, caught.value.holder) == (str(target), staged.temp, None)
    assert "move that file away" in str(caught.value) and "WAV of job" not in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == sorted([staged.temp, "x.wav"])
    assert (tmp_path / staged.temp).stat().st_size == staged.size
    if kind == "file":
        assert target.read_bytes() == b"someone else's"
    elif kind == "folder":
        assert target.is_dir() and os.listdir(target) == []
    else:
        assert os.readlink(target) == "elsewhere.wav"
    assert _open_fds() == before


def test_staged_wav__publish_replaces_the_jobs_own_earlier_wav(tmp_path: Path) -> None:
    """At the path is the job's own WAV (an earlier attempt's, its completion lost by the
    database): publish replaces it; another job's WAV there is never replaced, and named."""
    folders = Folders(str(tmp_path))
    earlier = stage_wav(str(tmp_path / "x.wav"), _audio(frames=10), tag=tag(UUID, 1, "w"), folders=folders, owner=UUID)
    earlier.publish()
    later = stage_wav(str(tmp_path / "x.wav"), _audio(), tag=tag(UUID, 2, "w"), folders=folders, owner=UUID)
    later.publish()
    assert os.listdir(tmp_path) == ["x.wav"] and (tmp_path / "x.wav").stat().st_size == later.size
    another = stage_wav(str(tmp_path / "x.wav"), _audio(frames=20), tag=tag("other", 1, "w"), folders=folders,
                        owner="other")
    folders.release()
    with pytest.raises(PathTakenError) as caught:
        another.publish()
    assert caught.value.holder == UUID and f"(the WAV of job {UUID})" in str(caught.value)
    assert (tmp_path / "x.wav").stat().st_size == later.size


def test_write_wav_atomic__without_replace_never_replaces_a_file(tmp_path: Path) -> None:
    """``replace=False``: onto nothing it writes; onto a file it raises PathTakenError, the file
    untouched and no temporary left (the default still replaces, as callers outside the daemon expect)."""
    target = tmp_path / "x.wav"
    size = write_wav_atomic(target, _audio(), replace=False)
    assert target.stat().st_size == size
    target.write_bytes(b"someone else's")
    with pytest.raises(PathTakenError, match="nothing was written"):
        write_wav_atomic(target, _audio(), replace=False)
    assert os.listdir(tmp_path) == ["x.wav"] and target.read_bytes() == b"someone else's"


@pytest.mark.parametrize("replace", [True, False])
def test_write_wav_atomic__a_folder_that_cannot_be_made_is_no_taken_path(tmp_path: Path, replace: bool) -> None:
    """The folder is a dangling link, so it cannot be made (mkdir: File exists): an OutputError
    naming the error, not PathTakenError's word that a file at the path was left as it is."""
    (tmp_path / "sub").symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError, match="File exists") as raised:
        write_wav_atomic(tmp_path / "sub" / "x.wav", _audio(), replace=replace)
    assert not isinstance(raised.value, PathTakenError)


def test_unpublished__lists_each_folder_once_however_many_jobs(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One listing per folder, not one per job: ``prune --delete-files`` of 20,000 jobs in one
    folder took 180 s (each job listed all 20,000 names again), and ``archive`` held SQLite's
    write lock that long per batch. The waiting job is still found."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    jobs = [(f"job-{i}", f"outputs/f{i}.wav") for i in range(50)]
    (outputs / f".f7.wav.{tag('job-7', 1, 'w')}.tmp").write_bytes(b"result")
    listings: list[str] = []
    real_scandir = os.scandir

    def counted(folder: str) -> Iterator[os.DirEntry[str]]:
        listings.append(folder)
        return real_scandir(folder)

    monkeypatch.setattr(os, "scandir", counted)  # outputs.waiting calls it as os.scandir
    listed: Listed = {}
    assert staging.unpublished(outputs, jobs, listed).held == {"job-7"}
    assert staging.unpublished(outputs, jobs, listed).held == {"job-7"}  # the next batch: listed already
    assert listings == [str(outputs)]
