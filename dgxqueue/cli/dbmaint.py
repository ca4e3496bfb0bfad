"""``db check`` and ``db vacuum``: is the database sound, and give back the space deleted rows left.

Registered in the ``db`` group by :mod:`dgxqueue.cli.admin`; the work is
:mod:`dgxqueue.storage.maintenance`'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from dgxqueue.cli.common import EX_TEMPFAIL, EXIT_OK, CliError, Context, parse_number, print_json, safe
from dgxqueue.errors import LockTimeoutError, ValidationError
from dgxqueue.storage.maintenance import DEFAULT_LOCK_TIMEOUT, check_database, vacuum_database

#: ``db check`` found the database damaged: a failed integrity check, an invalid index, or a
#: search index out of step with its rows.
EXIT_DAMAGED = 5


def cmd_db_check(ctx: Context, args: argparse.Namespace) -> int:
    report = check_database(ctx.settings.database.url, full=args.full, settings=ctx.settings.database)
    if args.json:
        print_json({"database": report.where, "healthy": report.healthy, "checked": report.checked,
                    **report.facts, "problems": report.problems})
    else:
        print(f"database {safe(report.where)}")
        print("checked: " + "; ".join(report.checked))
        for key, value in report.facts.items():
            print(f"  {key}: {safe(value)}")
        if report.healthy:
            print("healthy")
        else:
            print(f"DAMAGED: {len(report.problems)} problem(s)")
            for problem in report.problems:
                print(f"  {safe(problem)}")
            print("restore the latest backup (dgxqueue db backup makes one), or see the README's "
                  "'Maintaining the database'")
    return EXIT_OK if report.healthy else EXIT_DAMAGED


def _share(text: str) -> float:
    """``--min-free``: '20%' or 0.2."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValidationError("min_free", text, "a share of the pages from 0 to 1, or a percentage such as 20%")
    return value


def cmd_db_vacuum(ctx: Context, args: argparse.Namespace) -> int:
    min_free, lock_timeout = _share(args.min_free), parse_number("lock_timeout", args.lock_timeout, float)
    try:
        report = vacuum_database(ctx.settings.database.url, min_free=min_free, settings=ctx.settings.database,
                                 lock_timeout=lock_timeout)
    except LockTimeoutError as exc:  # another session's lock: try again later (75), nothing broken
        raise CliError(str(exc), EX_TEMPFAIL) from None
    if args.json:
        print_json({"database": report.where, "before_bytes": report.before_bytes,
                    "after_bytes": report.after_bytes, "freed_bytes": report.before_bytes - report.after_bytes,
                    "done": report.done, "skipped": report.skipped, **report.facts})
    elif report.skipped is not None:
        print(f"nothing done on {safe(report.where)}: {report.skipped}")
    else:
        print(f"vacuumed {safe(report.where)}: {report.before_bytes} -> {report.after_bytes} bytes "
              f"({report.before_bytes - report.after_bytes} freed)")
        for step in report.done:
            print(f"  {safe(step)}")
    return EXIT_OK


def add_db_parsers(db: Any) -> None:
    """``db check`` and ``db vacuum``, added to the ``db`` group's subparsers."""
    p = db.add_parser("check", help="check the database's integrity (exit 5 if damaged)",
                      description="SQLite: PRAGMA quick_check (--full: integrity_check and the search index "
                                  "against its rows) on the file opened read-only, with page counts and the "
                                  "write-ahead log's size. PostgreSQL: the server answers, the schema revision, "
                                  "row counts, every index valid (--full: every row read). Exit 0 healthy, "
                                  "5 damaged, 69 unreachable or without dgxqueue's tables.")
    p.add_argument("--full", action="store_true", help="the thorough check (reads every page; slower)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_check)
    p = db.add_parser("vacuum", help="give back the space of deleted rows (safe while daemons run)",
                      description="SQLite: VACUUM (one transaction: daemons' writes wait for it) then a "
                                  "TRUNCATE checkpoint of the write-ahead log; needs free disk about twice the "
                                  "file's size. PostgreSQL: VACUUM (ANALYZE) of generations and prompts, "
                                  "waiting at most --lock-timeout for a table another session holds. "
                                  "Prints the bytes before and after.")
    p.add_argument("--min-free", default="0", metavar="SHARE",
                   help="SQLite: only when at least this share of the pages is free, e.g. 20%% (default 0: "
                        "always); PostgreSQL always vacuums")
    p.add_argument("--lock-timeout", default=f"{DEFAULT_LOCK_TIMEOUT:g}", metavar="SECONDS",
                   help=f"PostgreSQL: give up (exit 75) after waiting this long for a table another session "
                        f"holds locked (default {DEFAULT_LOCK_TIMEOUT:g})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_vacuum)
