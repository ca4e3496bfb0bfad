"""The dgxqueue command at its edges: shared databases and files, database errors
that are not outages, out-of-range input, and a config check that builds the generator.

Each runs the real command on a real SQLite file and, where the engine matters, on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dgxqueue.storage import (
    cancel_generation,
    complete_generation,
    create_generations,
    dispose_engines,
    get_engine,
    init_db,
    session_scope,
)
from dgxqueue.storage.database import head_revision
from dgxqueue.storage.models import Generation
from tests.acceptance.test_cli import Cli, assert_error
from tests.support import zygote
from tests.support.pgcluster import private_cluster
from tests.support.processes import wait_until


@pytest.fixture
def any_cli(tmp_path: Path, db_url: str) -> Iterator[Cli]:
    """The command on an empty database of each engine."""
    cli = Cli(tmp_path)
    cli.url = cli.env["DATABASE_URL"] = db_url
    yield cli
    dispose_engines()


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with get_engine(url).connect() as conn:
        rows = [tuple(row) for row in conn.execute(sa.text(sql))]
    dispose_engines()
    return rows


def _count_jobs(cli: Cli) -> int:
    return int(_rows(cli.url, "SELECT count(*) FROM generations")[0][0])


# --- db reset ---------------------------------------------------------------------------------


def test_db_reset__keeps_tables_dgxqueue_does_not_own(any_cli: Cli) -> None:
    """`db reset --yes` on a shared database empties dgxqueue's tables and leaves the others alone."""
    cli = any_cli
    cli.add("to be reset")
    with get_engine(cli.url).begin() as conn:
        conn.execute(sa.text("CREATE TABLE billing_invoices (id INTEGER PRIMARY KEY, amount REAL)"))
        conn.execute(sa.text("INSERT INTO billing_invoices VALUES (1, 99.5)"))
    dispose_engines()
    assert "reset" in cli.ok("db", "reset", "--yes")
    assert _rows(cli.url, "SELECT id, amount FROM billing_invoices") == [(1, 99.5)]
    assert _rows(cli.url, "SELECT count(*) FROM generations") == [(0,)]
    assert _rows(cli.url, "SELECT count(*) FROM prompts") == [(0,)]
    assert json.loads(cli.here("db", "current", "--json").stdout)["current"] == head_revision()


# --- prune --delete-files -----------------------------------------------------------------------


def test_prune__deletes_the_pruned_jobs_files_and_keeps_the_others(any_cli: Cli) -> None:
    """Each job's file is its own (migration 007): pruning old jobs with --delete-files removes
    their files, once each, and leaves the file of the job that stays."""
    cli = any_cli
    engine = get_engine(cli.url)
    specs = [{"prompt": prompt, "file_path": f"outputs/{prompt}.wav"} for prompt in ("old", "new", "gone")]
    init_db(cli.url)
    with session_scope(engine) as session:
        old, new, gone = create_generations(session, specs)
        for job in (old, new, gone):
            complete_generation(session, job, generation_time=0.1, file_size_bytes=100)
        long_ago = datetime(2025, 1, 1, tzinfo=UTC)
        session.execute(sa.update(Generation).where(Generation.id.in_([old, gone])).values(completed_at=long_ago))
    dispose_engines()
    outputs = cli.folder / "outputs"
    outputs.mkdir()
    for name, size in (("old", 10), ("new", 100), ("gone", 4)):
        (outputs / f"{name}.wav").write_bytes(b"RIFF" + bytes(size))

    dry = json.loads(cli.here("prune", "--older-than", "30d", "--delete-files", "--dry-run", "--json").stdout)
    assert (dry["generations"], dry["files"], dry["bytes"], dry["kept_in_use"]) == (2, 2, 22, [])
    done = cli("prune", "--older-than", "30d", "--delete-files")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 generation(s)" in done.stdout and "2 file(s), 22 bytes" in done.stdout
    assert (outputs / "new.wav").read_bytes() == b"RIFF" + bytes(100)
    assert not (outputs / "old.wav").exists() and not (outputs / "gone.wav").exists()
    assert [row["id"] for row in json.loads(cli.here("list", "--json").stdout)] == [new]


def test_prune__a_failed_jobs_path_never_loses_the_archived_jobs_file(any_cli: Cli) -> None:
    """A failed job never wrote its file, and holds no path: once the job that completed at a path
    is archived, a new job may name that path and fail. Pruning it with --delete-files removed the
    archived job's WAV; a failed job's path is not its file, so it stays."""
    cli = any_cli
    engine = init_db(cli.url)
    with session_scope(engine) as session:
        [done] = create_generations(session, [{"prompt": "kept", "file_path": "outputs/song.wav"}])
        complete_generation(session, done, generation_time=0.1, file_size_bytes=104)
    dispose_engines()
    song = cli.folder / "outputs" / "song.wav"
    song.parent.mkdir()
    song.write_bytes(b"RIFF" + bytes(100))
    archived = cli("archive", "--older-than", "0s", "--to", f"sqlite:///{cli.folder / 'archive.db'}")
    assert archived.returncode == 0, archived.stderr
    with session_scope(get_engine(cli.url)) as session:
        [failed] = create_generations(session, [{"prompt": "took its path", "file_path": "outputs/song.wav"}])
        cancel_generation(session, failed)
    dispose_engines()
    pruned = json.loads(cli.ok("prune", "--older-than", "0s", "--status", "failed", "--delete-files", "--json"))
    assert (pruned["generations"], pruned["files"]) == (1, 0)
    assert song.read_bytes() == b"RIFF" + bytes(100)
    assert _count_jobs(cli) == 0


def test_prune__a_failed_job_naming_the_file_does_not_keep_it(any_cli: Cli) -> None:
    """A job that failed at a path, then another that completed there: pruning the completed one
    with --delete-files kept its WAV as 'still used' by the failed row, which never wrote it, and
    once that row went too the file was left to nobody. The completed job's file goes with it."""
    cli = any_cli
    engine = init_db(cli.url)
    with session_scope(engine) as session:
        [failed] = create_generations(session, [{"prompt": "failed", "file_path": "outputs/song.wav"}])
        cancel_generation(session, failed)
        [done] = create_generations(session, [{"prompt": "done", "file_path": "outputs/song.wav"}])
        complete_generation(session, done, generation_time=0.1, file_size_bytes=104)
    dispose_engines()
    song = cli.folder / "outputs" / "song.wav"
    song.parent.mkdir()
    song.write_bytes(b"RIFF" + bytes(100))
    dry = json.loads(cli.here("prune", "--older-than", "0s", "--status", "completed", "--delete-files", "--dry-run",
                              "--json").stdout)
    assert (dry["generations"], dry["files"], dry["kept_in_use"]) == (1, 1, [])
    pruned = json.loads(cli.ok("prune", "--older-than", "0s", "--status", "completed", "--delete-files", "--json"))
    assert (pruned["generations"], pruned["files"], pruned["kept_in_use"]) == (1, 1, [])
    assert not song.exists()
    assert _count_jobs(cli) == 1


# --- database errors: unavailable (69) or a failed statement (70) -------------------------------


def test_database_error__a_failed_statement_exit_70_an_outage_exit_69(any_cli: Cli) -> None:
    """A statement the database refuses (PostgreSQL's program_limit_exceeded, SQLite's missing
    table: both OperationalErrors) exits 70 naming the error, not 69 "database unavailable";
    a locked SQLite file or one that is no database still is 69 (an unreachable server: test_cli)."""
    cli = any_cli
    [kept] = cli.add("kept")
    with get_engine(cli.url).begin() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.execute(sa.text("CREATE TRIGGER audit AFTER INSERT ON generations "
                                 "BEGIN INSERT INTO audit_log VALUES (new.id); END"))
            words = ["OperationalError", "no such table"]
        else:
            conn.execute(sa.text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'index row size 9000 exceeds maximum' USING ERRCODE = 'program_limit_exceeded'; "
                "END $$"))
            conn.execute(sa.text("CREATE TRIGGER refuse BEFORE INSERT ON generations "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse()"))
            words = ["ProgramLimitExceeded", "index row size"]
    dispose_engines()
    done = cli("enqueue", "refused")
    assert_error(done, 70, "database error", *words)
    assert "unavailable" not in done.stderr
    assert _count_jobs(cli) == 1
    if not sqlite:
        return
    holder = sqlite3.connect(cli.db)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        locked = cli.here("cancel", kept, env={"DGXQUEUE_DATABASE_SQLITE_BUSY_TIMEOUT_MS": "0"})
        assert_error(locked, 69, "database unavailable", "locked")
    finally:
        holder.close()
    assert _rows(cli.url, "SELECT status FROM generations") == [("pending",)]
    cli.db.write_bytes(b"not a database, " * 512)
    assert_error(cli.here("list"), 69, str(cli.db), "not a database")  # named since open_queue reads it itself


# --- out-of-range input -------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "tz", "field"), [
    (["enqueue", "x", "--not-before", "9999-12-31T23:00-05:00"], "UTC", "not_before"),
    (["enqueue", "x", "--not-before", "0001-01-01T00:00+05:00"], "UTC", "not_before"),
    (["enqueue", "x", "--not-before", "0001-01-01T00:00"], "Asia/Tokyo", "not_before"),
    (["enqueue", "x", "--not-before", "99999999999d"], "UTC", "not_before"),
    (["enqueue", "x", "--not-before", "9999999d"], "UTC", "not_before"),
    (["prune", "--older-than", "999999d"], "UTC", "older_than"),
    (["prune", "--older-than", "9999999999w"], "UTC", "older_than"),
])
def test_times__out_of_range_exit_65_nothing_written(cli: Cli, args: list[str], tz: str, field: str) -> None:
    """A time past year 9999 or before year 1 is bad input naming the option, not an internal error.
    A subprocess: a naive time is local, and TZ is read once per process."""
    [job] = cli.add("present")
    with session_scope(get_engine(cli.url)) as session:
        complete_generation(session, job, generation_time=0.1, file_size_bytes=100)
    dispose_engines()
    before = cli.snapshot()
    assert_error(cli(*args, env={"TZ": tz}), 65, field, "year")
    assert cli.snapshot() == before


def test_enqueue__metadata_nested_too_deep_exit_65(cli: Cli) -> None:
    """JSON nested past the parser's recursion limit is bad metadata, not a RecursionError."""
    cli.add("present")
    before = cli.snapshot()
    deep = '{"a":' * 3000 + "1" + "}" * 3000
    assert_error(cli.here("enqueue", "x", "--metadata", deep), 65, "metadata", "nested")
    assert cli.snapshot() == before


@pytest.mark.parametrize("value", ["nan", "inf", "-3"])
def test_wait__timeout_must_be_finite_and_not_negative_exit_65(cli: Cli, value: str) -> None:
    """`--timeout nan` never timed out (a busy loop) and -3 was taken: both are bad input, and
    `enqueue --wait` refuses before it queues anything. Subprocesses: a regression would hang."""
    [job] = cli.add("nobody runs me")
    before = cli.snapshot()
    assert_error(cli("wait", job, "--timeout", value, timeout=30), 65, "timeout", "finite number >= 0")
    assert_error(cli("enqueue", "x", "--wait", "--timeout", value, timeout=30), 65, "timeout")
    assert cli.snapshot() == before


# --- config check -------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "words"), [
    ("sample_rat = 44100", ["generator.options", "sample_rat"]),
    ("max_batch_size = 0", ["generator.options.max_batch_size"]),
])
def test_config_check__builds_the_generator_from_its_options(cli: Cli, tmp_path: Path, options: str,
                                                              words: list[str]) -> None:
    """A mistyped or bad [generator.options] key fails `config check` (78), as the worker would."""
    config = tmp_path / "c.toml"
    config.write_text(f"[generator.options]\n{options}\n")
    assert_error(cli("--config", str(config), "config", "check"), 78, *words)
    config.write_text("[generator.options]\nmax_batch_size = 4\n")
    assert cli.here("--config", str(config), "config", "check").stdout.startswith("config ok")


def test_db_upgrade__wait_outlasts_a_database_that_starts_later(tmp_path: Path) -> None:
    """`db upgrade --wait` (the migrate unit's command) tries again while the server is down, as
    at a boot where PostgreSQL starts after it, and migrates once it is up; without --wait it
    exits 69 at once."""
    with private_cluster() as cluster:
        cluster.stop()
        env = {**os.environ, "DATABASE_URL": cluster.url}
        command = [sys.executable, "-m", "dgxqueue", "db", "upgrade"]
        at_once = zygote.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert at_once.returncode == 69 and "database unavailable" in at_once.stderr
        log = tmp_path / "upgrade.log"
        with log.open("w") as err:
            waiting = zygote.popen([*command, "--wait", "2m"], env=env, stderr=err, stdout=subprocess.PIPE)
        try:
            wait_until(lambda: "trying again" in log.read_text(), 60, "a retry while the server is down",
                       alive=waiting)
            cluster.start()
            out = waiting.communicate(timeout=60)[0].decode()
        finally:
            waiting.kill()
        assert waiting.returncode == 0, log.read_text()
        assert f"database at revision {head_revision()}" in out


def test_wait__survives_the_server_ending_its_connections(pg_db_url: str, tmp_path: Path) -> None:
    """`dgxqueue wait` on PostgreSQL while the server ends every one of its connections
    (pg_terminate_backend, as a restart or an idle timeout would): the next round reads on a new
    connection and the command exits 0 once the job completes, not 69 'database unavailable'."""
    init_db(pg_db_url)
    engine = get_engine(pg_db_url)
    with session_scope(engine) as session:
        [job_id] = create_generations(session, [{"prompt": "p", "model_name": "synth", "duration_seconds": 1.0}])
    others = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                     "AND pid <> pg_backend_pid()")
    env = {**os.environ, "DATABASE_URL": pg_db_url}
    # One connection of the test's, held (autocommit: pg_stat_activity is read afresh each time).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as observer:
        ours = set(observer.execute(others).scalars())
        waiting = zygote.popen([sys.executable, "-m", "dgxqueue", "wait", job_id, "--timeout", "60"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            def theirs() -> set[int]:
                return set(observer.execute(others).scalars()) - ours
            wait_until(lambda: len(theirs()) >= 2, 30, "the wait's listener and reader", alive=waiting)
            ended = theirs()
            for pid in ended:
                observer.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            # Another of the wait's rounds reads on a new connection before the job ends.
            wait_until(lambda: bool(theirs() - ended) or waiting.poll() is not None, 30, "a new connection")
            observer.execute(sa.update(Generation).where(Generation.id == job_id)
                             .values(status="completed", completed_at=sa.func.now()))
            out, err = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
    assert waiting.returncode == 0, err.decode()
    assert "completed" in (out + err).decode()


@pytest.mark.slow  # the down half waits out the reconnect window
def test_wait__outlasts_two_server_restarts_and_exits_69_when_it_stays_down(tmp_path: Path) -> None:
    """`dgxqueue wait` across two `pg_ctl restart`s in a row reads again once the server is back
    and exits 0 when the job completes: its one immediate reconnect landed while the server was
    shutting down and it exited 69. A server that stays down still ends it with 69, paced (its
    CPU time stays small: no spin), within the reconnect window."""
    with private_cluster() as cluster:
        init_db(cluster.url)
        engine = get_engine(cluster.url)
        with session_scope(engine) as session:
            [job_id] = create_generations(session, [{"prompt": "p", "model_name": "synth", "duration_seconds": 1.0}])
        dispose_engines()
        env = {**os.environ, "DATABASE_URL": cluster.url}
        command = [sys.executable, "-m", "dgxqueue", "wait", job_id, "--timeout", "120"]
        log = tmp_path / "wait.log"
        with log.open("w") as err:
            waiting = zygote.popen(command, env=env, stderr=err, stdout=subprocess.PIPE)
        try:
            wait_until(lambda: "pending" in log.read_text(), 60, "the wait's first round", alive=waiting)
            cluster.restart()
            cluster.restart()
            with get_engine(cluster.url).begin() as conn:
                conn.execute(sa.update(Generation).where(Generation.id == job_id)
                             .values(status="completed", completed_at=sa.func.now()))
            dispose_engines()
            out, _ = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
        assert waiting.returncode == 0, log.read_text()
        assert b"completed" in out

        with session_scope(get_engine(cluster.url)) as session:
            [job_id] = create_generations(session, [{"prompt": "q", "model_name": "synth", "duration_seconds": 1.0}])
        dispose_engines()
        with log.open("w") as err:
            # A child of this process, not the zygote's: the test reaps it itself, for its CPU time.
            waiting = subprocess.Popen([*command[:4], job_id, *command[5:]], env=env, stderr=err,
                                       stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: "pending" in log.read_text(), 60, "the wait's first round", alive=waiting)
            cluster.stop()
            _, status, usage = os.wait4(waiting.pid, 0)
        finally:
            waiting.kill()
        assert os.waitstatus_to_exitcode(status) == 69, log.read_text()
        assert "database unavailable" in log.read_text()
        assert usage.ru_utime + usage.ru_stime < 5.0  # start-up and a paced retry each half second
