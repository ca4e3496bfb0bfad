"""The generator interface: what a backend in ``workers/`` implements, and how one is found.

A backend is loaded once per daemon (the model stays warm) and then asked to render batches of
:class:`GenerationRequest`. It returns one :class:`GeneratedAudio` *or* one
:class:`~dgxqueue.errors.GeneratorError` per request, in order, so one bad request fails only its
own job. Raising from :meth:`Generator.generate` fails (or retries) the whole batch.

Backends are found by name in the entry-point group ``dgxqueue.generators`` or as a
``module:attr`` path; the object found is called with the ``[generator.options]`` table from
config as keyword arguments and must return a :class:`Generator`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from dgxqueue.errors import ConfigError, GeneratorError, UnknownGeneratorError

ENTRY_POINT_GROUP = "dgxqueue.generators"
T = TypeVar("T")


@dataclass(frozen=True)
class GenerationRequest:
    """One job as a backend sees it. ``seed`` is derived from the job id, so reruns agree."""

    job_id: str
    prompt: str
    model_name: str
    duration_seconds: float
    sample_rate: int
    channels: int
    seed: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


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


def available_generators() -> dict[str, str]:
    """Names registered in the entry-point group, mapped to their ``module:attr`` targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_factory(name: str) -> Any:
    """Find the factory registered as ``name``, or import ``module:attr``."""
    registered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in registered:
        return registered[name].load()
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise UnknownGeneratorError(
                f"generator {name!r} cannot be imported ({exc}); "
                f"registered: {', '.join(sorted(registered)) or 'none'}"
            ) from exc
    raise UnknownGeneratorError(
        f"unknown generator {name!r}; registered: {', '.join(sorted(registered)) or 'none'} "
        "(or give a module:attr path)"
    )


def create_generator(name: str, options: Mapping[str, Any] | None = None) -> Generator:
    """Build (but do not load) the backend ``name`` with its config options."""
    factory = resolve_factory(name)
    try:
        generator = factory(**dict(options or {}))
    except TypeError as exc:
        raise ConfigError("generator.options", dict(options or {}), f"options {name} accepts ({exc})") from exc
    if not isinstance(generator, Generator):
        raise UnknownGeneratorError(f"generator {name!r} does not implement the Generator protocol")
    return generator


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
