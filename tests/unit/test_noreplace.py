"""dgxqueue.noreplace on real files: a rename that never replaces what is at its target, by each
of its three ways (chosen by the ``ways`` argument, never by patching ``os``)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dgxqueue.noreplace import CHECK, LINK, RENAMEAT2, WAYS, rename_noreplace

XATTR = "user.dgxqueue.job"
EACH_WAY = [(RENAMEAT2,), (LINK,), (CHECK,), WAYS]
WAY_IDS = ["renameat2", "link", "check", "all"]


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A folder with the temporary ``src`` (bytes and an owner attribute), and its descriptor."""
    (tmp_path / "src").write_bytes(b"the result")
    os.setxattr(tmp_path / "src", XATTR, b"job-1")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def _file(path: Path) -> None:
    path.write_bytes(b"someone else's")


def _folder(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_bytes(b"someone else's")


def _link_to_a_file(path: Path) -> None:
    (path.parent / "elsewhere").write_bytes(b"someone else's")
    path.symlink_to("elsewhere")


def _dangling_link(path: Path) -> None:
    path.symlink_to("nowhere")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _looks(path: Path) -> tuple[int, bytes | str | None]:
    """What is at ``path``: its type, and its bytes, link text or folder listing."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return stat.S_IFMT(mode), os.readlink(path)
    if stat.S_ISDIR(mode):
        return stat.S_IFMT(mode), ",".join(sorted(os.listdir(path)))
    if stat.S_ISREG(mode):
        return stat.S_IFMT(mode), path.read_bytes()
    return stat.S_IFMT(mode), None


@pytest.mark.parametrize("ways", EACH_WAY, ids=WAY_IDS)
def test_rename_noreplace__onto_nothing_renames_and_keeps_the_attribute(folder: tuple[Path, int],
                                                                        ways: Sequence[str]) -> None:
    """With nothing at the target, the file is renamed: its bytes and its owner attribute are at
    the target (the inode is kept), and the source name is gone."""
    path, fd = folder
    inode = (path / "src").stat().st_ino
    rename_noreplace("src", "dst", dir_fd=fd, ways=ways)
    assert sorted(os.listdir(path)) == ["dst"]
    assert (path / "dst").read_bytes() == b"the result" and (path / "dst").stat().st_ino == inode
    assert os.getxattr(path / "dst", XATTR) == b"job-1"


@pytest.mark.parametrize("ways", EACH_WAY, ids=WAY_IDS)
@pytest.mark.parametrize("plant", [_file, _folder, _link_to_a_file, _dangling_link, _fifo],
                         ids=["file", "folder", "link", "dangling-link", "fifo"])
def test_rename_noreplace__onto_anything_is_file_exists_and_both_stay(
        folder: tuple[Path, int], ways: Sequence[str], plant: Callable[[Path], None]) -> None:
    """Whatever is at the target (a file, a folder, a link, even one leading nowhere, a FIFO):
    FileExistsError, the target exactly as it was and the source still there, attribute and all."""
    path, fd = folder
    plant(path / "dst")
    before = _looks(path / "dst")
    with pytest.raises(FileExistsError) as caught:
        rename_noreplace("src", "dst", dir_fd=fd, ways=ways)
    assert caught.value.errno == errno.EEXIST
    assert _looks(path / "dst") == before
    assert (path / "src").read_bytes() == b"the result" and os.getxattr(path / "src", XATTR) == b"job-1"


@pytest.mark.parametrize("ways", EACH_WAY, ids=WAY_IDS)
@pytest.mark.parametrize("occupied", [False, True], ids=["target-free", "target-taken"])
def test_rename_noreplace__a_source_renamed_by_someone_else_is_file_not_found(
        folder: tuple[Path, int], ways: Sequence[str], occupied: bool) -> None:
    """The source is gone (the sweep renamed it first): FileNotFoundError whether or not something
    is at the target, which stays as it was (the look-then-replace way looks at the target first)."""
    path, fd = folder
    (path / "src").rename(path / "moved")
    if occupied:
        _file(path / "dst")
    with pytest.raises(FileNotFoundError):
        rename_noreplace("src", "dst", dir_fd=fd, ways=ways)
    assert sorted(os.listdir(path)) == (["dst", "moved"] if occupied else ["moved"])


@pytest.mark.parametrize("ways", EACH_WAY, ids=WAY_IDS)
def test_rename_noreplace__a_link_then_unlink_cut_short_is_finished(folder: tuple[Path, int],
                                                                     ways: Sequence[str]) -> None:
    """Source and target are two names of one file (a crash between the link and the unlink): the
    rename completes by removing the source name; the file stays."""
    path, fd = folder
    os.link(path / "src", path / "dst")
    rename_noreplace("src", "dst", dir_fd=fd, ways=ways)
    assert os.listdir(path) == ["dst"] and (path / "dst").read_bytes() == b"the result"


def test_rename_noreplace__a_way_the_file_system_lacks_passes_to_the_next(tmp_path: Path) -> None:
    """A hard link refused with EPERM (as vfat refuses every one; here, because the source is a
    folder) passes to the next way, which renames; alone, that way's error is raised."""
    (tmp_path / "src").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(PermissionError):
            rename_noreplace("src", "dst", dir_fd=fd, ways=(LINK,))
        rename_noreplace("src", "dst", dir_fd=fd, ways=(LINK, CHECK))
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["dst"]

