"""Several producer processes enqueue the same prompt at once: no increment is lost, nothing fails."""

from __future__ import annotations

import sqlalchemy as sa

from dgxqueue.storage import init_db
from tests.support.producers import enqueue_many_times, run_in_processes

PROCESSES, EACH = 4, 250
PROMPT = "trap beat with heavy 808 bass at 140 BPM"


def test_enqueue__four_processes_same_prompt_count_exactly(db_url: str) -> None:
    """4 processes x 250 enqueues of one prompt: used_count is exactly 1000, with 1000 rows."""
    engine = init_db(db_url)
    done = run_in_processes(enqueue_many_times, [(db_url, PROMPT, EACH)] * PROCESSES)
    assert done == [EACH] * PROCESSES
    with engine.connect() as conn:
        used = conn.execute(sa.text("SELECT used_count FROM prompts WHERE text = :t"), {"t": PROMPT})
        rows = conn.execute(sa.text("SELECT count(*) FROM generations WHERE prompt = :t"), {"t": PROMPT})
        prompts = conn.execute(sa.text("SELECT count(*) FROM prompts")).scalar()
    assert (used.scalar(), rows.scalar(), prompts) == (PROCESSES * EACH, PROCESSES * EACH, 1)
