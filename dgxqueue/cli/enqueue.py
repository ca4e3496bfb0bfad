"""The ``enqueue`` subcommand: one job from flags, or many from JSON lines (``--jsonl FILE``).

Every job is validated before anything is written: one bad line refuses the whole batch (exit 65)
naming its line number and field. A job whose model no configured or registered generator serves
is queued with a warning on stderr; it waits until a daemon serving that model runs. So is a job
whose model no live daemon serves now (the registry, :mod:`dgxqueue.storage.registry`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import IO, Any

import sqlalchemy as sa

from dgxqueue.api import enqueue_many
from dgxqueue.cli.common import (
    EX_DATAERR,
    EX_IOERR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Context,
    job_dict,
    parse_json_object,
    parse_number,
    parse_span,
    parse_when_or_span,
    print_json,
    safe,
)
from dgxqueue.cli.stopsignals import Signalled, stop_signals_interrupt
from dgxqueue.cli.wait import Progress, finish, watch
from dgxqueue.config import Settings
from dgxqueue.errors import ValidationError
from dgxqueue.generators import available_generators, create_generator
from dgxqueue.storage import Generation, JobSpec, registry, session_scope, validate_jobs
from dgxqueue.storage.models import utcnow

#: The flags that set one job's fields; with ``--jsonl`` each line sets its own.
_JOB_FLAGS = ("duration", "model", "sample_rate", "channels", "priority", "not_before", "metadata",
              "file_path", "max_attempts", "ttl", "expires_at", "dedupe_key")


def _spec_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"prompt": args.prompt, "priority": parse_number("priority", args.priority or "0", int)}
    for key, text, kind in (("duration_seconds", args.duration, float),
                            ("sample_rate", args.sample_rate, int), ("channels", args.channels, int),
                            ("max_attempts", args.max_attempts, int)):
        if text is not None:
            spec[key] = parse_number(key, text, kind, door=True)
    if args.model is not None:
        spec["model_name"] = args.model
    if args.file_path is not None:
        spec["file_path"] = args.file_path
    if args.metadata is not None:
        spec["metadata"] = parse_json_object("metadata", args.metadata)
    if args.not_before is not None:
        spec["run_after"] = parse_when_or_span("not_before", args.not_before)
    if args.expires_at is not None:
        spec.update(_expiry("expires_at", args.expires_at, args.ttl is not None))
    if args.dedupe_key is not None:
        spec["dedupe_key"] = args.dedupe_key
    if args.ttl is not None:
        text = args.ttl.strip()
        spec["ttl"] = (parse_span("ttl", text).total_seconds() if text[-1:].lower() in "smhdw"
                       else parse_number("ttl", text, float, door=True))
    return spec


#: Room on a line beyond what its metadata may take: no job's other fields come near it.
_LINE_SLACK_BYTES = 16 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"


def _lines(stream: IO[bytes], settings: Settings) -> Iterator[tuple[int, str]]:
    # A "\u0041" escape is 6 bytes for 1 of the encoded metadata, whose size the door limits.
    limit = _LINE_SLACK_BYTES + 6 * settings.jobs.max_metadata_bytes
    number = 0
    while raw := stream.readline(limit + 1):  # bounded: one huge line must not fill the memory
        number += 1
        if len(raw) > limit:
            raise CliError(f"line {number}: longer than {limit} bytes, more than any job's fields take",
                           EX_DATAERR)
        if number == 1 and raw.startswith(_BOM):  # editors on Windows start UTF-8 files with one
            raw = raw[len(_BOM):]
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CliError(f"line {number}: not UTF-8 text ({exc.reason} at byte {exc.start + 1})",
                           EX_DATAERR) from None


def _expiry(field: str, text: str, ttl_given: bool) -> dict[str, Any]:
    """``expires_at`` given as text: a span from now is a ``ttl``, counted from the database's
    clock at the insert, not this host's (unless a ttl is given too: then the door refuses both)."""
    when = parse_when_or_span(field, text)
    if isinstance(when, timedelta) and not ttl_given:
        return {"ttl": when.total_seconds()}
    return {"expires_at": utcnow() + when if isinstance(when, timedelta) else when}


def read_jsonl(stream: IO[bytes], settings: Settings) -> list[JobSpec]:
    """One job per non-blank line, each a JSON object of :func:`dgxqueue.enqueue`'s arguments
    (``run_after`` as an ISO time or a span such as ``10m``), validated as it is read."""
    jobs: list[JobSpec] = []
    for number, line in _lines(stream, settings):
        if not line.strip():
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CliError(f"line {number}: not a JSON object ({exc.msg} at column {exc.colno})", EX_DATAERR) from None
        except RecursionError:
            raise CliError(f"line {number}: a JSON object nested too deeply", EX_DATAERR) from None
        except ValueError as exc:  # an integer of more digits than Python converts
            raise CliError(f"line {number}: not a JSON object Python can read ({exc})", EX_DATAERR) from None
        if not isinstance(spec, dict):
            raise CliError(f"line {number}: expected a JSON object such as {{\"prompt\": \"lo-fi beat\"}}, "
                           f"got {type(spec).__name__}", EX_DATAERR)
        try:
            if isinstance(spec.get("run_after"), str):
                spec["run_after"] = parse_when_or_span("run_after", spec["run_after"])
            if isinstance(spec.get("expires_at"), str):
                spec.update(_expiry("expires_at", spec.pop("expires_at"), spec.get("ttl") is not None))
            jobs += validate_jobs([spec], limits=settings.jobs, outputs=settings.outputs)
        except ValidationError as exc:
            raise CliError(f"line {number}: {exc}", EX_DATAERR) from None
    return jobs


def served_models(settings: Settings, wanted: Iterable[str] = ()) -> set[str]:
    """The models the configured generator serves, and every registered generator's defaults;
    with ``wanted``, only until all of those are found (each backend looked at is imported, and
    a backend's import can cost a producer's command more than the rest of it).

    Only what this machine's configuration and installed backends say: a daemon elsewhere, or one
    started with other options, may serve more.
    """
    served: set[str] = set(settings.generator.models)
    missing = set(wanted)
    chosen = [] if served else [(settings.generator.name, settings.generator.options)]
    for name, options in [*chosen, *((name, {}) for name in available_generators())]:
        if missing and missing <= served:
            break
        try:
            served |= set(create_generator(name, options).models)
        except Exception:  # noqa: S112  (only a warning depends on it: a broken backend serves nothing)
            continue
    return served


def warn_unserved(settings: Settings, models: Iterable[str], live: dict[str, int] | None = None) -> None:
    """One warning per model that no live daemon serves (``live``: daemons per model, None when
    the registry could not be read): that no generator here serves it (a typo?), or else that
    none serving it runs now."""
    wanted = sorted(set(models) - set(live or {}))
    known = served_models(settings, wanted) if wanted else set()
    for model in wanted:
        if model not in known:
            print(f"dgxqueue: warning: no configured or registered generator serves model {safe(repr(model))}; "
                  "the job waits until a daemon serving it runs (check --model or jobs.default_model)",
                  file=sys.stderr)
        elif live is not None:
            print(f"dgxqueue: warning: no live daemon serves model {safe(repr(model))} now; the job waits until "
                  "one starts ('dgxqueue workers' lists the live daemons)", file=sys.stderr)


def _live_per_model(engine: sa.Engine) -> dict[str, int] | None:
    """Live daemons per model; None if the registry cannot be read (only a warning depends on it)."""
    try:
        with session_scope(engine) as session:
            return registry.live_per_model(session)
    except sa.exc.SQLAlchemyError:
        return None


def _read_back(ctx: Context, ids: list[str]) -> list[Generation]:
    found: dict[str, Generation] = {}
    with session_scope(ctx.engine()) as session:
        for start in range(0, len(ids), 500):  # SQLite limits bound parameters
            query = sa.select(Generation).where(Generation.id.in_(ids[start:start + 500]))
            found.update((job.id, job) for job in session.scalars(query))
    return [found[job_id] for job_id in ids]


def cmd_enqueue(ctx: Context, args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.jsonl is None):
        raise CliError("give the prompt, or --jsonl FILE for many jobs (not both)", EXIT_USAGE)
    with ExitStack() as stack:
        if args.jsonl is None:
            jobs = validate_jobs([_spec_from_flags(args)], limits=ctx.settings.jobs, outputs=ctx.settings.outputs)
        else:
            given = [flag for flag in _JOB_FLAGS if getattr(args, flag) is not None]
            if given:
                raise CliError(f"--{given[0].replace('_', '-')} cannot be combined with --jsonl: each line "
                               "gives its job's fields", EXIT_USAGE)
            if args.jsonl == "-" and sys.stdin is None:  # started with stdin closed (<&-)
                raise CliError("--jsonl -: standard input is closed", EX_IOERR)
            stream = sys.stdin.buffer if args.jsonl == "-" else stack.enter_context(open(args.jsonl, "rb"))
            jobs = read_jsonl(stream, ctx.settings)
    timeout = parse_number("timeout", args.timeout, float)
    engine = ctx.engine(create=True)
    ids = enqueue_many(jobs, database_url=ctx.settings.database.url, settings=ctx.settings)
    progress = Progress(quiet=args.quiet)
    try:
        with stop_signals_interrupt():  # SIGTERM (a cancelled CI job, timeout(1)) and SIGHUP too
            return _report(ctx, args, engine, ids, jobs, timeout, progress)
    except KeyboardInterrupt as stopped:
        # The jobs are queued whatever happens to the wait: without their ids (the progress lines
        # show 8 characters, --quiet none) Ctrl-C left nothing to find them by.
        progress.done()
        how = f"stopped by {signal.Signals(stopped.signum).name}" if isinstance(stopped, Signalled) else "interrupted"
        print(f"dgxqueue: {how}; {'the job stays' if len(ids) == 1 else f'the {len(ids)} jobs stay'} "
              f"queued ('dgxqueue wait {' '.join(ids)}' waits again)", file=sys.stderr)
        return 128 + stopped.signum if isinstance(stopped, Signalled) else EXIT_INTERRUPTED


def _report(ctx: Context, args: argparse.Namespace, engine: sa.Engine, ids: list[str], jobs: list[JobSpec],
            timeout: float | None, progress: Progress) -> int:
    """Warn of unserved models, then wait for the jobs or print their ids (or rows)."""
    warn_unserved(ctx.settings, {job.model_name for job in jobs}, _live_per_model(engine))
    if args.wait:
        finished = watch(engine, ids, timeout=timeout, progress=progress)
        return finish(ctx.settings, finished, args.json)
    if args.json:
        rows_out = [job_dict(ctx.settings, job) for job in _read_back(ctx, ids)]
        print_json(rows_out if args.jsonl is not None else rows_out[0])
    else:
        for job_id in ids:
            print(job_id)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "enqueue", help="queue generations and print their ids",
        description="Queue one generation from PROMPT and flags, or many from JSON lines (--jsonl); prints "
                    "each id on a line of its own (--json: the rows). Every job is validated first: one bad "
                    "line refuses them all (exit 65). A model that no configured or registered generator "
                    "serves gets a warning on stderr (the job is still queued).",
    )
    p.add_argument("prompt", nargs="?", help="what the music should be")
    p.add_argument("--jsonl", metavar="FILE",
                   help="read jobs from FILE ('-': stdin), one JSON object a line with enqueue's fields: "
                        "prompt, duration_seconds, model_name, metadata, priority, sample_rate, channels, "
                        "file_path, max_attempts, model_version, run_after, expires_at, ttl, dedupe_key; all go in one "
                        "transaction")
    p.add_argument("--duration", metavar="SECONDS",
                   help="length of the audio (default: jobs.default_duration_seconds)")
    p.add_argument("--model", help="model name; a daemon serving it claims it (default: jobs.default_model)")
    p.add_argument("--sample-rate", metavar="HZ")
    p.add_argument("--channels", metavar="N", help="1 (mono) or 2 (stereo)")
    p.add_argument("--priority", help="higher runs first, -1000..1000 (default 0)")
    p.add_argument("--not-before", metavar="WHEN",
                   help="not before WHEN: an ISO time (local unless it has an offset) or a span (10m, 2h)")
    p.add_argument("--dedupe-key", metavar="KEY",
                   help="if an unfinished job holds KEY, print its id instead of queueing another")
    p.add_argument("--ttl", metavar="SECONDS",
                   help="fail the job as expired, unrun, if still pending this long from now (120, 10m, 2h)")
    p.add_argument("--expires-at", metavar="WHEN",
                   help="as --ttl, at WHEN: an ISO time (local unless it has an offset) or a span (10m)")
    p.add_argument("--metadata", metavar="JSON", help="a JSON object, e.g. '{\"bpm\": 120, \"key\": \"Am\"}'")
    p.add_argument("--file-path", help="the WAV's path, relative to the folder holding the outputs folder")
    p.add_argument("--max-attempts", metavar="N", help="attempts before failing (default: jobs.max_attempts)")
    p.add_argument("--wait", action="store_true", help="then wait like 'dgxqueue wait' (exit 1 if one fails)")
    p.add_argument("--timeout", metavar="SECONDS", help="with --wait: stop waiting after this long (exit 75)")
    p.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress display")
    p.add_argument("--json", action="store_true", help="print the job's row as JSON (--jsonl: a list of rows)")
    p.set_defaults(func=cmd_enqueue)
