"""The README's screenshots of the status page with live jobs:

    PYTHONPATH=. python -m tests.support.screenshot docs/

Two daemons (:class:`~tests.support.paced.PacedGenerator`) each run a job paused part-way through
its steps, with completed, failed and pending jobs around them and a second model paused; the
overview is saved as ``web-overview.png`` and the daemons page as ``web-daemons.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By

from dgxqueue.storage import admin, fail_generation, session_scope
from dgxqueue.storage import get_engine as engine_of
from tests.support.paced import release_step
from tests.support.webstack import web_stack

PROMPTS = ["lo-fi hip hop with warm piano, 85 BPM", "trap beat with heavy 808 bass at 140 BPM",
           "ambient pads in D minor, slow", "funk groove with slap bass, 110 BPM",
           "cinematic strings building to a climax", "deep house, 124 BPM, Am"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, web_stack(Path(tmp), daemons=2, model="musicgen-small") as stack:
        done = [stack.enqueue(prompt, model="musicgen-small") for prompt in PROMPTS]
        for job in done:
            stack.wait_status(job, "completed")
        failed = stack.enqueue("a prompt the model refuses", model="musicgen-medium")
        with session_scope(engine_of(stack.url)) as session:
            fail_generation(session, failed, "CUDA out of memory after halving the batch to 1")
            admin.pause_model(session, "musicgen-medium", "swapping weights")
        running = [stack.enqueue(prompt, model="musicgen-small", seconds=30.0, metadata={"paced": 10})
                   for prompt in ("jazzy boom bap with vinyl crackle, 92 BPM", "epic orchestral trailer, C minor")]
        for n, job in enumerate(running):
            stack.wait_status(job, "processing")
            for step in range(1, 4 + 3 * n):
                release_step(stack.gates, job, step)
        for prompt in PROMPTS[:4]:
            stack.enqueue(prompt, model="musicgen-small")
        for prompt in PROMPTS[4:]:
            stack.enqueue(prompt, model="musicgen-medium")
        stack.open("/")
        stack.wait(lambda d: (stack.text("#updated") or "").startswith("updated"), "a live update")
        args.folder.mkdir(parents=True, exist_ok=True)
        stack.driver.save_screenshot(str(args.folder / "web-overview.png"))
        stack.open("/daemons")
        stack.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "progress")) == 2, "both progress bars")
        stack.wait(lambda d: (stack.text("#updated") or "").startswith("updated"), "a live update")
        stack.driver.save_screenshot(str(args.folder / "web-daemons.png"))
        for job in running:  # let the daemons stop cleanly
            for step in range(1, 11):
                release_step(stack.gates, job, step)
            stack.wait_status(job, "completed")


if __name__ == "__main__":
    main()
