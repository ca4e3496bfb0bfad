"""The job subcommands: show, list, stats, wait, cancel, retry, prune (and enqueue's parser).

Text read from the database is printed escaped (:func:`~dgxqueue.cli.common.safe`): a prompt or
error message holding terminal control sequences is shown, never obeyed.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dgxqueue.cli import enqueue as enqueue_command
from dgxqueue.cli.common import (
    EX_DATAERR,
    EX_IOERR,
    EXIT_OK,
    CliError,
    Context,
    job_dict,
    job_output,
    output_fields,
    output_path,
    parse_age,
    parse_number,
    print_json,
    resolve_id,
    safe,
    seconds_text,
    table,
    when_text,
)
from dgxqueue.cli.wait import Progress, finish, fraction, watch
from dgxqueue.errors import JobNotFoundError, ValidationError
from dgxqueue.outputs import OUTSIDE, Unreadable, anothers, unpublished
from dgxqueue.storage import (
    Generation,
    admin,
    cancel_generation,
    get_all_generations,
    get_database_stats,
    get_generation,
    reads,
    registry,
    retry_generation,
    search,
    session_scope,
)
from dgxqueue.storage.queue import HOLDS_ITS_FILE


def _require(ctx: Context, text: str) -> Generation:
    engine = ctx.engine()
    job_id = resolve_id(engine, text)
    with session_scope(engine) as session:
        job = get_generation(session, job_id)
    if job is None:  # deleted since
        raise JobNotFoundError(job_id)
    return job


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    job = _require(ctx, args.id)
    row = job_dict(ctx.settings, job)
    found = None
    if job.status == "completed":  # its file may have been deleted or moved since, or its result be held
        found = job_output(ctx.settings, job)
        fields = output_fields(found)
        row["output_exists"] = fields["output_exists"]
        if args.json:
            row.update(fields)
    share = fraction(job)
    if share is not None:
        row["progress"] = f"{job.progress_done}/{job.progress_total} ({share * 100:.0f}%)"
    if args.json:
        print_json(row)
        return EXIT_OK
    width = max(len(key) for key in row)
    for key, value in row.items():
        shown = "-" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else value
        if key == "output_exists":
            shown = "yes" if value else f"no: {found.reason() if found is not None else OUTSIDE}"
        print(f"{key.ljust(width)}  {safe(shown)}")
    return EXIT_OK


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    limit = parse_number("limit", args.limit, int)
    offset = parse_number("offset", args.offset, int)
    with session_scope(ctx.engine()) as session:
        if args.search is not None:
            jobs = search.search_jobs(session, args.search, status=args.status, limit=limit, offset=offset)
        else:
            jobs = get_all_generations(session, status=args.status, limit=limit, offset=offset)
    if args.json:
        print_json([job_dict(ctx.settings, job) for job in jobs])
        return EXIT_OK
    rows = [
        # str(): a row written by plain SQL may hold anything in any column.
        [str(job.id), "cancelled" if job.status == "failed" and job.cancelled_at is not None else str(job.status),
         str(job.model_name), seconds_text(job.duration_seconds),
         when_text(job.created_at), " ".join(str(job.prompt).split())]
        for job in jobs
    ]
    headers = ["ID", "STATUS", "MODEL", "DURATION", "CREATED (UTC)", "PROMPT"]
    if any(job.status == "failed" for job in jobs):  # why they failed, without a 'show' each
        headers.append("ERROR")
        for row, job in zip(rows, jobs, strict=True):
            row.append(" ".join((job.error_message or "-").split()) if job.status == "failed" else "")
    print(table(headers, rows, stretch=(5, 6) if len(headers) > 6 else 5))
    return EXIT_OK


def _models(session: Session) -> dict[str, dict[str, int]]:
    """Pending jobs and live daemons per model, for every model that has either."""
    pending = reads.queue_depth(session).pending_by_model
    live = registry.live_per_model(session)
    return {model: {"pending": pending.get(model, 0), "live_daemons": live.get(model, 0)}
            for model in sorted(set(pending) | set(live), key=str)}


def cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    with session_scope(ctx.engine()) as session:
        stats = get_database_stats(session)
        models = _models(session)
    if args.json:
        print_json({**stats, "models": models})
        return EXIT_OK
    average = stats["average_generation_time_seconds"]
    rows = [[status, str(count)] for status, count in stats["by_status"].items()]
    rows.insert(4, ["  of which cancelled", str(stats["cancelled_generations"])])
    rows += [
        ["  of failed: expired", str(stats["expired_generations"])],
        ["total", str(stats["total_generations"])],
        ["distinct prompts", str(stats["total_prompts"])],
        ["average generation time", "-" if average is None else f"{average:.2f}s"],
        ["audio generated", f"{stats['total_audio_seconds']:.1f}s"],
        ["oldest pending since", stats["oldest_pending_created_at"] or "-"],
    ]
    print(table(["", "GENERATIONS"], rows))
    if models:
        print()
        print(table(["MODEL", "PENDING", "LIVE DAEMONS"],
                    [[str(model), str(n["pending"]), str(n["live_daemons"]) + ("  (none serves it)" if n["pending"]
                      and not n["live_daemons"] else "")] for model, n in models.items()], stretch=0))
    for model, reason in stats["paused_models"].items():
        print(f"paused: {safe(model)}" + (f" ({safe(reason)})" if reason else ""))
    return EXIT_OK


def cmd_wait(ctx: Context, args: argparse.Namespace) -> int:
    timeout = parse_number("timeout", args.timeout, float)
    engine = ctx.engine()
    ids = [resolve_id(engine, text) for text in args.ids]
    jobs = watch(engine, ids, timeout=timeout, progress=Progress(quiet=args.quiet))
    return finish(ctx.settings, jobs, args.json)


def _change(ctx: Context, args: argparse.Namespace, verb: str) -> int:
    engine = ctx.engine()
    job_id = resolve_id(engine, args.id)
    with session_scope(engine) as session:
        change = cancel_generation if verb == "cancelled" else retry_generation
        job = change(session, job_id)
    if args.json:
        print_json(job_dict(ctx.settings, job))
    elif verb == "cancelled" and job.status == "processing":
        print(f"cancel requested {safe(job.id)} (running: its daemon stops it within a heartbeat)")
    else:
        print(f"{verb} {safe(job.id)}")
    return EXIT_OK


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    return _change(ctx, args, "cancelled")


def cmd_retry(ctx: Context, args: argparse.Namespace) -> int:
    return _change(ctx, args, "requeued")


def _paths_in_use(session: Session, victims: list[tuple[str, str]], holders: set[str], *, deleted: bool) -> set[str]:
    """The victims' file paths that rows staying in the table still hold. Since migration 007 each
    path is one job's, so none do; kept as a guard, since a file removed in error cannot come back.
    A failed row holds no path (it never wrote its file), so it keeps none."""
    shared: set[str] = set()
    paths = sorted({file_path for _, file_path in victims})
    going = Counter(file_path for job_id, file_path in victims if job_id in holders)
    for start in range(0, len(paths), 500):  # SQLite limits bound parameters
        query = (sa.select(Generation.file_path, sa.func.count())
                 .where(Generation.file_path.in_(paths[start:start + 500]), HOLDS_ITS_FILE)
                 .group_by(Generation.file_path))
        for file_path, count in session.execute(query):
            if deleted or count > going[file_path]:  # after the deletion, any row left is a user
                shared.add(file_path)
    return shared


#: Why prune leaves a completed job whose result is held under its temporary name (see dgxqueue.outputs).
HELD_REASON = ("its result waits beside its file_path under a temporary name, the file there not its; pruned, its "
               "row would be gone and a daemon's sweep would delete that result a day later: move that file away "
               "so that a daemon publishes the result, and a later prune takes the job")


#: Why prune --delete-files keeps a file whose mark it cannot read (dgxqueue.outputs.anothers).
_UNKNOWN_FILE = "whose WAV it is cannot be told, so it is not deleted as its generation's: "


def _unreadable_reason(unreadable: Unreadable) -> str:
    """Why prune leaves a completed job whose folder it cannot read (dgxqueue.outputs.Unreadable)."""
    return (f"{unreadable.reason()}; pruned, its row would be gone and a daemon's sweep would delete such a result "
            "a day later: run prune as a user that can read that folder (the daemons' user, say)")


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    age = parse_age("older_than", args.older_than)
    statuses = [s.strip() for s in args.status.split(",") if s.strip()]
    if not statuses or not set(statuses) <= {"completed", "failed"}:
        raise ValidationError("status", args.status, "completed, failed or both (comma-separated)")
    engine = ctx.engine()
    with session_scope(engine) as session:
        cutoff = age.before(reads.database_now(session))
        victims = reads.finished_jobs_before(session, statuses, cutoff)
        # A failed job never wrote its file and holds no path (migration 007): a file at its path
        # is another's, such as an archived job's, so only completed jobs' files go.
        completed = {job_id for job_id, _ in reads.finished_jobs_before(session, ["completed"], cutoff)} \
            if "completed" in statuses else set()
        # A completed job whose result is held under its temporary name stays, as `archive` leaves
        # it: deleted, its row would be gone, and the sweep deletes a temporary no row names. So
        # does one whose folder cannot be read here: its result may be held there.
        staying = unpublished(ctx.settings.outputs_dir, [victim for victim in victims if victim[0] in completed])
        kept_held = [(job_id, path) for job_id, path in victims if job_id in staying.held]
        kept_unreadable = [(job_id, path, staying.unreadable[job_id]) for job_id, path in victims
                        if job_id in staying.unreadable]
        victims = [(job_id, path) for job_id, path in victims if job_id not in staying]
        owners = {job_id for job_id in completed if job_id not in staying} if args.delete_files else set()
        if not args.dry_run:
            # Files go only with rows really deleted, and only after the deletion is committed.
            deleted = set(admin.delete_finished(session, [job_id for job_id, _ in victims]))
            victims = [(job_id, path) for job_id, path in victims if job_id in deleted]
        # Read in the deleting transaction: rows left then are the ones that still need the file.
        in_use = _paths_in_use(session, victims, owners, deleted=not args.dry_run) if args.delete_files else set()
    removed, freed, skipped, kept, others = 0, 0, [], [], []
    unknown: dict[str, Unreadable] = {}
    files: list[tuple[str, Path]] = []
    if args.delete_files:
        owned = {path: job_id for job_id, path in victims if job_id in owners}  # each file once
        for file_path, job_id in owned.items():
            path = output_path(ctx.settings, file_path)
            if path is None:
                skipped.append(file_path)  # outside the outputs folder: never touched
            elif file_path in in_use:
                kept.append(file_path)
            elif isinstance(whose := anothers(str(path), job_id), Unreadable):  # its mark may name another job
                unknown[file_path] = whose
            elif whose:  # another job's WAV put at its path since: not its to delete
                others.append(file_path)
            elif path.is_file():
                files.append((file_path, path))
    # One file that cannot go (its folder not writable by this user, EIO) stops neither the others
    # nor the report: the rows are gone already, so every file left must be named.
    undeleted: dict[str, str] = {}
    if not args.dry_run:
        for file_path, path in files:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                undeleted[file_path] = exc.strerror or type(exc).__name__
                continue
            removed, freed = removed + 1, freed + size
    # The file at a held job's path is another's too: with --delete-files it is named as kept.
    not_its = [file_path for _, file_path in kept_held] + others if args.delete_files else []
    result = {
        "dry_run": args.dry_run, "cutoff": cutoff.isoformat(), "statuses": statuses,
        "generations": len(victims), "files": len(files) if args.dry_run else removed,
        "bytes": sum(p.stat().st_size for _, p in files) if args.dry_run else freed,
        "skipped_outside_outputs": skipped, "kept_in_use": kept, "kept_not_its": not_its,
        "kept_held": {job_id: HELD_REASON for job_id, _ in kept_held},
        "kept_unreadable": {job_id: _unreadable_reason(why) for job_id, _, why in kept_unreadable},
        "kept_unreadable_files": {file_path: _UNKNOWN_FILE + why.cause() for file_path, why in unknown.items()},
        "not_deleted": undeleted,
    }
    if args.json:
        print_json(result)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {result['generations']} generation(s) finished before {when_text(cutoff)} UTC"
              + (f" and {result['files']} file(s), {result['bytes']} bytes" if args.delete_files else ""))
        for file_path in skipped:
            print(f"kept {safe(file_path)}: not inside the outputs folder {safe(ctx.settings.outputs_dir.absolute())}")
        for file_path in kept:
            print(f"kept {safe(file_path)}: a generation that stays still uses it")
        for file_path in others:
            print(f"kept {safe(file_path)}: another job's WAV (its mark says so), not its generation's")
        for file_path, why in unknown.items():
            print(f"kept {safe(file_path)}: {safe(_UNKNOWN_FILE + why.cause())}")
        for job_id, file_path in kept_held:
            print(f"kept generation {safe(job_id)} ({safe(file_path)}): {HELD_REASON}")
        for job_id, file_path, why in kept_unreadable:
            print(f"kept generation {safe(job_id)} ({safe(file_path)}): {safe(_unreadable_reason(why))}")
        for file_path, error in undeleted.items():
            print(f"could not delete {safe(file_path)}: {safe(error)} (its generation is pruned: delete it by hand)")
    left = [(job_id, HELD_REASON) for job_id, _ in kept_held] + [(job_id, _unreadable_reason(why))
                                                                 for job_id, _, why in kept_unreadable]
    if undeleted:  # before the rows left: files that stay named by no row need a person now
        file_path, error = next(iter(undeleted.items()))
        raise CliError(f"{len(undeleted)} file(s) of pruned generations could not be deleted: {safe(file_path)}: "
                       f"{safe(error)}", EX_IOERR)
    if left:
        raise CliError(f"{len(left)} generation(s) left here: {safe(left[0][0])}: {safe(left[0][1])}", EX_DATAERR)
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    enqueue_command.add_parser(sub)

    id_help = "a job id, or a unique prefix of one (at least 4 hex digits, as 'wait' shows them)"
    p = sub.add_parser("show", help="show one generation",
                       description="Show every field of one generation; for a completed one, whether its "
                                   "WAV is at its path (output_exists): not when the file there carries another "
                                   "job's id, or while its result is held under its temporary name beside it, "
                                   "which is then named with what to do; where its folder cannot be read, that "
                                   "this cannot be told, and why. Exit 3 if no job matches, 65 if a "
                                   "prefix matches several.")
    p.add_argument("id", help=id_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("list", help="list generations, newest first",
                       description="List generations, newest first (completed ones by completion time).")
    p.add_argument("--status", help="pending, processing, completed or failed")
    p.add_argument("--limit", default="20", help="at most this many rows (default 20)")
    p.add_argument("--offset", default="0", help="skip this many rows first")
    p.add_argument("--search", metavar="WORDS",
                   help="only prompts having, for every word, a word that starts with it (case and "
                        "punctuation ignored; newest created first), e.g. --search 'lofi piano'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("stats", help="counts by status and totals",
                       description="Counts by status, totals; pending jobs per model beside the number of live "
                                   "daemons serving it (dgxqueue workers lists them).")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("wait", help="wait for jobs to finish, showing progress",
                       description="Show progress on stderr until every job is completed or failed, "
                                   "then print each outcome and WAV path; for a completed job whose WAV "
                                   "is not at its path while another file is (its result held under its "
                                   "temporary name), its id and why, as show says it. Exit 1 if any "
                                   "failed, 75 on --timeout.")
    p.add_argument("ids", nargs="+", metavar="ID", help=id_help)
    p.add_argument("--timeout", metavar="SECONDS", help="give up waiting after this long (exit 75)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wait)

    for name, func, text in (("cancel", cmd_cancel, "Cancel a generation (a running one is stopped by its daemon)"),
                             ("retry", cmd_retry, "Send a failed generation back to the queue")):
        p = sub.add_parser(name, help=text.lower(), description=text + ". Exit 4 if its status forbids "
                           "it, 3 if no job matches, 65 if a prefix matches several.")
        p.add_argument("id", help=id_help)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("prune", help="delete finished generations older than an age",
                       description="Delete completed/failed generations that finished before now minus "
                                   "--older-than; with --delete-files also the completed ones' WAV files (only files "
                                   "inside the outputs folder). A completed job whose result is held under its "
                                   "temporary name (another's file at its path) stays, named: exit 65, the rest "
                                   "pruned; so does one whose folder cannot be listed by the user running it "
                                   "(its result may be held there), named with the folder and the error. A file "
                                   "of a pruned generation that cannot be deleted (permissions, I/O) is named "
                                   "(--json: not_deleted) and the others still go: exit 74.")
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 2w")
    p.add_argument("--status", default="completed,failed",
                   help="which finished statuses (default completed,failed)")
    p.add_argument("--delete-files", action="store_true",
                   help="remove the completed ones' WAV files too (a failed job never wrote one)")
    p.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)
