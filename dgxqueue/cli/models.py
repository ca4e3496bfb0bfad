"""The model subcommands: pause and resume the claiming of one model."""

from __future__ import annotations

import argparse
from typing import Any

from dgxqueue.cli.common import EXIT_OK, Context, print_json, safe
from dgxqueue.storage import admin, session_scope


def cmd_pause(ctx: Context, args: argparse.Namespace) -> int:
    with session_scope(ctx.engine()) as session:
        added = admin.pause_model(session, args.model, args.reason)
    model = args.model.strip()  # as stored: pause_model validated it
    if args.json:
        print_json({"model": model, "paused": True, "already_paused": not added, "reason": args.reason})
    else:
        print(f"{'paused' if added else 'already paused (reason updated)'}: {safe(model)}")
    return EXIT_OK


def cmd_resume(ctx: Context, args: argparse.Namespace) -> int:
    with session_scope(ctx.engine()) as session:
        removed = admin.resume_model(session, args.model)
    model = args.model.strip()
    if args.json:
        print_json({"model": model, "paused": False, "was_paused": removed})
    else:
        print(f"{'resumed' if removed else 'was not paused'}: {safe(model)}")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("pause", help="stop every daemon claiming a model",
                       description="Stop every daemon claiming MODEL, from its next claim; jobs already "
                                   "running finish. Pausing a paused model updates its reason. "
                                   "'stats' lists paused models.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--reason", help="why, shown by 'stats'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pause)

    p = sub.add_parser("resume", help="let daemons claim a paused model again",
                       description="Let daemons claim MODEL again; idle daemons claim at once. Resuming "
                                   "a model that is not paused changes nothing (exit 0).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_resume)
