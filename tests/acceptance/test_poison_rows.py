"""Rows written by plain SQL that no job can use: each fails alone, and the daemon drains the rest."""

from __future__ import annotations

import json
from pathlib import Path

from dgxqueue.storage import create_generations, init_db, session_scope
from tests.acceptance.test_cli import Cli
from tests.support import poison
from tests.support.processes import start_worker, worker_config


def test_worker_burst__poison_rows_fail_alone_and_the_queue_drains(db_url: str, tmp_path: Path) -> None:
    """Every poison row fails its own job naming the column, good jobs complete, the daemon exits 0,
    an unknown status is left alone, and `show`/`list` read every row."""
    engine = init_db(db_url)
    with session_scope(engine) as session:
        good = create_generations(session, [{"prompt": f"good {i}", "model_name": "synth", "duration_seconds": 0.2,
                                             "sample_rate": 8000, "channels": 1} for i in range(3)])
    sqlite = engine.dialect.name == "sqlite"
    poisons = poison.COMMON + (poison.SQLITE if sqlite else poison.POSTGRES)
    poison.insert(db_url, [
        *poison.poison_rows(poisons),
        poison.row("upper-case", status="PENDING"),  # not a status of ours: nobody claims it
        # A lease nobody holds (not a time): rescued like an expired one, then run.
        poison.row("lease-words", status="processing", worker_id="gone",
                   lease_expires_at="tomorrow 10:00" if sqlite else "-infinity"),
    ])
    if sqlite:  # text that is not UTF-8 reads with U+FFFD and runs
        poison.insert(db_url, [poison.row("bad-utf8")])
        poison.execute(db_url, "UPDATE generations SET prompt = CAST(x'ff41' AS TEXT) WHERE id = 'bad-utf8'")
    config = worker_config(tmp_path, db_url, generator="synth")
    log = tmp_path / "worker.log"
    daemon = start_worker(config, log, "--burst")
    assert daemon.wait(120) == 0, log.read_text()[-3000:]

    rows = {job_id: (status, error) for job_id, status, error in
            poison.execute(db_url, "SELECT id, status, error_message FROM generations")}
    ran = [*good, "lease-words", *(["bad-utf8"] if sqlite else [])]
    assert {job_id: rows[job_id][0] for job_id in ran} == dict.fromkeys(ran, "completed"), rows
    for bad in poisons:
        status, error = rows[bad.job_id]
        assert status == "failed" and bad.named in (error or ""), (bad, status, error)
    assert rows["upper-case"] == ("PENDING", None)

    cli = Cli(tmp_path)
    cli.env["DATABASE_URL"] = db_url
    listed = cli("list", "--limit", "100")
    assert listed.returncode == 0, listed.stderr
    assert all(p.job_id in listed.stdout for p in poisons)
    as_json = cli.here("list", "--json", "--limit", "100")
    assert as_json.returncode == 0 and len(json.loads(as_json.stdout)) == len(rows), as_json.stderr
    raw = "created-words" if sqlite else "created-minus-infinity"
    shown = cli("show", raw)  # the value as stored, not an error
    assert shown.returncode == 0 and ("tomorrow 10:00" if sqlite else "-infinity") in shown.stdout, shown.stderr
    for bad in poisons:
        for args in (("show", bad.job_id), ("show", bad.job_id, "--json")):
            done = cli.here(*args)
            assert done.returncode == 0, (args, done.stderr)
    if sqlite:
        assert "{'bpm': 90}" in cli.here("show", "metadata-quotes").stdout
    pruned = cli.here("prune", "--older-than", "0s", "--delete-files", "--dry-run", "--json")
    assert pruned.returncode == 0, pruned.stderr
