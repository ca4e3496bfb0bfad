"""Moving rows to another database: ``db copy --to URL`` (the whole queue, say from SQLite to
PostgreSQL) and ``archive --older-than AGE --to URL`` (finished generations).

Both validate ``--to`` before touching anything, refuse a target that is the source itself, and
migrate the target to head before writing to it. ``db copy`` refuses while daemons are live on the
source or the target (a daemon would change rows under the copy: stop them, copy, point them at the
target); ``archive`` runs beside live daemons, since finished rows no daemon changes.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from dgxqueue.cli.common import (
    EX_DATAERR,
    EX_TEMPFAIL,
    EXIT_OK,
    CliError,
    Context,
    parse_age,
    parse_number,
    print_json,
    safe,
)
from dgxqueue.errors import ConfigError, TransferError, ValidationError
from dgxqueue.storage import registry, session_scope
from dgxqueue.storage.database import (
    check_driver,
    create_engine,
    describe_url,
    ensure_schema,
    hide_password,
    sqlite_path,
)
from dgxqueue.storage.models import COMPLETED
from dgxqueue.storage.reads import database_now
from dgxqueue.storage.transfer import ArchiveReport, archive, archive_preview, copy_queue, database_identity

if TYPE_CHECKING:
    from dgxqueue.outputs import Listed

DEFAULT_BATCH = 500
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "", None})


def target_url(text: str) -> str:
    """``--to``, checked before anything is opened: a bad URL names the field ``to``."""
    try:
        check_driver(text)  # parses it too
        if sqlite_path(text) is None and describe_url(text) == "an in-memory SQLite database":
            raise ConfigError("to", text, "a SQLite file or a PostgreSQL database, not an in-memory one")
    except ConfigError as exc:
        raise ValidationError("to", hide_password(text), exc.allowed) from None
    return text


def batch_size(text: str | None) -> int:
    size: int = DEFAULT_BATCH if text is None else parse_number("batch_size", text, int)
    if size < 1:
        raise ValidationError("batch_size", text, "an integer >= 1")
    return size


def _place(url: str) -> tuple[Any, ...]:
    """Where a URL's data lives: the SQLite file, or the server's host, port and database, with
    the URL's options (a ``search_path`` puts another queue in the same database). Only a
    first check, before anything is opened: _open_target asks the databases themselves."""
    path = sqlite_path(url)
    if path is not None:
        return ("file", path.resolve())
    parsed = make_url(url)
    host = "loopback" if parsed.host in _LOOPBACK else parsed.host
    return ("server", host, parsed.port or 5432, parsed.database, sorted(parsed.query.items()))


def _refuse_itself(source: str, target: str) -> None:
    same = _place(source) == _place(target)
    paths = sqlite_path(source), sqlite_path(target)
    if not same and paths[0] is not None and paths[1] is not None and paths[1].exists():
        same = paths[0].samefile(paths[1])  # a link to the same file
    if same:
        raise ValidationError("to", hide_password(target), f"a database other than the source ({describe_url(source)})")


def _open_target(ctx: Context, url: str, source: sa.Engine) -> sa.Engine:
    """The target, refused (before anything is written there) when the servers say it is the
    source under another URL, then migrated."""
    engine = create_engine(url, ctx.settings.database)
    try:
        if database_identity(engine) == database_identity(source):
            raise ValidationError("to", hide_password(url),
                                  f"a database other than the source ({describe_url(str(source.url))}), which it "
                                  "reaches under another name")
        ensure_schema(engine)  # the same migration as `db upgrade`, under its lock
    except BaseException:
        engine.dispose()
        raise
    return engine


def _refuse_live(engine: sa.Engine, which: str, when: str = "") -> None:
    with session_scope(engine) as session:
        live = registry.daemons(session)
    if live:
        names = ", ".join(f"{safe(d.id)} ({safe(d.host)} pid {d.pid})" for d in live)
        raise CliError(f"{len(live)} daemon(s) {when}are live on the {which} ({describe_url(str(engine.url))}): "
                       f"{names}; stop them (systemctl stop 'dgxqueue-worker@*') and run db copy again", EX_TEMPFAIL)


def cmd_db_copy(ctx: Context, args: argparse.Namespace) -> int:
    to = target_url(args.to)
    size = batch_size(args.batch_size)
    _refuse_itself(ctx.settings.database.url, to)
    source = ctx.engine()
    _refuse_live(source, "source")  # before the target is created or migrated: nothing written yet
    target = _open_target(ctx, to, source)
    try:
        _refuse_live(target, "target")

        def progress(table: str, done: int, total: int, new: int) -> None:
            if not args.json:
                print(f"copied {table}: {done}/{total} read, {new} new", flush=True)

        try:
            digests = copy_queue(source, target, batch_size=size, progress=progress)
        except TransferError as exc:
            raise CliError(str(exc), EX_DATAERR) from None
        # Again after the verification: a daemon started meanwhile that has changed nothing yet
        # passes it, and would go on working on the old queue, whose jobs the target holds too.
        _refuse_live(source, "source", "started during the copy and ")
    finally:
        target.dispose()
    if args.json:
        print_json({"to": describe_url(to), "tables": {name: {"rows": d.rows, "sha256": d.sha256}
                                                        for name, d in digests.items()}})
    else:
        for name, d in digests.items():
            print(f"verified {name}: {d.rows} rows, sha256 {d.sha256[:16]} on both")
        print(f"done: the queue is copied to {describe_url(to)}; point DATABASE_URL (or database.url) there")
    return EXIT_OK


def cmd_archive(ctx: Context, args: argparse.Namespace) -> int:
    age = parse_age("older_than", args.older_than)
    to = target_url(args.to)
    size = batch_size(args.batch_size)
    _refuse_itself(ctx.settings.database.url, to)
    source = ctx.engine()
    with session_scope(source) as session:
        cutoff = age.before(database_now(session))
    if args.dry_run:  # nothing opened at the archive, nothing written anywhere
        with session_scope(source) as session:
            counts = archive_preview(session, cutoff)
        if args.json:
            print_json({"dry_run": True, "cutoff": cutoff.isoformat(), "to": describe_url(to),
                        "generations": sum(counts.values()), "by_status": counts})
        else:
            shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
            print(f"would archive {sum(counts.values())} generations finished before {cutoff:%Y-%m-%d %H:%M:%S} "
                  f"UTC ({shown}) to {describe_url(to)}")
        return EXIT_OK
    target = _open_target(ctx, to, source)

    def progress(report: ArchiveReport) -> None:
        if not args.json:
            print(f"archived {report.moved + report.already} ({report.already} found already archived)", flush=True)

    listed: Listed = {}  # each folder listed once a run, not once a batch

    def held(rows: list[tuple[Any, str, str]]) -> dict[Any, str]:
        from dgxqueue.outputs import unpublished  # here: only an archive that moves rows looks

        # Archived, a result still under its temporary name would be deleted by the sweep (its
        # row gone from here), and the row would name the file at its path, which is another's;
        # so is one whose folder cannot be read here, since its result may be held there.
        waits = unpublished(ctx.settings.outputs_dir, [(str(i), p) for i, s, p in rows if s == COMPLETED], listed)
        reasons = {i: "its result waits beside its file_path under a temporary name, the file there not its: move "
                      "that file away so that a daemon publishes the result, then archive it" for i, _, _ in rows
                   if str(i) in waits.held}
        reasons.update({i: f"{waits.unreadable[str(i)].reason()}: archive it as a user that can read that folder (the "
                           "daemons' user, say)" for i, _, _ in rows if str(i) in waits.unreadable})
        return reasons

    try:
        report = archive(source, target, cutoff, batch_size=size, progress=progress, held=held)
    except TransferError as exc:
        raise CliError(str(exc), EX_DATAERR) from None
    finally:
        target.dispose()
    if args.json:
        print_json({"dry_run": False, "cutoff": cutoff.isoformat(), "to": describe_url(to), "moved": report.moved,
                    "already_archived": report.already, "refused": report.refused})
    else:
        earlier = f" ({report.already} had been inserted there by an interrupted run)" if report.already else ""
        print(f"archived {report.moved + report.already} generations finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC "
              f"to {describe_url(to)}{earlier}")
    if report.refused:
        job_id, reason = next(iter(report.refused.items()))
        raise CliError(f"{len(report.refused)} generation(s) left here: {safe(job_id)}: {reason}", EX_DATAERR)
    return EXIT_OK


def add_copy_parser(db: Any) -> None:
    """``db copy``, added to the ``db`` group by dgxqueue.cli.admin."""
    p = db.add_parser("copy", help="copy the whole queue to another database (e.g. SQLite to PostgreSQL)",
                      description="Copy every generation, prompt and paused model to the database at URL, "
                                  "migrated first, keeping ids and every column; then verify row counts and a "
                                  "checksum per table. Refused while daemons are live on either side. "
                                  "Interrupted, run it again: rows already copied are skipped.")
    p.add_argument("--to", required=True, metavar="URL", help="the target, e.g. postgresql://user@host/dgxqueue")
    p.add_argument("--batch-size", metavar="N", help=f"rows per transaction (default {DEFAULT_BATCH})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_copy)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("archive", help="move finished generations to an archive database",
                       description="Move completed and failed (also cancelled, expired) generations that "
                                   "finished before now minus --older-than to the database at URL (migrated "
                                   "first), in batches: inserted there and committed, then deleted here. The "
                                   "archive's prompts count the archived generations. Safe to interrupt and "
                                   "rerun; WAV files stay where they are.")
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 2w")
    p.add_argument("--to", required=True, metavar="URL", help="the archive, e.g. postgresql://user@host/archive")
    p.add_argument("--batch-size", metavar="N", help=f"generations per transaction (default {DEFAULT_BATCH})")
    p.add_argument("--dry-run", action="store_true", help="print how many would move; write nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_archive)
