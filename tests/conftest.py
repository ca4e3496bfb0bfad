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
from tests.support.db import build_sqlite_template, postgres_database_url, sqlite_url, sqlite_url_at_head


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at head, migrated once per session (per xdist worker) and copied per test."""
    return build_sqlite_template(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL of its own, once per engine: empty, or at head when the test also asks for
    ``engine`` (a copy of a template migrated once: migrating is what the migration tests test)."""
    at_head = "engine" in request.fixturenames
    if request.param == "sqlite":
        yield sqlite_url_at_head(tmp_path, request.getfixturevalue("sqlite_template")) if at_head \
            else sqlite_url(tmp_path)
    else:
        with postgres_database_url(at_head=at_head) as url:
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
    """An empty PostgreSQL database of its own."""
    with postgres_database_url() as url:
        yield url
        dispose_engines()


@pytest.fixture
def engine(db_url: str) -> Engine:
    """A database at head on each engine (``db_url`` is its URL)."""
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

