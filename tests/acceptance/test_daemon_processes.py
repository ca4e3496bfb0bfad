"""The daemon as real processes receiving real signals, on real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.storage import create_generations, get_engine, init_db, session_scope
from tests.support.completions import count_completions
from tests.support.generators import read_executions
from tests.support.processes import REPO, ignores, start_worker, stop, wait_ready, wait_until, worker_config

STATUS_COUNTS = sa.text("SELECT status, count(*) FROM generations GROUP BY status")


def counts(url: str) -> dict[str, int]:
    with get_engine(url).connect() as conn:
        return {status: n for status, n in conn.execute(STATUS_COUNTS).all()}


def enqueue(url: str, prompts: list[str], **spec: object) -> list[str]:
    with session_scope(get_engine(url)) as s:
        return create_generations(s, [{"prompt": p, "model_name": "scripted", "duration_seconds": 0.01,
                                       "sample_rate": 8000, "channels": 1, **spec} for p in prompts])


def job(url: str, job_id: str) -> sa.Row[str, int, str | None]:
    with get_engine(url).connect() as conn:
        return conn.execute(sa.text("SELECT status, attempts, error_message FROM generations WHERE id = :id"),
                            {"id": job_id}).one()


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
def test_daemons__four_processes_complete_2000_jobs_exactly_once(db_url: str, tmp_path: Path,
                                                                 prefetch: bool) -> None:
    """4 daemon processes drain 2,000 jobs: each runs once and its outcome is written once
    (also with worker.prefetch, where claims and outcomes overlap the backend calls)."""
    init_db(db_url)
    count_completions(db_url)
    ids = enqueue(db_url, [f"job {i}" for i in range(2000)])
    config = worker_config(tmp_path, db_url, prefetch=prefetch)
    workers = [start_worker(config, tmp_path / f"worker{i}.log", "--burst") for i in range(4)]
    for process in workers:
        assert process.wait(240) == 0, (tmp_path / "worker0.log").read_text()[-3000:]
    assert counts(db_url) == {"completed": 2000}
    executions = read_executions(tmp_path / "executions.log")
    assert set(executions) == set(ids) and set(executions.values()) == {1}
    with get_engine(db_url).connect() as conn:
        written = conn.execute(sa.text("SELECT id, count(*) FROM completions GROUP BY id")).all()
    assert len(written) == 2000 and {n for _, n in written} == {1}
    pids = {line.split()[1] for line in (tmp_path / "executions.log").read_text().splitlines()}
    assert len(pids) >= 2, "the work should be shared between daemons"


def test_daemon__sigkill_mid_job_is_rescued_by_another(db_url: str, tmp_path: Path) -> None:
    """A daemon killed mid-job loses nothing: after its lease expires another daemon completes it."""
    init_db(db_url)
    [job_id] = enqueue(db_url, ["block"])
    config = worker_config(tmp_path, db_url, lease_seconds=1.0, heartbeat_seconds=0.2)
    victim = start_worker(config, tmp_path / "victim.log")
    wait_ready(victim, tmp_path / "victim.log")
    log = tmp_path / "executions.log"
    wait_until(lambda: read_executions(log)[job_id] == 1, 30, "the job to start", alive=victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert job(db_url, job_id)[0] == "processing"
    (tmp_path / "release").touch()
    rescuer = start_worker(config, tmp_path / "rescuer.log")
    wait_ready(rescuer, tmp_path / "rescuer.log")  # the 30 s below are its rescue's, not its start-up's
    wait_until(lambda: job(db_url, job_id)[0] == "completed", 30, "the rescued job to complete", alive=rescuer)
    assert stop(rescuer) == 0
    assert job(db_url, job_id)[1] == 2
    assert read_executions(log)[job_id] == 2


def test_daemon__sigterm_lets_running_job_finish(sqlite_db_url: str, tmp_path: Path) -> None:
    """SIGTERM during a job: the job finishes within the grace period and the daemon exits 0."""
    url = sqlite_db_url
    init_db(url)
    [job_id] = enqueue(url, ["block"])
    process = start_worker(worker_config(tmp_path, url, grace_seconds=60.0), tmp_path / "w.log")
    wait_ready(process, tmp_path / "w.log")
    wait_until(lambda: read_executions(tmp_path / "executions.log")[job_id] == 1, 30, "the job to start", alive=process)
    process.send_signal(signal.SIGTERM)
    (tmp_path / "release").touch()
    assert process.wait(30) == 0
    assert job(url, job_id)[:2] == ("completed", 1)


@pytest.mark.parametrize("second_signal", [False, True])
def test_daemon__stop_after_grace_returns_job_unspent(sqlite_db_url: str, tmp_path: Path,
                                                      second_signal: bool) -> None:
    """A short grace (or a second signal) gives the running job back to pending, attempt not spent; exit 0."""
    url = sqlite_db_url
    init_db(url)
    [job_id] = enqueue(url, ["block"])
    grace = 600.0 if second_signal else 0.2
    process = start_worker(worker_config(tmp_path, url, grace_seconds=grace), tmp_path / "w.log")
    wait_ready(process, tmp_path / "w.log")
    wait_until(lambda: read_executions(tmp_path / "executions.log")[job_id] == 1, 30, "the job to start", alive=process)
    process.send_signal(signal.SIGTERM)
    if second_signal:
        process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    assert job(url, job_id)[:2] == ("pending", 0)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["sighup", "sigint"])
def test_daemon__a_stop_signal_ignored_at_start_stays_ignored(sqlite_db_url: str, tmp_path: Path,
                                                              signum: signal.Signals) -> None:
    """``nohup dgxqueue worker`` starts with SIGHUP ignored, a script's ``dgxqueue worker &`` with
    SIGINT: the worker caught them anyway, so closing the terminal stopped it. They stay ignored:
    after one, the worker still completes a job queued after it, and SIGTERM still stops it (exit 0)."""
    url = sqlite_db_url
    init_db(url)
    log = tmp_path / "w.log"
    process = start_worker(worker_config(tmp_path, url), log,
                           preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN))
    try:
        wait_ready(process, log)  # its stop handlers are installed before anything slow
        assert ignores(process.pid, signum), Path(f"/proc/{process.pid}/status").read_text()
        process.send_signal(signum)
        [job_id] = enqueue(url, ["after the signal"])
        wait_until(lambda: job(url, job_id)[0] == "completed", 30, "the job queued after the signal",
                   alive=process)
        # The job done, a signal the worker had caught would have been handled long since.
        assert process.poll() is None and '"stopping"' not in log.read_text(), log.read_text()[-3000:]
    finally:
        code = stop(process)
    assert code == 0, log.read_text()[-3000:]


def test_daemon__sigterm_with_prefetch_leaves_nothing_processing(db_url: str, tmp_path: Path) -> None:
    """With worker.prefetch, SIGTERM lets the running job finish and gives the job claimed ahead
    of it back unspent: exit 0, nothing left processing."""
    init_db(db_url)
    running, ahead, queued = enqueue(db_url, ["block", "fine", "fine"])
    config = worker_config(tmp_path, db_url, grace_seconds=60.0, prefetch=True, batch_size=1)
    process = start_worker(config, tmp_path / "w.log")
    wait_ready(process, tmp_path / "w.log")
    wait_until(lambda: read_executions(tmp_path / "executions.log")[running] == 1, 30, "the job to start",
               alive=process)
    wait_until(lambda: job(db_url, ahead)[0] == "processing", 30, "the prefetch claim", alive=process)
    process.send_signal(signal.SIGTERM)
    (tmp_path / "release").touch()
    assert process.wait(30) == 0, (tmp_path / "w.log").read_text()[-3000:]
    assert job(db_url, running)[:2] == ("completed", 1)
    assert job(db_url, ahead)[:2] == ("pending", 0) and job(db_url, queued)[:2] == ("pending", 0)
    assert read_executions(tmp_path / "executions.log")[ahead] == 0
    assert "processing" not in counts(db_url)


def test_daemon__sqlite_lock_storm_loses_nothing(sqlite_db_url: str, tmp_path: Path) -> None:
    """8 producer processes enqueue while 2 daemons drain: no 'database is locked' reaches a caller."""
    url = sqlite_db_url
    init_db(url)
    go = tmp_path / "go"
    producer = (
        "import sys, threading, pathlib\n"
        "from dgxqueue import enqueue\n"
        "go = pathlib.Path(sys.argv[2]); pause = threading.Event()\n"
        "while not go.exists(): pause.wait(0.005)\n"
        "for i in range(150):\n"
        "    enqueue(f'storm {sys.argv[3]} {i}', model_name='scripted', duration_seconds=0.01,"
        " sample_rate=8000, channels=1, database_url=sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    producers = [
        subprocess.Popen([sys.executable, "-c", producer, url, str(go), str(i)], cwd=REPO, env=env,
                         stderr=subprocess.PIPE)
        for i in range(8)
    ]
    config = worker_config(tmp_path, url, sqlite_check_interval_seconds=0.001)
    daemons = [start_worker(config, tmp_path / f"d{i}.log") for i in range(2)]
    go.touch()
    for process in producers:
        _, err = process.communicate(timeout=180)
        assert process.returncode == 0, err.decode()[-2000:]
    wait_until(lambda: counts(url).get("completed") == 1200, 120, "all 1,200 jobs to complete")
    for process in daemons:
        assert stop(process) == 0
    assert counts(url) == {"completed": 1200}
    logs = "".join((tmp_path / f"d{i}.log").read_text() for i in range(2))
    assert "database is locked" not in logs


@pytest.mark.slow
def test_daemon__survives_postgres_restart(tmp_path: Path) -> None:
    """A private PostgreSQL cluster restarts mid-run: the daemon carries on and every job completes."""
    from tests.support.pgcluster import private_cluster

    with private_cluster() as cluster:
        url = cluster.url
        init_db(url)
        enqueue(url, ["work:0.01"] * 300)
        process = start_worker(worker_config(tmp_path, url), tmp_path / "w.log")
        try:
            wait_until(lambda: counts(url).get("completed", 0) >= 30, 60, "work to start", alive=process)
            cluster.restart()
            get_engine(url).dispose()
            assert counts(url).get("completed", 0) < 300, "the restart should happen mid-run"
            wait_until(lambda: counts(url) == {"completed": 300}, 90, "all jobs after the restart",
                       alive=process, interval=0.2)
            [late] = enqueue(url, ["after restart"])  # pickup still works (LISTEN reconnected)
            wait_until(lambda: job(url, late)[0] == "completed", 30, "a job enqueued after the restart",
                       alive=process)
        finally:
            code = stop(process)
        assert code == 0, (tmp_path / "w.log").read_text()[-3000:]
        assert counts(url) == {"completed": 301}
        get_engine(url).dispose()


def test_daemon__survives_terminated_connections(pg_db_url: str, tmp_path: Path) -> None:
    """pg_terminate_backend on every daemon connection, twice mid-run: all jobs still complete."""
    app = f"dgxq-{os.getpid()}-{tmp_path.name}"[:60]
    url = str(sa.engine.make_url(pg_db_url).update_query_dict({"application_name": app})
              .render_as_string(hide_password=False))
    init_db(url)
    enqueue(url, ["work:0.01"] * 200)
    process = start_worker(worker_config(tmp_path, url), tmp_path / "w.log")
    admin = get_engine(pg_db_url)
    kill = sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :a")
    try:
        for threshold in (20, 80):
            wait_until(lambda: counts(pg_db_url).get("completed", 0) >= threshold, 60, "progress", alive=process)
            with admin.begin() as conn:
                assert conn.execute(kill, {"a": app}).scalar_one() >= 1
        wait_until(lambda: counts(pg_db_url) == {"completed": 200}, 90, "all jobs", alive=process, interval=0.2)
    finally:
        code = stop(process)
    assert code == 0, (tmp_path / "w.log").read_text()[-3000:]
