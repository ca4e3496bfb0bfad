"""The queue depth (metrics), each model's oldest due job and the status page's overview judge
what is due, and count ages and "finished in the last N minutes", by the database's clock when
the caller gives no time: a web or metrics host whose clock is an hour off would otherwise call
a scheduled job due, a due one not due, and miss the jobs that just finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from dgxqueue.storage import create_generation, dispose_engines, get_engine, session_scope
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import G
from dgxqueue.storage.reads import database_now
from tests.support.processes import REPO
from tests.support.skew import SKEW_PRELUDE

#: Far below the hour of skew, far above the time one process takes to start and read.
SLACK = timedelta(seconds=5)

# The three reads as the status page and the metrics collector make them (no time given), by a
# process whose clock is skewed by argv[2].
_READER = SKEW_PRELUDE + """
import json
from dgxqueue.storage import browse, get_engine, reads, session_scope
with session_scope(get_engine(sys.argv[1])) as session:
    depth = reads.queue_depth(session)
    per_model = reads.oldest_due_per_model(session)
    overview = browse.overview(session, {})
line = overview.models["m"]
print(json.dumps({"oldest": depth.oldest_pending_created_at.isoformat(), "read_at": depth.read_at.isoformat(),
                  "per_model": {k: v.isoformat() for k, v in per_model.items()}, "now": overview.now.isoformat(),
                  "age": line.oldest_due_age_seconds, "completed": line.finished["completed"][15]}))
"""


def _job(url: str, *, created_ago: timedelta, run_after_in: timedelta | None = None,
         completed_ago: timedelta | None = None) -> str:
    """A job of model ``m`` whose times are the database's now shifted as given."""
    engine = get_engine(url)
    profile = profile_of(engine.dialect)

    def at(shift: timedelta) -> sa.ColumnElement[datetime]:
        return profile.later(sa.literal(shift.total_seconds(), sa.Float))

    with session_scope(engine) as session:
        job_id = create_generation(session, prompt="p", model_name="m").id
        values: dict[str, object] = {"created_at": at(-created_ago)}
        if run_after_in is not None:
            values["run_after"] = at(run_after_in)
        if completed_ago is not None:
            values.update(status="completed", completed_at=at(-completed_ago))
        session.execute(sa.update(G).where(G.c.id == job_id).values(**values))
    return job_id


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["hour-fast", "hour-slow"])
def test_reads__due_and_ages_count_from_the_database_clock(engine: sa.Engine, db_url: str, skew: float) -> None:
    """Of a job due since a minute ago (created 10 minutes ago) and one due in 30 minutes (created
    20 minutes ago), the first is the oldest due, 10 minutes old; a job finished 10 minutes ago
    counts in the last 15 minutes: whatever the reading host's clock says."""
    due = _job(db_url, created_ago=timedelta(minutes=10), run_after_in=timedelta(minutes=-1))
    _job(db_url, created_ago=timedelta(minutes=20), run_after_in=timedelta(minutes=30))
    _job(db_url, created_ago=timedelta(minutes=12), completed_ago=timedelta(minutes=10))
    with session_scope(get_engine(db_url)) as session:
        before = database_now(session)
        created = session.execute(sa.select(G.c.created_at).where(G.c.id == due)).scalar_one()
    done = subprocess.run([sys.executable, "-c", _READER, db_url, str(skew)], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    with session_scope(get_engine(db_url)) as session:
        after = database_now(session)  # the reader's start-up can take seconds on a loaded machine
    dispose_engines()
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    assert datetime.fromisoformat(read["oldest"]) == created, (read, created)
    assert read["per_model"] == {"m": read["oldest"]}
    for key in ("read_at", "now"):
        assert before - SLACK <= datetime.fromisoformat(read[key]) <= after + SLACK, (read, before, after)
    waited = (after - before).total_seconds()
    assert 600 - SLACK.total_seconds() <= read["age"] <= 600 + waited + SLACK.total_seconds(), (read, waited)
    assert read["completed"] == 1, read
