"""The operator's subcommands: worker, db (upgrade, downgrade, current, backup, reset; copy is in
dgxqueue.cli.dbmove, check and vacuum in dgxqueue.cli.dbmaint), config."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from dgxqueue.cli.common import (
    EX_CANTCREAT,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Context,
    one_line,
    parse_span,
    print_json,
)
from dgxqueue.cli.dbmaint import add_db_parsers
from dgxqueue.cli.dbmove import add_copy_parser
from dgxqueue.config import Settings, settings_as_dict, toml_value
from dgxqueue.errors import ConfigError
from dgxqueue.storage import ensure_schema, get_engine
from dgxqueue.storage.database import (
    HEAD_REVISION,
    check_driver,
    describe_url,
    display_url,
    downgrade,
    downgrade_losses,
    head_revision,
    known_revisions,
    peek_sqlite,
    sqlite_path,
    stored_revision,
    upgrade,
)
from dgxqueue.storage.dberrors import database_unavailable
from dgxqueue.storage.engines import profile_of
from dgxqueue.storage.models import Base

# --- worker -----------------------------------------------------------------------------------


def worker_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The worker's flags as config overrides (a bad value is a config error, exit 78)."""
    overrides: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        overrides.setdefault(section, {})[key] = value

    def integer(key: str, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(key, text, "an integer") from None

    if args.generator is not None:
        put("generator", "name", args.generator)
    if args.models is not None:
        put("generator", "models", [m.strip() for m in args.models.split(",") if m.strip()])
    if args.batch_size is not None:
        put("worker", "batch_size", integer("worker.batch_size", args.batch_size))
    if args.metrics_port is not None:
        put("metrics", "port", integer("metrics.port", args.metrics_port))
    if args.log_level is not None:
        put("logging", "level", args.log_level)
    return overrides


def cmd_worker(ctx: Context, args: argparse.Namespace) -> int:
    from dgxqueue.cli.worker import run_worker  # here, so the other commands start without it

    code = run_worker(ctx.settings, burst=args.burst, worker_id=args.worker_id)
    if code != EXIT_OK:  # a machine fault or a stuck backend call, whose thread may never return
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the outcomes are written: skip interpreter teardown, which could hang on it
    return code


# --- db ---------------------------------------------------------------------------------------


def _revision_text(engine: sa.Engine) -> str | None:
    # By plain SQL: alembic's reader would import all of alembic, for a line of output.
    with engine.connect() as conn:
        return stored_revision(conn)


def cmd_db_upgrade(ctx: Context, args: argparse.Namespace) -> int:
    engine = _raw_engine(ctx.settings)
    # --wait: at boot the database may come up after this unit (another host, a slow start);
    # the workers wait for the migration, so the migration waits for the database.
    deadline = time.monotonic() + (parse_span("wait", args.wait).total_seconds() if args.wait else 0.0)
    pause = 0.5
    while True:
        try:
            if args.revision in (None, "head"):
                ensure_schema(engine)  # takes the migration lock, adopts a pre-alembic database
            else:
                upgrade(engine, args.revision)
            break
        except OSError as exc:  # the SQLite folder or its lock file cannot be created
            raise CliError(f"database {describe_url(ctx.settings.database.url)} cannot be created: {exc}",
                           EX_UNAVAILABLE) from None
        except sa.exc.DBAPIError as exc:
            left = deadline - time.monotonic()
            if not database_unavailable(exc) or left < pause:
                raise
            print(f"dgxqueue: database unavailable ({one_line(str(exc.orig))}); trying again for {left:.0f} s",
                  file=sys.stderr, flush=True)
            threading.Event().wait(pause)  # a retry's pause: nothing to wake us sooner
            pause = min(2 * pause, 5.0)
    print(f"database at revision {_revision_text(engine)} (head {HEAD_REVISION})")
    return EXIT_OK


def cmd_db_downgrade(ctx: Context, args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    _must_exist(ctx.settings)
    # Only the forms whose losses are judged below: alembic also takes relative ones such as
    # base+1 or 001+1, which would undo a migration that drops data without asking for --yes.
    known = known_revisions()
    rev = args.revision
    if not (rev == "base" or rev in known or (rev.startswith("-") and rev[1:].isdigit() and int(rev[1:]) > 0)):
        raise CliError(f"db downgrade {rev}: REV must be a revision id ({', '.join(sorted(known))}), "
                       "base, or -N for N steps back", EXIT_USAGE)
    engine = _raw_engine(ctx.settings)
    losses = downgrade_losses(engine, args.revision)
    if losses and not args.yes:
        raise CliError(
            f"db downgrade {args.revision} undoes migration {', '.join(losses)} of the database at "
            f"{describe_url(ctx.settings.database.url)}, dropping tables or columns and the data in them: "
            "back up first (dgxqueue db backup PATH), then add --yes to confirm",
            EXIT_USAGE)
    try:
        downgrade(engine, args.revision)
    except CommandError as exc:  # an unknown revision, or one above the current
        raise CliError(f"db downgrade {args.revision}: {one_line(str(exc))} "
                       "(REV: an id such as 002, base, or -N steps back)", EXIT_USAGE) from None
    print(f"database at revision {_revision_text(engine) or 'none (empty)'}")
    return EXIT_OK


def _must_exist(settings: Settings) -> None:
    path = sqlite_path(settings.database.url)
    if path is not None and not path.exists():
        raise CliError(f"database file {path.absolute()} does not exist", EX_UNAVAILABLE)


def _raw_engine(settings: Settings) -> sa.Engine:
    """The engine without a schema check (migration commands work on any revision)."""
    try:
        return get_engine(settings.database.url, settings.database)
    except OSError as exc:
        raise CliError(f"database {describe_url(settings.database.url)} cannot be opened: {exc}",
                       EX_UNAVAILABLE) from None


def cmd_db_current(ctx: Context, args: argparse.Namespace) -> int:
    _must_exist(ctx.settings)
    path = sqlite_path(ctx.settings.database.url)
    if path is not None:  # read without the engine, which would switch another application's file to WAL
        current = peek_sqlite(path, describe_url(ctx.settings.database.url), ctx.settings.database)[0]
    else:
        current = _revision_text(_raw_engine(ctx.settings))
    head = HEAD_REVISION
    if args.json:
        print_json({"current": current, "head": head, "up_to_date": current == head})
    else:
        print(f"{current or 'none'} (head {head}{', up to date' if current == head else ''})")
    return EXIT_OK


def _backup_sqlite(source: Path, target: Path, timeout_ms: int) -> int | None:
    """Copy with SQLite's online backup API: a consistent snapshot even while daemons write."""
    src = sqlite3.connect(source, timeout=timeout_ms / 1000)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise CliError(f"the backup at {target} failed its check: {check}", EX_SOFTWARE)
            has_table = dst.execute("SELECT 1 FROM sqlite_master WHERE name = 'generations'").fetchone()
            rows: int | None = dst.execute("SELECT count(*) FROM generations").fetchone()[0] if has_table else None
            return rows
        finally:
            dst.close()
    finally:
        src.close()


def _backup_postgres(url: str, target: Path) -> None:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise CliError("pg_dump is not on PATH: install the PostgreSQL client tools", EX_UNAVAILABLE)
    # libpq wants postgresql://; the password goes through the environment, not the command line.
    parsed = make_url(url).set(drivername="postgresql")
    query = {key: value for key, value in parsed.query.items() if key.lower() != "password"}
    password = parsed.password or next(
        (value for key, value in parsed.query.items() if key.lower() == "password"), None)
    env = dict(os.environ)
    if password:  # libpq's ?password= too: a command line is readable by every user (ps)
        env["PGPASSWORD"] = str(password if isinstance(password, str) else password[-1])
    dsn = parsed.set(password=None, query=query).render_as_string(hide_password=False)
    # --encoding: UTF-8 as dgxqueue reads the database; PGCLIENTENCODING would decide it otherwise
    # (LATIN1 fails the dump on the first prompt that is not Latin text).
    done = subprocess.run([pg_dump, "--format=custom", "--encoding=UTF8", f"--file={target}", f"--dbname={dsn}"],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # Its error lines ('error: query failed: ERROR: permission denied ...'), not its last one,
        # which is the statement it ran ('detail: Query was: LOCK TABLE ...').
        lines = done.stderr.strip().splitlines()
        said = [line for line in lines if "error" in line.lower()] or lines[-1:] or [f"exit {done.returncode}"]
        raise CliError(f"pg_dump failed: {'; '.join(said)}", EX_UNAVAILABLE)


def cmd_db_backup(ctx: Context, args: argparse.Namespace) -> int:
    target = Path(args.path).absolute()
    if target.exists() and not args.force:
        raise CliError(f"{target} already exists (use --force to replace it)", EX_CANTCREAT)
    if not target.parent.is_dir():
        raise CliError(f"folder {target.parent} does not exist", EX_CANTCREAT)
    url = ctx.settings.database.url
    source = sqlite_path(url)
    _must_exist(ctx.settings)
    engine = _raw_engine(ctx.settings)  # any schema revision: back up before `db upgrade` too
    # Written beside the target and renamed into place, so PATH is never a half-written backup.
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    partial = Path(name)
    try:
        if source is not None:  # a SQLite file
            partial.unlink()
            rows: int | None = _backup_sqlite(source, partial, ctx.settings.database.sqlite_busy_timeout_ms)
        elif not profile_of(engine.dialect).is_file:  # a server: PostgreSQL
            _backup_postgres(url, partial)
            rows = None
        else:
            raise CliError(f"cannot back up {describe_url(url)}: only SQLite files and PostgreSQL",
                           EX_UNAVAILABLE)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    size = target.stat().st_size
    if args.json:
        print_json({"path": str(target), "bytes": size, "generations": rows})
    else:
        counted = f", {rows} generations" if rows is not None else ""
        print(f"backed up to {target} ({size} bytes{counted})")
    return EXIT_OK


def cmd_db_reset(ctx: Context, args: argparse.Namespace) -> int:
    if not args.yes:
        raise CliError(f"db reset deletes every generation and prompt of the database at "
                       f"{describe_url(ctx.settings.database.url)}: add --yes to confirm", EXIT_USAGE)
    engine = _raw_engine(ctx.settings)
    # Only dgxqueue's tables: the database may be shared with an application's own tables.
    alembic_version = sa.Table("alembic_version", sa.MetaData(), sa.Column("version_num", sa.String(32)))
    with engine.begin() as conn:
        Base.metadata.drop_all(conn, checkfirst=True)
        alembic_version.drop(conn, checkfirst=True)
    ensure_schema(engine)
    print(f"database reset: empty, at revision {head_revision()}")
    return EXIT_OK


# --- config -----------------------------------------------------------------------------------


def _shown(settings: Settings) -> dict[str, Any]:
    values = settings_as_dict(settings)
    values["database"]["url"] = display_url(values["database"]["url"])  # one that does not parse: 78
    return values


def cmd_config_show(ctx: Context, args: argparse.Namespace) -> int:
    values = _shown(ctx.settings)
    if args.json:
        print_json(values)
        return EXIT_OK
    print(f"# effective settings (file: {ctx.config_path or 'none'}; then environment, then flags)")
    for section, table in values.items():
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        print(f"\n[{section}]")
        for key, value in table.items():
            if key not in nested:
                print(f"{key} = {toml_value(value)}")
        for key, value in nested.items():
            print(f"\n[{section}.{key}]")
            for sub_key, sub_value in value.items():
                print(f"{json.dumps(sub_key)} = {toml_value(sub_value)}")
    return EXIT_OK


def _check_outputs(folder: Path) -> None:
    """The outputs folder exists and is writable, or the nearest existing folder above it is."""
    folder = folder.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError("outputs.dir", str(folder), f"a folder path ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "writable" if existing == folder else f"creatable ({existing} is not writable)"
        raise ConfigError("outputs.dir", str(folder), f"a folder this user can write: it is not {what}")


def _check_generator_limits(ctx: Context, generator: Any) -> None:
    """Refuse ``jobs.*`` limits that let through requests the generator would fail at run time."""
    import importlib.util

    name = ctx.settings.generator.name
    missing = [m for m in getattr(generator, "required_modules", ()) if importlib.util.find_spec(m) is None]
    if missing:
        hint = getattr(generator, "install_hint", f"pip install 'dgxqueue[{name}]'")
        raise ConfigError("generator.name", name, f"its extra installed: {hint} (missing {', '.join(missing)})")
    model = getattr(generator, "model_id", None)  # MusicGen's generator.options.model
    if isinstance(model, str) and (Path(model).is_absolute() or model.startswith(".")) and not Path(model).is_dir():
        # The backend takes such a name for a folder only when load() runs: the worker stopped
        # with 78 on a path that config check had passed.
        raise ConfigError("generator.options.model", model, "an existing folder or a hub id")
    longest = getattr(generator, "max_duration_seconds", None)
    jobs = ctx.settings.jobs
    if isinstance(longest, (int, float)):
        for key, value in (("jobs.max_duration_seconds", jobs.max_duration_seconds),
                           ("jobs.default_duration_seconds", jobs.default_duration_seconds)):
            if value > longest:
                raise ConfigError(key, value, f"at most {longest:g}, the longest audio generator {name} "
                                              "renders (longer jobs would fail when they run)")


def _check_metrics_address(address: str) -> None:
    """The worker's refusal of a metrics address that is not this machine's, ahead of time: a
    bind to a free port of it (the configured port may be a running worker's)."""
    import errno
    import socket

    from dgxqueue.metrics import address_family

    # In the worker's server's family alone: resolved in any family, a name with only an IPv6
    # address of this machine passed, and every worker exited 78.
    try:
        with socket.socket(address_family(address), socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError("metrics.address", address, f"an address of this machine ({exc})") from None
        # Anything else is the worker's to report when it binds its own port.


def cmd_config_check(ctx: Context, args: argparse.Namespace) -> int:
    from dgxqueue.generators import create_generator

    check_driver(ctx.settings.database.url)  # parses the URL too: a bad one is a config error
    # Built as the worker builds it, so a mistyped option fails here rather than in the worker;
    # not loaded, which may need the model and a GPU.
    generator = create_generator(ctx.settings.generator.name, ctx.settings.generator.options)
    _check_generator_limits(ctx, generator)
    _check_outputs(ctx.settings.outputs_dir)
    if ctx.settings.metrics.enabled:
        _check_metrics_address(ctx.settings.metrics.address)
    print(f"config ok (file: {ctx.config_path or 'none'}; generator {ctx.settings.generator.name}; "
          f"database {_shown(ctx.settings)['database']['url']}; "
          f"outputs {ctx.settings.outputs_dir.absolute()})")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("worker", help="run the daemon (one per GPU)",
                       description="Run the daemon: claim jobs, generate, record. SIGTERM, SIGINT or SIGHUP stop it "
                                   "gracefully; a second one releases the running jobs at once (under nohup "
                                   "SIGHUP stays ignored). It never "
                                   "creates or migrates its database: run 'dgxqueue db upgrade' first. "
                                   "Flags override the config file and environment.",
                       epilog="Exit codes: 0 stopped by a signal, or --burst drained the queue; 69 database "
                              "unreachable, missing or not migrated, or the metrics port taken; 75 a machine "
                              "fault (outputs disk, memory, GPU: jobs given back unspent), or --burst stopped "
                              "by an outputs folder that takes no files; 78 bad configuration; 124 a backend "
                              "call overran worker.job_timeout_seconds (its jobs charged, the rest given "
                              "back). The systemd unit restarts the worker after any code but 0 and 78.")
    p.add_argument("--burst", action="store_true", help="exit once the queue is drained")
    p.add_argument("--worker-id", help="name in the worker_id column (default: host-pid-random, unique per run)")
    p.add_argument("--generator", help="backend name (generator.name), e.g. synth, musicgen")
    p.add_argument("--models", metavar="A,B", help="models this daemon claims (generator.models)")
    p.add_argument("--batch-size", metavar="N", help="worker.batch_size (0: the generator's own limit)")
    p.add_argument("--metrics-port", metavar="N", help="metrics.port for /metrics")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error (logging.level)")
    p.set_defaults(func=cmd_worker, overrides=worker_overrides)

    db = sub.add_parser("db", help="migrate, inspect, back up or reset the database",
                        description="Database maintenance."
                        ).add_subparsers(dest="db_command", metavar="ACTION")
    db.required = True
    p = db.add_parser("upgrade", help="migrate to the newest schema (or REV); creates the database")
    p.add_argument("revision", nargs="?", metavar="REV")
    p.add_argument("--wait", metavar="SPAN", help="while the database is unavailable, try again for up to "
                   "SPAN (such as 5m): for a boot where it starts after this command")
    p.set_defaults(func=cmd_db_upgrade)
    p = db.add_parser("downgrade", help="migrate back to REV (default: one step, -1)",
                      description="Migrate the schema back to REV. A step that drops tables or columns "
                                  "(and their data) needs --yes; back up first (db backup).")
    p.add_argument("revision", nargs="?", default="-1", metavar="REV",
                   help="a revision id such as 002 or 001 ('db current' shows the one in use), 'base' "
                        "(before the first: no dgxqueue tables), or -N for N steps back (default -1)")
    p.add_argument("--yes", action="store_true", help="confirm a downgrade that drops tables or columns")
    p.set_defaults(func=cmd_db_downgrade)
    p = db.add_parser("current", help="print the schema revision")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_current)
    p = db.add_parser("backup", help="consistent copy: SQLite online backup, or pg_dump (custom format)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--force", action="store_true", help="replace PATH if it exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_backup)
    p = db.add_parser("reset", help="drop dgxqueue's tables and recreate them empty; other tables stay (needs --yes)")
    p.add_argument("--yes", action="store_true", help="really delete every generation and prompt")
    p.set_defaults(func=cmd_db_reset)
    add_copy_parser(db)
    add_db_parsers(db)  # check, vacuum

    config = sub.add_parser("config", help="show or check the settings",
                            description="Settings: defaults < config file < environment < flags."
                            ).add_subparsers(dest="config_command", metavar="ACTION")
    config.required = True
    p = config.add_parser("show", help="print the effective settings (TOML, password hidden)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)
    p = config.add_parser("check", help="check what the worker needs: settings, database driver, generator "
                          "and its extra, job limits it can honour, a writable outputs folder (exit 78 if not)")
    p.set_defaults(func=cmd_config_check)

