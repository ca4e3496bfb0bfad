"""An attacker's review of start-up and the admin commands, each a real ``python -m dgxqueue``
(or ``main()`` where a subprocess adds nothing): secrets in URLs, foreign databases, migrations
racing, downgrades that drop data, a demo that cannot write its files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from dgxqueue.storage.database import HEAD_REVISION
from tests.acceptance.test_cli import REPO, Cli, assert_error
from tests.support import zygote
from tests.support.db import PG_ADMIN_URL, postgres_database_url
from tests.support.processes import wait_until

# --- passwords never shown --------------------------------------------------------------------


@pytest.mark.parametrize("command", [("config", "show"), ("config", "check"), ("list",)])
def test_database_url__unencoded_at_in_password_is_config_error_and_hidden(cli: Cli, command: tuple[str, ...]) -> None:
    """A password with a bare '@': exit 78 asking for %40; no part of the password is printed
    (it used to be shown as the host: 'u:***@ss-cret@host')."""
    url = "postgresql://dgx:pa@ss-cret@127.0.0.1:5432/dgxqueue"
    done = cli.here(*command, env={"DATABASE_URL": url})
    assert_error(done, 78, "database.url", "%40")
    assert "ss-cret" not in done.stdout + done.stderr


def _with_query_password(url: str) -> str:
    return sa.engine.make_url(url).update_query_dict({"password": "qu3ry-sekret"}).render_as_string(
        hide_password=False)


@pytest.mark.parametrize("command", [("config", "show"), ("config", "check"), ("list",)])
def test_database_url__password_in_query_hidden(cli: Cli, pg_db_url: str, command: tuple[str, ...]) -> None:
    """libpq's ``?password=`` is hidden like the user-part password, in settings and in errors."""
    url = _with_query_password(pg_db_url)  # trust auth: libpq sends it, the server ignores it
    done = cli.here(*command, env={"DATABASE_URL": url})
    assert "qu3ry-sekret" not in done.stdout + done.stderr
    assert "password=***" in done.stdout + done.stderr


# --- a mistyped URL that names something else ----------------------------------------------------


@pytest.mark.parametrize("command", [("list",), ("enqueue", "a prompt"), ("worker", "--burst")])
def test_open_queue__foreign_sqlite_database_left_in_its_journal_mode(cli: Cli, command: tuple[str, ...]) -> None:
    """Another application's SQLite file: exit 69, and the file is not switched to WAL (which
    persists in the file, and which the engine's first connection used to do)."""
    with sqlite3.connect(cli.db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    done = cli.here(*command, env={"DGXQUEUE_METRICS_ENABLED": "false"})
    assert_error(done, 69, str(cli.db), "no dgxqueue tables")
    with sqlite3.connect(cli.db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not Path(f"{cli.db}-wal").exists()


def test_open_queue__folder_and_non_database_named_in_the_error(cli: Cli) -> None:
    """A path that is a folder, or a file that is not a database: exit 69 naming the path (the
    driver's 'unable to open database file' named nothing)."""
    cli.db.mkdir()
    assert_error(cli.here("list"), 69, str(cli.db), "is a folder")
    cli.db.rmdir()
    cli.db.write_text("not a database\n")
    assert_error(cli.here("list"), 69, str(cli.db), "file is not a database")
    assert cli.db.read_text() == "not a database\n"


# --- downgrades -------------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", ["base+1", "001+1", "-0", "heads", "1"])
def test_db_downgrade__forms_not_judged_for_losses_refused(cli: Cli, revision: str) -> None:
    """alembic's relative forms (base+1 undoes 002, dropping its columns) and other odd ones:
    exit 2 listing the accepted forms; the schema and its rows stay."""
    cli.ok("db", "upgrade")
    job = cli.enqueue()
    done = cli.here("db", "downgrade", "--", revision)
    assert_error(done, 2, "REV must be", "base", "-N")
    assert cli.ok("db", "current").startswith(HEAD_REVISION)
    assert job in cli.ok("list")


# --- migrations racing ------------------------------------------------------------------------------


def test_db_upgrade__a_sql_ascii_postgres_database_is_refused_naming_its_encoding(cli: Cli) -> None:
    """A PostgreSQL database encoded SQL_ASCII: exit 69 naming the encoding and the fix, nothing
    created (it was exit 70, 'internal error: TypeError', from SQLAlchemy's first connect)."""
    with postgres_database_url(sql_ascii=True) as url:
        done = cli("db", "upgrade", env={"DATABASE_URL": url})
        assert_error(done, 69, "SQL_ASCII", "UTF8")
        check = sa.create_engine(url, connect_args={"client_encoding": "utf8"}, poolclass=sa.pool.NullPool)
        with check.connect() as conn:
            tables = conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar_one()
        check.dispose()
        assert tables == 0


def test_db_upgrade__explicit_revision_concurrently_on_postgres(cli: Cli, pg_db_url: str) -> None:
    """Four ``db upgrade 002`` released at once on an empty PostgreSQL schema: all exit 0 at 002
    (without the migration lock, the losers failed with 70 on a duplicate CREATE TABLE)."""
    engine = sa.create_engine(pg_db_url)
    with engine.begin() as conn:  # alembic's own table, empty: every migrator reads it first
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
    env = {**cli.env, "DATABASE_URL": pg_db_url}
    with engine.connect() as gate:
        gate.execute(sa.text("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE"))
        runs = [zygote.popen(cli.command("db", "upgrade", "002"), cwd=cli.folder, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
        pids = ",".join(str(run.pid) for run in runs)

        def all_waiting() -> bool:  # on the gate (or, with the fix, on the migration lock)
            with engine.connect() as conn:
                waiting = conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND pid <> pg_backend_pid() AND datname = current_database() AND query ILIKE ANY "
                    "(ARRAY['%alembic_version%', '%pg_advisory_lock%'])")).scalar_one()
            return bool(waiting >= 4) or any(run.poll() is not None for run in runs)

        wait_until(all_waiting, timeout=90, what=f"4 migrators ({pids}) waiting", interval=0.2)
        gate.rollback()  # releases them together
    results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    engine.dispose()
    assert [code for code, _out, _err in results] == [0] * 4, results
    assert cli.ok("db", "current", env={"DATABASE_URL": pg_db_url}).startswith("002")


# --- demo ---------------------------------------------------------------------------------------


def test_demo__outputs_that_cannot_take_files_refused_before_starting(cli: Cli) -> None:
    """Outputs the daemon's check refuses (here: less free space than outputs.min_free_mb, 1 TiB): exit 73
    at once naming the problem, nothing queued (the demo used to wait out its timeout while the
    daemon, paused, claimed nothing)."""
    done = cli("demo", "--prompts", "1", "--duration", "1", "--timeout", "20",
               env={"DGXQUEUE_OUTPUTS_MIN_FREE_MB": "1048576"}, timeout=60)
    assert_error(done, 73, "outputs.min_free_mb", "outputs.dir")
    assert not cli.db.exists()


def test_demo__database_folder_that_cannot_be_made_named(cli: Cli) -> None:
    """A database whose folder cannot be created (a file is in the way, as a read-only working
    folder would be): exit 69 naming the database, not a bare '[Errno 20] Not a directory' (74)."""
    (cli.folder / "blocker").write_text("")
    db = cli.folder / "blocker" / "data" / "generations.db"
    done = cli.here("demo", "--prompts", "1", env={"DATABASE_URL": f"sqlite:///{db}"})
    assert_error(done, 69, str(db), "cannot be created")


# --- config check -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["/nonexistent/musicgen-small", "./models/musicgen-smal"])
def test_config_check__musicgen_model_folder_missing_is_78(cli: Cli, model: str) -> None:
    """MusicGen with a local model folder that does not exist: config check says so (78) as the
    worker would at load, instead of 'config ok'."""
    config = cli.folder / "musicgen.toml"
    config.write_text(f'[jobs]\nmax_duration_seconds = 30.0\n\n[generator]\nname = "musicgen"\n\n'
                      f'[generator.options]\nmodel = "{model}"\n')
    assert_error(cli.here("--config", str(config), "config", "check"), 78, "generator.options.model", model)
    if not model.startswith("/"):  # a folder there: the check passes (loading it is the worker's)
        (cli.folder / model).mkdir(parents=True)
        assert cli.here("--config", str(config), "config", "check").returncode == 0


# --- read-only media --------------------------------------------------------------------------------


@pytest.fixture
def read_only_backup(cli: Cli) -> Iterator[Path]:
    """A ``db backup`` of a database with one job, seen through a read-only bind mount (root)."""
    cli.ok("db", "upgrade")
    cli.enqueue("kept in the backup")
    folder, view = cli.folder / "backups", cli.folder / "read-only"
    folder.mkdir()
    view.mkdir()
    cli.ok("db", "backup", str(folder / "b.db"))
    mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode:
        if mounted:
            subprocess.run(["umount", str(view)], check=False)
        if os.environ.get("CI"):
            pytest.fail("cannot make a read-only bind mount; CI runs as root")
        pytest.skip("needs root for a read-only bind mount")
    try:
        yield view / "b.db"
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_sqlite__backup_on_read_only_media_can_be_read(cli: Cli, read_only_backup: Path) -> None:
    """A backup (not in WAL mode) on read-only media: list shows its jobs (the engine's switch to
    WAL on connect failed with 'attempt to write a readonly database'); enqueue still refuses (69)."""
    env = {"DATABASE_URL": f"sqlite:///{read_only_backup}"}
    assert "kept in the backup" in cli.ok("list", env=env)
    assert_error(cli("enqueue", "a new one", env=env), 69, "readonly")


# --- Ctrl-C -----------------------------------------------------------------------------------


def test_main__ctrl_c_while_importing_is_one_line_not_a_traceback(cli: Cli) -> None:
    """SIGINT in the first tenths of a second (the command's modules importing): 'dgxqueue:
    interrupted' and 130, never Python's traceback."""
    cli.ok("db", "upgrade")
    for delay in (0.1, 0.2, 0.3):
        run = subprocess.Popen(cli.command("list"), cwd=cli.folder, env=cli.env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        threading.Event().wait(delay)  # a point during start-up, not a synchronisation
        run.send_signal(signal.SIGINT)
        _out, err = run.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        if run.returncode != 0:  # 0: it had already finished
            assert run.returncode in (130, -signal.SIGINT), (delay, run.returncode, err)


def test_main__ctrl_c_inside_a_callback_python_runs_itself_is_still_one_line() -> None:
    """SIGINT that lands in a callback Python runs for itself (importlib's module-lock weakref during
    the imports; here an object's __del__) is no 'Exception ignored ... Traceback' lost on stderr: it
    interrupts the command, which says 'dgxqueue: interrupted' and exits 130."""
    code = (
        "import sys, threading, dgxqueue.cli as cli\n"
        "class Ctrl_C:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt\n"
        "def command(argv):\n"
        "    Ctrl_C()\n"
        "    threading.Event().wait(600)  # past the run's 60 s timeout: only a prompt interrupt passes\n"
        "    return 0\n"
        "cli._main = command\n"
        "sys.exit(cli.main([]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (130, "dgxqueue: interrupted\n")


def test_main__ctrl_c_inside_code_python_execs_exits_130_not_by_the_signal(cli: Cli) -> None:
    """SIGINT that lands in code run by ``exec`` of a string (SQLAlchemy builds its statement
    visitors so, on first use: the flaky enqueue test's traceback ended there) makes 'dgxqueue:
    interrupted' and 130, not a death by SIGINT after it: CPython marks an exact KeyboardInterrupt
    leaving such code as unhandled, caught or not, and ``python -m`` then re-raised SIGINT at exit."""
    cli.ok("db", "upgrade")
    (cli.folder / "ctrl_c_in_exec.py").write_text(
        "import signal\n"
        "import sqlalchemy as sa\n"
        "from dgxqueue.cli import run\n"
        "def ctrl_c(*_):  # a real SIGINT, raised inside exec'd code\n"
        "    exec('signal.raise_signal(signal.SIGINT)', {'signal': signal})\n"
        "sa.event.listen(sa.engine.Engine, 'before_cursor_execute', ctrl_c, once=True)\n"
        "run()\n")
    done = subprocess.run([sys.executable, "-m", "ctrl_c_in_exec", "list"], cwd=cli.folder,
                          env={**cli.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stderr, done.stdout) == (130, "dgxqueue: interrupted\n", "")


def test_demo__config_with_another_generators_options_refused_before_queueing(cli: Cli) -> None:
    """A production config (MusicGen and its options): exit 78 before anything is queued (its
    synth daemon used to exit 78 on those options, leaving a stray job and exit 75)."""
    config = cli.folder / "production.toml"
    config.write_text('[jobs]\nmax_duration_seconds = 30.0\n\n[generator]\nname = "musicgen"\n\n'
                      '[generator.options]\nmodel = "facebook/musicgen-small"\n')
    cli.ok("db", "upgrade")
    done = cli("--config", str(config), "demo", "--prompts", "1", "--duration", "1", "--timeout", "60")
    assert_error(done, 78, "synth", "generator.options", "--config")
    assert cli.ok("list").splitlines()[1:] == []


def test_db_upgrade__another_applications_generations_table_refused_untouched(cli: Cli) -> None:
    """A SQLite file whose 'generations' table is another application's: exit 69 naming the missing
    columns, and nothing written (it used to be stamped 001, fail with 70 on 'no such column'
    and leave an alembic_version table behind)."""
    with sqlite3.connect(cli.db) as conn:
        conn.execute("CREATE TABLE generations (id INTEGER PRIMARY KEY, title TEXT, score REAL)")
        conn.execute("INSERT INTO generations (title, score) VALUES ('theirs', 1.5)")
    done = cli.here("db", "upgrade")
    assert_error(done, 69, str(cli.db), "not dgxqueue's", "model_name")
    with sqlite3.connect(cli.db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"generations"}
        assert conn.execute("SELECT title, score FROM generations").fetchall() == [("theirs", 1.5)]


def test_db_backup__postgres_password_never_on_pg_dumps_command_line(cli: Cli, pg_db_url: str) -> None:
    """The password of ``?password=`` goes to pg_dump through PGPASSWORD, as the user-part one
    does, never on its command line (readable by every user with ps). A wrapper on PATH records
    the arguments and runs the real pg_dump."""
    real = shutil.which("pg_dump")
    assert real is not None, "the PostgreSQL client tools are needed"
    bin_dir = cli.folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "pg_dump"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{cli.folder}/argv"\n'
                       f'printf "%s" "$PGPASSWORD" > "{cli.folder}/pgpassword"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    url = _with_query_password(pg_db_url)  # trust auth: the server ignores it
    env = {"DATABASE_URL": url, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cli.ok("db", "upgrade", env=env)
    cli.ok("db", "backup", str(cli.folder / "b.dump"), env=env)
    assert "qu3ry-sekret" not in (cli.folder / "argv").read_text()
    assert (cli.folder / "pgpassword").read_text() == "qu3ry-sekret"


def test_db_backup__postgres_dumps_non_latin_text_whatever_pgclientencoding_says(cli: Cli, pg_db_url: str) -> None:
    """PGCLIENTENCODING=LATIN1 in the environment (the engine reads in UTF-8 whatever it says): db
    backup still dumps a prompt that is not Latin text, in UTF-8. pg_dump took the variable's
    encoding and failed on the row ('has no equivalent in encoding LATIN1'), so no backup."""
    env = {"DATABASE_URL": pg_db_url}
    cli.ok("db", "upgrade", env=env)
    cli.ok("enqueue", "音楽 ✓ beat", env=env)
    cli.ok("db", "backup", str(cli.folder / "b.dump"), env={**env, "PGCLIENTENCODING": "LATIN1"})
    pg_restore = shutil.which("pg_restore")
    assert pg_restore is not None, "the PostgreSQL client tools are needed"
    data = subprocess.run([pg_restore, "--data-only", "--file=-", str(cli.folder / "b.dump")],
                          capture_output=True, check=True).stdout
    assert "音楽 ✓ beat".encode() in data


def test_db_backup__postgres_a_failed_dump_says_why_in_words(cli: Cli, pg_db_url: str) -> None:
    """pg_dump refused (a role without rights on the tables): one line naming its error,
    'permission denied'. It showed pg_dump's last line as a Python list, the statement it ran
    ("['pg_dump: detail: Query was: LOCK TABLE ...']"), never the reason."""
    cli.ok("db", "upgrade", env={"DATABASE_URL": pg_db_url})
    role = f"dgxq_t_norights_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    try:
        url = sa.make_url(pg_db_url).set(username=role).render_as_string(hide_password=False)
        done = cli("db", "backup", str(cli.folder / "b.dump"), env={"DATABASE_URL": url})
        assert_error(done, 69, "pg_dump failed", "permission denied")
        assert "['" not in done.stderr and "Query was" not in done.stderr
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_open_queue__in_memory_sqlite_says_to_use_a_file(cli: Cli, url: str) -> None:
    """An in-memory SQLite URL for the worker or a reading command: exit 69 saying to use a file,
    not 'db upgrade creates them there' (each process gets its own empty database)."""
    for command in (("list",), ("worker", "--burst")):
        done = cli.here(*command, env={"DATABASE_URL": url, "DGXQUEUE_METRICS_ENABLED": "false"})
        assert_error(done, 69, "in-memory", "SQLite file")
        assert "db upgrade" not in done.stderr


def test_db_current__foreign_sqlite_file_read_not_changed(cli: Cli) -> None:
    """db current on another application's SQLite file: 'none', and the file is not switched to
    WAL; on a folder: exit 69 naming it (the driver's message named nothing)."""
    with sqlite3.connect(cli.db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    assert cli.here("db", "current").stdout.startswith("none")
    with sqlite3.connect(cli.db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    cli.db.unlink()
    cli.db.mkdir()
    assert_error(cli.here("db", "current"), 69, str(cli.db), "is a folder")


@pytest.mark.parametrize("driver", ["postgresql+psycopg2", "postgresql+asyncpg", "sqlite+pysqlcipher"])
@pytest.mark.parametrize("command", [("config", "check"), ("list",)])
def test_database_url__unsupported_driver_is_config_error(cli: Cli, driver: str, command: tuple[str, ...]) -> None:
    """A driver dgxqueue does not use: exit 78 naming the supported ones ('config ok' and an
    internal error, ModuleNotFoundError, before), the password hidden."""
    done = cli.here(*command, env={"DATABASE_URL": f"{driver}://dgx:sekret-pw@127.0.0.1/dgxqueue"})
    assert_error(done, 78, "database.url", "postgresql+psycopg://")
    assert "sekret-pw" not in done.stdout + done.stderr


# --- config files -------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "words"), [
    (None, ["an existing TOML file"]),  # a folder
    (b"\xe4\xff\x00garbage", ["UTF-8"]),
    (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", ["nested too deeply"]),
])
def test_config_file__unreadable_is_config_error(cli: Cli, content: bytes | None, words: list[str]) -> None:
    """A --config that is a folder, not UTF-8, or nested past Python's stack: exit 78 naming
    --config (74 or an internal error, 70, before)."""
    config = cli.folder / "config.toml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    assert_error(cli.here("--config", str(config), "config", "check"), 78, "--config", *words)


def test_config_file__byte_order_mark_accepted(cli: Cli) -> None:
    """A config file saved with a UTF-8 byte order mark (Windows editors): read as written."""
    config = cli.folder / "config.toml"
    config.write_bytes(b"\xef\xbb\xbf[worker]\nbatch_size = 4\n")
    done = cli.here("--config", str(config), "config", "show", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["worker"]["batch_size"] == 4


def test_db_reset_and_downgrade__refusal_names_the_database(cli: Cli) -> None:
    """Without --yes, db reset and a dropping db downgrade say which database they would empty:
    a mistyped DATABASE_URL is the first hour's trap, and --yes is typed next."""
    cli.ok("db", "upgrade")
    assert_error(cli.here("db", "reset"), 2, str(cli.db), "--yes")
    assert_error(cli.here("db", "downgrade", "base"), 2, str(cli.db), "--yes")


@pytest.mark.parametrize("url", ["postgresql://dgx:pa://sekret-pw@127.0.0.1:x/dgxqueue",
                                 "dgx:sekret-pw@127.0.0.1/dgxqueue"])
def test_database_url__unparsable_with_password_hidden(cli: Cli, url: str) -> None:
    """A URL that does not parse (a port that is no number, no scheme) is refused (78) with its
    password hidden, also one that holds '://' (the scheme was split off at the last one)."""
    done = cli.here("config", "show", env={"DATABASE_URL": url})
    assert_error(done, 78, "database.url", "***")
    assert "sekret-pw" not in done.stderr


def test_demo__timeout_says_the_jobs_stay_queued(cli: Cli) -> None:
    """demo --timeout 0: exit 75 saying the jobs stay queued for a worker, not wait's "they keep
    going" (the demo stops the only daemon it started)."""
    done = cli("demo", "--prompts", "1", "--duration", "1", "--timeout", "0", timeout=120)
    assert done.returncode == 75, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "stay queued" in last and "dgxqueue worker" in last and "keep going" not in last, last


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_main__a_sigterm_lost_in_a_callback_comes_back_as_itself(signum: signal.Signals) -> None:
    """A SIGTERM or SIGHUP that ``enqueue --wait`` or the demo turned into an interrupt, landing in
    a callback Python runs itself, is delivered to the main thread again as that signal, not as
    Ctrl-C's SIGINT: the command then exits 143 or 129, not 130 (the enqueue test caught 130)."""
    import types

    from dgxqueue.cli import _interrupt_again
    from dgxqueue.cli.stopsignals import Signalled

    seen: list[int] = []
    arrived = threading.Event()

    def handler(number: int, _frame: object) -> None:
        seen.append(number)
        arrived.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signum, signal.SIGINT)}
    try:
        _interrupt_again(lambda _: None, types.SimpleNamespace(exc_value=Signalled(signum)))
        assert arrived.wait(30), "no signal came back"
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    assert seen == [signum]
