"""The ``dgxqueue`` command (also ``python -m dgxqueue``).

Subcommands: ``worker``, ``enqueue``, ``show``, ``list``, ``stats``, ``wait``, ``cancel``,
``retry``, ``prune``, ``archive``, ``workers``, ``pause``, ``resume``,
``db upgrade|downgrade|current|backup|reset|copy|check|vacuum``,
``config show|check``, ``demo`` and ``web``. Each has ``--help``; most have ``--json``. Settings are parsed
once, before anything
touches the database: defaults < ``--config``/``$DGXQUEUE_CONFIG`` < environment < flags.

Errors are one line on stderr (``dgxqueue: error: ...``) and an exit code:

====  ==============================================================================
0     success; the worker stopped by a signal, or ``worker --burst`` drained the queue
1     a job failed (``wait``, ``enqueue --wait``, ``demo``)
2     usage error: unknown or missing argument; ``db reset`` without ``--yes``
3     no generation with that id (or id prefix)
4     the job's status forbids it (cancel a finished job, retry a completed one)
5     ``db check`` found the database damaged
65    bad input data (EX_DATAERR): a value out of range, bad JSON, bad time span, a bad
      ``enqueue --jsonl`` line (naming it); an id prefix that matches several jobs; ``db copy``
      or ``archive`` met a row the other database holds differently, or a failed verification;
      ``prune`` or ``archive`` left a completed job whose result is held under its temporary name
      (or may be: its folder cannot be listed)
69    unavailable (EX_UNAVAILABLE): database unreachable, missing, or not migrated (the worker
      never creates one: ``db upgrade`` does); the metrics port (or ``web``'s) is taken
70    internal error (EX_SOFTWARE): a bug or a broken installation; ``--traceback``
73    cannot create the output (EX_CANTCREAT): ``db backup`` target exists
74    input/output error (EX_IOERR): a file could not be read or written; ``enqueue --jsonl -``
      with standard input closed
75    temporary failure (EX_TEMPFAIL): ``--timeout`` passed, or the demo's daemon died; the
      worker met a machine fault (disk, memory, GPU) and gave its jobs back unspent, or
      ``worker --burst`` could not drain the queue because its outputs folder takes no files;
      ``db copy`` while daemons are live on either database
78    configuration error (EX_CONFIG): names the key, the value and what is allowed; a
      malformed database URL (its password never shown), a PostgreSQL URL without the
      ``postgres`` extra; ``web`` without the ``web`` extra, or off loopback without a token
124   the worker gave up on a backend call past ``worker.job_timeout_seconds`` (charged to its
      jobs; the rest given back) and exited for a fresh process, as timeout(1) does
129   ``demo`` stopped by SIGHUP (a closed terminal), its daemon stopped first; ``enqueue --wait``
      stopped by it, the queued ids said
130   interrupted (Ctrl-C)
141   stdout was closed early (``dgxqueue list | head``), as a shell reports SIGPIPE
143   ``demo`` stopped by SIGTERM, its daemon stopped first; ``enqueue --wait`` stopped by it,
      the queued ids said
====  ==============================================================================
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dgxqueue import __version__

# Each subcommand's module is imported only when that subcommand runs (or asks for its --help):
# SQLAlchemy alone costs longer to import than ``--version`` should take. The help text is here so
# that ``dgxqueue --help`` lists every subcommand without importing any of them.
COMMANDS: dict[str, tuple[str, str]] = {
    "worker": ("dgxqueue.cli.admin", "run the daemon (one per GPU)"),
    "db": ("dgxqueue.cli.admin", "migrate, inspect, back up or reset the database"),
    "config": ("dgxqueue.cli.admin", "show or check the settings"),
    "enqueue": ("dgxqueue.cli.jobs", "queue generations and print their ids"),
    "show": ("dgxqueue.cli.jobs", "show one generation"),
    "list": ("dgxqueue.cli.jobs", "list generations, newest first"),
    "stats": ("dgxqueue.cli.jobs", "counts by status and totals"),
    "wait": ("dgxqueue.cli.jobs", "wait for jobs to finish, showing progress"),
    "cancel": ("dgxqueue.cli.jobs", "cancel a generation (a running one is stopped by its daemon)"),
    "retry": ("dgxqueue.cli.jobs", "send a failed generation back to the queue"),
    "prune": ("dgxqueue.cli.jobs", "delete finished generations older than an age"),
    "archive": ("dgxqueue.cli.dbmove", "move finished generations to an archive database"),
    "workers": ("dgxqueue.cli.workers", "list the live daemons"),
    "pause": ("dgxqueue.cli.models", "stop every daemon claiming a model"),
    "resume": ("dgxqueue.cli.models", "let daemons claim a paused model again"),
    "demo": ("dgxqueue.cli.demo", "start a daemon, queue sample prompts, wait, show the WAV files"),
    "web": ("dgxqueue.cli.web", "serve the status page (overview, daemons, jobs, listen)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _LazyCommand(_Parser):
    """A subcommand's stand-in: imports its module and hands the arguments to the real parser."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        return real_parser(self.prog.rpartition(" ")[2]).parse_known_args(args, namespace)


def real_parser(command: str) -> argparse.ArgumentParser:
    """The full parser of one subcommand, built by its module's ``add_parsers``."""
    holder = _Parser(prog="dgxqueue").add_subparsers()
    importlib.import_module(COMMANDS[command][0]).add_parsers(holder)
    parser: argparse.ArgumentParser = holder.choices[command]
    return parser


def _top_parser(commands: type[argparse.ArgumentParser]) -> tuple[argparse.ArgumentParser, Any]:
    parser = _Parser(
        prog="dgxqueue",
        description="A persistent job queue and worker daemon for AI music generation.",
        epilog="Exit codes: 0 ok, 1 job failed, 2 usage, 3 not found, 4 invalid state, 5 db check found damage, "
               "65 bad input "
               "(or an ambiguous id prefix, or rows prune/archive left, named), 69 database unavailable (or the "
               "metrics port taken), 70 internal, "
               "73/74 file errors, 75 timed out or a worker's machine fault, 78 bad config, 124 a worker's "
               "backend call past its time limit, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"dgxqueue {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="config file (TOML); default $DGXQUEUE_CONFIG, else built-in defaults")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=commands)
    sub.required = True
    return parser, sub


def lazy_parser() -> argparse.ArgumentParser:
    """The parser ``main`` uses: each subcommand's module is imported only if it is chosen."""
    parser, sub = _top_parser(_LazyCommand)
    for name, (_module, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The whole parser, every subcommand's module imported (for tests and documentation)."""
    parser, sub = _top_parser(_Parser)
    for module in dict.fromkeys(module for module, _text in COMMANDS.values()):
        importlib.import_module(module).add_parsers(sub)
    return parser


def _code_for(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and one-line message for an error we expect, or None for a bug."""
    import sqlite3

    import sqlalchemy as sa

    from dgxqueue.cli.common import (
        EX_CONFIG,
        EX_DATAERR,
        EX_IOERR,
        EX_SOFTWARE,
        EX_UNAVAILABLE,
        EXIT_INVALID_STATE,
        EXIT_NOT_FOUND,
        CliError,
        one_line,
    )
    from dgxqueue.errors import (
        ConfigError,
        DgxQueueError,
        InvalidStateError,
        JobNotFoundError,
        SchemaError,
        UnknownGeneratorError,
        ValidationError,
    )
    from dgxqueue.storage.dberrors import database_unavailable

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, (ConfigError, UnknownGeneratorError)):
        return EX_CONFIG, str(exc)
    if isinstance(exc, ValidationError):
        return EX_DATAERR, str(exc)
    if isinstance(exc, JobNotFoundError):
        return EXIT_NOT_FOUND, str(exc)
    if isinstance(exc, InvalidStateError):
        return EXIT_INVALID_STATE, str(exc)
    if isinstance(exc, SchemaError):
        return EX_UNAVAILABLE, str(exc)
    if isinstance(exc, DgxQueueError):
        return EX_SOFTWARE, str(exc)
    if isinstance(exc, sa.exc.DBAPIError) and database_unavailable(exc):
        return EX_UNAVAILABLE, f"database unavailable: {one_line(str(exc.orig)) or type(exc.orig).__name__}"
    if isinstance(exc, sqlite3.DatabaseError) and database_unavailable(exc):  # db backup uses SQLite directly
        return EX_UNAVAILABLE, f"database unavailable: {one_line(str(exc))}"
    if isinstance(exc, sa.exc.NoSuchModuleError):
        return EX_UNAVAILABLE, f"no driver: {exc} (PostgreSQL: pip install 'dgxqueue[postgres]')"
    if isinstance(exc, OSError):
        return EX_IOERR, str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    previous = sys.unraisablehook
    sys.unraisablehook = functools.partial(_interrupt_again, previous)
    # Python's own handler only: a SIGINT started ignored (``cmd &``), or a caller's handler, stays.
    ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ctrl_c:
        try:
            signal.signal(signal.SIGINT, _raise_interrupted)
        except ValueError:  # called off the main thread, where no handler can be set
            ctrl_c = False
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while the command's modules import (a few tenths of a second) printed Python's
        # traceback; 130 is EXIT_INTERRUPTED, not imported from cli.common, whose import is that.
        print("dgxqueue: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.unraisablehook = previous
        for timer in _redeliveries:  # the command ended first: no SIGINT while Python shuts down
            timer.cancel()
        if ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while :func:`main` runs, not Python's exact KeyboardInterrupt: CPython marks that one
    unhandled, caught or not, once it leaves code run by ``exec`` of a string (SQLAlchemy builds its
    visitors so on first use), and ``python -m dgxqueue`` then killed itself by SIGINT at exit after
    saying 'interrupted' and returning 130."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted


#: Ctrl-Cs :func:`_interrupt_again` is to deliver again (``threading.Timer``, imported when one comes).
_redeliveries: list[Any] = []


def _interrupt_again(previous: Callable[[Any], object], unraisable: Any) -> None:
    """Ctrl-C that lands in a callback Python runs for itself (importlib's module-lock weakref,
    while the command's modules import) is printed as 'Exception ignored ... Traceback' and lost:
    it is delivered to the main thread again, where :func:`main` says 'interrupted'. From another
    thread, a moment later: raised now, it would land in this hook and be lost the same way. A real
    signal to the main thread, not ``_thread.interrupt_main``: that one only sets a flag, which a
    blocking wait (a lock, a socket) does not see until it ends on its own. The signal that raised
    it: SIGTERM or SIGHUP turned into an interrupt (``signum``) must not come back as Ctrl-C."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        import signal
        import threading

        main_thread = threading.main_thread().ident
        assert main_thread is not None  # the main thread has always started
        signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
        later = threading.Timer(0.05, signal.pthread_kill, (main_thread, signum))
        later.daemon = True
        _redeliveries.append(later)
        later.start()
        return
    previous(unraisable)


def _main(argv: Sequence[str] | None) -> int:
    args = lazy_parser().parse_args(argv)
    from dgxqueue.cli.common import EX_SOFTWARE, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, Context, one_line
    from dgxqueue.config import load_settings

    try:
        overrides: dict[str, Any] = args.overrides(args) if getattr(args, "overrides", None) else {}
        settings = load_settings(args.config, overrides=overrides)
        context = Context(settings=settings, config_path=args.config or os.environ.get("DGXQUEUE_CONFIG"))
        code: int = args.func(context, args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here
        return code
    except KeyboardInterrupt:
        print("dgxqueue: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``dgxqueue list | head``): stop quietly, as a killed pipe would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        known = _code_for(exc)
        if known is None:
            if args.traceback:
                raise
            import sqlalchemy as sa

            if isinstance(exc, sa.exc.DBAPIError):  # the driver's own error, without SQLAlchemy's SQL
                detail = f"database error {type(exc.orig).__name__}: {one_line(str(exc.orig))}"
            else:
                detail = f"{type(exc).__name__}: {one_line(str(exc))}"
            known = EX_SOFTWARE, f"internal error: {detail} (--traceback shows where)"
        code, message = known
        print(f"dgxqueue: error: {one_line(message)}", file=sys.stderr)
        return code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
