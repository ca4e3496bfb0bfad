"""Shared fixtures: ``db_url`` runs a test on a real SQLite file and on real PostgreSQL."""

from __future__ import annotations

import os

# No model hub is reachable: huggingface_hub reads these once, at its first import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from dgxqueue.storage import dispose_engines, get_engine, init_db
from tests.support.db import postgres_schema_url, sqlite_url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL, once per engine."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with postgres_schema_url() as url:
            yield url
            dispose_engines()
            return
    dispose_engines()


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> Iterator[str]:
    yield sqlite_url(tmp_path)
    dispose_engines()


@pytest.fixture
def pg_db_url() -> Iterator[str]:
    with postgres_schema_url() as url:
        yield url
        dispose_engines()


@pytest.fixture
def engine(db_url: str) -> Engine:
    """A migrated database on each engine."""
    init_db(db_url)
    return get_engine(db_url)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that runs out of space. Needs root (mount)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=64k"):
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs; CI runs as root and must run the disk-full tests")
        pytest.skip("cannot mount a tmpfs (needs root); test_write__file_size_limit covers a failed write")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nothing can be written to: a read-only tmpfs as root (root ignores modes), else mode 0555."""
    folder = tmp_path / "readonly"
    if os.geteuid() == 0 and _mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
        return
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)
