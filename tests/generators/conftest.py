"""The ``backend`` fixture: every generator backend, built through its entry point, with what it
promises (rates, channels, determinism) and requests it must refuse, for the conformance suite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from dgxqueue.generators import GenerationRequest, Generator, create_generator


@dataclass(frozen=True)
class Backend:
    """A loaded backend and the promises the conformance suite holds it to."""

    name: str  # entry-point name
    options: Mapping[str, Any]
    generator: Generator
    sample_rate: int
    channels: tuple[int, ...]  # channel counts it renders
    repeatable: bool  # the same request twice gives identical samples
    seed_sensitive: bool  # another seed gives other samples
    unservable: tuple[Mapping[str, Any], ...] = field(default=())  # request fields it must refuse

    def request(self, **changes: Any) -> GenerationRequest:
        """A request this backend serves, with ``changes`` applied."""
        base = GenerationRequest(
            job_id="job-1",
            prompt="lofi hip hop beat with warm piano and vinyl crackle",
            model_name=sorted(self.generator.models)[0],
            duration_seconds=0.5,
            sample_rate=self.sample_rate,
            channels=self.channels[0],
            seed=1234,
        )
        return dataclasses.replace(base, **changes)


def _musicgen_options(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = "the musicgen backend needs the extra: pip install .[musicgen]"
    pytest.importorskip("torch", reason=reason)
    pytest.importorskip("transformers", reason=reason)
    from tests.support.tiny_musicgen import build_tiny_musicgen

    folder = build_tiny_musicgen(tmp_path_factory.mktemp("conformance-musicgen"))
    return {"model": str(folder), "models": ["tiny-musicgen"], "device": "cpu"}


def _build(name: str, tmp_path_factory: pytest.TempPathFactory, extra: dict[str, Any]) -> Backend:
    too_many_channels = {"channels": 7}
    absurd_duration = {"duration_seconds": 1e6}
    if name == "silence":
        options: dict[str, Any] = {}
        traits: dict[str, Any] = {"sample_rate": 32000, "channels": (1, 2), "repeatable": True,
                                  "seed_sensitive": False, "unservable": (too_many_channels,)}
    elif name == "synth":
        options = {"max_batch_size": 4}
        traits = {"sample_rate": 32000, "channels": (1, 2), "repeatable": True, "seed_sensitive": True,
                  "unservable": (too_many_channels, absurd_duration, {"sample_rate": 100})}
    else:  # musicgen: the tiny model is mono and renders at 32 kHz only, at most 30 s
        options = _musicgen_options(tmp_path_factory) | extra
        traits = {"sample_rate": 32000, "channels": (1,), "repeatable": True, "seed_sensitive": True,
                  "unservable": (too_many_channels, absurd_duration, {"sample_rate": 44100})}
    generator = create_generator(name, options)
    generator.load()
    return Backend(name=name, options=options, generator=generator, **traits)


@pytest.fixture(scope="session", params=["silence", "synth", "musicgen", "musicgen-loop"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    """Each registered backend, built once per session by its entry-point name and loaded; MusicGen
    twice, with each of its decoders."""
    name, _, variant = str(request.param).partition("-")
    return _build(name, tmp_path_factory, {"decode": variant} if variant else {})
