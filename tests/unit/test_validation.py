"""Validation at the door: every rule raises one typed error naming the field and what is allowed."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from dgxqueue.config import JobSettings, OutputSettings
from dgxqueue.errors import DgxQueueError, ValidationError
from dgxqueue.storage import GenerationStatus, validate_jobs
from dgxqueue.storage.validation import (
    validate_duration,
    validate_file_path,
    validate_limit,
    validate_metadata,
    validate_prompt,
    validate_run_after,
    validate_status,
)

LIMITS = JobSettings()
GOOD: dict[str, Any] = {
    "prompt": "trap beat with heavy 808 bass at 140 BPM", "model_name": "musicgen-small",
    "duration_seconds": 16.0, "sample_rate": 32000, "channels": 2, "file_path": "outputs/a1b2.wav",
    "metadata": {"bpm": 140, "key": "Cm"},
}

# (field, bad value, a fragment of the allowed range the message must state)
BAD_INPUTS: list[tuple[str, object, str]] = [
    ("prompt", "", "1 to 2000 characters"),
    ("prompt", "   \t\n", "1 to 2000 characters"),
    ("prompt", "x" * 2001, "1 to 2000 characters"),
    ("prompt", "beat\x00drop", "without NUL bytes"),
    ("prompt", "beat \udcff", "not valid Unicode"),  # what undecodable bytes in argv become
    ("prompt", "\u4e00" * 900, "at most 2600 bytes of UTF-8"),  # 900 characters, 2700 bytes
    ("model_name", "musicgen\udcff", "not valid Unicode"),
    ("prompt", 42, "1 to 2000 characters"),
    ("prompt", None, "1 to 2000 characters"),
    ("model_name", "", "1 to 200 characters"),
    ("duration_seconds", 0, "(0, 300]"),
    ("duration_seconds", -1, "(0, 300]"),
    ("duration_seconds", math.nan, "(0, 300]"),
    ("duration_seconds", math.inf, "(0, 300]"),
    ("duration_seconds", "3", "(0, 300]"),
    ("duration_seconds", True, "(0, 300]"),
    ("duration_seconds", 300.5, "(0, 300]"),
    ("duration_seconds", 1e-5, "at least one sample at 32000 Hz"),  # would be an empty WAV
    ("sample_rate", 7999, "[8000, 96000]"),
    ("sample_rate", 96001, "[8000, 96000]"),
    ("sample_rate", 32000.0, "[8000, 96000]"),
    ("sample_rate", True, "[8000, 96000]"),
    ("channels", 0, "[1, 2]"),
    ("channels", 3, "[1, 2]"),
    ("file_path", "/tmp/x.wav", "relative path inside the outputs folder"),
    ("file_path", "../x.wav", "without '..'"),
    ("file_path", "outputs/../../etc/x.wav", "without '..'"),
    ("file_path", "outputs\\..\\x.wav", "without '..'"),
    ("file_path", "C:\\outputs\\x.wav", "relative path inside the outputs folder"),
    ("file_path", "C:x.wav", "relative path inside the outputs folder"),
    ("file_path", "\\\\server\\share\\x.wav", "relative path inside the outputs folder"),
    ("file_path", "~/x.wav", "relative path inside the outputs folder"),
    ("file_path", "outputs/x.mp3", "ending in .wav"),
    ("file_path", "", "ending in .wav"),
    ("file_path", "outputs/x\x00.wav", "ending in .wav"),
    ("file_path", "x.wav", "starting with 'outputs/'"),  # the daemon would refuse it after a claim
    ("file_path", "data/x.wav", "starting with 'outputs/'"),
    ("file_path", "outputs/" + "a" * 252 + ".wav", "at most 255 bytes"),  # ENAMETOOLONG in the daemon
    ("file_path", "outputs/" + "\u00e9" * 126 + ".wav", "(one is 256 bytes)"),  # 130 characters
    ("file_path", "outputs/" + "d" * 256 + "/x.wav", "at most 255 bytes"),
    ("file_path", "outputs/x\udc80.wav", "lone surrogate"),
    ("metadata", [1, 2], "a JSON object"),
    ("metadata", "bpm=120", "a JSON object"),
    ("metadata", {1: "one"}, "a JSON object"),
    ("metadata", {"energy": math.nan}, "a JSON object"),
    ("metadata", {"when": datetime(2025, 1, 1)}, "JSON-serialisable"),
    ("metadata", {"notes": "x" * 20_000}, "at most 16384 bytes"),
    ("metadata", {"key": "C\x00m"}, "without NUL"),
    ("metadata", {"note": "\udc80"}, "metadata.note is not valid Unicode"),  # json.loads('"\\udc80"')
    ("metadata", {"\udc80": 1}, "lone surrogate"),
    ("metadata", {"tags": ["ok", {"x": "\ud83c"}]}, "metadata.tags[1].x is not valid Unicode"),
    ("metadata", {"a": {"b": "x\x00y"}}, "metadata.a.b holds a NUL character"),
    ("metadata", {"a": {"k\x00": 1}}, "holds a NUL character"),
    ("metadata", {"levels": [0.5, math.inf]}, "metadata.levels[1] is inf"),
    ("metadata", json.loads('{"gain": 1e400}'), "metadata.gain is inf"),
    ("metadata", {"deep": {"x": -math.nan}}, "metadata.deep.x is nan"),
    ("priority", 1001, "[-1000, 1000]"),
    ("max_attempts", 0, "[1, 100]"),
    ("run_after", "tomorrow", "a datetime"),
    ("model_version", "", "1 to 200 characters"),
]

# Metadata keys that steer generation: (key, bad value, the allowed range). The error names
# ``metadata.<key>``, the generator's own rule (the daemon would refuse the job after a claim).
BAD_STEERING: list[tuple[str, object, str]] = [
    ("seed", "abc", "an integer in [0, 2147483647]"),
    ("seed", 1.5, "an integer in [0, 2147483647]"),
    ("seed", True, "an integer in [0, 2147483647]"),
    ("seed", -1, "an integer in [0, 2147483647]"),
    ("seed", 2**31, "an integer in [0, 2147483647]"),
    ("guidance_scale", "loud", "a finite number"),
    ("guidance_scale", 0.5, "a number >= 1"),
    ("temperature", 0, "a number > 0"),
    ("temperature", [1], "a finite number"),
    ("top_k", -1, "an integer >= 0"),
    ("top_k", 2.5, "an integer >= 0"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_INPUTS, ids=lambda v: repr(v)[:30])
def test_validate_jobs__rejects_each_bad_field(field: str, value: object, allowed: str) -> None:
    """Each bad field raises ValidationError (a ValueError under DgxQueueError) naming it and its range."""
    with pytest.raises(ValidationError) as caught:
        validate_jobs([{**GOOD, field: value}])
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, DgxQueueError)
    assert error.field == field
    assert allowed in str(error) and allowed in error.allowed
    assert str(error).startswith(f"{field}=")


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_STEERING, ids=lambda v: repr(v)[:30])
def test_validate_jobs__rejects_each_bad_steering_key(key: str, value: object, allowed: str) -> None:
    """A steering key the generator would refuse is refused at the door, naming metadata.<key>."""
    with pytest.raises(ValidationError) as caught:
        validate_jobs([{**GOOD, "metadata": {"bpm": 90, key: value}}])
    assert caught.value.field == f"metadata.{key}"
    assert allowed in str(caught.value)


def test_validate_jobs__accepts_good_steering_keys() -> None:
    """The edges the generators accept pass the door too: seed 0 and 2**31-1, top_k 0, guidance 1."""
    for metadata in ({"seed": 0, "top_k": 0, "guidance_scale": 1, "temperature": 1e-3},
                     {"seed": 2**31 - 1, "top_k": 250, "guidance_scale": 3.0, "temperature": 1}):
        [job] = validate_jobs([{**GOOD, "metadata": metadata}])
        assert job.metadata == metadata


def test_validate_metadata__allows_text_that_only_looks_like_an_escape() -> None:
    """A backslash followed by 'u0000' is two ordinary characters, not a NUL; astral text is fine."""
    metadata = {"path": "C:\\u0000", "mood": "\U0001f3b5 caf\u00e9"}
    assert validate_metadata(metadata, LIMITS) == metadata


def test_steering_value__the_daemon_and_musicgen_share_the_door_rule() -> None:
    """job_seed and MusicGen's override check are the door's function, so the three cannot drift."""
    from dgxqueue.daemon import executor
    from dgxqueue.storage import validation
    from workers import musicgen

    assert musicgen._sampling_value is validation.steering_value
    assert vars(executor)["steering_value"] is validation.steering_value


def test_validate_jobs__accepts_the_specification_example() -> None:
    """The specification's create_generation example passes and keeps its values."""
    [job] = validate_jobs([GOOD])
    assert job.prompt == GOOD["prompt"]
    assert job.file_path == "outputs/a1b2.wav" and job.metadata == {"bpm": 140, "key": "Cm"}
    assert job.duration_seconds == 16.0 and isinstance(job.duration_seconds, float)


def test_validate_jobs__fills_defaults_and_an_output_path() -> None:
    """Left-out fields take the configured defaults; the file path is <outputs folder>/<id>.wav."""
    limits = JobSettings(default_model="musicgen-small", default_duration_seconds=12.0)
    [job] = validate_jobs([{"prompt": "lo-fi"}], limits=limits,
                          outputs=OutputSettings(dir="/srv/music/renders/"))
    assert (job.model_name, job.duration_seconds) == ("musicgen-small", 12.0)
    assert (job.sample_rate, job.channels, job.max_attempts) == (32000, 1, 3)
    assert job.file_path == f"renders/{job.id}.wav"


def test_validate_jobs__rejects_an_unknown_key() -> None:
    """A misspelt key is named as the field instead of being silently dropped."""
    with pytest.raises(ValidationError) as caught:
        validate_jobs([{**GOOD, "sample_rat": 32000}])
    assert caught.value.field == "sample_rat"
    assert "sample_rate" in caught.value.allowed


def test_validate_jobs__one_bad_spec_fails_the_batch() -> None:
    """A batch with one bad spec raises for that spec (and so writes nothing)."""
    with pytest.raises(ValidationError) as caught:
        validate_jobs([GOOD, GOOD, {**GOOD, "channels": 9}])
    assert caught.value.field == "channels"


def test_validate_duration__uses_the_configured_maximum() -> None:
    """The duration limit comes from the settings, and the message states it."""
    limits = JobSettings(max_duration_seconds=10.0)
    assert validate_duration(10, limits) == 10.0
    with pytest.raises(ValidationError, match=r"\(0, 10\]"):
        validate_duration(10.5, limits)


def test_validate_prompt__uses_the_configured_length_and_strips() -> None:
    """The prompt limit comes from the settings; surrounding whitespace is trimmed."""
    limits = JobSettings(max_prompt_length=5)
    assert validate_prompt("  beat ", JobSettings()) == "beat"
    assert validate_prompt("12345", limits) == "12345"
    with pytest.raises(ValidationError, match="1 to 5 characters"):
        validate_prompt("123456", limits)


def test_validate_sample_rate__uses_the_configured_range() -> None:
    """Sample rate bounds come from the settings."""
    limits = JobSettings(min_sample_rate=16000, max_sample_rate=48000)
    with pytest.raises(ValidationError, match=r"\[16000, 48000\]") as caught:
        validate_jobs([{**GOOD, "sample_rate": 8000}], limits=limits)
    assert caught.value.field == "sample_rate"


def test_validate_file_path__normalises_a_good_path() -> None:
    """A relative .wav path inside outputs is accepted, case-insensitively on the suffix."""
    assert validate_file_path("outputs/2025/a.WAV") == "outputs/2025/a.WAV"
    assert validate_file_path("outputs/./a.wav") == "outputs/a.wav"


def test_validate_metadata__returns_a_plain_json_copy() -> None:
    """Metadata becomes a plain JSON object (tuples to lists), detached from the caller's dict."""
    given = {"instruments": ("808", "hi-hat"), "energy": 0.85}
    result = validate_metadata(given, LIMITS)
    assert result == {"instruments": ["808", "hi-hat"], "energy": 0.85}
    assert validate_metadata(None, LIMITS) is None


def test_validate_metadata__size_limit_is_configurable() -> None:
    """The metadata size limit comes from the settings and counts the compact JSON's bytes."""
    limits = JobSettings(max_metadata_bytes=16)
    assert validate_metadata({"k": "abcdefgh"}, limits) == {"k": "abcdefgh"}  # {"k":"abcdefgh"}: 16
    with pytest.raises(ValidationError, match="at most 16 bytes"):
        validate_metadata({"k": "abcdefghi"}, limits)


@pytest.mark.parametrize("value", ["done", "PENDING", "", 1, None, ["pending"]])
def test_validate_status__rejects_unknown(value: object) -> None:
    """An unknown status raises ValidationError on 'status' listing the four allowed values."""
    with pytest.raises(ValidationError) as caught:
        validate_status(value)
    assert caught.value.field == "status"
    assert "pending, processing, completed, failed" in str(caught.value)


@pytest.mark.parametrize("status", list(GenerationStatus))
def test_validate_status__accepts_each_status_as_enum_or_text(status: GenerationStatus) -> None:
    """The four statuses pass, as the enum or as its text."""
    assert validate_status(status) is status
    assert validate_status(status.value) is status


def test_validate_run_after__converts_to_utc() -> None:
    """run_after: naive means UTC; aware values are converted to UTC."""
    naive = datetime(2025, 11, 7, 10, 0)
    assert validate_run_after(naive) == naive.replace(tzinfo=UTC)
    cet = datetime(2025, 11, 7, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    result = validate_run_after(cet)
    assert result is not None and result.tzinfo is UTC and result.hour == 10
    assert validate_run_after(None) is None


@pytest.mark.parametrize("value", [-1, 100_001, 2.0, True, "10"])
def test_validate_limit__rejects_bad_limits(value: object) -> None:
    """A limit must be an integer in [0, 100000]."""
    with pytest.raises(ValidationError, match=r"\[0, 100000\]"):
        validate_limit(value)
