"""Whether the file at a completed job's path is its WAV (dgxqueue.outputs.output), on real files
with real extended attributes: the one rule behind ``show``, the status page and a job handle."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgxqueue.outputs import output, unpublished
from tests.support.held import FOREIGN, hold, mark, temporary

JOB, OTHER = "0b7f3a52-6d0e-4c5e-9f43-2a1c8e7d9b10", "5d1e2f3a-0000-4c5e-9f43-2a1c8e7d9b11"


def _outputs(tmp_path: Path) -> Path:
    folder = tmp_path / "outputs"
    folder.mkdir()
    return folder


def test_output__a_held_result_and_another_jobs_wav_at_the_path(tmp_path: Path) -> None:
    """Another job's WAV at the path, the job's result beside it under its temporary name: not
    its; the temporary and the other job are named, with what to do. ``prune`` and ``archive``
    (unpublished) see the same job as held."""
    outputs = _outputs(tmp_path)
    held = hold(outputs / "song.wav", JOB, OTHER)
    found = output(outputs, JOB, "outputs/song.wav", attempt=1, worker_id="box-1")
    assert found is not None and not found.exists and found.held and found.occupied
    assert found.temporary == str(held) and found.holder == OTHER and found.path == str(outputs / "song.wav")
    reason = found.reason()
    assert reason is not None and f"job {OTHER}'s WAV" in reason and str(held) in reason
    assert "move that file away" in reason
    assert found.reason(relative_to=str(tmp_path)) == reason.replace(str(tmp_path) + os.sep, "")
    assert unpublished(outputs, [(JOB, "outputs/song.wav")]).held == {JOB}


def test_output__an_unmarked_file_at_the_path_of_a_held_result_is_not_its(tmp_path: Path) -> None:
    """A file without any mark (put there by hand) while the job's result is held: not its,
    without a holder to name."""
    outputs = _outputs(tmp_path)
    held = hold(outputs / "song.wav", JOB, None)
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and not found.exists and found.temporary == str(held) and found.holder is None
    assert "another file, not this job's WAV" in (found.reason() or "")


def test_output__of_several_temporaries_the_completed_attempts_is_named(tmp_path: Path) -> None:
    """A crashed earlier attempt's temporary beside the completed one's: the one of the row's
    attempt and worker is named, not the newest."""
    outputs = _outputs(tmp_path)
    completed = hold(outputs / "song.wav", JOB, OTHER, attempt=2, worker_id="box-2")
    stale = temporary(outputs / "song.wav", JOB, attempt=1, worker_id="box-1")
    os.utime(completed, (1_000_000_000, 1_000_000_000))  # the stale one is newer
    named = output(outputs, JOB, "outputs/song.wav", attempt=2, worker_id="box-2")
    assert named is not None and named.temporary == str(completed)
    newest = output(outputs, JOB, "outputs/song.wav")
    assert newest is not None and newest.temporary == str(stale)


def test_output__nothing_at_the_path_yet_is_not_occupied(tmp_path: Path) -> None:
    """The result still under its temporary name, nothing at the path (the rename a moment
    behind the commit, or a crash between them): not there yet, nothing in its way."""
    outputs = _outputs(tmp_path)
    held = temporary(outputs / "song.wav", JOB)
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and not found.exists and not found.occupied and found.temporary == str(held)
    assert "to be renamed to" in (found.reason() or "")


def test_output__the_jobs_own_wav_exists_whatever_waits_beside_it(tmp_path: Path) -> None:
    """A file carrying the job's own id is its WAV, even beside a temporary of its own (an
    older attempt's, still to be swept)."""
    outputs = _outputs(tmp_path)
    (outputs / "song.wav").write_bytes(b"RIFF")
    mark(outputs / "song.wav", JOB)
    temporary(outputs / "song.wav", JOB)
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and found.exists and not found.occupied and found.reason() is None


def test_output__another_jobs_wav_at_the_path_is_not_its_even_with_nothing_held(tmp_path: Path) -> None:
    """A file marked as another job's, no temporary of this job: its own was deleted or moved
    and that job's put there; not its, the other job named."""
    outputs = _outputs(tmp_path)
    (outputs / "song.wav").write_bytes(FOREIGN)
    mark(outputs / "song.wav", OTHER)
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and not found.exists and found.occupied and not found.held
    assert found.holder == OTHER and "deleted or moved" in (found.reason() or "")


def test_output__an_unmarked_file_with_nothing_held_counts_as_its_own(tmp_path: Path) -> None:
    """A WAV without any mark and no temporary of the job: its own as far as can be told (WAVs
    written before the mark existed, or copied without extended attributes, carry none)."""
    outputs = _outputs(tmp_path)
    (outputs / "song.wav").write_bytes(b"RIFF")
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and found.exists


def test_output__missing_a_folder_in_the_way_and_a_path_outside(tmp_path: Path) -> None:
    """Nothing at the path: missing. A folder there (whatever it carries): no job's WAV. A path
    leaving the outputs folder, or none (plain SQL): None, for the caller to say so."""
    outputs = _outputs(tmp_path)
    missing = output(outputs, JOB, "outputs/song.wav")
    assert missing is not None and not missing.exists and not missing.occupied
    assert "does not exist" in (missing.reason() or "")
    (outputs / "folder.wav").mkdir()
    mark(outputs / "folder.wav", JOB)
    folder = output(outputs, JOB, "outputs/folder.wav")
    assert folder is not None and not folder.exists and folder.occupied
    assert output(outputs, JOB, "elsewhere/song.wav") is None and output(outputs, JOB, None) is None


def test_unpublished__only_a_regular_file_named_as_its_temporary_holds_a_result(tmp_path: Path) -> None:
    """A folder, a link or a FIFO that only bears the name of one of the job's temporaries holds
    no result: the sweep never publishes (nor deletes) anything but a regular file, and ``show``
    (output) says nothing is held. prune and archive (unpublished) must not keep the job's row
    for it: they did, prune exiting 65 every night with "move that file away" for a result that
    can never be published."""
    outputs = _outputs(tmp_path)
    for kind in ("folder", "link", "fifo"):
        name = f"{kind}.wav"
        fake = Path(str(temporary(outputs / name, JOB)))
        fake.unlink()
        if kind == "folder":
            fake.mkdir()
        elif kind == "link":
            (outputs / "elsewhere.wav").write_bytes(b"RIFF")
            fake.symlink_to(outputs / "elsewhere.wav")
        else:
            os.mkfifo(fake)
        found = output(outputs, JOB, f"outputs/{name}")
        assert found is not None and not found.held, kind
        assert JOB not in unpublished(outputs, [(JOB, f"outputs/{name}")]), kind


def _loop(folder: Path) -> None:
    """Make ``folder`` a link to itself: a real folder path that cannot be listed (ELOOP), even by
    root, whom permissions do not stop (tests/acceptance/test_unreadable_outputs.py has those)."""
    folder.symlink_to(folder.name)


def test_unpublished__a_folder_that_cannot_be_listed_keeps_its_jobs_an_absent_one_none(tmp_path: Path) -> None:
    """A folder that cannot be listed (here a link loop; permissions and EIO alike) may hold a
    job's result under its temporary name: the job must keep its row, with what could not be read
    and why. It was taken as holding nothing, so prune and archive, run as a user who cannot list
    the folder, removed the row of a held job and the sweep deleted its only result. A folder
    that is absent, or a file where a folder should be, holds nothing: its jobs go as before."""
    outputs = _outputs(tmp_path)
    _loop(outputs / "loop")
    (outputs / "file.wav").write_bytes(b"RIFF")
    third = "7c2e4b61-0000-4c5e-9f43-2a1c8e7d9b12"
    found = unpublished(outputs, [(JOB, "outputs/loop/song.wav"), (OTHER, "outputs/gone/song.wav"),
                                  (third, "outputs/file.wav/song.wav")])
    assert JOB in found and OTHER not in found and third not in found
    assert found.held == set() and list(found.unreadable) == [JOB], found
    why = found.unreadable[JOB]
    assert why.path == str(outputs / "loop") and why.error == os.strerror(errno.ELOOP), why
    assert why.reason() == (f"whether its result waits beside its file_path under a temporary name cannot be told: "
                            f"{outputs / 'loop'} cannot be read ({os.strerror(errno.ELOOP)})")


def test_output__a_folder_that_cannot_be_listed_is_not_called_deleted(tmp_path: Path) -> None:
    """``show``, ``wait``, the status page and a job handle, where the job's folder cannot be
    read: its WAV is not taken as there, nor said to be deleted or moved (as it was): the reason
    says that it cannot be told, naming what could not be read and why (relative, for the page).
    A missing folder still says the file does not exist."""
    outputs = _outputs(tmp_path)
    _loop(outputs / "loop")
    found = output(outputs, JOB, "outputs/loop/song.wav")
    assert found is not None and not found.exists and not found.occupied and not found.held
    reason = found.reason() or ""
    assert "deleted or moved" not in reason and "cannot be told" in reason, reason
    assert found.unreadable is not None and found.unreadable.error == os.strerror(errno.ELOOP)
    assert f"{outputs / 'loop'} cannot be read ({os.strerror(errno.ELOOP)})" in reason, reason
    assert found.reason(relative_to=str(tmp_path)) == reason.replace(str(tmp_path) + os.sep, ""), reason
    missing = output(outputs, JOB, "outputs/gone/song.wav")
    assert missing is not None and missing.unreadable is None and "does not exist" in (missing.reason() or "")


def _settled(folder: Path) -> None:
    """Date ``folder``'s last change a minute back: a listing taken now is past the racy window."""
    os.utime(folder, (folder.stat().st_atime, folder.stat().st_mtime - 60))


def test_output__a_settled_folder_is_listed_once_until_it_changes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The status page asks for every WAV it serves: a folder of 30,000 WAVs took 24 ms to list
    each time. A folder unchanged since its listing is not listed again; a temporary that appears
    later (a rename refused) changes the folder and is seen."""
    outputs = _outputs(tmp_path)
    (outputs / "song.wav").write_bytes(b"RIFF")  # unmarked: only a listing tells whether it is held
    _settled(outputs)
    listings = _count_listings(monkeypatch)
    for _ in range(3):
        found = output(outputs, JOB, "outputs/song.wav")
        assert found is not None and found.exists
    assert listings == [str(outputs)]
    held = temporary(outputs / "song.wav", JOB)
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and not found.exists and found.temporary == str(held)
    assert len(listings) == 2


def test_output__a_listing_taken_as_the_folder_changed_is_not_reused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A change in the same clock tick as a listing leaves the folder's mtime as it was: a listing
    begun within two seconds of the folder's last change is never reused, so a temporary added then
    is seen even where the mtime did not move (set back here, as a coarse clock leaves it)."""
    outputs = _outputs(tmp_path)
    (outputs / "song.wav").write_bytes(b"RIFF")
    listings = _count_listings(monkeypatch)
    before = outputs.stat()
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and found.exists
    held = temporary(outputs / "song.wav", JOB)
    os.utime(outputs, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick: no visible change
    found = output(outputs, JOB, "outputs/song.wav")
    assert found is not None and not found.exists and found.temporary == str(held)
    assert len(listings) == 2


def _count_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    listings: list[str] = []
    real_scandir = os.scandir

    def counted(folder: str) -> Iterator[os.DirEntry[str]]:
        listings.append(folder)
        return real_scandir(folder)

    monkeypatch.setattr(os, "scandir", counted)
    return listings
