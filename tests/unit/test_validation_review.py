"""Review of the door: numbers past the largest float and hand-made JobSpecs are refused as bad
input, not passed on."""

from __future__ import annotations

import dataclasses

import pytest

from dgxqueue.config import JobSettings
from dgxqueue.errors import ValidationError
from dgxqueue.storage import JobSpec, validate_job, validate_jobs
from dgxqueue.storage.validation import steering_value

HUGE = 10**400  # an int no float holds: float(HUGE) and math.isfinite(HUGE) raise OverflowError


@pytest.mark.parametrize("value", [HUGE, -HUGE], ids=["huge", "-huge"])
def test_duration__an_integer_past_the_largest_float_is_refused_by_name(value: int) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_job("beat", duration_seconds=value)
    assert caught.value.field == "duration_seconds"


@pytest.mark.parametrize("key", ["guidance_scale", "temperature"])
def test_steering__an_integer_past_the_largest_float_is_refused_by_name(key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_job("beat", metadata={key: HUGE})
    assert caught.value.field == f"metadata.{key}"
    with pytest.raises(ValueError, match="finite"):  # the daemon and the backend read it with this rule
        steering_value(key, HUGE)


def _fields(**changes: object) -> dict[str, object]:
    job = validate_job("beat")
    values = {field.name: getattr(job, field.name) for field in dataclasses.fields(JobSpec)}
    return {**values, **changes}


def test_jobspec__cannot_be_built_past_the_door() -> None:
    """A JobSpec is what the door checked: one built by hand (here with a path out of the
    outputs folder and a negative duration) would reach the insert unchecked."""
    with pytest.raises(TypeError, match="validate_job"):
        JobSpec(**_fields(file_path="../../escape.wav", duration_seconds=-5.0))  # type: ignore[arg-type]


def test_jobspec__cannot_be_changed_past_the_door() -> None:
    job = validate_job("beat")
    with pytest.raises((TypeError, ValueError)):
        dataclasses.replace(job, file_path="../escape.wav")


def test_jobspec__the_doors_own_pass_through_validate_jobs() -> None:
    job = validate_job("beat", limits=JobSettings())
    assert validate_jobs([job]) == [job]
