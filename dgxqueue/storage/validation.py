"""Validation at the door: every field of a new job is checked before anything is written."""

from __future__ import annotations

import functools
import json
import math
import os
import reprlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from dgxqueue.config import MAX_MODEL_NAME_LENGTH, JobSettings, OutputSettings
from dgxqueue.errors import ValidationError
from dgxqueue.storage.models import GenerationStatus

MAX_FILE_PATH_LENGTH = 1024
#: The longest file name (one path component) Linux file systems take, in bytes of UTF-8.
MAX_FILE_NAME_BYTES = 255
PRIORITY_RANGE = (-1000, 1000)
#: PostgreSQL's unique index on ``prompts.prompt_text`` takes at most 2704 bytes a row (8 of
#: them its own header): a longer prompt would fail at the insert, after validation.
MAX_PROMPT_BYTES = 2600
#: ``file_size_bytes`` is the specification's INTEGER, 32-bit on PostgreSQL.
MAX_FILE_SIZE = 2**31 - 1
_WAV_HEADER_BYTES = 44
#: ``metadata.seed``: what torch.manual_seed and every backend accept (31 bits, as seed_for derives).
MAX_SEED = 2**31 - 1
#: Objects and arrays nested in ``metadata``, the outermost counted: a fixed bound, because how
#: deep Python's recursive JSON encoder and decoder can go depends on the caller's stack, so a
#: document the door encoded could fail at the insert or in the daemon reading it back.
MAX_METADATA_DEPTH = 64


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A new job, validated and normalised at the door: what the insert writes, field for field.

    Built by :func:`validate_job` and :func:`validate_jobs`, which check every field; the insert
    adds what every new job shares (pending, created now, no attempts yet). Built any other way
    (by hand, ``dataclasses.replace``) it raises TypeError: the insert trusts every JobSpec.
    """

    id: str
    prompt: str
    model_name: str
    model_version: str | None
    duration_seconds: float
    sample_rate: int
    channels: int
    file_path: str
    metadata: dict[str, Any] | None
    priority: int
    max_attempts: int
    run_after: datetime | None
    expires_at: datetime | None
    dedupe_key: str | None
    #: Seconds from the database's clock at the insert to the job's ``expires_at`` (then None):
    #: the insert computes it, so a producer whose clock is off cannot move it.
    ttl: float | None = None
    #: Seconds from the database's clock at the insert to the job's ``run_after`` (then None),
    #: for a ``run_after`` given as a timedelta, as ``ttl`` is for ``expires_at``.
    run_after_delay: float | None = None
    door: InitVar[object] = None

    def __post_init__(self, door: object) -> None:
        if door is not _DOOR:
            raise TypeError("a JobSpec is made by validate_job or validate_jobs, which check its fields")


_DOOR = object()


#: The keys a job's mapping may hold: the keyword arguments of ``create_generation`` and ``enqueue``.
SPEC_KEYS = frozenset({"prompt", "model_name", "duration_seconds", "sample_rate", "channels", "file_path",
                       "metadata", "model_version", "priority", "run_after", "max_attempts",
                       "expires_at", "ttl", "dedupe_key"})
MAX_DEDUPE_KEY_LENGTH = 200
#: The longest ``ttl``: ten years, far past any wait a user would sit through.
MAX_TTL_SECONDS = 10 * 365 * 86400


def _text(field: str, value: object, limit: int) -> str:
    # Every refusal states the whole rule, so the message alone says what would pass.
    allowed = f"non-empty text of 1 to {limit} characters without NUL bytes"
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field, value, allowed)
    if "\x00" in value:
        raise ValidationError(field, value, allowed + " (it holds a NUL byte)")
    if len(value) > limit:
        raise ValidationError(field, value, f"{allowed} (got {len(value)} characters)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from undecodable bytes in argv
        raise ValidationError(field, value, allowed + " (it is not valid Unicode: a lone surrogate)") from None
    return value


def _integer(field: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, value, f"an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise ValidationError(field, value, f"an integer in [{lo}, {hi}]")
    return value


def validate_prompt(prompt: object, limits: JobSettings) -> str:
    text = _text("prompt", prompt, limits.max_prompt_length).strip()
    size = len(text.encode("utf-8"))
    if size > MAX_PROMPT_BYTES:
        raise ValidationError("prompt", text, f"at most {MAX_PROMPT_BYTES} bytes of UTF-8, what the prompts"
                                              f" table's unique index can hold (got {size} bytes)")
    return text


def validate_duration(value: object, limits: JobSettings) -> float:
    allowed = f"a finite number of seconds in (0, {limits.max_duration_seconds:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError("duration_seconds", value, allowed)
    # The range first: math.isfinite of an int past the largest float raises OverflowError.
    if value <= 0 or value > limits.max_duration_seconds or not math.isfinite(value):
        raise ValidationError("duration_seconds", value, allowed)
    return float(value)


def validate_file_path(value: object) -> str:
    """A relative POSIX path with no ``..``: it must stay inside the outputs folder."""
    allowed = "a relative path inside the outputs folder ending in .wav, without '..'"
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > MAX_FILE_PATH_LENGTH:
        raise ValidationError("file_path", value, allowed)
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or value.startswith(("/", "\\", "~")):
        raise ValidationError("file_path", value, allowed)
    if ".." in posix.parts or ".." in windows.parts or posix.suffix.lower() != ".wav":
        raise ValidationError("file_path", value, allowed)
    try:
        longest = max(len(part.encode("utf-8")) for part in posix.parts)
    except UnicodeEncodeError:  # a lone surrogate: PostgreSQL cannot store it, no file system can name it
        raise ValidationError("file_path", value, allowed + " (it is not valid Unicode: a lone surrogate)") from None
    if longest > MAX_FILE_NAME_BYTES:  # the daemon's write would fail with ENAMETOOLONG after a claim
        raise ValidationError("file_path", value, f"{allowed}, each name in it at most {MAX_FILE_NAME_BYTES}"
                                                  f" bytes of UTF-8 (one is {longest} bytes)")
    return posix.as_posix()


def path_taken(path: object, who: str = "another job writes to it") -> ValidationError:
    """The refusal of a job whose ``file_path`` another job already writes to (``who`` says which,
    when known): two jobs writing one WAV would replace a finished file (migration 007's unique
    index)."""
    return ValidationError("file_path", path, f"a path no other job writes to, each job's WAV its own: {who}; "
                                              "choose another file_path, or delete that job first")


def steering_value(key: str, value: object) -> int | float:
    """Check one metadata key that steers generation (``seed``, ``guidance_scale``, ``temperature``,
    ``top_k``); raise ValueError saying what would pass. The door, the daemon and the MusicGen
    backend all use this one rule, so a job the door accepts is never refused for it later."""
    if key == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
            raise ValueError(f"an integer in [0, {MAX_SEED}]")
        return value
    if key == "top_k":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("an integer >= 0 (0 turns top-k off)")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a finite number")
    try:
        number = float(value)
    except OverflowError:  # an int past the largest float
        raise ValueError("a finite number") from None
    if not math.isfinite(number):
        raise ValueError("a finite number")
    if key == "guidance_scale" and number < 1:
        raise ValueError("a number >= 1 (1 turns classifier-free guidance off)")
    if key == "temperature" and number <= 0:
        raise ValueError("a number > 0")
    return number


#: The metadata keys :func:`steering_value` checks.
STEERING_KEYS = ("seed", "guidance_scale", "temperature", "top_k")


def unstorable(document: object) -> tuple[str, str] | None:
    """The path and fault of the first value in a decoded JSON document that PostgreSQL's JSON
    types cannot store: a lone surrogate, a NUL character, a non-finite number. Iterative, so a
    deep document cannot exhaust the stack."""
    stack: list[tuple[str, object]] = [("metadata", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, f"is {value}, which JSON cannot hold"
        texts: list[tuple[str, str]] = []
        if isinstance(value, str):
            texts.append((path, value))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                texts.append((f"{path} key {key!r}", key))
                stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        for where, text in texts:
            if "\x00" in text:
                return where, "holds a NUL character"
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return where, "is not valid Unicode (a lone surrogate)"
    return None


class _Abridged:
    """A value shown by :mod:`reprlib`: the full repr of shared nested lists can be endless."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        return reprlib.repr(self.value)


def _shape_fault(document: Mapping[str, Any], limits: JobSettings) -> str | None:
    """Why a document is too deep or holds more values than its byte limit could (each takes at
    least one byte), or None. Iterative, and it stops at the first fault, so a list holding
    itself, or one list shared at every level, cannot make it run long."""
    stack: list[tuple[object, int]] = [(document, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > limits.max_metadata_bytes:
            return f"more values than {limits.max_metadata_bytes} bytes can hold"
        children: Iterable[object]
        if isinstance(value, Mapping):
            children = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > MAX_METADATA_DEPTH:
            return f"objects and arrays nested more than {MAX_METADATA_DEPTH} deep"
        stack.extend((child, depth + 1) for child in children)
    return None


def validate_metadata(value: object, limits: JobSettings) -> dict[str, Any] | None:
    if value is None:
        return None
    allowed = f"a JSON object of at most {limits.max_metadata_bytes} bytes"
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValidationError("metadata", value, allowed)
    fault = _shape_fault(value, limits)
    if fault is not None:  # before encoding: the encoder would recurse, or expand shared lists
        raise ValidationError("metadata", _Abridged(value), f"{allowed}, not {fault}")
    try:
        # NaN is let through here so that unstorable can name where it is.
        encoded = json.dumps(dict(value), separators=(",", ":"))
        loaded: dict[str, Any] = json.loads(encoded)
    except (TypeError, ValueError):
        raise ValidationError("metadata", value, allowed + " with JSON-serialisable values") from None
    except RecursionError:  # nested deeper than the encoder's recursion limit
        raise ValidationError("metadata", value, allowed + " nested less deeply") from None
    problem = unstorable(loaded)
    if problem is not None:  # PostgreSQL would refuse the row, or a daemon reading it back
        where, fault = problem
        raise ValidationError("metadata", value, f"{allowed} without NUL characters, lone surrogates or"
                                                 f" non-finite numbers ({where} {fault})")
    if len(encoded.encode()) > limits.max_metadata_bytes:
        raise ValidationError("metadata", value, allowed)
    for key in STEERING_KEYS:
        if key in loaded:
            try:
                steering_value(key, loaded[key])
            except ValueError as exc:  # the daemon or the backend would fail the job after a claim
                raise ValidationError(f"metadata.{key}", loaded[key], str(exc)) from None
    return loaded


def validate_status(value: object) -> GenerationStatus:
    if isinstance(value, str) and value in _STATUS_VALUES:
        return GenerationStatus(value)
    raise ValidationError("status", value, "one of " + ", ".join(s.value for s in GenerationStatus))


_STATUS_VALUES = frozenset(s.value for s in GenerationStatus)


def validate_run_after(value: object) -> datetime | None:
    if value is None:
        return None
    allowed = "a datetime (naive means UTC) between years 1 and 9999 in UTC"
    if not isinstance(value, datetime):
        raise ValidationError("run_after", value, allowed)
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last datetime in UTC
        raise ValidationError("run_after", value, allowed) from None


def validate_not_before(value: object) -> tuple[datetime | None, float | None]:
    """A new job's ``run_after``, as (time, delay): a datetime, or a timedelta from the insert
    (counted by the insert on the database's clock, never the producer's)."""
    if not isinstance(value, timedelta):
        return validate_run_after(value), None
    seconds = value.total_seconds()
    if not 0 <= seconds <= MAX_TTL_SECONDS:
        raise ValidationError("run_after", value, f"a datetime, or a timedelta of 0 to {MAX_TTL_SECONDS} seconds"
                                                  " from the insert")
    return None, seconds


def validate_expiry(expires_at: object, ttl: object) -> tuple[datetime | None, float | None]:
    """When a job still pending stops being wanted, as (``expires_at``, ``ttl``): ``expires_at`` (a
    timezone-aware datetime) or ``ttl`` (seconds, counted by the insert from the database's clock,
    never the producer's), not both."""
    if expires_at is not None and ttl is not None:
        raise ValidationError("ttl", ttl, "left out when expires_at is given (one expiry, not two)")
    if ttl is not None:
        allowed = f"a finite number of seconds in (0, {MAX_TTL_SECONDS}]"
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL_SECONDS:
            raise ValidationError("ttl", ttl, allowed)
        return None, float(ttl)
    if expires_at is None:
        return None, None
    allowed = "a timezone-aware datetime between years 1 and 9999 in UTC"
    if not isinstance(expires_at, datetime) or expires_at.utcoffset() is None:
        raise ValidationError("expires_at", expires_at, allowed)
    try:
        return expires_at.astimezone(UTC), None
    except OverflowError:
        raise ValidationError("expires_at", expires_at, allowed) from None


def validate_model_name(value: object) -> str:
    """A model's name as a job stores it (surrounding blanks dropped): for pause and resume,
    which otherwise store or look for a name no job has."""
    return _text("model_name", value, MAX_MODEL_NAME_LENGTH).strip()


#: The longest reason a pause records.
MAX_PAUSE_REASON_LENGTH = 1000


def validate_pause_reason(value: object) -> str | None:
    if value is None:
        return None
    allowed = f"None or text of up to {MAX_PAUSE_REASON_LENGTH} characters without NUL bytes"
    if not isinstance(value, str) or "\x00" in value or len(value) > MAX_PAUSE_REASON_LENGTH:
        raise ValidationError("reason", value, allowed)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from undecodable bytes in argv
        raise ValidationError("reason", value, allowed + " (it is not valid Unicode: a lone surrogate)") from None
    return value


def validate_limit(value: object, field: str = "limit", hi: int = 100_000) -> int:
    return _integer(field, value, 0, hi)


_DEFAULT_LIMITS = JobSettings()
_DEFAULT_OUTPUTS = OutputSettings()


@functools.lru_cache(maxsize=8)
def _outputs_folder(outputs_dir: str) -> str:
    # The outputs folder's own name, as the daemon resolves it (audio.OutputRoot).
    return os.path.basename(os.path.abspath(outputs_dir))


def validate_job(
    prompt: object,
    *,
    model_name: object = None,
    duration_seconds: object = None,
    sample_rate: object = None,
    channels: object = None,
    file_path: object = None,
    metadata: object = None,
    model_version: object = None,
    priority: object = 0,
    run_after: object = None,
    max_attempts: object = None,
    expires_at: object = None,
    ttl: object = None,
    dedupe_key: object = None,
    limits: JobSettings = _DEFAULT_LIMITS,
    outputs: OutputSettings = _DEFAULT_OUTPUTS,
) -> JobSpec:
    """One job from keyword arguments, as ``create_generation`` and ``enqueue`` take them: a field
    given as None takes its default (``jobs.default_*``; the file path ``<outputs>/<id>.wav``).
    ``expires_at`` or ``ttl`` (seconds from the insert, by the database's clock): a job still
    pending then fails as expired.
    ``dedupe_key``: while an unfinished job holds it, the insert returns that job instead.

    A bad field raises :class:`~dgxqueue.errors.ValidationError` naming it.
    """
    return _build(
        prompt,
        limits.default_model if model_name is None else model_name,
        limits.default_duration_seconds if duration_seconds is None else duration_seconds,
        limits.default_sample_rate if sample_rate is None else sample_rate,
        limits.default_channels if channels is None else channels,
        file_path, metadata, model_version, priority, run_after, max_attempts, limits, outputs,
        validate_expiry(expires_at, ttl), dedupe_key,
    )


def validate_jobs(
    specs: Iterable[Mapping[str, Any] | JobSpec],
    *,
    limits: JobSettings = _DEFAULT_LIMITS,
    outputs: OutputSettings = _DEFAULT_OUTPUTS,
) -> list[JobSpec]:
    """Every job of a batch, each a mapping of :func:`validate_job`'s arguments (a left-out key
    takes its default; a None is checked as given) or a :class:`JobSpec`, validated already.

    One bad spec raises :class:`~dgxqueue.errors.ValidationError` naming its field.
    """
    jobs = []
    for index, spec in enumerate(specs):
        if isinstance(spec, JobSpec):
            jobs.append(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ValidationError(f"specs[{index}]", spec, "a mapping of create_generation's keyword arguments")
        if not SPEC_KEYS.issuperset(spec):
            unknown = sorted(set(spec) - SPEC_KEYS)[0]
            raise ValidationError(unknown, spec[unknown], "one of " + ", ".join(sorted(SPEC_KEYS)))
        jobs.append(_build(
            spec.get("prompt"),
            spec.get("model_name", limits.default_model),
            spec.get("duration_seconds", limits.default_duration_seconds),
            spec.get("sample_rate", limits.default_sample_rate),
            spec.get("channels", limits.default_channels),
            spec.get("file_path"), spec.get("metadata"), spec.get("model_version"), spec.get("priority", 0),
            spec.get("run_after"), spec.get("max_attempts"), limits, outputs,
            validate_expiry(spec.get("expires_at"), spec.get("ttl")), spec.get("dedupe_key"),
        ))
    return jobs


def _build(
    prompt: object,
    model_name: object,
    duration_seconds: object,
    sample_rate: object,
    channels: object,
    file_path: object,
    metadata: object,
    model_version: object,
    priority: object,
    run_after: object,
    max_attempts: object,
    limits: JobSettings,
    outputs: OutputSettings,
    expiry: tuple[datetime | None, float | None] = (None, None),
    dedupe_key: object = None,
) -> JobSpec:
    duration = validate_duration(duration_seconds, limits)
    rate = _integer("sample_rate", sample_rate, limits.min_sample_rate, limits.max_sample_rate)
    count = _integer("channels", channels, 1, limits.max_channels)
    frames = round(duration * rate)
    if frames < 1:
        raise ValidationError("duration_seconds", duration_seconds, f"at least one sample at {rate} Hz"
                                                                    f" ({1 / rate:.3g} s)")
    size = _WAV_HEADER_BYTES + frames * count * 2
    if size > MAX_FILE_SIZE:
        raise ValidationError("duration_seconds", duration_seconds, f"short enough for a WAV file of at most"
                              f" {MAX_FILE_SIZE} bytes, what file_size_bytes holds (at {rate} Hz and {count}"
                              f" channel(s) it would be {size} bytes)")
    text = validate_prompt(prompt, limits)
    model = _text("model_name", model_name, MAX_MODEL_NAME_LENGTH).strip()
    path = None if file_path is None else validate_file_path(file_path)
    document = validate_metadata(metadata, limits)
    version = None if model_version is None else _text("model_version", model_version, 200)
    rank = _integer("priority", priority, *PRIORITY_RANGE)
    not_before = validate_not_before(run_after)
    attempts = _integer("max_attempts", limits.max_attempts if max_attempts is None else max_attempts, 1, 100)
    key = None if dedupe_key is None else _text("dedupe_key", dedupe_key, MAX_DEDUPE_KEY_LENGTH)
    folder = _outputs_folder(outputs.dir)
    if path is not None and not path.startswith(folder + "/"):  # the daemon would refuse it after a claim
        raise ValidationError("file_path", path, f"a relative path inside the outputs folder, starting with"
                                                 f" '{folder}/'")
    job_id = str(uuid.uuid4())
    return JobSpec(
        id=job_id, prompt=text, model_name=model, model_version=version, duration_seconds=duration,
        sample_rate=rate, channels=count, file_path=f"{folder}/{job_id}.wav" if path is None else path,
        metadata=document, priority=rank, max_attempts=attempts, run_after=not_before[0],
        expires_at=expiry[0], dedupe_key=key, ttl=expiry[1], run_after_delay=not_before[1], door=_DOOR,
    )
