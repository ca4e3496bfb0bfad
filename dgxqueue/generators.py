"""The generator interface: what a backend in ``workers/`` implements, and how one is found.

A backend is loaded once per daemon (the model stays warm) and then asked to render batches of
:class:`GenerationRequest`. It returns one :class:`GeneratedAudio` *or* one
:class:`~dgxqueue.errors.GeneratorError` per request, in order, so one bad request fails only its
own job. Raising from :meth:`Generator.generate` fails (or retries) the whole batch.

A request carries a :class:`JobControl`, the one channel between the daemon and a running
request: the backend may report progress on it (``request.control.report(done, total)``) and may
look at ``request.control.cancelled`` to stop that request early, returning a
:class:`~dgxqueue.errors.JobCancelledError` for it. Both are optional: a backend that does neither
still works; its progress is simply unknown, and a cancelled request's result is discarded.

Backends are found by name in the entry-point group ``dgxqueue.generators`` or as a
``module:attr`` path; the object found is called with the ``[generator.options]`` table from
config as keyword arguments and must return a :class:`Generator`. Both are checked when the backend
is built, before the daemon claims anything: a ``module:attr`` that cannot be imported is an
:class:`~dgxqueue.errors.UnknownGeneratorError` saying which part failed and why, and an object
missing a protocol member a :class:`~dgxqueue.errors.ConfigError` naming each one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

from dgxqueue.errors import ConfigError, GeneratorError, UnknownGeneratorError

if TYPE_CHECKING:  # numpy only for the types: a producer or the CLI never loads it (0.15 s)
    import numpy as np
    import numpy.typing as npt

ENTRY_POINT_GROUP = "dgxqueue.generators"
#: The largest step count a progress report keeps: ``progress_done``/``progress_total`` are
#: INTEGER columns, 32-bit on PostgreSQL, and a value past them failed the heartbeat's write.
MAX_PROGRESS_STEPS = 2**31 - 1
T = TypeVar("T")


class JobControl:
    """Progress reported by a backend and a cancel asked by the daemon, for one request.

    Thread-safe without a lock: each side writes one attribute with a single assignment (the
    backend the ``(done, total)`` pair, the daemon the cancel flag), and the other only reads it,
    so a report costs the generator thread an attribute store and nothing else."""

    __slots__ = ("_cancelled", "progress")

    def __init__(self) -> None:
        #: The latest ``(steps done, steps total)``, or None before the first report.
        self.progress: tuple[int, int] | None = None
        self._cancelled = False

    def report(self, done: int, total: int) -> None:
        """On the generator thread: ``done`` of ``total`` steps are finished (total > 0).

        Never raises: progress is a display, and a backend's odd report must not cost its job or
        the daemon (the heartbeat writes it). ``done`` is kept between 0 and ``total``; counts
        past :data:`MAX_PROGRESS_STEPS` are scaled down together, keeping their fraction; a
        report without a positive total, or of values that are not numbers, is ignored."""
        try:
            steps, of = int(done), int(total)
        except (TypeError, ValueError, OverflowError):  # None, NaN, an infinity
            return
        if of <= 0:
            return
        steps = min(max(steps, 0), of)
        if of > MAX_PROGRESS_STEPS:
            steps, of = steps * MAX_PROGRESS_STEPS // of, MAX_PROGRESS_STEPS
        self.progress = (steps, of)

    @property
    def cancelled(self) -> bool:
        """The job was cancelled: a backend that checks this may stop the request early."""
        return self._cancelled

    def cancel(self) -> None:
        """On the daemon's thread: ask the backend to stop this request."""
        self._cancelled = True


@dataclass(frozen=True)
class GenerationRequest:
    """One job as a backend sees it. ``seed`` is derived from the job id, so reruns agree.
    ``control``: progress reports and a cancel flag (see :class:`JobControl`)."""

    job_id: str
    prompt: str
    model_name: str
    duration_seconds: float
    sample_rate: int
    channels: int
    seed: int
    metadata: Mapping[str, Any] = field(default_factory=dict)
    control: JobControl = field(default_factory=JobControl, compare=False, repr=False)


@dataclass(frozen=True)
class GeneratedAudio:
    """Rendered audio: float32 ``samples`` shaped (channels, frames) in [-1, 1].

    ``metadata`` holds what the backend knows about the music (bpm, key, genre, instruments...);
    it is merged into the job's metadata together with measured levels.
    """

    samples: npt.NDArray[np.float32]
    sample_rate: int
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_seconds(self) -> float:
        return self.frames / self.sample_rate


GenerationOutcome = GeneratedAudio | GeneratorError


@runtime_checkable
class Generator(Protocol):
    """What the daemon needs from a backend."""

    #: Name shown in logs and ``dgxqueue_build_info``.
    name: str
    #: The ``model_name`` values this backend serves; the daemon claims only these jobs.
    models: frozenset[str]
    #: The most requests :meth:`generate` accepts in one call.
    max_batch_size: int

    def load(self) -> None:
        """Load weights and warm up. Called once, before the first claim."""

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Requests with equal keys may share one :meth:`generate` call."""

    def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`~dgxqueue.errors.PermanentGeneratorError` for a request it cannot serve."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        """Render every request; one result or error per request, in order."""


@runtime_checkable
class SlotGenerator(Protocol):
    """What a backend adds to :class:`Generator` for continuous batching (``[generator]
    continuous = true``): a running batch of ``slots`` requests that advances one step at a time.

    The daemon calls every method below from one thread (its runner's), between steps: it
    starts (:meth:`start`) the requests it claimed while a slot is free, calls :meth:`step`, and writes
    each request that :meth:`step` returns finished at once, while the others decode on. Requests
    are keyed by ``job_id``. A backend that has the methods but cannot serve slots now (MusicGen
    with ``decode = "generate"``) has ``slots == 0``; see :func:`serves_slots`."""

    @property
    def slots(self) -> int:
        """How many requests decode at once; 0 when this backend cannot run slots. It may shrink
        (after running out of memory), only in a :meth:`step` that frees every slot or a
        :meth:`start` that raises :class:`~dgxqueue.errors.CapacityError`."""

    @property
    def free_slots(self) -> int:
        """How many more requests :meth:`start` accepts before the next step."""

    def start(self, request: GenerationRequest) -> None:
        """Put ``request`` in a free slot, to decode from the next step. Raising fails that request
        alone (the others are not touched), judged like an error raised from ``generate``: a
        :class:`~dgxqueue.errors.GeneratorError` as it says (transient or permanent), anything
        else as an unexpected error (retried while ``worker.retry_unexpected_errors``), a machine
        fault (:mod:`dgxqueue.machine_faults`) as the machine's. A
        :class:`~dgxqueue.errors.CapacityError` says the backend ran out of memory and has fewer
        slots now: the request goes back unspent, to join again (with as many slots as before, it
        is charged as a transient error). After a start that raised, the daemon calls
        :meth:`cancel` with the request's ``job_id``, so a backend need not clean up itself: a
        slot taken before the error is freed (what that cancel raises is logged, and does not
        change the request's outcome). Not after a machine fault no test write can clear (memory,
        descriptors, the GPU): the daemon then exits, and the slots with it. ``request.control``
        may be used for progress and is read for cancels."""

    def step(self) -> list[tuple[str, GenerationOutcome]]:
        """Advance every occupied slot by one step; the requests that finished, by ``job_id``,
        their slots free again. Raising ends every request in a slot, which are all freed: a
        :class:`~dgxqueue.errors.CapacityError` says the backend ran out of memory and has fewer
        slots now (the daemon gives the requests back unspent); anything else is judged like a
        failed call."""

    def cancel(self, job_id: str) -> bool:
        """Free the slot of ``job_id``; False when it holds none. The other slots decode on."""


def serves_slots(generator: object) -> bool:
    """``generator`` implements :class:`SlotGenerator` and has slots now."""
    if not isinstance(generator, SlotGenerator):
        return False
    slots = generator.slots
    return isinstance(slots, int) and not isinstance(slots, bool) and slots > 0


#: What :func:`create_generator` checks on the object a factory returns, so that a backend
#: missing a member fails at start-up naming it, not later inside the daemon's loop.
PROTOCOL_ATTRIBUTES = ("name", "models", "max_batch_size")
PROTOCOL_METHODS = ("load", "validate", "batch_key", "generate")


def available_generators() -> dict[str, str]:
    """Names registered in the entry-point group, mapped to their ``module:attr`` targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _registered_names() -> str:
    return ", ".join(sorted(available_generators())) or "none"


def _import_target(label: str, target: str) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted) for the generator ``label``; an
    UnknownGeneratorError says which part failed and why."""
    module_name, _, attr_path = (part.strip() for part in target.partition(":"))
    if not module_name or not attr_path:
        raise UnknownGeneratorError(
            f"generator {label}: {target!r} is not a module:attr path (both parts are needed, "
            "as in mypackage.backend:MyGenerator)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name != missing and not module_name.startswith(missing + "."):  # found, but its import failed
            raise UnknownGeneratorError(f"generator {label}: importing module {module_name!r} failed: {exc}") from exc
        package = f" (no {missing!r})" if missing != module_name else ""
        raise UnknownGeneratorError(
            f"generator {label}: module {module_name!r} not found{package} on sys.path; add its folder to "
            f"PYTHONPATH (now {os.environ.get('PYTHONPATH') or 'unset'}) or install its package; "
            f"registered generators: {_registered_names()}"
        ) from exc
    except Exception as exc:  # a syntax error, or an exception while the module runs
        raise UnknownGeneratorError(
            f"generator {label}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    found: Any = module
    parts = attr_path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(found, part):
            where = ".".join([module_name, *parts[:i]])
            public = sorted(a for a in dir(found) if not a.startswith("_"))
            shown = ", ".join(public[:20]) + (", ..." if len(public) > 20 else "")
            raise UnknownGeneratorError(
                f"generator {label}: {where!r} has no attribute {part!r}; it has: {shown or 'nothing public'}"
            )
        found = getattr(found, part)
    return found


def resolve_factory(name: str) -> Any:
    """Find the factory registered as ``name``, or import ``module:attr``."""
    registered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in registered:
        value = registered[name].value
        return _import_target(f"{name!r} (entry point {ENTRY_POINT_GROUP} {name} = {value})", value)
    if ":" in name:
        return _import_target(repr(name), name)
    raise UnknownGeneratorError(
        f"unknown generator {name!r}; registered: {_registered_names()} (or give a module:attr path)"
    )


def protocol_problems(generator: object) -> list[str]:
    """What keeps ``generator`` from serving as a :class:`Generator`, one phrase each; empty if nothing."""
    members = {m: getattr(generator, m) for m in (*PROTOCOL_ATTRIBUTES, *PROTOCOL_METHODS) if hasattr(generator, m)}
    missing = [m for m in (*PROTOCOL_ATTRIBUTES, *PROTOCOL_METHODS) if m not in members]
    problems = [f"lacks {', '.join(missing)}"] if missing else []
    problems += [f"{m} is not callable" for m in PROTOCOL_METHODS if m in members and not callable(members[m])]
    if "name" in members and not (isinstance(members["name"], str) and members["name"]):
        problems.append(f"name={members['name']!r} is not a non-empty string")
    models = members.get("models", frozenset())
    names = isinstance(models, Collection) and not isinstance(models, str)
    if not names or not all(isinstance(m, str) and m for m in models):
        problems.append(f"models={models!r} is not a set of model names")
    size = members.get("max_batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        problems.append(f"max_batch_size={size!r} is not an integer >= 1")
    return problems


def create_generator(name: str, options: Mapping[str, Any] | None = None) -> Generator:
    """Build (but do not load) the backend ``name`` with its config options.

    A name that resolves to nothing raises :class:`UnknownGeneratorError`; a factory that refuses
    the options, or builds an object that is not a :class:`Generator`, raises :class:`ConfigError`
    naming what is wrong."""
    factory = resolve_factory(name)
    if not callable(factory):
        raise ConfigError("generator.name", name,
                          f"a class or function that builds a Generator, not a value of type {type(factory).__name__}")
    try:
        generator = factory(**dict(options or {}))
    except TypeError as exc:
        raise ConfigError("generator.options", dict(options or {}), f"options {name} accepts ({exc})") from exc
    problems = protocol_problems(generator)
    if problems:
        raise ConfigError(
            "generator.name", name,
            f"a backend implementing dgxqueue.generators.Generator (members: "
            f"{', '.join((*PROTOCOL_ATTRIBUTES, *PROTOCOL_METHODS))}); the "
            f"{type(generator).__name__} it built {'; '.join(problems)}",
        )
    return cast(Generator, generator)


def split_into_batches(items: Sequence[T], key: Callable[[T], Hashable], size: int) -> list[list[T]]:
    """Group items by ``key`` (a backend's batch key), each group cut into chunks of ``size``."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    size = max(1, size)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def seed_for(job_id: str) -> int:
    """A stable 31-bit seed from a job id, so a job renders the same audio on every attempt."""
    import hashlib

    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big") & 0x7FFFFFFF
