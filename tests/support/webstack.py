"""The status page's stack for browser tests and the README's screenshot: a SQLite file at head,
daemon processes on :class:`~tests.support.paced.PacedGenerator`, a real ``dgxqueue web`` process
and a headless Chromium (Debian's chromium and chromium-driver; nothing is downloaded)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from dgxqueue.storage import create_generations, dispose_engines, get_engine, session_scope
from tests.support import zygote
from tests.support.db import build_sqlite_template, sqlite_url_at_head
from tests.support.processes import REPO, free_port, start_worker, stop, wait_until, write_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 30.0  # seconds: the page polls every 1.5 s, the daemon heartbeats every 0.2 s


@dataclass
class Stack:
    url: str  # the database
    base: str  # the page
    gates: Path
    driver: WebDriver
    workers: list[subprocess.Popen[bytes]]
    web: subprocess.Popen[bytes]

    def enqueue(self, prompt: str, model: str = "scripted", seconds: float = 1.0,
                metadata: dict[str, Any] | None = None) -> str:
        with session_scope(get_engine(self.url)) as session:
            (job_id,) = create_generations(session, [{"prompt": prompt, "model_name": model,
                                                      "duration_seconds": seconds, "sample_rate": 8000,
                                                      "channels": 1, "metadata": metadata}])
        return job_id

    def status(self, job_id: str) -> str:
        with get_engine(self.url).connect() as conn:
            return str(conn.execute(sa.text("SELECT status FROM generations WHERE id = :id"), {"id": job_id}).scalar())

    def wait_status(self, job_id: str, status: str) -> None:
        wait_until(lambda: self.status(job_id) == status, WAIT, f"job {job_id} to be {status}", alive=self.workers[0])

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def text(self, css: str) -> str | None:
        """The element's shown text, or None when the page has no such element now: read in one
        script, since the live pages replace their elements every poll and Chromium then answers a
        second command on an element it has found with "Node ... does not belong to the document"
        (an unknown error, not a stale element)."""
        found = self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css)
        return None if found is None else str(found)

    def wait(self, condition: Any, what: str) -> Any:
        # The live pages rebuild their elements on every poll: one found a moment ago may be gone.
        return WebDriverWait(self.driver, WAIT, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
                             ).until(condition, what)


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/api/overview", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def browser_available() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


@contextlib.contextmanager
def web_stack(tmp: Path, *, daemons: int = 1, model: str = "scripted") -> Iterator[Stack]:
    """Everything started in ``tmp``, stopped (each process asked to exit 0) on leaving."""
    template = tmp / "template"
    template.mkdir()
    url = sqlite_url_at_head(tmp, build_sqlite_template(template))
    gates = tmp / "gates"
    gates.mkdir()
    config = write_config(tmp / "config.toml", {
        "database": {"url": url},
        "outputs": {"dir": str(tmp / "outputs")},
        "generator": {"name": "tests.support.paced:PacedGenerator"},
        "generator.options": {"gate_dir": str(gates), "models": [model]},
        "worker": {"lease_seconds": 30.0, "heartbeat_seconds": 0.2, "poll_interval_seconds": 0.2, "grace_seconds": 1.0,
                   "backoff_base_seconds": 0.0},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    })
    workers = [start_worker(config, tmp / f"worker-{n}.log") for n in range(daemons)]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    with (tmp / "web.log").open("ab") as log:
        web = zygote.popen([sys.executable, "-m", "dgxqueue", "--config", str(config), "web", "--port", str(port)],
                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--autoplay-policy=no-user-gesture-required"]:
        options.add_argument(argument)
    driver = None
    try:
        wait_until(lambda: _answers(base), 30, "the page to answer", alive=web)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        yield Stack(url, base, gates, driver, workers, web)
    finally:
        if driver is not None:
            driver.quit()
        codes = [stop(web), *(stop(worker) for worker in workers)]
        dispose_engines()
        logs = "\n".join(path.read_text()[-2000:] for path in sorted(tmp.glob("*.log")))
        assert codes == [0] * len(codes), logs
