"""``backend``: each conformance test runs on a real SQLite file, the real PostgreSQL and the
in-memory queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.queues import QueueBackend, open_backend


@pytest.fixture(params=["sqlite", "postgres", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueBackend]:
    yield from open_backend(request.param, tmp_path)
