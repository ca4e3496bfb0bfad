"""The dgxqueue command as a subprocess against a real SQLite file: output, exit codes, error paths.

Every error path checks the three promises: the documented exit code, exactly one line on
stderr, and nothing changed in the database.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from dgxqueue.cli import build_parser, main
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
from tests.support import zygote
from tests.support.processes import wait_until

REPO = Path(__file__).resolve().parents[2]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
QUIET_DAEMON = {"DGXQUEUE_METRICS_ENABLED": "false", "DGXQUEUE_WORKER_POLL_INTERVAL_SECONDS": "0.2"}


class Cli:
    """Runs ``python -m dgxqueue`` in a temporary folder with its own SQLite database."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = folder / "generations.db"
        self.url = f"sqlite:///{self.db}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DGXQUEUE_") and k != "DATABASE_URL"}
        self.env = {**clean, "DATABASE_URL": self.url}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dgxqueue", *args]

    def __call__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
                 ) -> subprocess.CompletedProcess[str]:
        return zygote.run(self.command(*args), cwd=self.folder, env={**self.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)

    def popen(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None,
              ) -> subprocess.Popen[str]:
        with (log or self.folder / "worker.log").open("a") as out:  # the child keeps its own copy
            return zygote.popen(self.command(*args), cwd=self.folder, env={**self.env, **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, text=True)

    def here(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The same command through ``main()`` in this process: for the variants of a path that a
        subprocess already covers (each subprocess costs half a second of start-up)."""
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        try:
            with mock.patch.dict(os.environ, {**self.env, **(env or {})}, clear=True), \
                    contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                os.chdir(self.folder)
                code = main(list(args))
        finally:
            os.chdir(cwd)
            dispose_engines()
        return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())

    def ok(self, *args: str, **kwargs: Any) -> str:
        done = self(*args, **kwargs)
        assert done.returncode == 0, f"{args}: exit {done.returncode}: {done.stderr}"
        return done.stdout

    def enqueue(self, prompt: str = "lo-fi piano at 80 BPM", *args: str) -> str:
        return self.ok("enqueue", prompt, *args).strip()

    def add(self, *prompts: str, cancel: bool = False) -> list[str]:
        """Set-up through the library, in this process: the command under test runs as a subprocess."""
        engine = init_db(self.url)
        with session_scope(engine) as session:
            ids = create_generations(session, [{"prompt": p} for p in prompts])
            for job_id in ids if cancel else []:
                cancel_generation(session, job_id)
        dispose_engines()
        return ids

    def snapshot(self) -> tuple[list[tuple[Any, ...]], ...] | None:
        """Every row of both tables (None when the file does not exist)."""
        if not self.db.exists():
            return None
        with sqlite3.connect(self.db) as conn:
            return (conn.execute("SELECT * FROM generations ORDER BY id").fetchall(),
                    conn.execute("SELECT * FROM prompts ORDER BY id").fetchall())


def assert_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """The documented exit code and exactly one line on stderr (no traceback)."""
    assert done.returncode == code, f"exit {done.returncode}, stderr: {done.stderr}"
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _closed_port() -> Iterator[int]:
    """A TCP port bound but never listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


closed_port = pytest.fixture(_closed_port)


# --- help and version -------------------------------------------------------------------------


def test_cli__help_as_module_lists_every_subcommand(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m dgxqueue --help` lists every subcommand; --version prints the version."""
    text = cli.ok("--help")
    for name in ("worker", "enqueue", "show", "list", "stats", "wait", "cancel", "retry", "prune", "db",
                 "config", "demo"):
        assert name in text
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("dgxqueue ")


@pytest.mark.parametrize("argv", [
    ["worker"], ["enqueue"], ["show"], ["list"], ["stats"], ["wait"], ["cancel"], ["retry"], ["prune"],
    ["db"], ["db", "upgrade"], ["db", "downgrade"], ["db", "current"], ["db", "backup"], ["db", "reset"],
    ["db", "copy"], ["archive"], ["config"], ["config", "show"], ["config", "check"], ["demo"],
])
def test_cli__every_subcommand_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand answers --help with a usage text and exit code 0."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    assert "usage: dgxqueue" in capsys.readouterr().out


def test_cli__usage_error_is_one_line_exit_2(cli: Cli) -> None:
    """A missing argument or an unknown subcommand: exit 2, one line, nothing created."""
    assert_error(cli("enqueue"), 2, "prompt")
    with pytest.raises(SystemExit) as done, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["frobnicate"])
    assert done.value.code == 2 and len(err.getvalue().splitlines()) == 1
    assert cli.snapshot() is None


# --- enqueue, show, list, stats ---------------------------------------------------------------


def test_enqueue__prints_the_id_and_show_gives_the_row(cli: Cli) -> None:
    """`enqueue` prints a UUID; `show --json` returns every column."""
    cli.add()
    job_id = cli.enqueue()
    assert UUID.match(job_id)
    row = json.loads(cli.ok("show", job_id, "--json"))
    assert row["id"] == job_id and row["status"] == "pending" and row["model_name"] == "synth"
    assert row["output_path"] == str(cli.folder / "outputs" / f"{job_id}.wav")
    human = cli.here("show", job_id).stdout
    assert re.search(r"^status\s+pending$", human, re.M) and job_id in human


def test_enqueue__every_option_lands_in_the_row(cli: Cli) -> None:
    """Duration, model, rate, channels, priority, not-before, metadata and file path are stored."""
    cli.add()
    row = json.loads(cli.ok(
        "enqueue", "trap beat", "--duration", "2.5", "--model", "musicgen-small", "--sample-rate", "16000",
        "--channels", "2", "--priority", "7", "--not-before", "10m", "--metadata", '{"bpm": 140, "key": "Cm"}',
        "--file-path", "outputs/trap.wav", "--max-attempts", "5", "--json",
    ))
    assert (row["prompt"], row["duration_seconds"], row["model_name"], row["sample_rate"], row["channels"],
            row["priority"], row["file_path"], row["max_attempts"]) == (
        "trap beat", 2.5, "musicgen-small", 16000, 2, 7, "outputs/trap.wav", 5)
    assert row["metadata"] == {"bpm": 140, "key": "Cm"}
    assert row["run_after"] > row["created_at"]


def test_enqueue__bad_json_metadata_exit_65_nothing_written(cli: Cli) -> None:
    """Metadata that is not JSON: exit 65, one line naming the field, no row written."""
    cli.add("already here")
    before = cli.snapshot()
    assert_error(cli("enqueue", "new", "--metadata", "{not json"), 65, "metadata")
    assert cli.snapshot() == before


@pytest.mark.parametrize(("args", "words"), [
    (["--metadata", "[1, 2]"], ["metadata", "JSON object"]),
    (["--duration", "-1"], ["duration_seconds"]),
    (["--duration", "99999"], ["duration_seconds"]),
    (["--duration", "ten"], ["duration_seconds"]),
    (["--channels", "9"], ["channels"]),
    (["--priority", "high"], ["priority"]),
    (["--not-before", "next tuesday"], ["not_before"]),
    (["--file-path", "../escape.wav"], ["file_path"]),
])
def test_enqueue__bad_value_exit_65_nothing_written(cli: Cli, args: list[str], words: list[str]) -> None:
    """A bad duration or any other bad value: exit 65, one line naming it, no row written."""
    cli.add("already here")
    before = cli.snapshot()
    assert_error(cli.here("enqueue", "new", *args), 65, *words)
    assert cli.snapshot() == before


def test_enqueue__bad_duration_as_subprocess_exit_65(cli: Cli) -> None:
    """The spec's own example, end to end: a negative duration exits 65 with one line."""
    assert_error(cli("enqueue", "x", "--duration", "-5"), 65, "duration_seconds")


def test_list__table_filters_and_json(cli: Cli) -> None:
    """`list` prints a table newest first; --status, --limit and --json narrow and format it."""
    [first] = cli.add("first prompt", cancel=True)
    [second] = cli.add("a very long prompt " * 20)
    table = cli.ok("list").splitlines()
    assert table[0].split() == ["ID", "STATUS", "MODEL", "DURATION", "CREATED", "(UTC)", "PROMPT", "ERROR"]
    assert [line.split()[0] for line in table[1:]] == [second, first]
    assert table[2].split()[-4:] == ["prompt", "cancelled", "by", "request"]  # a failed job's error, in its column
    assert "…" in table[1]  # the long prompt is cut to fit
    failed = json.loads(cli.here("list", "--status", "failed", "--json").stdout)
    assert [row["id"] for row in failed] == [first]
    assert len(json.loads(cli.here("list", "--limit", "1", "--json").stdout)) == 1
    assert_error(cli.here("list", "--status", "lost"), 65, "status")


def test_stats__counts_by_status(cli: Cli) -> None:
    """`stats --json` counts generations by status and prompts; the table shows the same."""
    cli.add("one", cancel=True)
    cli.add("one", "two")
    stats = json.loads(cli.ok("stats", "--json"))
    assert stats["total_generations"] == 3 and stats["by_status"]["pending"] == 2
    assert stats["by_status"]["failed"] == 1 and stats["total_prompts"] == 2
    assert re.search(r"^pending\s+2$", cli.here("stats").stdout, re.M)


# --- cancel, retry, not found -----------------------------------------------------------------


def test_cancel_retry__state_rules_and_exit_codes(cli: Cli) -> None:
    """Cancel a pending job, retry it; a wrong state is exit 4 and changes nothing."""
    [job] = cli.add("to cancel")
    assert cli.ok("cancel", job).strip() == f"cancelled {job}"
    before = cli.snapshot()
    assert_error(cli("cancel", job), 4, "only pending")
    assert cli.snapshot() == before
    assert json.loads(cli.ok("retry", job, "--json"))["status"] == "pending"
    before = cli.snapshot()
    assert_error(cli.here("retry", job), 4, "only failed")
    assert cli.snapshot() == before


def test_unknown_id__exit_3_one_line(cli: Cli) -> None:
    """An id that does not exist: exit 3, one line naming it, nothing changed."""
    cli.add("present")
    before = cli.snapshot()
    missing = str(uuid.uuid4())
    assert_error(cli("show", missing), 3, missing)
    for argv in (["cancel"], ["retry"], ["wait", "--timeout", "5"]):
        assert_error(cli.here(*argv, missing), 3, missing)
    assert cli.snapshot() == before


# --- wait -------------------------------------------------------------------------------------


def test_wait__failed_job_exit_1_and_timeout_exit_75(cli: Cli) -> None:
    """`wait` on a failed job prints its error and exits 1; on a job nobody runs, --timeout gives 75."""
    [cancelled] = cli.add("to cancel", cancel=True)
    done = cli("wait", cancelled)
    assert done.returncode == 1 and "cancelled by request" in done.stdout
    [pending] = cli.add("nobody runs me")
    timed_out = cli.here("wait", pending, "--timeout", "0.6")
    assert timed_out.returncode == 75 and "timed out" in timed_out.stderr
    assert f"{pending[:8]}  pending" in timed_out.stderr  # the progress display


def test_wait_and_worker_burst__drain_the_queue(cli: Cli) -> None:
    """`worker --burst` runs every due job and exits 0; `wait` shows progress then the WAV path."""
    cli.add()
    ids = [cli.enqueue("house groove at 124 BPM", "--duration", "0.5"), *cli.add("techno", "ambient")]
    waiter = zygote.popen(cli.command("wait", *ids, "--timeout", "60"), cwd=cli.folder, env=cli.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    burst = cli("worker", "--burst", env=QUIET_DAEMON)
    assert burst.returncode == 0, burst.stdout + burst.stderr
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    paths = [line.split(None, 1)[1] for line in out.splitlines()]
    assert paths == [str(cli.folder / "outputs" / f"{i}.wav") for i in ids]
    assert all(Path(p).stat().st_size > 44 for p in paths)
    assert "completed" in err
    statuses = {row["status"] for row in json.loads(cli.here("list", "--json").stdout)}
    assert statuses == {"completed"}


def test_enqueue_wait__with_a_running_worker_then_sigterm(cli: Cli, tmp_path: Path) -> None:
    """`enqueue --wait` returns once a running daemon finishes it; a refused job makes it exit 1."""
    cli.add()
    config = tmp_path / "small.toml"
    config.write_text("[generator.options]\nmax_duration_seconds = 1.0\n")
    worker = cli.popen("--config", str(config), "worker", env=QUIET_DAEMON)
    try:
        done = cli("enqueue", "bossa nova at 130 BPM", "--duration", "0.5", "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("completed  ") and done.stdout.strip().endswith(".wav")
        refused = cli("enqueue", "too long for this daemon", "--duration", "2", "--wait", "--timeout", "60")
        assert refused.returncode == 1 and refused.stdout.startswith("failed  "), refused.stderr
    finally:
        worker.terminate()
        assert worker.wait(timeout=60) == 0


# --- prune ------------------------------------------------------------------------------------


def test_prune__ages_dry_run_and_files_only_inside_outputs(cli: Cli) -> None:
    """Prune keeps young rows, --dry-run deletes nothing, --delete-files never leaves outputs/."""
    old, linked, young_pending = cli.add("old", "linked", "pending")
    outputs = cli.folder / "outputs"
    outputs.mkdir()
    (outputs / f"{old}.wav").write_bytes(b"RIFF" + bytes(100))
    precious = cli.folder / "precious.wav"
    precious.write_bytes(b"keep me")
    (outputs / f"{linked}.wav").symlink_to(precious)  # resolves outside the outputs folder
    with session_scope(get_engine(cli.url)) as session:
        for job in (old, linked):
            complete_generation(session, job, generation_time=0.1, file_size_bytes=100)
    dispose_engines()
    assert "deleted 0 generation(s)" in cli.here("prune", "--older-than", "1h").stdout
    before = cli.snapshot()
    dry = json.loads(cli.here("prune", "--older-than", "0s", "--delete-files", "--dry-run", "--json").stdout)
    assert (dry["generations"], dry["files"]) == (2, 1) and cli.snapshot() == before
    assert (outputs / f"{old}.wav").exists()
    done = json.loads(cli.ok("prune", "--older-than", "0s", "--delete-files", "--json"))
    assert (done["generations"], done["files"], done["bytes"]) == (2, 1, 104)
    assert done["skipped_outside_outputs"] == [f"outputs/{linked}.wav"]
    assert not (outputs / f"{old}.wav").exists() and precious.read_bytes() == b"keep me"
    assert [row["id"] for row in json.loads(cli.here("list", "--json").stdout)] == [young_pending]
    assert_error(cli.here("prune", "--older-than", "a while"), 65, "older_than")
    assert_error(cli.here("prune", "--older-than", "1d", "--status", "pending"), 65, "status")


# --- db ---------------------------------------------------------------------------------------


def test_db__upgrade_current_downgrade(cli: Cli) -> None:
    """`db current` on no database is 69; upgrade creates it; downgrade steps back; list then refuses."""
    assert_error(cli("db", "current"), 69, "does not exist")
    assert not cli.db.exists()
    assert f"revision {head_revision()}" in cli.ok("db", "upgrade")
    assert json.loads(cli.ok("db", "current", "--json")) == {
        "current": head_revision(), "head": head_revision(), "up_to_date": True}
    assert "revision 006" in cli.ok("db", "downgrade")  # 007 drops only the file-path index: nothing to lose
    assert "revision 005" in cli.ok("db", "downgrade")  # 006 drops only the search index: nothing to lose
    assert_error(cli.here("db", "downgrade"), 2, "--yes")  # 005 drops tables and columns: asked first
    assert "revision 004" in cli.ok("db", "downgrade", "--yes")  # one step back from 005
    assert not json.loads(cli.here("db", "current", "--json").stdout)["up_to_date"]
    assert_error(cli.here("list"), 69, "db upgrade")
    assert cli.here("db", "upgrade").returncode == 0
    assert cli.here("list").stdout.startswith("ID")


def test_db_backup__consistent_copy_while_writing(cli: Cli, tmp_path: Path) -> None:
    """`db backup` copies a database that another process writes to into one file that checks out."""
    cli.add(*[f"prompt {i}" for i in range(5)])
    stop = threading.Event()

    def writer() -> None:
        conn = sqlite3.connect(cli.db, timeout=30)
        while not stop.is_set():
            with conn:
                conn.execute("UPDATE prompts SET used_count = used_count + 1")
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        target = tmp_path / "backup.db"
        assert str(target) in cli.ok("db", "backup", str(target))
    finally:
        stop.set()
        thread.join()
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT count(*) FROM generations").fetchone() == (5,)
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert not (tmp_path / "backup.db-wal").exists()
    before = target.read_bytes()
    assert_error(cli("db", "backup", str(target)), 73, "already exists")
    assert target.read_bytes() == before


def test_db_reset__refuses_without_yes_then_empties(cli: Cli) -> None:
    """`db reset` without --yes: exit 2, data kept; with --yes: empty and at head."""
    cli.add("to be reset")
    before = cli.snapshot()
    assert_error(cli("db", "reset"), 2, "--yes")
    assert cli.snapshot() == before
    assert "reset" in cli.ok("db", "reset", "--yes")
    assert cli.snapshot() == ([], [])
    assert json.loads(cli.here("db", "current", "--json").stdout)["up_to_date"]


# --- databases that cannot be used ------------------------------------------------------------


def test_database__missing_file_exit_69_and_not_created(cli: Cli) -> None:
    """Reading commands on a database file that does not exist: exit 69, and no file appears."""
    assert_error(cli("list"), 69, "no database at", str(cli.db))
    for argv in (["stats"], ["show", str(uuid.uuid4())], ["prune", "--older-than", "1d"], ["wait", "x"]):
        assert_error(cli.here(*argv), 69, "no database at")
    assert not cli.db.exists()


def test_database__unreachable_postgres_exit_69(cli: Cli, closed_port: int) -> None:
    """A PostgreSQL URL on a port nobody listens on: exit 69 with one line, for reads and writes."""
    env = {"DATABASE_URL": f"postgresql+psycopg://dgxqueue@127.0.0.1:{closed_port}/dgxqueue"}
    assert_error(cli("list", env=env), 69, "database unavailable")
    assert_error(cli("enqueue", "x", env=env), 69, "database unavailable")


def test_database__sqlite_where_no_file_can_be_made_exit_69(cli: Cli) -> None:
    """An SQLite path under a regular file: exit 69 with one line, nothing created."""
    blocker = cli.folder / "not-a-folder"
    blocker.write_text("")
    env = {"DATABASE_URL": f"sqlite:///{blocker}/db/generations.db"}
    assert_error(cli("enqueue", "x", env=env), 69, "no database at")
    assert_error(cli.here("db", "upgrade", env=env), 69)
    assert blocker.read_text() == ""


# --- configuration ----------------------------------------------------------------------------


def test_config__bad_file_exit_78_before_touching_the_database(cli: Cli, tmp_path: Path) -> None:
    """A bad config: exit 78 naming key and value, for any command, and the database is untouched."""
    cli.add("kept")
    before = cli.snapshot()
    bad = tmp_path / "bad.toml"
    bad.write_text('[logging]\nlevel = "loud"\n')
    assert_error(cli("--config", str(bad), "enqueue", "x"), 78, "logging.level", "loud")
    assert_error(cli("worker", "--batch-size", "lots"), 78, "worker.batch_size")
    assert_error(cli.here("enqueue", "x", env={"DGXQUEUE_CONFIG": str(bad)}), 78, "logging.level")
    assert_error(cli.here("worker", "--log-level", "loud"), 78, "logging.level")
    assert_error(cli.here("--config", str(tmp_path / "missing.toml"), "list"), 78, "missing.toml")
    assert cli.snapshot() == before


def test_config_show__effective_values_with_password_hidden(cli: Cli, tmp_path: Path) -> None:
    """`config show` reflects file, environment and flags; the database password never appears."""
    config = tmp_path / "c.toml"
    config.write_text("[worker]\nbatch_size = 4\n")
    env = {"DATABASE_URL": "postgresql+psycopg://dgxqueue:s3cret@db.internal/dgxqueue",
           "DGXQUEUE_METRICS_PORT": "9470"}
    shown = json.loads(cli.ok("--config", str(config), "config", "show", "--json", env=env))
    assert shown["worker"]["batch_size"] == 4 and shown["metrics"]["port"] == 9470
    assert "s3cret" not in json.dumps(shown) and "***" in shown["database"]["url"]
    text = cli.here("--config", str(config), "config", "show", env=env).stdout
    assert "batch_size = 4" in text and "s3cret" not in text


def test_config_check__unknown_generator_exit_78(cli: Cli) -> None:
    """`config check` also resolves the generator name and lists the registered ones."""
    assert_error(cli("config", "check", env={"DGXQUEUE_GENERATOR_NAME": "nosuch"}), 78, "nosuch", "synth")


def test_config_check__a_metrics_address_not_of_this_machine_exit_78(cli: Cli) -> None:
    """`config check` refuses the metrics address the worker would refuse (it passed, then every
    worker exited 78); with metrics off the address is not checked."""
    for address in ("999.1.1.1", "192.0.2.1"):  # not an address at all; TEST-NET-1, on no interface
        assert_error(cli("config", "check", env={"DGXQUEUE_METRICS_ADDRESS": address,
                                                 "DGXQUEUE_METRICS_ENABLED": "true"}),
                     78, f"metrics.address='{address}'", "an address of this machine")
    assert cli("config", "check", env={"DGXQUEUE_METRICS_ADDRESS": "192.0.2.1",
                                       "DGXQUEUE_METRICS_ENABLED": "false"}).returncode == 0


def test_config_check__a_metrics_host_name_the_worker_cannot_bind_exit_78(cli: Cli, tmp_path: Path) -> None:
    """A host name whose only address of this machine is IPv6: the worker binds an address
    without ':' as IPv4, finds none and exits 78; `config check` resolved it in any family, bound
    the IPv6 one and said 'config ok'. The machine is a user, mount and network namespace of
    its own: loopback plus the address fd00::2, and an /etc/hosts naming it."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\nfd00::2 metrics-v6\n")
    cli.ok("db", "upgrade")
    env = {**cli.env, "DGXQUEUE_METRICS_ENABLED": "true", "DGXQUEUE_METRICS_ADDRESS": "metrics-v6",
           "DGXQUEUE_METRICS_PORT": "0"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        script = ('ip link set lo up && ip -6 addr add fd00::2/128 dev lo nodad'
                  f' && mount --bind "{hosts}" /etc/hosts || exit 99; exec "$@"')
        return subprocess.run(["unshare", "-rmn", "sh", "-c", script, "sh", *cli.command(*args)], cwd=cli.folder,
                              env=env, capture_output=True, text=True, timeout=60, check=False)

    probe = run("--version")
    assert probe.returncode == 0, f"the namespace could not be set up: {probe.stderr.strip()}"
    assert run("worker", "--burst").returncode == 78
    assert_error(run("config", "check"), 78, "metrics.address='metrics-v6'", "an address of this machine")


# --- the main job -----------------------------------------------------------------------------


def test_demo__from_a_fresh_folder_writes_the_wavs(tmp_path: Path) -> None:
    """`dgxqueue demo --prompts 2 --duration 1` in an empty folder: exit 0 and two WAV files there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGXQUEUE_") and k != "DATABASE_URL"}
    done = zygote.run([sys.executable, "-m", "dgxqueue", "demo", "--prompts", "2", "--duration", "1"],
                      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    wavs = re.findall(r"(/\S+\.wav)", done.stdout)
    assert len(wavs) == 2
    for wav in wavs:
        path = Path(wav)
        assert path.parent == tmp_path / "outputs" and path.read_bytes()[:4] == b"RIFF"
    assert (tmp_path / "data" / "generations.db").exists()
    assert "daemon ready" in done.stderr and "stopping the daemon" in done.stderr


def test_demo__its_daemon_stops_when_the_demo_is_killed(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) to `dgxqueue demo` cannot run its clean-up: its daemon, a
    worker without --burst in a session of its own, used to run on for ever in the background."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGXQUEUE_") and k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(REPO)  # this checkout's dgxqueue, from the temporary folder too
    stderr = tmp_path / "demo.err"
    with stderr.open("wb") as err:
        demo = zygote.popen([sys.executable, "-m", "dgxqueue", "demo", "--prompts", "1", "--duration", "1"],
                            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=err)
    try:
        started = wait_until(lambda: re.findall(r"daemon started \(pid (\d+)", stderr.read_text()), 60,
                             "the demo to start its daemon", alive=demo)
        daemon_pid = int(started[0])
        wait_until(lambda: "daemon ready" in stderr.read_text(), 60, "the daemon to be ready", alive=demo)
    finally:
        demo.kill()
        demo.wait()

    def gone() -> bool:
        try:
            os.kill(daemon_pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):  # reaped by init, or by us if we adopted it
            os.waitpid(daemon_pid, os.WNOHANG)
        return False

    try:
        wait_until(gone, 60, f"the demo's daemon (pid {daemon_pid}) to exit after the demo was killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon_pid, 9)


def test_parser__worker_flags_become_overrides() -> None:
    """The worker's flags map onto their config keys."""
    from dgxqueue.cli.admin import worker_overrides

    args = build_parser().parse_args(["worker", "--generator", "musicgen", "--models", "a, b",
                                      "--batch-size", "8", "--metrics-port", "9470", "--log-level", "debug"])
    assert worker_overrides(args) == {
        "generator": {"name": "musicgen", "models": ["a", "b"]}, "worker": {"batch_size": 8},
        "metrics": {"port": 9470}, "logging": {"level": "debug"},
    }



def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick_start, re.S)]


def test_readme__the_two_setup_commands_are_the_tested_ones() -> None:
    """The README's quick start is the demo (tested above) and .ci/run; nothing else to type."""
    assert _readme_commands() == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/dgxqueue demo",
        "bash .ci/run",
    ]
    assert (REPO / ".ci" / "run").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("RUN_FRESH_INSTALL") or os.environ.get("CI")),
                    reason="installs from the package index (network): runs under CI, or set RUN_FRESH_INSTALL=1")
def test_readme__main_command_in_a_clean_copy(tmp_path: Path) -> None:
    """The README's first command, verbatim, in a clean copy of the repository, exits 0 with WAVs."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path / "dgxqueue"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((REPO / name).read_bytes())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DGXQUEUE_", "VIRTUAL_ENV")) and k != "DATABASE_URL"}
    done = subprocess.run(["bash", "-c", _readme_commands()[0]], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((copy / "outputs").glob("*.wav"))) == 4
