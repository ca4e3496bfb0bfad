"""Settings: every key's validation, the load order, the environment, and the shipped config.toml."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dgxqueue.audio import resolve_output_path
from dgxqueue.config import MAX_MODEL_NAME_LENGTH, Settings, load_settings
from dgxqueue.errors import ConfigError
from dgxqueue.storage import validate_jobs
from tests.support import zygote

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {f.name: f.type for f in dataclasses.fields(Settings)}


def _fields() -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every (section, field) of the settings, so a new key cannot escape these tests."""
    out: list[tuple[str, dataclasses.Field[Any]]] = []
    for section in dataclasses.fields(Settings):
        cls = type(getattr(Settings(), section.name))
        out.extend((section.name, f) for f in dataclasses.fields(cls))
    return out


def _kind(f: dataclasses.Field[Any]) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _wrong_type(f: dataclasses.Field[Any]) -> Any:
    return {"bool": "yes", "int": "5", "float": "1.5", "str": 5}.get(
        _kind(f), 5 if _kind(f).startswith(("list", "dict")) else None)


BAD_VALUES: list[tuple[str, str, Any]] = []
for _section, _field in _fields():
    BAD_VALUES.append((_section, _field.name, _wrong_type(_field)))
    lo, hi = _field.metadata.get("lo"), _field.metadata.get("hi")
    if lo is not None:
        BAD_VALUES.append((_section, _field.name, lo - 1))
    if hi is not None:
        BAD_VALUES.append((_section, _field.name, hi + 1))
    if _field.metadata.get("choices"):
        BAD_VALUES.append((_section, _field.name, "bogus"))
    if _kind(_field) == "int":
        BAD_VALUES.append((_section, _field.name, 1.5))
        BAD_VALUES.append((_section, _field.name, True))
    if _kind(_field) == "float":
        BAD_VALUES.append((_section, _field.name, float("nan")))


def _load(layer: dict[str, dict[str, Any]], **kwargs: Any) -> Settings:
    return load_settings(env=kwargs.pop("env", {}), overrides=layer, **kwargs)


def test_load_settings__defaults_without_file_or_environment() -> None:
    """With no file and an empty environment, the settings are the built-in defaults."""
    assert load_settings(env={}) == Settings()


@pytest.mark.parametrize(("section", "key", "value"), BAD_VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v in BAD_VALUES])
def test_load_settings__rejects_each_bad_value_naming_its_key(section: str, key: str, value: Any) -> None:
    """A wrong type, an out-of-range number or an unknown choice names the key and what is allowed."""
    with pytest.raises(ConfigError) as caught:
        _load({section: {key: value}})
    assert caught.value.key == f"{section}.{key}"
    assert f"{section}.{key}" in str(caught.value) and "expected" in str(caught.value)


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("worker", "batch_size", -1, "in [0, 1024]"),
    ("metrics", "port", 70000, "in [0, 65535]"),
    ("jobs", "default_channels", 3, "in [1, 2]"),
    ("logging", "level", "loud", "debug, info, warning, error"),
    ("logging", "format", "xml", "auto, json, console"),
    ("database", "sqlite_synchronous", "sometimes", "OFF, NORMAL, FULL, EXTRA"),
    ("database", "sqlite_cache_kib", 16, "in [64, 1048576]"),
    ("generator", "models", ["ok", ""], "non-empty strings"),
    ("generator", "options", "model=x", "a table"),
])
def test_load_settings__message_says_what_is_allowed(
    section: str, key: str, value: Any, expected: str
) -> None:
    """The message shows the allowed range or choices, written out."""
    with pytest.raises(ConfigError, match=re.escape(expected)):
        _load({section: {key: value}})


def test_load_settings__choices_are_case_insensitive() -> None:
    """Choices accept any case and are normalised (NORMAL for SQLite, lower case for levels)."""
    settings = _load({"database": {"sqlite_synchronous": "full"}, "logging": {"level": "DEBUG"}})
    assert settings.database.sqlite_synchronous == "FULL"
    assert settings.logging.level == "debug"


def test_load_settings__cross_key_rules() -> None:
    """min_sample_rate above max_sample_rate, or a heartbeat over half the lease, are refused."""
    with pytest.raises(ConfigError, match=r"jobs\.min_sample_rate"):
        _load({"jobs": {"min_sample_rate": 48000, "max_sample_rate": 44100}})
    with pytest.raises(ConfigError, match=r"worker\.heartbeat_seconds"):
        _load({"worker": {"lease_seconds": 10, "heartbeat_seconds": 6}})


def _load_toml(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_settings(path, env=env or {})


@pytest.mark.parametrize(("bad", "key", "expected", "good"), [
    ("[jobs]\ndefault_duration_seconds = 600.0\n", "jobs.default_duration_seconds",
     "at most jobs.max_duration_seconds (300)", "[jobs]\ndefault_duration_seconds = 300.0\n"),
    ("[jobs]\nmax_duration_seconds = 5.0\n", "jobs.default_duration_seconds",
     "at most jobs.max_duration_seconds (5)", "[jobs]\nmax_duration_seconds = 8.0\n"),
    ("[jobs]\ndefault_sample_rate = 192000\n", "jobs.default_sample_rate",
     "(8000..96000)", "[jobs]\ndefault_sample_rate = 96000\n"),
    ("[jobs]\nmin_sample_rate = 44100\n", "jobs.default_sample_rate",
     "(44100..96000)", "[jobs]\nmin_sample_rate = 44100\ndefault_sample_rate = 44100\n"),
    ("[jobs]\ndefault_channels = 2\nmax_channels = 1\n", "jobs.default_channels",
     "at most jobs.max_channels (1)", "[jobs]\ndefault_channels = 1\nmax_channels = 1\n"),
    ('[jobs]\ndefault_model = ""\n', "jobs.default_model", "model name", '[jobs]\ndefault_model = "m"\n'),
    ('[jobs]\ndefault_model = " \\t"\n', "jobs.default_model", "model name", '[jobs]\ndefault_model = "m"\n'),
    ('[jobs]\ndefault_model = "a\\u0000b"\n', "jobs.default_model", "without NUL bytes",
     '[jobs]\ndefault_model = "ab"\n'),
    (f'[jobs]\ndefault_model = "{"m" * (MAX_MODEL_NAME_LENGTH + 1)}"\n', "jobs.default_model",
     f"1 to {MAX_MODEL_NAME_LENGTH} characters", f'[jobs]\ndefault_model = "{"m" * MAX_MODEL_NAME_LENGTH}"\n'),
], ids=["duration>max", "max<duration", "rate>max", "min>rate", "channels>max", "model-empty", "model-blank",
        "model-nul", "model-long"])
def test_load_settings__job_default_outside_its_limits_names_the_default(
    tmp_path: Path, bad: str, key: str, expected: str, good: str
) -> None:
    """A default that breaks its own limit is a config error naming the default, not a request
    error at enqueue; at the limit it loads, and a job left to take it passes validation."""
    with pytest.raises(ConfigError, match=re.escape(expected)) as caught:
        _load_toml(tmp_path, bad)
    assert caught.value.key == key
    settings = _load_toml(tmp_path, good)
    [job] = validate_jobs([{"prompt": "p"}], limits=settings.jobs)
    assert job.model_name == settings.jobs.default_model.strip()


@pytest.mark.parametrize(("bad", "good"), [
    ("", "outputs"), ("   ", "outputs"), (".", "./outputs"), ("./", "outputs/"), ("..", "../outputs"),
    ("renders/..", "renders/../outputs"), ("renders/.", "renders"), ("renders/./", "renders/"),
    ("/", "/srv/outputs"), ("//", "/srv/outputs/"),
])
def test_load_settings__outputs_dir_must_end_in_a_folder_name(tmp_path: Path, bad: str, good: str) -> None:
    """An outputs.dir without a folder name of its own (empty, '.', '..', the root) is refused from
    the file and from $DGXQUEUE_OUTPUTS_DIR alike; one with a name holds the files of its jobs."""
    for text, env in ((f"[outputs]\ndir = {json.dumps(bad)}\n", {}), ("", {"DGXQUEUE_OUTPUTS_DIR": bad})):
        with pytest.raises(ConfigError) as caught:
            _load_toml(tmp_path, text, env)
        assert caught.value.key == "outputs.dir" and "not '.', '..' or the root" in caught.value.allowed
    settings = _load_toml(tmp_path, f"[outputs]\ndir = {json.dumps(good)}\n")
    [job] = validate_jobs([{"prompt": "p"}], outputs=settings.outputs)
    target = resolve_output_path(settings.outputs_dir, job.file_path)
    assert target.parent == Path(os.path.abspath(settings.outputs_dir))


@pytest.mark.parametrize(("key", "variable", "value", "hint"), [
    ("metrics.address", "DGXQUEUE_METRICS_ADDRESS", "", "such as 127.0.0.1"),
    ("metrics.address", "DGXQUEUE_METRICS_ADDRESS", " \t", "such as 127.0.0.1"),
    ("database.url", "DGXQUEUE_DATABASE_URL", "", "such as sqlite:///"),
    ("database.url", "DGXQUEUE_DATABASE_URL", "  ", "such as sqlite:///"),
])
def test_load_settings__blank_text_that_would_mean_something_else_is_refused(
    tmp_path: Path, key: str, variable: str, value: str, hint: str
) -> None:
    """A blank metrics.address would listen on every interface, a blank database.url would fall back
    to another database: refused from the file and from the environment (a blank line in an env file)."""
    section, name = key.split(".")
    for text, env in ((f"[{section}]\n{name} = {json.dumps(value)}\n", {}), ("", {variable: value})):
        with pytest.raises(ConfigError) as caught:
            _load_toml(tmp_path, text, env)
        assert caught.value.key == key and caught.value.value == value and hint in caught.value.allowed


def test_load_settings__unknown_key_lists_the_known_ones() -> None:
    """A misspelt key is refused, and the message lists the keys of its section."""
    with pytest.raises(ConfigError) as caught:
        _load({"worker": {"batchsize": 4}})
    assert caught.value.key == "worker.batchsize"
    assert "batch_size" in str(caught.value)


def test_load_settings__unknown_section_and_non_table_section(tmp_path: Path) -> None:
    """An unknown section, or a section that is not a table, is refused by name."""
    with pytest.raises(ConfigError) as caught:
        _load({"workers": {"batch_size": 4}})
    assert caught.value.key == "workers" and "worker" in caught.value.allowed
    path = tmp_path / "c.toml"
    path.write_text("worker = 3\n")
    with pytest.raises(ConfigError, match="worker"):
        load_settings(path, env={})


def test_load_settings__order_is_defaults_file_environment_flags(tmp_path: Path) -> None:
    """Each layer overrides the one before: defaults < file < environment < flags."""
    path = tmp_path / "c.toml"
    path.write_text("[worker]\nbatch_size = 2\ngrace_seconds = 5\n[metrics]\nport = 9500\n")
    env = {"DGXQUEUE_WORKER_BATCH_SIZE": "3", "DGXQUEUE_METRICS_PORT": "9600"}
    assert Settings().worker.batch_size == 0

    def seen(s: Settings) -> tuple[int, float, int]:
        return s.worker.batch_size, s.worker.grace_seconds, s.metrics.port

    assert seen(load_settings(path, env={})) == (2, 5.0, 9500)
    assert seen(load_settings(path, env=env)) == (3, 5.0, 9600)
    assert seen(load_settings(path, env=env, overrides={"worker": {"batch_size": 4}})) == (4, 5.0, 9600)


def test_load_settings__dgxqueue_config_names_the_file_and_path_beats_it(tmp_path: Path) -> None:
    """$DGXQUEUE_CONFIG is read when no path is given; an explicit path wins over it."""
    named = tmp_path / "named.toml"
    named.write_text("[worker]\nbatch_size = 7\n")
    given = tmp_path / "given.toml"
    given.write_text("[worker]\nbatch_size = 9\n")
    assert load_settings(env={"DGXQUEUE_CONFIG": str(named)}).worker.batch_size == 7
    assert load_settings(given, env={"DGXQUEUE_CONFIG": str(named)}).worker.batch_size == 9


def test_load_settings__database_url_from_environment() -> None:
    """DATABASE_URL sets database.url, as the specification says."""
    assert load_settings(env={"DATABASE_URL": "sqlite:///x.db"}).database.url == "sqlite:///x.db"


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_environment__parses_booleans(text: str, value: bool) -> None:
    """Booleans from the environment accept 1/0, true/false, yes/no, on/off in any case."""
    assert load_settings(env={"DGXQUEUE_METRICS_ENABLED": text}).metrics.enabled is value


def test_environment__parses_numbers_and_lists() -> None:
    """Integers, floats and comma-separated lists are parsed from their text."""
    settings = load_settings(env={
        "DGXQUEUE_WORKER_BATCH_SIZE": "16", "DGXQUEUE_WORKER_GRACE_SECONDS": "2.5",
        "DGXQUEUE_GENERATOR_MODELS": "musicgen-small, musicgen-medium,,",
    })
    assert settings.worker.batch_size == 16
    assert settings.worker.grace_seconds == 2.5
    assert settings.generator.models == ["musicgen-small", "musicgen-medium"]


@pytest.mark.parametrize(("name", "text", "key"), [
    ("DGXQUEUE_METRICS_ENABLED", "maybe", "metrics.enabled"),
    ("DGXQUEUE_WORKER_BATCH_SIZE", "4.5", "worker.batch_size"),
    ("DGXQUEUE_WORKER_GRACE_SECONDS", "soon", "worker.grace_seconds"),
    ("DGXQUEUE_METRICS_PORT", "99999", "metrics.port"),
    ("DGXQUEUE_GENERATOR_OPTIONS", "model=x", "generator.options"),
    ("DGXQUEUE_NOPE_KEY", "1", "DGXQUEUE_NOPE_KEY"),
    ("DGXQUEUE_WORKER_NOPE", "1", "worker.nope"),
])
def test_environment__bad_text_names_the_key(name: str, text: str, key: str) -> None:
    """Unparsable or unknown variables are refused, naming the key (or the variable)."""
    with pytest.raises(ConfigError) as caught:
        load_settings(env={name: text})
    assert caught.value.key == key


def test_read_file__missing_or_invalid_toml(tmp_path: Path) -> None:
    """A missing file or invalid TOML is a config error naming the file."""
    with pytest.raises(ConfigError, match="an existing TOML file"):
        load_settings(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[worker\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_settings(broken, env={})


def test_settings__are_frozen() -> None:
    """Settings cannot be changed after parsing; pass new ones down instead."""
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.worker.batch_size = 3  # type: ignore[misc]


def test_config_toml__loads_to_exactly_the_defaults() -> None:
    """The shipped config.toml documents the defaults: loading it changes nothing."""
    assert load_settings(REPO / "config.toml", env={}) == Settings()


def test_config_toml__names_every_key_with_a_comment() -> None:
    """Every key of every section appears in config.toml, each preceded by a comment line."""
    text = (REPO / "config.toml").read_text()
    parsed = tomllib.loads(text)
    for section, f in _fields():
        table = parsed[section]
        if f.name == "options":
            assert table.get("options", {}) == {}
            assert "[generator.options]" in text
            continue
        assert f.name in table, f"{section}.{f.name} is missing from config.toml"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[i - 1].startswith("#"), f"config.toml line {i + 1} ({line}) has no comment above it"


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DGXQUEUE_") and k != "DATABASE_URL"}
    return zygote.run([sys.executable, "-m", "dgxqueue", *args], cwd=cwd, env={**clean, **env},
                      capture_output=True, text=True, timeout=60, check=False)


def test_config_check__bad_file_exits_78_with_one_line_naming_the_key(tmp_path: Path) -> None:
    """`dgxqueue config check` on a bad file: exit 78, one stderr line naming key and value, no database."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nbatch_size = -3\n")
    done = _cli("--config", str(bad), "config", "check", cwd=tmp_path,
                env={"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"})
    assert done.returncode == 78
    assert done.stderr.count("\n") == 1 and "worker.batch_size=-3" in done.stderr
    assert "[0, 1024]" in done.stderr
    assert not (tmp_path / "db.sqlite").exists() and not (tmp_path / "data").exists()


def test_config_check__good_file_and_bad_environment(tmp_path: Path) -> None:
    """The shipped file checks out (exit 0); a bad DGXQUEUE_ variable then fails with 78."""
    ok = _cli("--config", str(REPO / "config.toml"), "config", "check", cwd=tmp_path, env={})
    assert ok.returncode == 0, ok.stderr
    assert "config ok" in ok.stdout
    bad = _cli("--config", str(REPO / "config.toml"), "config", "check", cwd=tmp_path,
               env={"DGXQUEUE_LOGGING_LEVEL": "loud"})
    assert bad.returncode == 78 and bad.stderr.count("\n") == 1 and "logging.level" in bad.stderr
