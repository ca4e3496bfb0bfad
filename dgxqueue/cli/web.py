"""The ``web`` subcommand: serve the status page (:mod:`dgxqueue.web`, the ``web`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgxqueue.cli.common import EX_CONFIG, EX_IOERR, EX_UNAVAILABLE, EXIT_OK, CliError, Context, parse_number, safe
from dgxqueue.cli.stopsignals import catch, restore

TOKEN_VARIABLE = "DGXQUEUE_WEB_TOKEN"  # noqa: S105  (the name of the variable, not a token)
MIN_TOKEN_LENGTH = 16
#: The most a token file is read of: a token is tens of characters; /dev/zero or a huge file
#: named by mistake would otherwise be read whole (every byte of memory, or a giant token).
MAX_TOKEN_FILE_BYTES = 4096


def read_token(args: argparse.Namespace) -> str | None:
    """The token from ``--token-file`` or ``$DGXQUEUE_WEB_TOKEN`` (never echoed in an error)."""
    if args.token_file:
        try:
            with Path(args.token_file).open("rb") as file:
                data = file.read(MAX_TOKEN_FILE_BYTES + 1)
            if len(data) > MAX_TOKEN_FILE_BYTES:
                raise CliError(f"--token-file {safe(args.token_file)} holds over {MAX_TOKEN_FILE_BYTES} bytes: "
                               "it must hold the token alone", EX_CONFIG)
            token = data.decode("utf-8").removeprefix("\ufeff").strip()  # an editor's byte order mark
        except OSError as exc:  # what is wrong, as the system says it (not the exception's class)
            raise CliError(f"--token-file {safe(args.token_file)} cannot be read: {exc.strerror or exc}",
                           EX_IOERR) from None
        except UnicodeDecodeError as exc:  # its bytes are never shown: they may be the token
            raise CliError(f"--token-file {safe(args.token_file)} cannot be read: not UTF-8 text "
                           f"({exc.reason} at byte {exc.start + 1})", EX_IOERR) from None
        where = f"--token-file {safe(args.token_file)}"
    else:
        token = os.environ.get(TOKEN_VARIABLE, "").strip()
        where = f"${TOKEN_VARIABLE}"
    if not token:
        if args.token_file:
            raise CliError(f"{where} is empty", EX_CONFIG)
        return None
    if len(token) < MIN_TOKEN_LENGTH or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise CliError(f"the token in {where} must be at least {MIN_TOKEN_LENGTH} printable characters without "
                       "spaces (for example: openssl rand -hex 32)", EX_CONFIG)
    return token


def cmd_web(ctx: Context, args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dgxqueue.web import WebOptions, create_app
        from dgxqueue.web.security import is_loopback
    except ImportError as exc:
        raise CliError(f"the status page needs the web extra (pip install 'dgxqueue[web]'): {exc}", EX_CONFIG) \
            from None
    port = parse_number("--port", args.port, int)
    if not 0 <= port <= 65535:
        raise CliError(f"--port {port} is not a TCP port (0..65535)", EX_CONFIG)
    token = read_token(args)
    loopback = is_loopback(args.host)
    if not loopback and token is None:
        raise CliError(f"--host {args.host} is not a loopback address: give a token (--token-file or "
                       f"${TOKEN_VARIABLE}), or keep the default 127.0.0.1 behind a reverse proxy", EX_CONFIG)
    engine = ctx.engine()
    try:  # bound here, so a taken port is one line and exit 69 (uvicorn would exit 1 after a log line)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        listener = socket.create_server((args.host, port), family=family)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host} port {port}: {exc.strerror or exc}", EX_UNAVAILABLE) from None
    port = listener.getsockname()[1]
    app = create_app(WebOptions(settings=ctx.settings, engine=engine, read_only=args.read_only, token=token,
                                loopback_only=loopback and token is None))
    # No access log: a first request may carry ?token= in its address.
    config = uvicorn.Config(app, host=args.host, port=port, access_log=False, log_level="warning",
                            server_header=False, proxy_headers=False)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own catches a SIGINT ignored at start (``web &`` in a script) and raises the
            # signal again after its graceful stop: this one leaves it ignored and exits 0, as the worker.
            # SIGHUP (a closed terminal) stops it as the worker, gracefully, not by its default action.
            previous = catch((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), self.handle_exit)
            try:
                yield
            finally:
                restore(previous)

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            # A second stop signal of either kind drops the open requests, as the worker's does:
            # uvicorn forces only on a second SIGINT, so a slow download kept ``web &`` up until SIGKILL.
            if self.should_exit:
                self.force_exit = True
                # The dropped requests' cancellations are what was asked for, not errors to trace.
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            self.should_exit = True

    server = Server(config)
    print(f"dgxqueue web: http://{'[' + args.host + ']' if ':' in args.host else args.host}:{port}/"
          f"{' (read-only)' if args.read_only else ''}{' (token required)' if token else ''}", flush=True)
    server.run(sockets=[listener])
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "web", help="serve the status page (overview, daemons, jobs, listen)",
        description="Serve the status page and its JSON API (needs the web extra: pip install 'dgxqueue[web]'). "
                    "Binds 127.0.0.1 by default; any other address needs a token (--token-file or "
                    f"${TOKEN_VARIABLE}), sent as 'Authorization: Bearer TOKEN' or entered once in the login form.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", default="8470", help="TCP port (default 8470; 0: any free port, printed)")
    p.add_argument("--read-only", action="store_true", help="show only: cancel, retry, pause and enqueue are refused")
    p.add_argument("--token-file", metavar="PATH",
                   help=f"file holding the access token (else ${TOKEN_VARIABLE}); required off loopback")
    p.set_defaults(func=cmd_web)
