"""``dgxqueue demo``: the whole loop on one machine in one command.

It starts a daemon (``dgxqueue worker`` with the ``synth`` generator, as a child process of the
same Python), queues a few sample prompts, shows their progress, stops the daemon with SIGTERM
and prints where the WAV files are. The database is the configured one: by default the embedded
SQLite file ``data/generations.db`` under the current folder, with the WAVs in ``outputs/``.
The child gets a ``NOTIFY_SOCKET`` of ours, so the demo can say when the daemon is ready, exactly
as systemd would learn it, and stops it only once it is: a daemon still starting up could die of
the SIGTERM before its handler exists (as when another daemon on the same database did the jobs
first). The child runs in a session of its own, so a Ctrl-C on the terminal reaches the demo
alone: the first stops the daemon gracefully, a second releases its running jobs at once.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgxqueue import faultpoints
from dgxqueue.cli.common import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EXIT_JOB_FAILED,
    EXIT_OK,
    CliError,
    Context,
    job_dict,
    output_path,
    parse_number,
    print_json,
    table,
)
from dgxqueue.cli.stopsignals import Signalled, stop_signals_interrupt
from dgxqueue.cli.wait import Progress, watch
from dgxqueue.daemon.diskcheck import look
from dgxqueue.errors import ConfigError, ValidationError
from dgxqueue.storage import JobSpec, create_generations, session_scope, validate_jobs
from dgxqueue.storage.database import describe_url, open_queue

MODEL = "synth"
SAMPLES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lo-fi hip hop with warm piano chords and vinyl crackle", {"genre": "lo-fi", "bpm": 82, "key": "Am"}),
    ("driving synthwave with an arpeggiated bassline", {"genre": "synthwave", "bpm": 118, "key": "Em"}),
    ("bright acoustic folk guitar picking", {"genre": "folk", "bpm": 100, "key": "G"}),
    ("deep house groove with a rolling bass", {"genre": "house", "bpm": 124, "key": "Fm"}),
    ("slow ambient drone pad, wide and spacious", {"genre": "ambient", "bpm": 60, "key": "D"}),
    ("trap beat with heavy 808 bass and fast hi-hats", {"genre": "trap", "bpm": 140, "key": "Cm"}),
    ("bossa nova with nylon guitar and soft brushes", {"genre": "bossa nova", "bpm": 130, "key": "Dm"}),
    ("orchestral fanfare with brass and timpani", {"genre": "orchestral", "bpm": 96, "key": "Bb"}),
)


def sample_specs(count: int, duration: float) -> list[dict[str, Any]]:
    """``count`` jobs cycling through the samples, each prompt naming its tempo and key."""
    specs = []
    for i in range(count):
        text, meta = SAMPLES[i % len(SAMPLES)]
        prompt = f"{text}, {meta['bpm']} BPM in {meta['key']}"
        specs.append({"prompt": prompt, "model_name": MODEL, "duration_seconds": duration,
                      "metadata": {**meta, "source": "dgxqueue demo"}})
    return specs


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _stops_with(parent: int) -> Callable[[], None] | None:
    """For the daemon's ``preexec_fn``: SIGTERM it when the demo dies, however it dies (a SIGKILL
    or the OOM killer runs no clean-up, and the worker, without --burst, would run on for ever).
    Linux only; elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None).prctl  # looked up here: no dlopen between fork and exec

    def set_up() -> None:  # in the child, between fork and exec: it survives the exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the demo died before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return set_up


class _Daemon:
    """The ``dgxqueue worker`` child process, its log file and its notify socket."""

    def __init__(self, ctx: Context, folder: Path, progress: Progress) -> None:
        self.progress = progress
        self.log_path = folder / "worker.log"
        self.socket_path = folder / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.socket_path))
        self.notify.setblocking(False)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.socket_path), DGXQUEUE_METRICS_ENABLED="false")
        command = [sys.executable, "-m", "dgxqueue"]
        if ctx.config_path:
            command += ["--config", ctx.config_path]
        command += ["worker", "--generator", MODEL, "--models", MODEL, "--worker-id", f"demo-{os.getpid()}"]
        self.ready = False
        self.stops_sent = 0
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                            preexec_fn=_stops_with(os.getpid()))
        progress.line(f"daemon started (pid {self.process.pid}, synth generator); log: {self.log_path}")

    def check(self) -> str | None:
        """Report what the daemon told systemd; a message if it has died."""
        while True:
            try:
                data = self.notify.recv(4096).decode(errors="replace")
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            if fields.get("READY") == "1":
                self.ready = True
                self.progress.line("daemon ready" + (f": {fields['STATUS']}" if fields.get("STATUS") else ""))
        code = self.process.poll()
        if code is not None:
            return f"the daemon exited with code {code} before the jobs finished; its log: {self.log_path}"
        return None

    def wait_ready(self, timeout: float) -> None:
        """Until the daemon says READY=1 or exits (bounded: start-up on a loaded machine is slow)."""
        deadline = time.monotonic() + timeout
        while not self.ready and self.process.poll() is None and time.monotonic() < deadline:
            select.select([self.notify], [], [], 0.2)
            self.check()

    def stop(self, grace: float) -> int:
        """SIGTERM once it is ready, as systemd sends it; a Ctrl-C meanwhile sends the second
        SIGTERM, which releases the running jobs at once; SIGKILL only past the grace period."""
        try:
            if self.process.poll() is None:
                self.wait_ready(60.0)
                self.progress.line(f"stopping the daemon (SIGTERM to pid {self.process.pid})")
                self.process.send_signal(signal.SIGTERM)
                self.stops_sent = 1
                self._wait(grace + 15)
        except KeyboardInterrupt:
            self.release()
            raise
        finally:
            self.notify.close()
        return self.process.returncode

    def release(self) -> None:
        """Stop it at once, its running jobs released: a second SIGTERM; if none went yet, SIGTERM
        and SIGINT (two SIGTERMs sent together may arrive as one); SIGKILL after 15 s."""
        if self.process.poll() is None:
            self.progress.line("releasing the running jobs now (a second stop signal)")
            self.process.send_signal(signal.SIGTERM)
            if not self.stops_sent:
                self.process.send_signal(signal.SIGINT)
            self.stops_sent = 2
            self._wait(15)

    def _wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _check_arguments(ctx: Context, count: int, duration: float) -> list[JobSpec]:
    """The sample jobs, checked as enqueue and the synth would check them, before anything starts."""
    from dgxqueue.generators import create_generator

    if not 1 <= count <= 100:
        raise ValidationError("prompts", count, "an integer in [1, 100]")
    try:  # built as its daemon will build it: with the configuration's [generator.options]
        synth = create_generator(MODEL, ctx.settings.generator.options)
    except ConfigError as exc:
        raise CliError(f"the demo runs the synth generator, which cannot take this configuration's "
                       f"[generator.options] ({exc}): run it without this configuration (no --config, "
                       "no DGXQUEUE_CONFIG)", EX_CONFIG) from None
    longest = getattr(synth, "max_duration_seconds", None)
    if isinstance(longest, (int, float)) and duration > longest:
        raise ValidationError("duration", duration, f"at most {longest:g} s, the longest the synth renders")
    jobs = validate_jobs(sample_specs(count, duration), limits=ctx.settings.jobs, outputs=ctx.settings.outputs)
    # The daemon would start, then claim nothing while its outputs check fails: the demo sat out
    # its whole timeout and said the jobs "keep going".
    problem = look(ctx.settings.outputs_dir, ctx.settings.outputs.min_free_mb)
    if problem is not None:
        raise CliError(f"the daemon could not write the WAV files: {problem.message} (outputs.dir)", EX_CANTCREAT)
    return jobs


def cmd_demo(ctx: Context, args: argparse.Namespace) -> int:
    try:
        return _demo(ctx, args)
    except Signalled as stopped:  # its daemon is stopped: the clean-up ran as for Ctrl-C
        print(f"dgxqueue: stopped by {signal.Signals(stopped.signum).name}", file=sys.stderr)
        return 128 + stopped.signum


def _demo(ctx: Context, args: argparse.Namespace) -> int:
    count = parse_number("prompts", args.prompts, int)
    duration = parse_number("duration", args.duration, float, door=True)  # checked as enqueue checks it
    timeout = parse_number("timeout", args.timeout, float)
    specs = _check_arguments(ctx, count, duration)
    if timeout is None:
        timeout = max(120.0, 60.0 + 10.0 * count * duration)
    # The demo is asked for by name: it creates (or migrates) its database, before the daemon starts.
    try:
        engine = open_queue(ctx.settings.database.url, ctx.settings.database, create="always")
    except OSError as exc:  # its folder cannot be created (a read-only working folder)
        raise CliError(f"database {describe_url(ctx.settings.database.url)} cannot be created: {exc}",
                       EX_UNAVAILABLE) from None
    progress = Progress()
    folder = Path(tempfile.mkdtemp(prefix="dgxqueue-demo-"))
    grace = ctx.settings.worker.grace_seconds
    daemon = None
    keep_log = True
    told = False  # the first Ctrl-C was answered: "Ctrl-C again releases them at once"
    try:
        with stop_signals_interrupt():
            daemon = _Daemon(ctx, folder, progress)
            try:
                with session_scope(engine) as session:
                    ids = create_generations(session, specs, limits=ctx.settings.jobs,
                                             outputs=ctx.settings.outputs)
                progress.line(f"queued {count} prompt(s) of {duration:g}s each")
                try:
                    jobs = watch(engine, ids, timeout=timeout, progress=progress, alive=daemon.check)
                except CliError as exc:
                    if exc.code != EX_TEMPFAIL or daemon.process.poll() is not None:
                        raise  # not the timeout: the daemon died, and says so
                    # wait's "they keep going" is false here: the demo stops the only daemon it started.
                    raise CliError(f"timed out after {timeout:g}s with jobs unfinished; the demo stops its "
                                   "daemon, so they stay queued until a worker runs them ('dgxqueue worker'; "
                                   "'dgxqueue list --status pending' shows them)", EX_TEMPFAIL) from None
            except KeyboardInterrupt:
                told = True
                progress.line(f"interrupted: the daemon finishes its running jobs (up to {grace:g} s); "
                              "Ctrl-C again releases them at once")
                faultpoints.reached("demo-interrupted")
                daemon.stop(grace)
                raise
            code = daemon.stop(grace)
            if code != 0:
                raise CliError(f"the daemon exited with code {code} on SIGTERM; its log: {daemon.log_path}",
                               EX_SOFTWARE)
            keep_log = False
    finally:
        if daemon is not None and daemon.process.poll() is None:
            # An error while it ran; or the second Ctrl-C, come before stop() began, which must
            # still release the jobs at once rather than wait out the grace period.
            if told:
                daemon.release()
            else:
                daemon.stop(grace)
        if not keep_log:
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
    if args.json:
        print_json([job_dict(ctx.settings, job) for job in jobs])
    else:
        rows = [[job.id, job.status,
                 f"{job.generation_time_seconds:.2f}s" if job.generation_time_seconds is not None else "-",
                 str(output_path(ctx.settings, job.file_path) or job.file_path)
                 if job.status == "completed" else job.error_message or "-"]
                for job in jobs]
        print(table(["ID", "STATUS", "TOOK", "WAV FILE"], rows))
        print(f"\nWAV files are in {ctx.settings.outputs_dir.absolute()}")
    return EXIT_OK if all(job.status == "completed" for job in jobs) else EXIT_JOB_FAILED


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="start a daemon, queue sample prompts, wait, show the WAV files",
        description="Start a daemon (synth generator) on the configured database (default: "
                    "data/generations.db here), queue sample prompts, show their progress, stop the daemon "
                    "and print where the WAV files are. Exit 0 only if every job completed.",
    )
    p.add_argument("--prompts", default="4", metavar="N", help="how many sample prompts (default 4)")
    p.add_argument("--duration", default="4", metavar="SECONDS", help="seconds of audio each (default 4)")
    p.add_argument("--timeout", metavar="SECONDS",
                   help="give up after this long (default scales with the work)")
    p.add_argument("--json", action="store_true", help="print the finished rows as JSON")
    p.set_defaults(func=cmd_demo)
