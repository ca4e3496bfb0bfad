"""The synth backend: what it reads from a prompt, and the music it renders from it."""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import numpy as np
import pytest

from dgxqueue.audio import measure
from dgxqueue.errors import ConfigError, JobCancelledError, PermanentGeneratorError, TransientGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationRequest, JobControl, create_generator
from dgxqueue.machine_faults import machine_fault
from workers.synth import SynthGenerator


def _request(prompt: str, *, seed: int = 7, duration: float = 2.0, rate: int = 32000, channels: int = 2,
             job_id: str = "job") -> GenerationRequest:
    return GenerationRequest(job_id=job_id, prompt=prompt, model_name="synth", duration_seconds=duration,
                             sample_rate=rate, channels=channels, seed=seed)


def _render(request: GenerationRequest) -> GeneratedAudio:
    [outcome] = SynthGenerator().generate([request])
    assert isinstance(outcome, GeneratedAudio), outcome
    return outcome


@pytest.mark.parametrize(
    ("prompt", "bpm", "key", "genre", "tempo"),
    [
        ("dark trap beat, 140 BPM, in Cm", 140, "Cm", "trap", "fast"),
        ("lo-fi hip hop, 80bpm, A minor", 80, "Am", "lo-fi", "slow"),
        ("F# major house groove", 124, "F#", "house", "moderate"),
        ("warehouse techno in Bb", 130, "Bbm", "techno", "fast"),
        ("jazz trio in C", 120, "C", "jazz", "moderate"),
        ("liquid drum and bass, key of E minor", 174, "Em", "drum and bass", "fast"),
        ("Ambient drone in d minor, bpm: 60", 60, "Dm", "ambient", "slow"),
    ],
)
def test_render__prompt_tempo_key_and_genre_become_metadata(
    prompt: str, bpm: int, key: str, genre: str, tempo: str
) -> None:
    """Tempo, key and genre named in the prompt (or the genre's defaults) fill the metadata."""
    metadata = _render(_request(prompt, duration=0.2)).metadata
    got = (metadata["bpm"], metadata["key"], metadata["genre"], metadata["tempo"])
    assert got == (bpm, key, genre, tempo)
    assert metadata["instruments"] and all(isinstance(name, str) for name in metadata["instruments"])


def test_render__mood_sets_the_mode_when_no_key_is_named() -> None:
    """'happy' picks a major key and 'dark' a minor one, whatever root the seed draws."""
    for seed in range(6):
        assert not _render(_request("happy pop song", seed=seed, duration=0.1)).metadata["key"].endswith("m")
        assert _render(_request("dark pop song", seed=seed, duration=0.1)).metadata["key"].endswith("m")


def test_render__capital_a_article_is_not_read_as_a_key() -> None:
    """'A dark beat' names no key: the key's root varies with the seed instead of being A."""
    keys = {_render(_request("A dark beat", seed=seed, duration=0.1)).metadata["key"] for seed in range(8)}
    assert len(keys) > 1


def test_render__beat_follows_the_requested_tempo() -> None:
    """The loudness envelope of a four-on-the-floor track repeats at the prompt's beat period."""
    audio = _render(_request("techno 128 BPM", duration=8.0, channels=1, rate=16000))
    hop = 80  # 5 ms envelope frames
    envelope = np.abs(audio.samples[0, 16000:]).reshape(-1, hop).max(axis=1)  # skip the fade-in
    envelope -= envelope.mean()
    correlation = np.correlate(envelope, envelope, mode="full")[envelope.size - 1 :]
    lags = np.arange(correlation.size) * hop / 16000
    window = (lags > 0.3) & (lags < 0.7)
    period = lags[window][np.argmax(correlation[window])]
    assert period == pytest.approx(60 / 128, rel=0.03)


def test_render__stereo_channels_differ() -> None:
    """Stereo output is a real stereo image, not one channel duplicated."""
    samples = _render(_request("deep house groove", channels=2)).samples
    assert not np.allclose(samples[0], samples[1], atol=1e-3)
    assert np.corrcoef(samples[0], samples[1])[0, 1] > 0.5  # yet clearly the same music


def test_render__same_request_is_bit_identical_across_instances() -> None:
    """Two generator instances render one request to identical samples (job retries agree)."""
    request = _request("lofi hip hop with vinyl crackle", seed=42)
    first = SynthGenerator().generate([request])[0]
    second = create_generator("synth").generate([request])[0]
    assert isinstance(first, GeneratedAudio) and isinstance(second, GeneratedAudio)
    np.testing.assert_array_equal(first.samples, second.samples)


def test_render__prompt_that_is_not_valid_unicode_renders() -> None:
    """A lone surrogate (a row written by plain SQL; the API refuses it) does not fail the batch."""
    outcomes = SynthGenerator().generate([_request("beat \udcff"), _request("beat")])
    assert all(isinstance(o, GeneratedAudio) for o in outcomes)


def test_render__prompt_changes_audio_under_one_seed() -> None:
    """Two prompts that read the same still render differently, as the prompt seeds the RNG too."""
    first = _render(_request("a beat", seed=3)).samples
    second = _render(_request("a  beat", seed=3)).samples
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("prompt", ["dark trap 140 bpm", "calm ambient pads", "rock anthem", "jazz in Bb"])
def test_render__levels_are_sane(prompt: str) -> None:
    """A render peaks near -1 dBFS with real loudness and no DC offset."""
    audio = _render(_request(prompt, duration=4.0))
    levels = measure(audio)
    assert 0.85 <= levels["peak"] <= 0.9
    assert levels["rms"] > 0.04
    assert 0.4 < levels["energy"] < 0.95
    assert abs(float(audio.samples.mean())) < 0.01


@pytest.mark.parametrize(("rate", "duration"), [(44100, 1.5), (48000, 1.0), (22050, 0.37), (8000, 1.23456)])
def test_render__any_rate_gives_exact_frame_count(rate: int, duration: float) -> None:
    """At 44.1 and 48 kHz (and odd rates and durations) the frame count is round(duration*rate)."""
    audio = _render(_request("house", rate=rate, duration=duration))
    assert audio.sample_rate == rate
    assert audio.samples.shape == (2, round(duration * rate))
    assert np.isfinite(audio.samples).all() and measure(audio)["rms"] > 0.01


@pytest.mark.parametrize(
    ("field", "value"),
    [("channels", 0), ("channels", 3), ("sample_rate", 4000), ("sample_rate", 400000),
     ("duration_seconds", 0.0), ("duration_seconds", -1.0), ("duration_seconds", math.nan),
     ("duration_seconds", math.inf), ("duration_seconds", 600.5)],
)
def test_validate__refuses_what_it_cannot_render(field: str, value: float) -> None:
    """Channels outside 1..2, rates outside 8..192 kHz and durations outside (0, 600] are permanent errors."""
    changes: dict[str, Any] = {field: value}
    request = dataclasses.replace(_request("house", duration=1.0), **changes)
    with pytest.raises(PermanentGeneratorError, match="synth renders"):
        SynthGenerator().validate(request)


@pytest.mark.parametrize(
    "options",
    [{"max_batch_size": 0}, {"models": []}, {"max_duration_seconds": -1}, {"default_bpm": 500}],
)
def test_options__bad_values_raise_config_error(options: dict[str, object]) -> None:
    """Bad [generator.options] fail at start-up with a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=next(iter(options))):
        create_generator("synth", options)


def test_options__default_bpm_applies_when_the_prompt_names_no_genre() -> None:
    """default_bpm sets the tempo of prompts without tempo or genre, and only those."""
    generator = SynthGenerator(default_bpm=100, models=["synth", "synth-hq"], max_batch_size=2)
    assert generator.models == frozenset({"synth", "synth-hq"}) and generator.max_batch_size == 2
    requests = [_request("something nice", duration=0.1), _request("trap", duration=0.1)]
    plain, trap = generator.generate(requests)
    assert isinstance(plain, GeneratedAudio) and isinstance(trap, GeneratedAudio)
    assert (plain.metadata["bpm"], trap.metadata["bpm"]) == (100, 140)


def test_generate__memory_error_is_the_machines_and_frees_the_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError fails its own request with an error the daemon reads as the machine's (it used
    to be a plain transient error, charged to the job), holding none of the failed render's
    arrays; the other requests still render."""
    generator = SynthGenerator()
    real = generator.render
    held: list[weakref.ref[Any]] = []

    def render(request: GenerationRequest) -> GeneratedAudio:
        if request.job_id == "big":
            stems = np.ones(1024, np.float32)  # what the failed render holds
            held.append(weakref.ref(stems))
            raise MemoryError("Unable to allocate 80.0 GiB")
        return real(request)

    monkeypatch.setattr(generator, "render", render)
    fine, big = generator.generate([_request("house", duration=0.2), _request("house", duration=0.2, job_id="big")])
    assert isinstance(fine, GeneratedAudio)
    assert isinstance(big, TransientGeneratorError) and machine_fault(big) == "memory"
    assert big.__cause__ is not None and big.__cause__.__traceback__ is None
    assert held[0]() is None, "the failed render's array is still alive"


class _CancelAfter(JobControl):
    __slots__ = ("after", "reports")

    def __init__(self, after: int | None) -> None:
        super().__init__()
        self.after = after
        self.reports: list[tuple[int, int]] = []

    def report(self, done: int, total: int) -> None:
        super().report(done, total)
        self.reports.append((done, total))
        if self.after is not None and len(self.reports) >= self.after:
            self.cancel()


def test_synth__reports_frames_arranged_up_to_all_of_them() -> None:
    """The synth reports the frames it has arranged, loop by loop, ending at every frame."""
    control = _CancelAfter(None)
    request = dataclasses.replace(_request("lofi", duration=60.0, rate=8000, channels=1), control=control)
    SynthGenerator().generate([request])
    done = [d for d, _ in control.reports]
    assert len(done) > 3 and done == sorted(done)
    assert control.reports[-1] == (480_000, 480_000)


def test_synth__a_cancel_stops_its_request_between_loops_and_spares_the_others() -> None:
    """Cancelled mid-arrangement, a request ends JobCancelledError before its last frame; the
    next request of the batch renders exactly as it does alone."""
    stopped = dataclasses.replace(_request("lofi", duration=60.0, rate=8000, channels=1), control=_CancelAfter(2))
    other = _request("techno", rate=8000, channels=1)
    outcomes = SynthGenerator().generate([stopped, other])
    assert isinstance(outcomes[0], JobCancelledError)
    assert stopped.control.reports[-1][0] < 480_000  # type: ignore[attr-defined]
    np.testing.assert_array_equal(_render(other).samples, outcomes[1].samples)  # type: ignore[union-attr]
