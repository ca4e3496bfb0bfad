"""``prune`` and ``archive --older-than`` count their cutoff back from the database's clock: a
host whose clock is an hour fast would otherwise take jobs that finished half an hour ago, and one
an hour slow would keep jobs that are old enough."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.storage import create_generation, dispose_engines, get_engine, session_scope
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import G
from dgxqueue.storage.reads import database_now
from tests.support.processes import REPO
from tests.support.skew import SKEW_PRELUDE

#: Far below the hour of skew, far above the time one process takes to start and read the clock.
SLACK = timedelta(seconds=5)
HOUR = timedelta(hours=1)

# prune and archive as an operator runs them, in a process whose clock is skewed by argv[2].
_OPERATOR = SKEW_PRELUDE + """
import io, contextlib, json
from dgxqueue.cli import main
answers = []
for argv in (["archive", "--older-than", "1h", "--to", sys.argv[3], "--dry-run", "--json"],
             ["prune", "--older-than", "1h", "--dry-run", "--json"],
             ["archive", "--older-than", "1h", "--to", sys.argv[3], "--json"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)  # DATABASE_URL: argv[1]
    assert code == 0, (argv, code)
    answers.append(json.loads(out.getvalue()))
print(json.dumps(answers))
"""


def _finished(url: str, ago: timedelta) -> str:
    """A completed job whose ``completed_at`` is the database's now less ``ago``."""
    engine = get_engine(url)
    with session_scope(engine) as session:
        job_id = create_generation(session, prompt="done").id
        later = profile_of(engine.dialect).later(sa.literal(-ago.total_seconds(), sa.Float))
        session.execute(sa.update(G).where(G.c.id == job_id).values(status="completed", completed_at=later))
    return job_id


def _db_now(url: str) -> datetime:
    with session_scope(get_engine(url)) as session:
        return database_now(session)


@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["hour-fast", "hour-slow"])
def test_older_than__counts_back_from_the_database_clock(engine: sa.Engine, db_url: str, tmp_path: Path,
                                                          skew: float) -> None:
    """Of a job finished 90 minutes ago and one 30 minutes ago, ``--older-than 1h`` takes exactly
    the first (archive's preview, prune's preview and the archive itself), and the cutoff each
    reports is the database's now less an hour, whatever the operator's clock says."""
    old, recent = _finished(db_url, timedelta(minutes=90)), _finished(db_url, timedelta(minutes=30))
    target = f"sqlite:///{tmp_path / 'archive.db'}"
    before = _db_now(db_url)
    done = subprocess.run([sys.executable, "-c", _OPERATOR, db_url, str(skew), target], capture_output=True,
                          text=True, timeout=120, check=False, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": db_url})
    assert done.returncode == 0, done.stderr
    after = _db_now(db_url)
    preview, pruning, archived = json.loads(done.stdout)
    assert (preview["generations"], pruning["generations"], archived["moved"]) == (1, 1, 1)
    for answer in (preview, pruning, archived):
        cutoff = datetime.fromisoformat(answer["cutoff"])
        assert before - HOUR - SLACK <= cutoff <= after - HOUR + SLACK, (answer, before)
    with session_scope(get_engine(db_url)) as session:
        left = set(session.scalars(sa.select(G.c.id)))
    with session_scope(get_engine(target)) as session:
        moved = set(session.scalars(sa.select(G.c.id)))
    dispose_engines()
    assert (left, moved) == ({recent}, {old})
