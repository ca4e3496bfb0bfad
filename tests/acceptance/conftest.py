"""Fixtures shared by the command's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dgxqueue.storage import dispose_engines
from tests.acceptance.test_cli import Cli


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The command on its own SQLite file."""
    yield Cli(tmp_path)
    dispose_engines()
