"""The status page in a real headless Chromium (Debian's chromium and chromium-driver, nothing
downloaded), served by a real ``dgxqueue web`` process on a SQLite file that a real daemon
process works on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from dgxqueue.storage import create_generations, dispose_engines, get_engine, session_scope
from tests.support.db import build_sqlite_template, sqlite_url_at_head
from tests.support.paced import release_step
from tests.support.processes import REPO, free_port, start_worker, stop, wait_until, write_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 30.0  # seconds: the page polls every 1.5 s, the daemon heartbeats every 0.2 s


@dataclass
class Stack:
    url: str  # the database
    base: str  # the page
    gates: Path
    driver: WebDriver
    worker: subprocess.Popen[bytes]
    web: subprocess.Popen[bytes]

    def enqueue(self, prompt: str, model: str = "scripted", seconds: float = 1.0) -> str:
        with session_scope(get_engine(self.url)) as session:
            (job_id,) = create_generations(session, [{"prompt": prompt, "model_name": model,
                                                      "duration_seconds": seconds, "sample_rate": 8000,
                                                      "channels": 1}])
        return job_id

    def status(self, job_id: str) -> str:
        with get_engine(self.url).connect() as conn:
            return str(conn.execute(sa.text("SELECT status FROM generations WHERE id = :id"), {"id": job_id}).scalar())

    def wait_status(self, job_id: str, status: str) -> None:
        wait_until(lambda: self.status(job_id) == status, WAIT, f"job {job_id} to be {status}", alive=self.worker)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def wait(self, condition: Any, what: str) -> Any:
        return WebDriverWait(self.driver, WAIT, poll_frequency=0.05).until(condition, what)


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/api/overview", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: install chromium and chromium-driver")
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver")
    tmp = tmp_path_factory.mktemp("web")
    url = sqlite_url_at_head(tmp, build_sqlite_template(tmp_path_factory.mktemp("template")))
    gates = tmp / "gates"
    gates.mkdir()
    config = write_config(tmp / "config.toml", {
        "database": {"url": url},
        "outputs": {"dir": str(tmp / "outputs")},
        "generator": {"name": "tests.support.paced:PacedGenerator"},
        "generator.options": {"gate_dir": str(gates)},
        "worker": {"lease_seconds": 30.0, "heartbeat_seconds": 0.2, "poll_interval_seconds": 0.2,
                   "backoff_base_seconds": 0.0},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "info"},
    })
    worker = start_worker(config, tmp / "worker.log")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    with (tmp / "web.log").open("ab") as log:
        web = subprocess.Popen([sys.executable, "-m", "dgxqueue", "--config", str(config), "web", "--port", str(port)],
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
        yield Stack(url, base, gates, driver, worker, web)
    finally:
        if driver is not None:
            driver.quit()
        web_code = stop(web)
        worker_code = stop(worker)
        dispose_engines()
        assert web_code == 0, (tmp / "web.log").read_text()[-3000:]
        assert worker_code == 0, (tmp / "worker.log").read_text()[-3000:]
        shutil.rmtree(gates, ignore_errors=True)


def _no_alert(driver: WebDriver) -> bool:
    try:
        driver.switch_to.alert.text
    except NoAlertPresentException:
        return True
    return False


def test_browser__overview_updates_when_a_daemon_completes_a_job(stack: Stack) -> None:
    """The overview's completed count goes up when the daemon completes a job, without a reload."""
    stack.open("/")
    cell = stack.driver.find_element(By.CSS_SELECTOR, '[data-k="by_status.completed"]')
    before = int(cell.text)
    stack.driver.execute_script("window.notReloaded = true;")
    job = stack.enqueue("overview job")
    stack.wait_status(job, "completed")
    stack.wait(lambda d: int(d.find_element(By.CSS_SELECTOR, '[data-k="by_status.completed"]').text) == before + 1,
               "the completed count to go up")
    assert stack.driver.execute_script("return window.notReloaded === true;")
    row = stack.driver.find_element(By.CSS_SELECTOR, 'tr[data-model="scripted"]')
    assert "claiming" in row.text


def test_browser__progress_bar_moves_as_the_daemon_reports(stack: Stack) -> None:
    """On the daemons page the running job's bar follows each step the backend reports."""
    job = stack.enqueue("paced:4")
    stack.open("/daemons")
    bar = f'tr[data-job="{job}"] progress'

    def value(driver: WebDriver) -> float | None:
        found = driver.find_elements(By.CSS_SELECTOR, bar)
        return float(found[0].get_attribute("value") or "nan") if found else None

    stack.wait(lambda d: value(d) == 0.0, "the bar at 0 of 4")
    assert stack.driver.find_element(By.CSS_SELECTOR, bar).get_attribute("max") == "4"
    for step in (1, 2, 3):
        release_step(stack.gates, job, step)
        stack.wait(lambda d, step=step: value(d) == step, f"the bar at {step} of 4")
    release_step(stack.gates, job, 4)
    stack.wait_status(job, "completed")
    stack.wait(lambda d: not d.find_elements(By.CSS_SELECTOR, bar), "the finished job to leave the daemon")


def test_browser__audio_loads_and_reports_its_duration(stack: Stack) -> None:
    """A completed job's page has a player that loads the file (served with ranges) and knows its
    length, and a download link."""
    job = stack.enqueue("listen", seconds=3.0)
    stack.wait_status(job, "completed")
    stack.open(f"/jobs/{job}")
    stack.wait(lambda d: d.execute_script("return document.getElementById('player').readyState >= 1;"),
               "the audio's metadata to load")
    duration = stack.driver.execute_script("return document.getElementById('player').duration;")
    assert abs(duration - 3.0) < 0.01, duration
    link = stack.driver.find_element(By.ID, "download").get_attribute("href")
    assert link == f"{stack.base}/files/{job}.wav?download=1"


def test_browser__cancel_and_retry_through_the_buttons(stack: Stack) -> None:
    """Cancel stops the running job (its daemon ends it failed); Retry queues it again, and the
    daemon then completes it: the page follows each change."""
    job = stack.enqueue("paced:2")
    stack.wait_status(job, "processing")
    stack.open(f"/jobs/{job}")
    stack.driver.find_element(By.XPATH, "//button[text()='Cancel']").click()
    stack.wait(lambda d: d.find_element(By.ID, "status").text == "failed", "the page to show the job failed")
    assert "cancelled" in stack.driver.find_element(By.ID, "error").text
    stack.driver.find_element(By.XPATH, "//button[text()='Retry']").click()
    stack.wait(lambda d: d.find_element(By.ID, "status").text in ("pending", "processing"), "the job queued again")
    stack.wait_status(job, "processing")
    release_step(stack.gates, job, 1)
    release_step(stack.gates, job, 2)
    stack.wait(lambda d: d.find_element(By.ID, "status").text == "completed", "the page to show the job completed")
    assert stack.driver.find_elements(By.ID, "player")


def test_browser__a_prompt_holding_script_is_shown_as_text(stack: Stack) -> None:
    """A prompt and a model name holding markup show as their text on the job page, the jobs list
    and the live overview; no script of theirs runs."""
    prompt = "<script>window.pwned = 1; alert(1)</script><img src=x onerror=\"window.pwned = 2\">"
    model = "<i>nobody</i>"  # no daemon serves it: the job stays pending
    job = stack.enqueue(prompt, model=model)
    for path in (f"/jobs/{job}", "/jobs"):
        stack.open(path)
        shown = stack.driver.find_element(By.ID, "prompt") if path != "/jobs" else \
            stack.driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{job}"] td.prompt')
        assert shown.text == prompt
        assert _no_alert(stack.driver)
        assert stack.driver.execute_script("return window.pwned === undefined;")
    stack.open("/")
    stack.driver.execute_script("window.notReloaded = true;")
    stack.wait(lambda d: d.find_element(By.ID, "updated").text.startswith("updated"), "a live update")
    row = stack.driver.find_element(By.XPATH, f"//tr[@data-model='{model}']")
    assert row.find_element(By.TAG_NAME, "td").text == model and not row.find_elements(By.TAG_NAME, "i")
    assert _no_alert(stack.driver) and stack.driver.execute_script("return window.notReloaded && !window.pwned;")
