"""One conformance suite, run against every backend in ``workers/`` (see ``conftest.backend``)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from dgxqueue.audio import read_wav, write_wav_atomic
from dgxqueue.errors import PermanentGeneratorError
from dgxqueue.generators import (
    GeneratedAudio,
    GenerationOutcome,
    GenerationRequest,
    Generator,
    available_generators,
    create_generator,
)
from tests.generators.conftest import Backend


def _frames(request: GenerationRequest) -> int:
    return round(request.duration_seconds * request.sample_rate)


def _audio(outcome: GenerationOutcome) -> GeneratedAudio:
    assert isinstance(outcome, GeneratedAudio), f"expected audio, got {outcome!r}"
    return outcome


def test_registry__finds_backend_by_entry_point_name(backend: Backend) -> None:
    """The backend is registered under its name and create_generator builds the same class."""
    assert backend.name in available_generators()
    built = create_generator(backend.name, backend.options)
    assert type(built) is type(backend.generator)
    assert built.name == backend.name


def test_protocol__attributes_are_well_formed(backend: Backend) -> None:
    """The backend satisfies the Generator protocol with models and a positive batch size."""
    generator = backend.generator
    assert isinstance(generator, Generator)
    assert isinstance(generator.models, frozenset) and generator.models
    assert all(isinstance(model, str) and model for model in generator.models)
    assert isinstance(generator.max_batch_size, int) and generator.max_batch_size >= 1


def test_models__one_name_as_text_is_one_model(backend: Backend) -> None:
    """``models = "name"`` (text, not a list) serves that one model, not each of its letters."""
    built = create_generator(backend.name, {**backend.options, "models": "my-model"})
    assert built.models == frozenset({"my-model"})


def test_generate__one_result_per_request_in_order(backend: Backend) -> None:
    """A batch yields one float32 (channels, round(duration*rate)) result per request, in order."""
    durations = (0.5, 0.25, 0.3333)
    requests = [
        backend.request(job_id=f"job-{i}", seed=i, duration_seconds=d, channels=channels)
        for i, (d, channels) in enumerate(zip(durations, itertools.cycle(backend.channels), strict=False))
    ]
    outcomes = backend.generator.generate(requests)
    assert len(outcomes) == len(requests)
    for request, outcome in zip(requests, outcomes, strict=True):
        audio = _audio(outcome)
        assert isinstance(audio.samples, np.ndarray) and audio.samples.dtype == np.float32
        assert audio.samples.shape == (request.channels, _frames(request))
        assert audio.sample_rate == request.sample_rate


def test_generate__samples_are_finite_and_within_full_scale(backend: Backend) -> None:
    """Every sample of every result is finite and within [-1, 1]."""
    outcomes = backend.generator.generate([backend.request(seed=s, job_id=f"j{s}") for s in (1, 2)])
    for outcome in outcomes:
        samples = _audio(outcome).samples
        assert np.isfinite(samples).all()
        assert float(np.max(np.abs(samples))) <= 1.0


def test_generate__empty_batch_gives_no_results(backend: Backend) -> None:
    """An empty batch is answered with an empty list, not an error."""
    assert backend.generator.generate([]) == []


def test_generate__results_write_as_wav_files_that_read_back(backend: Backend, tmp_path: Path) -> None:
    """Each result writes as a WAV whose rate, channels and frame count match the request."""
    requests = [backend.request(job_id=f"w{c}", channels=c) for c in backend.channels]
    for request, outcome in zip(requests, backend.generator.generate(requests), strict=True):
        path = tmp_path / "outputs" / f"{request.job_id}.wav"
        write_wav_atomic(path, _audio(outcome))
        samples, rate = read_wav(path)
        assert rate == request.sample_rate
        assert samples.shape == (request.channels, _frames(request))


def test_batch_key__hashable_and_equal_for_identical_requests(backend: Backend) -> None:
    """Identical requests share a batch key, and the key can index a dict."""
    request = backend.request()
    twin = dataclasses.replace(request)
    key = backend.generator.batch_key(request)
    assert {key: 1}[backend.generator.batch_key(twin)] == 1


def test_generate__same_request_gives_identical_audio(backend: Backend) -> None:
    """Where the backend promises it, rendering one request twice gives bit-identical samples."""
    if not backend.repeatable:
        pytest.skip(f"{backend.name} does not promise repeatable output")
    request = backend.request(seed=99)
    [first] = backend.generator.generate([request])
    [second] = backend.generator.generate([request])
    np.testing.assert_array_equal(_audio(first).samples, _audio(second).samples)


def test_generate__seed_changes_audio_as_promised(backend: Backend) -> None:
    """Two seeds give different samples where output depends on the seed, identical ones where not."""
    [first] = backend.generator.generate([backend.request(seed=1)])
    [second] = backend.generator.generate([backend.request(seed=2)])
    same = np.array_equal(_audio(first).samples, _audio(second).samples)
    assert same is not backend.seed_sensitive


def test_generate__unservable_request_fails_alone(backend: Backend) -> None:
    """A request the backend cannot serve is refused permanently; its batch neighbours succeed."""
    assert backend.unservable, f"{backend.name} must name a request it refuses"
    for changes in backend.unservable:
        bad = backend.request(job_id="bad", **changes)
        with pytest.raises(PermanentGeneratorError):
            backend.generator.validate(bad)
        good = [backend.request(job_id="good-1", seed=1), backend.request(job_id="good-2", seed=2)]
        outcomes = backend.generator.generate([good[0], bad, good[1]])
        assert isinstance(outcomes[1], PermanentGeneratorError), (changes, outcomes[1])
        for request, outcome in zip(good, (outcomes[0], outcomes[2]), strict=True):
            assert _audio(outcome).frames == _frames(request)
