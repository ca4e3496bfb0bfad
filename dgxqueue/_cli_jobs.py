"""The job subcommands: enqueue, show, list, stats, wait, cancel, retry, prune."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dgxqueue._cli_common import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    Context,
    job_dict,
    output_path,
    parse_age,
    parse_json_object,
    parse_number,
    parse_when,
    print_json,
    table,
    when_text,
)
from dgxqueue._cli_wait import Progress, watch
from dgxqueue.errors import JobNotFoundError, ValidationError
from dgxqueue.storage import (
    Generation,
    cancel_generation,
    create_generations,
    get_all_generations,
    get_database_stats,
    get_generation,
    repository,
    retry_generation,
    session_scope,
)
from dgxqueue.storage.models import utcnow


def _finish(ctx: Context, jobs: list[Generation], as_json: bool) -> int:
    """Print the outcome of waited-for jobs; exit 1 if any failed."""
    if as_json:
        rows = [job_dict(ctx.settings, job) for job in jobs]
        print_json(rows[0] if len(rows) == 1 else rows)
    else:
        for job in jobs:
            if job.status == "completed":
                print(f"completed  {output_path(ctx.settings, job.file_path) or job.file_path}")
            else:
                print(f"failed  {job.id}  {job.error_message or 'no reason given'}")
    return EXIT_JOB_FAILED if any(job.status != "completed" for job in jobs) else EXIT_OK


def cmd_enqueue(ctx: Context, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"prompt": args.prompt, "priority": parse_number("priority", args.priority, int)}
    for key, text, kind in (("duration_seconds", args.duration, float),
                            ("sample_rate", args.sample_rate, int), ("channels", args.channels, int),
                            ("max_attempts", args.max_attempts, int)):
        if text is not None:
            spec[key] = parse_number(key, text, kind)
    if args.model is not None:
        spec["model_name"] = args.model
    if args.file_path is not None:
        spec["file_path"] = args.file_path
    if args.metadata is not None:
        spec["metadata"] = parse_json_object("metadata", args.metadata)
    if args.not_before is not None:
        spec["run_after"] = parse_when("not_before", args.not_before, utcnow())
    timeout = parse_number("timeout", args.timeout, float)
    engine = ctx.engine(create=True)
    with session_scope(engine) as session:
        [job_id] = create_generations(session, [spec], limits=ctx.settings.jobs, outputs=ctx.settings.outputs)
    if args.wait:
        jobs = watch(engine, [job_id], timeout=timeout, progress=Progress(quiet=args.quiet))
        return _finish(ctx, jobs, args.json)
    if args.json:
        with session_scope(engine) as session:
            print_json(job_dict(ctx.settings, repository.require_job(session, job_id)))
    else:
        print(job_id)
    return EXIT_OK


def _require(ctx: Context, job_id: str) -> Generation:
    with session_scope(ctx.engine()) as session:
        job = get_generation(session, job_id)
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    job = _require(ctx, args.id)
    row = job_dict(ctx.settings, job)
    if args.json:
        print_json(row)
        return EXIT_OK
    width = max(len(key) for key in row)
    for key, value in row.items():
        shown = "-" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else value
        print(f"{key.ljust(width)}  {shown}")
    return EXIT_OK


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    limit = parse_number("limit", args.limit, int)
    offset = parse_number("offset", args.offset, int)
    with session_scope(ctx.engine()) as session:
        jobs = get_all_generations(session, status=args.status, limit=limit, offset=offset)
    if args.json:
        print_json([job_dict(ctx.settings, job) for job in jobs])
        return EXIT_OK
    rows = [
        [job.id, job.status, job.model_name, f"{job.duration_seconds:g}s", when_text(job.created_at),
         " ".join(job.prompt.split())]
        for job in jobs
    ]
    print(table(["ID", "STATUS", "MODEL", "DURATION", "CREATED (UTC)", "PROMPT"], rows, stretch=5))
    return EXIT_OK


def cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    with session_scope(ctx.engine()) as session:
        stats = get_database_stats(session)
    if args.json:
        print_json(stats)
        return EXIT_OK
    average = stats["average_generation_time_seconds"]
    rows = [[status, str(count)] for status, count in stats["by_status"].items()]
    rows += [
        ["total", str(stats["total_generations"])],
        ["distinct prompts", str(stats["total_prompts"])],
        ["average generation time", "-" if average is None else f"{average:.2f}s"],
        ["audio generated", f"{stats['total_audio_seconds']:.1f}s"],
        ["oldest pending since", stats["oldest_pending_created_at"] or "-"],
    ]
    print(table(["", "GENERATIONS"], rows))
    return EXIT_OK


def cmd_wait(ctx: Context, args: argparse.Namespace) -> int:
    timeout = parse_number("timeout", args.timeout, float)
    engine = ctx.engine()
    jobs = watch(engine, args.ids, timeout=timeout, progress=Progress(quiet=args.quiet))
    return _finish(ctx, jobs, args.json)


def _change(ctx: Context, args: argparse.Namespace, verb: str) -> int:
    with session_scope(ctx.engine()) as session:
        change = cancel_generation if verb == "cancelled" else retry_generation
        job = change(session, args.id)
    if args.json:
        print_json(job_dict(ctx.settings, job))
    else:
        print(f"{verb} {job.id}")
    return EXIT_OK


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    return _change(ctx, args, "cancelled")


def cmd_retry(ctx: Context, args: argparse.Namespace) -> int:
    return _change(ctx, args, "requeued")


def _paths_in_use(session: Session, victims: list[tuple[str, str]], *, deleted: bool) -> set[str]:
    """The victims' file paths that rows staying in the table still name: two jobs may share one
    file (``--file-path outputs/test.wav``), and pruning the old one must not take the new one's."""
    shared: set[str] = set()
    paths = sorted({file_path for _, file_path in victims})
    going = Counter(file_path for _, file_path in victims)
    for start in range(0, len(paths), 500):  # SQLite limits bound parameters
        query = (sa.select(Generation.file_path, sa.func.count())
                 .where(Generation.file_path.in_(paths[start:start + 500])).group_by(Generation.file_path))
        for file_path, count in session.execute(query):
            if deleted or count > going[file_path]:  # after the deletion, any row left is a user
                shared.add(file_path)
    return shared


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    cutoff = parse_age("older_than", args.older_than, utcnow())
    statuses = [s.strip() for s in args.status.split(",") if s.strip()]
    if not statuses or not set(statuses) <= {"completed", "failed"}:
        raise ValidationError("status", args.status, "completed, failed or both (comma-separated)")
    engine = ctx.engine()
    with session_scope(engine) as session:
        victims = repository.finished_jobs_before(session, statuses, cutoff)
        if not args.dry_run:
            # Files go only with rows really deleted, and only after the deletion is committed.
            deleted = set(repository.delete_finished(session, [job_id for job_id, _ in victims]))
            victims = [(job_id, path) for job_id, path in victims if job_id in deleted]
        # Read in the deleting transaction: rows left then are the ones that still need the file.
        in_use = _paths_in_use(session, victims, deleted=not args.dry_run) if args.delete_files else set()
    removed, freed, skipped, kept = 0, 0, [], []
    files: list[Path] = []
    if args.delete_files:
        for file_path in dict.fromkeys(file_path for _, file_path in victims):  # each file once
            path = output_path(ctx.settings, file_path)
            if path is None:
                skipped.append(file_path)  # outside the outputs folder: never touched
            elif file_path in in_use:
                kept.append(file_path)
            elif path.is_file():
                files.append(path)
    if not args.dry_run:
        for path in files:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed, freed = removed + 1, freed + size
    result = {
        "dry_run": args.dry_run, "cutoff": cutoff.isoformat(), "statuses": statuses,
        "generations": len(victims), "files": len(files) if args.dry_run else removed,
        "bytes": sum(p.stat().st_size for p in files) if args.dry_run else freed,
        "skipped_outside_outputs": skipped, "kept_in_use": kept,
    }
    if args.json:
        print_json(result)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {result['generations']} generation(s) finished before {when_text(cutoff)} UTC"
              + (f" and {result['files']} file(s), {result['bytes']} bytes" if args.delete_files else ""))
        for file_path in skipped:
            print(f"kept {file_path}: not inside the outputs folder {ctx.settings.outputs_dir.absolute()}")
        for file_path in kept:
            print(f"kept {file_path}: a generation that stays still uses it")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("enqueue", help="queue one generation and print its id",
                       description="Queue one generation; prints its id (--json: the whole row).")
    p.add_argument("prompt", help="what the music should be")
    p.add_argument("--duration", metavar="SECONDS",
                   help="length of the audio (default: jobs.default_duration_seconds)")
    p.add_argument("--model", help="model name; a daemon serving it claims it (default: jobs.default_model)")
    p.add_argument("--sample-rate", metavar="HZ")
    p.add_argument("--channels", metavar="N", help="1 (mono) or 2 (stereo)")
    p.add_argument("--priority", default="0", help="higher runs first, -1000..1000 (default 0)")
    p.add_argument("--not-before", metavar="WHEN",
                   help="not before WHEN: an ISO time (local unless it has an offset) or a span (10m, 2h)")
    p.add_argument("--metadata", metavar="JSON", help="a JSON object, e.g. '{\"bpm\": 120, \"key\": \"Am\"}'")
    p.add_argument("--file-path", help="the WAV's path, relative to the folder holding the outputs folder")
    p.add_argument("--max-attempts", metavar="N", help="attempts before failing (default: jobs.max_attempts)")
    p.add_argument("--wait", action="store_true", help="then wait like 'dgxqueue wait' (exit 1 if it fails)")
    p.add_argument("--timeout", metavar="SECONDS", help="with --wait: stop waiting after this long (exit 75)")
    p.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress display")
    p.add_argument("--json", action="store_true", help="print the job's row as JSON")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("show", help="show one generation", description="Show every field of one generation.")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("list", help="list generations, newest first",
                       description="List generations, newest first (completed ones by completion time).")
    p.add_argument("--status", help="pending, processing, completed or failed")
    p.add_argument("--limit", default="20", help="at most this many rows (default 20)")
    p.add_argument("--offset", default="0", help="skip this many rows first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("stats", help="counts by status and totals", description="Counts by status, totals.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("wait", help="wait for jobs to finish, showing progress",
                       description="Show progress on stderr until every job is completed or failed, "
                                   "then print each outcome and WAV path. Exit 1 if any failed, "
                                   "75 on --timeout.")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", metavar="SECONDS", help="give up waiting after this long (exit 75)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wait)

    for name, func, text in (("cancel", cmd_cancel, "Cancel a pending generation (it becomes failed)"),
                             ("retry", cmd_retry, "Send a failed generation back to the queue")):
        p = sub.add_parser(name, help=text.lower(), description=text + ". Exit 4 if its status forbids it.")
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("prune", help="delete finished generations older than an age",
                       description="Delete completed/failed generations that finished before now minus "
                                   "--older-than; with --delete-files also their WAV files (only files "
                                   "inside the outputs folder).")
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 2w")
    p.add_argument("--status", default="completed,failed",
                   help="which finished statuses (default completed,failed)")
    p.add_argument("--delete-files", action="store_true", help="remove their WAV files too")
    p.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)
