"""Configuration: built-in defaults, then ``config.toml``, then the environment, then flags.

Everything is parsed once into frozen, validated dataclasses (:class:`Settings`). An unknown key,
a wrong type or an out-of-range value raises :class:`~dgxqueue.errors.ConfigError` naming the key,
the value and what is allowed, before anything touches the database.

Environment: ``DATABASE_URL`` sets ``database.url``; ``DGXQUEUE_<SECTION>_<KEY>`` sets any other key
(``DGXQUEUE_WORKER_BATCH_SIZE=4``); ``DGXQUEUE_CONFIG`` names the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgxqueue.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///data/generations.db"
# The longest model name a job may have; here, so that the default model is held to it too.
MAX_MODEL_NAME_LENGTH = 200


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[str, ...] | None = None, nonblank: str | None = None) -> Any:
    """A dataclass field carrying its validation rule in metadata.

    ``nonblank``: what the text must be; an empty or whitespace-only value is refused with it.
    """
    meta = {"lo": lo, "hi": hi, "choices": choices, "nonblank": nonblank}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DatabaseSettings:
    # Blank would not fail: the engine falls back to $DATABASE_URL or the default database.
    url: str = _spec(DEFAULT_DATABASE_URL, nonblank="an SQLAlchemy URL such as sqlite:///data/generations.db")
    sqlite_synchronous: str = _spec("NORMAL", choices=("OFF", "NORMAL", "FULL", "EXTRA"))
    sqlite_busy_timeout_ms: int = _spec(5000, lo=0, hi=600_000)
    sqlite_cache_kib: int = _spec(1024, lo=64, hi=1_048_576)
    pool_size: int = _spec(5, lo=1, hi=100)


@dataclass(frozen=True)
class JobSettings:
    default_model: str = _spec("synth", nonblank=f"a model name of 1 to {MAX_MODEL_NAME_LENGTH} characters")
    default_duration_seconds: float = _spec(8.0, lo=0.01, hi=3600)
    default_sample_rate: int = _spec(32000, lo=8000, hi=192000)
    default_channels: int = _spec(1, lo=1, hi=2)
    max_prompt_length: int = _spec(2000, lo=1, hi=100_000)
    max_duration_seconds: float = _spec(300.0, lo=0.01, hi=3600)
    min_sample_rate: int = _spec(8000, lo=1000, hi=384000)
    max_sample_rate: int = _spec(96000, lo=1000, hi=384000)
    max_channels: int = _spec(2, lo=1, hi=8)
    max_metadata_bytes: int = _spec(16384, lo=2, hi=1_048_576)
    max_attempts: int = _spec(3, lo=1, hi=100)


_OUTPUTS_DIR_RULE = "a folder path whose last part is a name (not '.', '..' or the root)"


@dataclass(frozen=True)
class OutputSettings:
    dir: str = _spec("outputs", nonblank=_OUTPUTS_DIR_RULE)
    min_free_mb: int = _spec(256, lo=0, hi=1_048_576)


@dataclass(frozen=True)
class GeneratorSettings:
    name: str = _spec("synth")
    models: list[str] = _spec([])  # noqa: RUF009  (_spec returns a field with a default_factory)
    options: dict[str, Any] = _spec({})  # noqa: RUF009
    # Continuous batching: a running batch of slots that jobs join and leave between steps
    # (dgxqueue.daemon.continuous); needs a backend with slots (musicgen with decode = "loop").
    continuous: bool = _spec(False)


@dataclass(frozen=True)
class WorkerSettings:
    batch_size: int = _spec(0, lo=0, hi=1024)
    prefetch: bool = _spec(False)
    lease_seconds: float = _spec(60.0, lo=1, hi=86400)
    heartbeat_seconds: float = _spec(10.0, lo=0.05, hi=3600)
    rescue_interval_seconds: float = _spec(15.0, lo=0.05, hi=3600)
    poll_interval_seconds: float = _spec(5.0, lo=0.01, hi=600)
    sqlite_check_interval_seconds: float = _spec(0.002, lo=0.0005, hi=10)
    job_timeout_seconds: float = _spec(600.0, lo=0.1, hi=86400)
    grace_seconds: float = _spec(30.0, lo=0, hi=86400)
    retry_unexpected_errors: bool = _spec(True)
    backoff_base_seconds: float = _spec(2.0, lo=0, hi=3600)
    backoff_max_seconds: float = _spec(300.0, lo=0, hi=86400)


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = _spec(True)
    # Blank would not fail: the HTTP server reads "" as every interface (0.0.0.0).
    address: str = _spec("127.0.0.1", nonblank="a host name or IP address such as 127.0.0.1 "
                                                 "(0.0.0.0 listens on every interface)")
    port: int = _spec(9464, lo=0, hi=65535)
    depth_cache_seconds: float = _spec(1.0, lo=0, hi=60)


@dataclass(frozen=True)
class LoggingSettings:
    format: str = _spec("auto", choices=("auto", "json", "console"))
    level: str = _spec("info", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    @property
    def outputs_dir(self) -> Path:
        return Path(self.outputs.dir)


_SECTIONS: dict[str, type[Any]] = {f.name: f.type for f in dataclasses.fields(Settings)}  # type: ignore[misc]
_SECTION_TYPES = {
    "database": DatabaseSettings, "jobs": JobSettings, "outputs": OutputSettings,
    "generator": GeneratorSettings, "worker": WorkerSettings, "metrics": MetricsSettings,
    "logging": LoggingSettings,
}


def _coerce(key: str, value: Any, f: dataclasses.Field[Any], from_text: bool) -> Any:
    """Check one value against its field's type and range; text from the environment is parsed."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    meta = f.metadata
    if from_text and isinstance(value, str) and not kind.startswith("str"):
        value = _parse_text(key, value, kind)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer" + _range(meta))
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, value, "a finite number" + _range(meta))
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        if meta.get("nonblank") and not value.strip():
            raise ConfigError(key, value, meta["nonblank"])
        if meta.get("choices"):
            normal = value.upper() if value.upper() in meta["choices"] else value.lower()
            if normal not in meta["choices"]:
                raise ConfigError(key, value, "one of " + ", ".join(meta["choices"]))
            value = normal
    elif kind.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(key, value, "a list of non-empty strings")
        return list(value)
    elif kind.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a table")
        return dict(value)
    if kind in ("int", "float"):
        lo, hi = meta.get("lo"), meta.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(key, value, "a number" + _range(meta))
    return value


def _range(meta: Mapping[str, Any]) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    return f" in [{lo!r}, {hi!r}]" if lo is not None and hi is not None else ""  # repr: 1048576, not 1.04858e+06


def _parse_text(key: str, text: str, kind: str) -> Any:
    try:
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("list"):
            return [part.strip() for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(key, text, f"a value of type {kind}") from None
    raise ConfigError(key, text, "a value that can be set from a table in the config file")


def _build(overrides: Mapping[str, Mapping[str, Any]], from_text: frozenset[str]) -> Settings:
    sections: dict[str, Any] = {}
    for section, cls in _SECTION_TYPES.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in overrides.get(section, {}).items():
            dotted = f"{section}.{key}"
            if key not in fields:
                raise ConfigError(dotted, value, "one of the keys " + ", ".join(fields))
            values[key] = _coerce(dotted, value, fields[key], dotted in from_text)
        sections[section] = cls(**values)
    jobs: JobSettings = sections["jobs"]
    if jobs.min_sample_rate > jobs.max_sample_rate:
        raise ConfigError("jobs.min_sample_rate", jobs.min_sample_rate, "at most jobs.max_sample_rate")
    _check_job_defaults(jobs)
    # Jobs' file_path is "<last part of outputs.dir>/<id>.wav": without a real name there, every
    # job would resolve outside the folder and fail at run time.
    outputs_dir: str = sections["outputs"].dir
    if outputs_dir.rstrip("/").rpartition("/")[2] in ("", ".", ".."):
        raise ConfigError("outputs.dir", outputs_dir, _OUTPUTS_DIR_RULE)
    worker: WorkerSettings = sections["worker"]
    if worker.heartbeat_seconds * 2 > worker.lease_seconds:
        raise ConfigError(
            "worker.heartbeat_seconds", worker.heartbeat_seconds,
            f"at most half of worker.lease_seconds ({worker.lease_seconds:g})",
        )
    return Settings(**sections)


def _check_job_defaults(jobs: JobSettings) -> None:
    """Each default must pass the limits a request is held to, or enqueue blames the request."""
    if "\x00" in jobs.default_model or len(jobs.default_model) > MAX_MODEL_NAME_LENGTH:
        raise ConfigError("jobs.default_model", jobs.default_model,
                          f"a model name of 1 to {MAX_MODEL_NAME_LENGTH} characters without NUL bytes")
    if jobs.default_duration_seconds > jobs.max_duration_seconds:
        raise ConfigError("jobs.default_duration_seconds", jobs.default_duration_seconds,
                          f"at most jobs.max_duration_seconds ({jobs.max_duration_seconds:g})")
    if not jobs.min_sample_rate <= jobs.default_sample_rate <= jobs.max_sample_rate:
        raise ConfigError("jobs.default_sample_rate", jobs.default_sample_rate,
                          f"from jobs.min_sample_rate to jobs.max_sample_rate "
                          f"({jobs.min_sample_rate}..{jobs.max_sample_rate})")
    if jobs.default_channels > jobs.max_channels:
        raise ConfigError("jobs.default_channels", jobs.default_channels,
                          f"at most jobs.max_channels ({jobs.max_channels})")


def _merge(into: dict[str, dict[str, Any]], layer: Mapping[str, Any], origin: str) -> None:
    for section, table in layer.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(section, table, "one of the sections " + ", ".join(_SECTION_TYPES))
        if not isinstance(table, dict):
            raise ConfigError(section, table, f"a table in {origin}")
        into.setdefault(section, {}).update(table)


def read_file(path: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: a byte order mark, which Windows editors write, is skipped as TOML's own
        # parsers in other languages do; a file that is not UTF-8 at all is a config error.
        text = path.read_bytes().decode("utf-8-sig")
        return tomllib.loads(text)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ConfigError("--config", str(path), "an existing TOML file") from None
    except PermissionError as exc:
        raise ConfigError("--config", str(path), f"a file this user can read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", str(path), f"a UTF-8 text file (byte {exc.start} is not UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"valid TOML ({exc})") from None
    except RecursionError:  # arrays nested thousands deep
        raise ConfigError("--config", str(path), "valid TOML (nested too deeply)") from None


#: DGXQUEUE_ variables that are not settings: the config file's path, and the status page's token
#: (a secret: were it read as a setting, the error for its unknown section would print it).
_NOT_SETTINGS = frozenset({"DGXQUEUE_CONFIG", "DGXQUEUE_WEB_TOKEN"})


def environment_layer(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    if env.get("DATABASE_URL"):
        layer.setdefault("database", {})["url"] = env["DATABASE_URL"]
    for name, value in env.items():
        if not name.startswith("DGXQUEUE_") or name in _NOT_SETTINGS:
            continue
        rest = name[len("DGXQUEUE_"):].lower()
        for section in _SECTION_TYPES:
            if rest.startswith(section + "_"):
                layer.setdefault(section, {})[rest[len(section) + 1:]] = value
                break
        else:
            raise ConfigError(name, value, "DGXQUEUE_<SECTION>_<KEY> with a known section")
    return layer


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Defaults, then the file (``path`` or ``$DGXQUEUE_CONFIG``), then environment, then overrides."""
    env = os.environ if env is None else env
    merged: dict[str, dict[str, Any]] = {}
    chosen = path or env.get("DGXQUEUE_CONFIG")
    if chosen:
        _merge(merged, read_file(Path(chosen)), str(chosen))
    env_layer = environment_layer(env)
    _merge(merged, env_layer, "the environment")
    from_text = frozenset(f"{s}.{k}" for s, table in env_layer.items() for k in table)
    if overrides:
        _merge(merged, overrides, "the command line")
        from_text = from_text - {f"{s}.{k}" for s, t in overrides.items() for k in t}
    return _build(merged, from_text)


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def toml_value(value: Any) -> str:
    """``value`` written as TOML (for ``config show`` and for tests that write config files)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))
