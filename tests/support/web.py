"""The status page for tests: the application on a test database (in process, through
Starlette's TestClient) and a small WAV file in place of a rendered one."""

from __future__ import annotations

import re
import wave
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from dgxqueue.config import Settings
from dgxqueue.storage import get_engine
from dgxqueue.web import WebOptions, create_app

#: A loopback origin: the page answers loopback host names only when it runs without a token.
BASE = "http://127.0.0.1:8470"
_CSRF = re.compile(r'<meta name="csrf-token" content="([0-9a-f]+)">')


def client(settings: Settings, **options: Any) -> TestClient:
    """A client of the application on ``settings``' database (options: read_only, token, loopback_only)."""
    options.setdefault("overview_cache_seconds", 0.0)  # each read sees the test's last write
    app = create_app(WebOptions(settings=settings, engine=get_engine(settings.database.url), **options))
    return TestClient(app, base_url=BASE, follow_redirects=False)


def csrf_token(browser: TestClient, headers: dict[str, str] | None = None) -> str:
    """The CSRF token a page hands this client (its cookie is kept by the client)."""
    page = browser.get("/jobs", headers=headers or {})
    assert page.status_code == 200, page.text
    match = _CSRF.search(page.text)
    assert match is not None
    return match.group(1)


def write_wav(path: Path, seconds: float, rate: int = 8000) -> int:
    """A mono 16-bit WAV of ``seconds`` of a ramp (so byte ranges differ); its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = round(seconds * rate)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join((i % 30000).to_bytes(2, "little") for i in range(frames)))
    return path.stat().st_size
