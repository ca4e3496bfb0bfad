"""The status page in a real headless Chromium (Debian's chromium and chromium-driver, nothing
downloaded), served by a real ``dgxqueue web`` process on a SQLite file that a real daemon
process works on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from dgxqueue.storage import get_engine, session_scope
from tests.support.paced import release_step
from tests.support.webstack import Stack, browser_available, web_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not browser_available():
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: install chromium and chromium-driver")
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver")
    with web_stack(tmp_path_factory.mktemp("web")) as running:
        yield running


def _no_alert(driver: WebDriver) -> bool:
    try:
        driver.switch_to.alert.text
    except NoAlertPresentException:
        return True
    return False


def test_browser__overview_updates_when_a_daemon_completes_a_job(stack: Stack) -> None:
    """The overview's completed count goes up when the daemon completes a job, without a reload."""
    stack.open("/")
    before = int(stack.wait(lambda d: stack.text('[data-k="by_status.completed"]'), "the completed count"))
    stack.driver.execute_script("window.notReloaded = true;")
    job = stack.enqueue("overview job")
    stack.wait_status(job, "completed")
    stack.wait(lambda d: stack.text('[data-k="by_status.completed"]') == str(before + 1),
               "the completed count to go up")
    assert stack.driver.execute_script("return window.notReloaded === true;")
    stack.wait(lambda d: "claiming" in (stack.text('tr[data-model="scripted"]') or ""),
               "the model's line")


def test_browser__progress_bar_moves_as_the_daemon_reports(stack: Stack) -> None:
    """On the daemons page the running job's bar follows each step the backend reports."""
    job = stack.enqueue("paced:4")
    stack.open("/daemons")
    bar = f'tr[data-job="{job}"] progress'

    def value(driver: WebDriver) -> Any:  # read in one script: the page replaces its elements every poll
        return driver.execute_script("const b = document.querySelector(arguments[0]);"
                                     "return b ? [b.value, b.max] : null;", bar)

    stack.wait(lambda d: value(d) == [0, 4], "the bar at 0 of 4")
    for step in (1, 2, 3):
        release_step(stack.gates, job, step)
        stack.wait(lambda d, step=step: value(d) == [step, 4], f"the bar at {step} of 4")
    release_step(stack.gates, job, 4)
    stack.wait_status(job, "completed")
    stack.wait(lambda d: value(d) is None, "the finished job to leave the daemon")


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
    stack.wait(lambda d: stack.text("#status") == "failed", "the page to show the job failed")
    stack.wait(lambda d: "cancelled" in (stack.text("#error") or ""), "the cancel's message")
    stack.driver.find_element(By.XPATH, "//button[text()='Retry']").click()
    stack.wait(lambda d: stack.text("#status") in ("pending", "processing"), "the job queued again")
    stack.wait_status(job, "processing")
    release_step(stack.gates, job, 1)
    release_step(stack.gates, job, 2)
    stack.wait(lambda d: stack.text("#status") == "completed", "the page to show the job completed")
    stack.wait(lambda d: d.find_elements(By.ID, "player"), "the player of the completed job")


def test_browser__a_prompt_holding_script_is_shown_as_text(stack: Stack) -> None:
    """A prompt and a model name holding markup show as their text on the job page, the jobs list
    and the live overview; no script of theirs runs."""
    prompt = "<script>window.pwned = 1; alert(1)</script><img src=x onerror=\"window.pwned = 2\">"
    model = "<i>nobody</i>"  # no daemon serves it: the job stays pending
    job = stack.enqueue(prompt, model=model)
    for path in (f"/jobs/{job}", "/jobs"):
        stack.open(path)
        shown = stack.text("#prompt" if path != "/jobs" else f'tr[data-job="{job}"] td.prompt')
        assert shown == prompt
        assert _no_alert(stack.driver)
        assert stack.driver.execute_script("return window.pwned === undefined;")
    stack.open("/")
    stack.driver.execute_script("window.notReloaded = true;")
    stack.wait(lambda d: (stack.text("#updated") or "").startswith("updated"), "a live update")
    cells = stack.driver.execute_script(  # in one script: the page replaces the rows every poll
        "const row = document.querySelector(`tr[data-model='${arguments[0]}']`);"
        "return [row.cells[0].textContent, row.querySelectorAll('i').length];", model)
    assert cells == [model, 0]
    assert _no_alert(stack.driver) and stack.driver.execute_script("return window.notReloaded && !window.pwned;")


def test_browser__odd_status_and_id_written_by_plain_sql(stack: Stack) -> None:
    """A status holding a carriage return (which the HTML parser turns into a line feed) leaves
    the job page polling, not reloading on every poll for ever; a job id holding ``?`` and ``#``
    links to its own page from the jobs list."""
    row = {"prompt": "odd row from plain sql", "model_name": "nobody", "duration_seconds": 1.0,
           "sample_rate": 8000, "channels": 1, "file_path": "odd.wav", "created_at": "2026-12-06T10:00:00+00:00"}
    untyped = sa.table("generations", *(sa.column(name) for name in ["id", "status", *row]))
    with session_scope(get_engine(stack.url)) as session:
        session.execute(sa.insert(untyped).values([{**row, "id": "odd-status", "status": "processing\r"},
                                                   {**row, "id": "odd?id=1#here", "status": "pending",
                                                    "file_path": "odd-too.wav"}]))
    stack.open("/jobs/odd-status")
    stack.driver.execute_script("window.notReloaded = true;")
    stack.wait(lambda d: (stack.text("#updated") or "").startswith("updated"), "a live update")
    assert stack.driver.execute_script("return window.notReloaded === true;")
    stack.open("/jobs?q=odd+row+from+plain+sql&status=pending")
    stack.driver.find_element(By.CSS_SELECTOR, "td a").click()
    stack.wait(lambda d: stack.text("h2") == "Job odd?id=1#here", "the job's own page")
