"""Every error dgxqueue raises derives from one root, :class:`DgxQueueError`.

::

    DgxQueueError
    ├── ConfigError              bad config file, environment or flag (exit code 78)
    ├── ValidationError          bad input at the door; also a ValueError; names the field
    ├── JobNotFoundError         no generation with that id; also a LookupError
    ├── InvalidStateError        the job is not in a state that allows the operation
    ├── WaitTimeoutError         a job handle's wait ran out of time; also a TimeoutError
    ├── SchemaError              the database is newer than this code, or unreachable schema
    ├── TransferError            a copy or archive met a row it cannot move exactly, or a mismatch
    ├── LockTimeoutError         upkeep waited its lock timeout for a table another session holds
    ├── LeaseLostError           this daemon no longer holds the attempt it tries to finish
    ├── UnknownGeneratorError    no backend registered under that name; lists those that exist
    ├── BackendExitError         backend code raised SystemExit, KeyboardInterrupt or GeneratorExit
    ├── OutputError              the WAV file could not be written (disk full, permission, path)
    │   └── PathTakenError       a result's path holds another's file, which it never replaces
    └── GeneratorError           raised by a backend for one request or a whole batch
        ├── TransientGeneratorError   worth retrying (CUDA OOM after halving, a flaky resource)
        │   ├── JobTimeoutError       the backend call overran worker.job_timeout_seconds
        │   └── CapacityError         a running batch ran out of memory; the backend has fewer slots
        ├── PermanentGeneratorError   retrying cannot help (request above the model's limit)
        └── JobCancelledError         the job was cancelled while it ran (never retried)

Foreign exceptions (SQLAlchemy, OSError, torch) are translated at the boundary that meets them.
"""

from __future__ import annotations


class DgxQueueError(Exception):
    """Root of every error dgxqueue raises on purpose."""


class ConfigError(DgxQueueError):
    """A configuration key is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"config {key}={value!r} is invalid: expected {allowed}")


class ValidationError(DgxQueueError, ValueError):
    """A request field is invalid; ``field`` names it and ``allowed`` says what would pass."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        try:
            shown = repr(value)
        except RecursionError:  # metadata nested thousands deep: the refusal says so
            shown = f"<{type(value).__name__} nested too deeply to show>"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}={shown} is invalid: expected {allowed}")


class JobNotFoundError(DgxQueueError, LookupError):
    """No generation row has the given id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"generation {job_id} not found")


class InvalidStateError(DgxQueueError):
    """The job's status does not allow the operation (cancel a running job, retry a pending one)."""


class WaitTimeoutError(DgxQueueError, TimeoutError):
    """A wait for jobs to end ran out of time; ``unfinished`` names those still going (they keep going)."""

    def __init__(self, timeout: float, unfinished: list[str]) -> None:
        self.timeout = timeout
        self.unfinished = unfinished
        super().__init__(f"timed out after {timeout:g}s waiting for {len(unfinished)} job(s), "
                         f"first {unfinished[0] if unfinished else '-'}")


class SchemaError(DgxQueueError):
    """The database schema cannot be used by this version of dgxqueue."""


class TransferError(DgxQueueError):
    """``db copy`` or ``archive`` found a row the other database holds differently, a value the
    other engine cannot hold, or a verification that did not match; nothing was overwritten."""


class LockTimeoutError(DgxQueueError, TimeoutError):
    """Database upkeep (``db vacuum``) waited ``seconds`` for a lock on ``table`` that another
    session holds (``holders``: who, as the server says) and gave up before changing anything
    there; also a TimeoutError."""

    def __init__(self, table: str, seconds: float, holders: list[str], done: list[str]) -> None:
        self.table = table
        self.seconds = seconds
        self.holders = holders
        self.done = done
        who = "; ".join(holders) if holders else "a session that has since let go"
        finished = f" (done before it: {', '.join(done)})" if done else " (nothing was vacuumed)"
        super().__init__(f"vacuum gave up after waiting {seconds:g}s for a lock on table {table} that another session "
                         f"holds: {who}{finished}; end that session's transaction or run this again later")


class LeaseLostError(DgxQueueError):
    """This daemon no longer holds the attempt it tried to finish: its write was fenced off."""


class UnknownGeneratorError(DgxQueueError):
    """No generator backend is registered under the requested name."""


class BackendExitError(DgxQueueError):
    """Backend code raised an exception that is no ``Exception`` (SystemExit from a library's
    ``sys.exit()``, KeyboardInterrupt, GeneratorExit) out of a backend call: an error of that call,
    judged as any other, never the daemon's exit. The original is its ``__cause__``."""


class OutputError(DgxQueueError):
    """The audio file could not be written; nothing partial is left behind."""


class PathTakenError(OutputError):
    """A WAV could not be put in place: ``path`` holds a file (folder, link) that is not its job's,
    which is never replaced. A daemon's result stays beside it as ``temporary``, for the sweep to
    publish once that file is moved away; ``temporary`` None: nothing was left. ``holder``: the job
    whose WAV that file is, where it says so (:func:`dgxqueue.audio.holder`)."""

    def __init__(self, path: str, temporary: str | None = None, holder: str | None = None) -> None:
        self.path = path
        self.temporary = temporary
        self.holder = holder
        what = (f"the result stays beside it as {temporary}: move that file away and the next sweep publishes it"
                if temporary is not None else "nothing was written")
        whose = f" (the WAV of job {holder})" if holder is not None else ""
        super().__init__(f"{path} holds a file that is not this result{whose}, left as it is; {what}")


class GeneratorError(DgxQueueError):
    """A backend failed a request (or a whole batch). Subclasses say whether to retry."""

    transient: bool = False


class TransientGeneratorError(GeneratorError):
    """A failure that may pass: the daemon retries the job with backoff."""

    transient = True


class JobTimeoutError(TransientGeneratorError):
    """The backend call overran ``worker.job_timeout_seconds`` and was abandoned: charged to its
    jobs as a transient failure (their attempt is spent), while the daemon exits for a fresh process.
    Its jobs are marked (``lease_losses``) and run alone next time: one may be what stalls it."""


class CapacityError(TransientGeneratorError):
    """A running batch of slots ran out of memory: every request in a slot was dropped and the
    backend has fewer slots now. The daemon gives those jobs back unspent to join again."""


class PermanentGeneratorError(GeneratorError):
    """A failure that retrying cannot fix: the job is failed at once with this message."""


class JobCancelledError(GeneratorError):
    """The job was cancelled while it ran: a backend returns it for a request it stopped early,
    and the daemon records it for any cancelled request, whatever the backend returned."""


def text_of(error: BaseException) -> str:
    """``str(error)``, or a placeholder naming what it raised: a backend's error whose ``__str__``
    raises is its job's to pay for, and must not take the daemon down while it is judged."""
    try:
        return str(error)
    except Exception as exc:
        return f"<str() of the error raised {type(exc).__name__}>"
