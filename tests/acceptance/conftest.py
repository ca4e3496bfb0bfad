"""Fixtures shared by the command's tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgxqueue.storage import dispose_engines
from tests.acceptance.test_cli import Cli
from tests.acceptance.test_machine_faults import mount


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The command on its own SQLite file."""
    yield Cli(tmp_path)
    dispose_engines()


@pytest.fixture
def outputs_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs as the daemons' outputs folder."""
    folder = tmp_path / "outputs"
    mount(folder, "size=2m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)
