"""Review of the door: numbers past the largest float and hand-made JobSpecs are refused as bad
input, not passed on."""

from __future__ import annotations

import pytest

from dgxqueue.errors import ValidationError
from dgxqueue.storage import validate_job
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


