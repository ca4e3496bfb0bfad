"""The traps of a first hour with dgxqueue, each run as a real ``python -m dgxqueue`` subprocess:
a mistyped database, where things are, errors that say what to do, a CLI that answers at once."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import dgxqueue
from dgxqueue.errors import SchemaError
from dgxqueue.storage import dispose_engines, init_db
from dgxqueue.storage.database import HEAD_REVISION
from tests.acceptance.test_cli import QUIET_DAEMON, REPO, Cli, assert_error
from tests.support import zygote
from tests.support.processes import stop, stopped, wait_until


def _log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# --- 1. a mistyped database never becomes a second, empty queue ---------------------------------


def test_worker__missing_sqlite_file_exit_69_and_nothing_created(cli: Cli) -> None:
    """The worker on a SQLite path that does not exist: exit 69 naming the absolute path and the fix;
    neither the file nor its folder appears."""
    typo = cli.folder / "dta" / "generations.db"
    done = cli("worker", env={**QUIET_DAEMON, "DATABASE_URL": "sqlite:///dta/generations.db"}, timeout=60)
    assert_error(done, 69, str(typo), "dgxqueue db upgrade")
    assert not typo.parent.exists()


def test_worker__database_without_tables_exit_69(cli: Cli) -> None:
    """An empty SQLite file (no dgxqueue tables): exit 69 and no table is created."""
    cli.db.touch()
    assert_error(cli("worker", env=QUIET_DAEMON), 69, str(cli.db), "no dgxqueue tables", "db upgrade")
    assert _tables(cli.db) == set()


def test_worker__empty_postgres_exit_69_password_hidden(cli: Cli, pg_db_url: str) -> None:
    """A PostgreSQL database without dgxqueue's tables: exit 69 naming host, port and database,
    never the password; no table is created."""
    where = sa.engine.make_url(pg_db_url)
    url = where.set(password="sekret-pw").render_as_string(hide_password=False)
    done = cli("worker", env={**QUIET_DAEMON, "DATABASE_URL": url})
    assert_error(done, 69, f"{where.host}:{where.port}/{where.database}", "no dgxqueue tables", "db upgrade")
    assert "sekret-pw" not in done.stderr + done.stdout
    engine = sa.create_engine(pg_db_url)
    with engine.connect() as conn:
        assert not sa.inspect(conn).get_table_names()
    engine.dispose()


def test_worker__older_schema_exit_69_and_left_alone(cli: Cli) -> None:
    """A database at an older revision: exit 69 telling to run 'dgxqueue db upgrade'; not migrated."""
    cli.ok("db", "upgrade", "001")
    assert_error(cli("worker", "--burst", env=QUIET_DAEMON), 69, "revision 001", "dgxqueue db upgrade")
    assert cli.ok("db", "current").startswith("001")


def test_enqueue__explicit_missing_database_exit_69_default_one_created(cli: Cli, tmp_path: Path) -> None:
    """`enqueue` never creates a configured database that is missing (exit 69, nothing made); with no
    database configured it creates the default data/generations.db on first use."""
    assert_error(cli("enqueue", "x"), 69, str(cli.db), "db upgrade")
    assert not cli.db.exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env = {k: v for k, v in cli.env.items() if k != "DATABASE_URL"}
    done = zygote.run([sys.executable, "-m", "dgxqueue", "enqueue", "x"], cwd=fresh, env=env,
                      capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "generations" in _tables(fresh / "data" / "generations.db")


def test_library_enqueue__explicit_missing_database_raises_schema_error(tmp_path: Path) -> None:
    """`dgxqueue.enqueue(database_url=...)` on a missing file raises SchemaError and creates nothing."""
    db = tmp_path / "typo" / "generations.db"
    with pytest.raises(SchemaError, match="db upgrade"):
        dgxqueue.enqueue("x", database_url=f"sqlite:///{db}")
    assert not db.parent.exists()
    init_db(f"sqlite:///{db}")
    assert dgxqueue.enqueue("x", database_url=f"sqlite:///{db}")
    dispose_engines()


# --- 2. start-up says where everything is ------------------------------------------------------


def test_worker__first_log_line_names_database_outputs_and_metrics_address(cli: Cli) -> None:
    """With metrics.port = 0 the first log line gives the real /metrics address, which answers, and
    the absolute database and outputs paths."""
    init_db(cli.url)
    dispose_engines()
    log = cli.folder / "worker.log"
    env = {"DGXQUEUE_METRICS_PORT": "0", "DGXQUEUE_LOGGING_FORMAT": "json",
           "DGXQUEUE_OUTPUTS_DIR": "songs"}
    worker = cli.popen("worker", env=env, log=log)
    try:
        lines = wait_until(lambda: _log_lines(log), 60, "the first log line", alive=worker)  # type: ignore[arg-type]
        first = lines[0]
        assert first["database"] == str(cli.db)
        assert first["outputs"] == str(cli.folder / "songs")
        metrics = str(first["metrics"])
        assert metrics.startswith("http://127.0.0.1:") and metrics.endswith("/metrics")
        assert not metrics.startswith("http://127.0.0.1:0/")
        with urllib.request.urlopen(metrics, timeout=10) as reply:
            assert b"dgxqueue" in reply.read()
    finally:
        assert stop(worker) == 0  # type: ignore[arg-type]


# --- 3. errors a new user meets ----------------------------------------------------------------


def test_worker__metrics_port_in_use_exit_69_with_the_ways_out(cli: Cli) -> None:
    """A taken metrics port: exit 69, one line naming metrics.port, the port and the ways out."""
    init_db(cli.url)
    dispose_engines()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = cli("worker", "--metrics-port", port, env={"DGXQUEUE_METRICS_ENABLED": "true"})
    assert_error(done, 69, "metrics.port", port, "--metrics-port", "metrics.enabled = false")


@pytest.fixture
def no_psycopg(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import psycopg`` fails, as without the postgres extra."""
    shim = tmp_path / "shim"
    (shim / "psycopg").mkdir(parents=True)
    (shim / "psycopg" / "__init__.py").write_text("raise ImportError(\"No module named 'psycopg'\")\n")
    return {"PYTHONPATH": f"{shim}{os.pathsep}{REPO}",
            "DATABASE_URL": "postgresql://dgxqueue:sekret-pw@127.0.0.1:5432/test"}


@pytest.mark.parametrize("argv", [["worker"], ["list"], ["enqueue", "x"], ["config", "check"]])
def test_postgres_without_driver__exit_78_pip_install(cli: Cli, no_psycopg: dict[str, str],
                                                       argv: list[str]) -> None:
    """A PostgreSQL URL without psycopg: exit 78 with the pip command, not an internal error."""
    done = cli(*argv, env={**QUIET_DAEMON, **no_psycopg})
    assert_error(done, 78, "database.url", "pip install 'dgxqueue[postgres]'")
    assert "sekret-pw" not in done.stderr


@pytest.mark.parametrize("url", [
    "postgresql://dgxqueue:sekret-pw@db.internal:abc/queue",
    "mysql://dgxqueue:sekret-pw@db.internal/queue",
    "postgresql//dgxqueue:sekret-pw@db.internal/queue",
])
def test_database_url__malformed_exit_78_password_never_shown(cli: Cli, url: str) -> None:
    """A bad port, an unknown scheme or no URL at all: exit 78 naming database.url, no password."""
    for argv in (["worker"], ["list"], ["config", "show"]):
        done = cli(*argv, env={**QUIET_DAEMON, "DATABASE_URL": url})
        assert_error(done, 78, "database.url")
        assert "sekret-pw" not in done.stderr + done.stdout


def test_config_check__limits_the_generator_cannot_honour_exit_78(cli: Cli) -> None:
    """MusicGen stops at 30 s: the default jobs.max_duration_seconds (300) is reported; within
    its limit the same settings pass."""
    musicgen = {"DGXQUEUE_GENERATOR_NAME": "musicgen"}
    assert_error(cli("config", "check", env=musicgen), 78, "jobs.max_duration_seconds", "30")
    fits = {**musicgen, "DGXQUEUE_JOBS_MAX_DURATION_SECONDS": "30", "DGXQUEUE_JOBS_DEFAULT_DURATION_SECONDS": "8"}
    assert cli.ok("config", "check", env=fits).startswith("config ok")
    synth = {"DGXQUEUE_JOBS_MAX_DURATION_SECONDS": "900"}
    assert_error(cli.here("config", "check", env=synth), 78, "jobs.max_duration_seconds", "600")


def test_config_check__outputs_folder_must_be_writable(cli: Cli, readonly_dir: Path) -> None:
    """An outputs folder under a file, or in a read-only place: exit 78 naming outputs.dir."""
    blocker = cli.folder / "a-file"
    blocker.write_text("")
    assert_error(cli("config", "check", env={"DGXQUEUE_OUTPUTS_DIR": f"{blocker}/outputs"}), 78, "outputs.dir")
    assert_error(cli.here("config", "check", env={"DGXQUEUE_OUTPUTS_DIR": f"{readonly_dir}/outputs"}),
                 78, "outputs.dir")
    assert cli.here("config", "check", env={"DGXQUEUE_OUTPUTS_DIR": f"{cli.folder}/new/outputs"}).returncode == 0


def test_db_downgrade__dropping_tables_or_columns_needs_yes(cli: Cli) -> None:
    """`db downgrade` that drops tables or columns asks for --yes and changes nothing without it;
    one that drops neither runs; the help says what REV is."""
    cli.ok("db", "upgrade")
    assert_error(cli("db", "downgrade", "base"), 2, "--yes", "001")
    assert_error(cli.here("db", "downgrade", "001"), 2, "--yes", "002")
    assert cli.ok("db", "current").startswith(HEAD_REVISION)
    assert_error(cli.here("db", "downgrade", "003"), 2, "--yes", "004")  # 004 drops its two columns
    cli.ok("db", "downgrade", "003", "--yes")
    cli.ok("db", "downgrade", "002")  # 003 only adds a trigger (PostgreSQL): nothing to lose
    assert_error(cli.here("db", "downgrade"), 2, "--yes")
    cli.ok("db", "downgrade", "base", "--yes")
    assert "generations" not in _tables(cli.db)
    help_text = cli.ok("db", "downgrade", "--help")
    assert "base" in help_text and "-1" in help_text and "002" in help_text


def test_demo__with_another_daemon_on_the_same_database(cli: Cli) -> None:
    """Another daemon does the demo's jobs first: the demo still stops its own daemon cleanly (exit 0)."""
    init_db(cli.url)
    dispose_engines()
    other = cli.popen("worker", env=QUIET_DAEMON)
    try:
        wait_until(lambda: "daemon ready" in (cli.folder / "worker.log").read_text(), 60,
                   "the other daemon", alive=other)  # type: ignore[arg-type]
        done = cli("demo", "--prompts", "2", "--duration", "0.5", env=QUIET_DAEMON, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        assert stop(other) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "field"), [
    (["--prompts", "0"], "prompts"), (["--prompts", "many"], "prompts"),
    (["--duration", "0"], "duration"), (["--duration", "700"], "duration"), (["--duration", "nan"], "duration"),
])
def test_demo__bad_arguments_exit_65_before_anything_starts(cli: Cli, argv: list[str], field: str) -> None:
    """Bad --prompts or --duration: exit 65 naming it; no database, no daemon log, no outputs."""
    done = cli("demo", *argv)
    assert_error(done, 65, field)
    assert not cli.db.exists() and not (cli.folder / "outputs").exists()
    assert "daemon started" not in done.stderr


# --- 4. the CLI feels like a tool ----------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_cli__version_and_help_do_not_import_sqlalchemy(argv: list[str]) -> None:
    """`--version` and `--help` import neither SQLAlchemy nor any subcommand's module."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dgxqueue", *argv], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=60, check=True)
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "sqlalchemy" not in imported and "dgxqueue.cli.jobs" not in imported
    assert "dgxqueue" in imported and done.stdout


def test_cli__lazy_help_table_matches_each_subcommand() -> None:
    """The table `--help` lists without importing the modules names each subcommand's real help."""
    import argparse

    from dgxqueue.cli import COMMANDS, build_parser, real_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    real = {choice.dest: choice.help for choice in sub._choices_actions}
    assert real == {name: text for name, (_module, text) in COMMANDS.items()}
    for name in COMMANDS:  # the module the table names builds that subcommand
        assert real_parser(name).prog == f"dgxqueue {name}"


def test_package__enqueue_is_imported_on_first_use() -> None:
    """`import dgxqueue` does not import the API; `from dgxqueue import enqueue` still works."""
    code = ("import sys, dgxqueue; assert 'sqlalchemy' not in sys.modules; "
            "from dgxqueue import enqueue, enqueue_many; assert callable(enqueue) and callable(enqueue_many); "
            "assert 'sqlalchemy' in sys.modules")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   timeout=60)


def _loaded(cli: Cli, modules: tuple[str, ...], *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """Which of ``modules`` the command ``dgxqueue argv`` imported (it must succeed)."""
    probe = ("import json, sys, runpy\n"
             "modules, sys.argv = sys.argv[1].split(','), ['dgxqueue', *sys.argv[2:]]\n"
             "try:\n    runpy.run_module('dgxqueue', run_name='__main__')\n"
             "except SystemExit as done:\n    assert not done.code, done.code\n"
             "print(json.dumps(sorted(m for m in modules if m in sys.modules)), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe, ",".join(modules), *argv], cwd=cli.folder,
                          env={**cli.env, **(env or {})}, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stderr.splitlines()[-1])
    return loaded


def test_package__producers_and_cli_reads_never_load_numpy_or_structlog(cli: Cli) -> None:
    """Submitting a job, `config show` and `list` need neither the audio stack nor the logging
    stack (each is a sixth of a command's start-up); the daemon loads them. `enqueue` builds the
    registered backends to warn of a model none serves, and a backend imports numpy only to make audio."""
    cli.add("a queued job")
    for argv in (["config", "show"], ["list"], ["stats"], ["enqueue", "lo-fi", "--model", "nobody-serves-this"]):
        assert _loaded(cli, ("numpy", "structlog", "torch"), *argv) == [], argv
    library = ("import sys, dgxqueue; dgxqueue.submit('x', database_url=sys.argv[1]); "
               "assert not {'numpy', 'structlog'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", library, cli.url], env={**cli.env, "PYTHONPATH": str(REPO)},
                   check=True, timeout=60)


def test_package__alembic_only_to_migrate_and_prometheus_only_to_serve_metrics(cli: Cli) -> None:
    """`db upgrade` and `db current` on a database at head import no alembic (a third of their
    start-up), and a worker with metrics off imports no prometheus_client."""
    cli.add("a queued job")  # in this process: the database at head
    assert _loaded(cli, ("alembic",), "db", "upgrade") == []
    assert _loaded(cli, ("alembic",), "db", "current") == []
    # structlog, the daemon's logging: the probe sees what the command imports
    assert _loaded(cli, ("prometheus_client", "structlog"), "worker", "--burst", env=QUIET_DAEMON) == ["structlog"]


class _Terminal:
    """A process whose stdin, stdout and stderr are a pseudo-terminal, as in an operator's shell."""

    def __init__(self, cli: Cli, *args: str, env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = zygote.popen(cli.command(*args), cwd=cli.folder, env={**cli.env, **env},
                                    stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.text = ""

    def read_until(self, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while word not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {word!r}; got: {self.text[-2000:]}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.text += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the process has closed the terminal
                    assert word in self.text, self.text[-2000:]
        return self.text

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[list[_Terminal]]:
    opened: list[_Terminal] = []
    yield opened
    for term in opened:
        term.close()


def test_worker__first_ctrl_c_on_a_terminal_says_what_the_second_does(cli: Cli, terminal: list[_Terminal]) -> None:
    """On a terminal, the first SIGINT prints that a second Ctrl-C releases the running jobs; the
    second one stops the worker."""
    init_db(cli.url)
    dispose_engines()
    term = _Terminal(cli, "worker", env={**QUIET_DAEMON, "DGXQUEUE_LOGGING_FORMAT": "json"})
    terminal.append(term)
    term.read_until("daemon ready", 60)
    term.process.send_signal(signal.SIGINT)
    term.read_until("Ctrl-C again releases them at once", 30)
    assert term.process.wait(timeout=60) == 0


def test_demo__first_ctrl_c_on_a_terminal_says_what_the_second_does(cli: Cli, terminal: list[_Terminal]) -> None:
    """The demo's first Ctrl-C says the daemon finishes its jobs and a second releases them; the
    second Ctrl-C ends the demo (exit 130) with its daemon gone."""
    env = {**QUIET_DAEMON, "DGXQUEUE_JOBS_MAX_DURATION_SECONDS": "600"}
    term = _Terminal(cli, "demo", "--prompts", "8", "--duration", "600", env=env)
    terminal.append(term)
    term.read_until("processing", 120)
    term.process.send_signal(signal.SIGINT)
    term.read_until("Ctrl-C again releases them at once", 30)
    term.process.send_signal(signal.SIGINT)
    assert term.process.wait(timeout=60) == 130
    pid = int(term.read_until("daemon started", 1).split("daemon started (pid ", 1)[1].split(",", 1)[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_demo__a_second_ctrl_c_before_its_daemon_is_told_to_stop_still_releases_the_jobs(
        cli: Cli, terminal: list[_Terminal]) -> None:
    """The second Ctrl-C landing after the first one's message but before the demo had told its
    daemon to stop (here: the demo held there, SIGSTOP, while it comes): the demo still releases
    the running jobs at once and exits 130. It waited out the grace period of a graceful stop."""
    env = {**QUIET_DAEMON, "DGXQUEUE_JOBS_MAX_DURATION_SECONDS": "600", "DGXQ_TEST_STOP_AT": "demo-interrupted"}
    term = _Terminal(cli, "demo", "--prompts", "8", "--duration", "600", env=env)
    terminal.append(term)
    term.read_until("processing", 120)
    term.process.send_signal(signal.SIGINT)
    wait_until(lambda: stopped(term.process.pid), 30, "the demo to stop after its first Ctrl-C's message")
    term.process.send_signal(signal.SIGINT)  # pending until it runs again
    term.process.send_signal(signal.SIGCONT)
    assert term.process.wait(timeout=60) == 130
    assert "releasing the running jobs now" in term.read_until("releasing the running jobs now", 10)
    pid = int(term.text.split("daemon started (pid ", 1)[1].split(",", 1)[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_demo__sigterm_stops_it_cleanly_with_exit_143(cli: Cli) -> None:
    """SIGTERM to the demo stops its daemon as Ctrl-C does (the first gracefully, a second releases
    the running jobs), but exits 143 (128 + SIGTERM), not Ctrl-C's 130: it said 130."""
    env = {**QUIET_DAEMON, "DGXQUEUE_JOBS_MAX_DURATION_SECONDS": "600"}
    log = cli.folder / "demo.err"
    with log.open("wb") as err:
        demo = zygote.popen(cli.command("demo", "--prompts", "8", "--duration", "600"), cwd=cli.folder,
                            env={**cli.env, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=err)
    try:
        wait_until(lambda: "processing" in log.read_text(), 120, "a job to run", alive=demo)
        demo.send_signal(signal.SIGTERM)
        wait_until(lambda: "Ctrl-C again releases them at once" in log.read_text(), 30, "the graceful stop",
                   alive=demo)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 143, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = log.read_text()
    pid = int(text.split("daemon started (pid ", 1)[1].split(",", 1)[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "Traceback" not in text
