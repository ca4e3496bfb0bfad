"""The ``workers`` subcommand: the registry of live daemons (:mod:`dgxqueue.storage.registry`).

Text read from the database is printed escaped (:func:`~dgxqueue.cli.common.safe`, through
:func:`~dgxqueue.cli.common.table`): a host or model name holding control sequences is shown, never obeyed.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from dgxqueue.cli.common import EXIT_OK, Context, print_json, table, when_text
from dgxqueue.storage import session_scope
from dgxqueue.storage.registry import LiveDaemon, daemons

_SHORT_ID = 16


def age_text(age: timedelta) -> str:
    """``4.2s``, ``3m05s``, ``2h03m``, ``3d04h``."""
    seconds = age.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours < 24 else f"{hours // 24}d{hours % 24:02d}h"


def short_id(daemon: LiveDaemon) -> str:
    """The id without its host and pid (shown in their own columns) when it starts with them, as
    the daemon's own ids do; else its start."""
    prefix = f"{daemon.host}-{daemon.pid}-"
    rest = daemon.id[len(prefix):] if daemon.id.startswith(prefix) and len(daemon.id) > len(prefix) else daemon.id
    return rest if len(rest) <= _SHORT_ID else rest[:_SHORT_ID - 1] + "…"


def cmd_workers(ctx: Context, args: argparse.Namespace) -> int:
    with session_scope(ctx.engine()) as session:
        found = daemons(session, include_stale=args.all)
    if args.json:
        print_json([daemon.as_dict() for daemon in found])
        return EXIT_OK
    if not found:
        print("no live daemons" + ("" if args.all else " (--all also lists stale ones)"))
        return EXIT_OK
    headers = ["ID", "HOST", "PID", "GENERATOR", "MODELS", "VERSION", "UP SINCE (UTC)", "HEARTBEAT", "HELD"]
    rows = [[short_id(d), d.host, str(d.pid), d.generator, ",".join(d.models), d.version, when_text(d.started_at),
             f"{age_text(d.heartbeat_age)} ago", str(len(d.holding))] for d in found]
    if args.all:
        headers.append("STATE")
        for row, daemon in zip(rows, found, strict=True):
            row.append("stale" if daemon.stale else "live")
    print(table(headers, rows, stretch=4))
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "workers", help="list the live daemons",
        description="List the daemons serving the queue, as each registered itself: id, host, pid, generator, "
                    "models, version, when it started, how long ago its last heartbeat was and how many jobs it "
                    "holds. A daemon that has not refreshed its entry for a lease period (it died or lost the "
                    "database) is stale: listed only with --all, and forgotten a few lease periods later.")
    p.add_argument("--all", action="store_true", help="also list stale entries, marked stale")
    p.add_argument("--json", action="store_true", help="every field, the full id and the held job ids")
    p.set_defaults(func=cmd_workers)
