"""MusicGen as a SlotGenerator (``decode = "loop"``): jobs start between steps, leave when done,
and free their slot when cancelled; out of memory leaves fewer slots. Tiny model, CPU."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dgxqueue.daemon import Daemon
from dgxqueue.errors import CapacityError, ConfigError, PermanentGeneratorError, TransientGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest, SlotGenerator, serves_slots
from dgxqueue.storage import get_engine, init_db
from tests.support.daemons import make_settings
from tests.support.tiny_musicgen import PROMPTS, build_tiny_musicgen
from workers.musicgen import MusicGenGenerator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch = pytest.importorskip("torch", reason="MusicGen tests need the extra: pip install .[musicgen]")
pytest.importorskip("transformers", reason="MusicGen tests need the extra: pip install .[musicgen]")

MODEL = "tiny-musicgen"


def _request(job_id: str, prompt: str = PROMPTS[0], *, duration: float = 0.5, seed: int = 7) -> GenerationRequest:
    return GenerationRequest(job_id=job_id, prompt=prompt, model_name=MODEL, duration_seconds=duration,
                             sample_rate=32000, channels=1, seed=seed)


def _load(folder: Path, **options: Any) -> MusicGenGenerator:
    generator = MusicGenGenerator(model=str(folder), models=[MODEL], device="cpu", **options)
    generator.load()
    return generator


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_musicgen(tmp_path_factory.mktemp("musicgen-slots"))


@pytest.fixture
def slotted(folder: Path) -> MusicGenGenerator:
    return _load(folder, decode="loop", max_batch_size=4)


def _drain(generator: SlotGenerator, joins: dict[int, GenerationRequest]) -> tuple[dict[str, GenerationOutcome],
                                                                                    dict[str, int]]:
    """Step until every slot is empty, starting ``joins[step]`` at that step; outcomes and the
    step each job finished at."""
    outcomes: dict[str, GenerationOutcome] = {}
    finished_at: dict[str, int] = {}
    step = 0
    while generator.free_slots < generator.slots or any(at >= step for at in joins):
        if step in joins:
            generator.start(joins[step])
        for key, outcome in generator.step():
            outcomes[key], finished_at[key] = outcome, step
        step += 1
    return outcomes, finished_at


def test_musicgen_slots__a_late_joiner_leaves_first_with_its_audio_alone(slotted: MusicGenGenerator) -> None:
    """A short job started while a long one decodes finishes first, and its samples equal the same
    request rendered alone; the long one has its full length."""
    assert serves_slots(slotted) and slotted.slots == 4
    short = _request("short", PROMPTS[1], duration=0.5, seed=11)
    (alone,) = slotted.generate([short])
    outcomes, finished_at = _drain(slotted, {0: _request("long", duration=2.0), 20: short})
    assert finished_at["short"] < finished_at["long"]
    long_audio, short_audio = outcomes["long"], outcomes["short"]
    assert isinstance(long_audio, GeneratedAudio) and long_audio.frames == 64000
    assert isinstance(short_audio, GeneratedAudio) and isinstance(alone, GeneratedAudio)
    assert np.array_equal(short_audio.samples, alone.samples)
    assert short.control.progress is not None and short.control.progress[0] == short.control.progress[1]


def test_musicgen_slots__cancel_frees_its_slot_and_the_others_decode_on(slotted: MusicGenGenerator) -> None:
    """A cancelled job's slot is free at once; the other job ends with the audio it has alone."""
    kept = _request("kept", PROMPTS[2], duration=0.5, seed=3)
    (alone,) = slotted.generate([kept])
    slotted.start(kept)
    slotted.start(_request("gone", PROMPTS[3], duration=2.0))
    for _ in range(5):
        assert slotted.step() == []
    assert slotted.cancel("gone") and not slotted.cancel("gone")
    assert slotted.free_slots == 3
    outcomes, _ = _drain(slotted, {})
    assert set(outcomes) == {"kept"}
    result = outcomes["kept"]
    assert isinstance(result, GeneratedAudio) and isinstance(alone, GeneratedAudio)
    assert np.array_equal(result.samples, alone.samples)


def test_musicgen_slots__a_bad_request_is_refused_alone(slotted: MusicGenGenerator) -> None:
    """start() refuses a request it cannot serve with a PermanentGeneratorError; no slot is taken."""
    with pytest.raises(PermanentGeneratorError, match="duration"):
        slotted.start(_request("bad", duration=1e6))
    with pytest.raises(PermanentGeneratorError, match="tokens"):
        slotted.start(_request("long-prompt", " ".join(PROMPTS * 8)))
    assert slotted.free_slots == 4


def test_musicgen_slots__out_of_memory_leaves_fewer_slots(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory in a step with several jobs: CapacityError, every slot freed, half the slots;
    with one job in one slot it is a transient failure of that job."""
    import workers.musicgen_decode as decode

    def step(self: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    generator = _load(folder, decode="loop", max_batch_size=4)
    for i in range(3):
        generator.start(_request(f"j{i}", seed=i))
    monkeypatch.setattr(decode.DecodeSession, "step", step)
    with pytest.raises(CapacityError):
        generator.step()
    assert (generator.slots, generator.free_slots) == (1, 1)
    generator.start(_request("alone"))
    with pytest.raises(TransientGeneratorError) as caught:
        generator.step()
    assert not isinstance(caught.value, CapacityError) and generator.free_slots == 1


def test_musicgen_slots__generate_decoder_has_none_and_the_daemon_refuses_it(folder: Path, tmp_path: Path) -> None:
    """With decode = "generate" MusicGen has no slots, and a daemon told to batch continuously
    refuses to start with it, naming the setting."""
    generate = MusicGenGenerator(model=str(folder), models=[MODEL], device="cpu")
    assert generate.slots == 0 and not serves_slots(generate)
    url = f"sqlite:///{tmp_path / 'q.db'}"
    init_db(url)
    settings = make_settings(url, tmp_path / "outputs")
    settings = dataclasses.replace(settings, generator=dataclasses.replace(settings.generator, continuous=True))
    with pytest.raises(ConfigError, match=r"generator\.continuous"):
        Daemon(settings, engine=get_engine(url), generator=generate)


def test_musicgen_slots__a_start_that_raised_midway_leaves_no_slot_taken(
        slotted: MusicGenGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    """start() raising after the loop put the request in a slot (here its first window failing to
    start): the daemon then calls cancel(), which finds no job of that key (False), and the slot is
    free; the same job starts again cleanly and renders, and a step never finishes the failed
    attempt. (The loop kept the request in its slot while start() had not recorded it: cancel()
    could not free it, every later job had one slot fewer, a step finished a key start() never
    recorded (KeyError: a failed step), and the retry was refused as already decoding.)"""
    import workers.musicgen_decode as decode

    real = decode.DecodeSession._start_window
    failures = [RuntimeError("copying the window into the slot failed")]

    def start_window(self: Any, slot: int, occupant: Any) -> None:
        if failures:
            raise failures.pop()
        real(self, slot, occupant)

    monkeypatch.setattr(decode.DecodeSession, "_start_window", start_window)
    with pytest.raises(RuntimeError, match="copying the window"):
        slotted.start(_request("broken"))
    assert slotted.cancel("broken") is False  # what the daemon does after a start that raised
    assert slotted.free_slots == 4 and slotted._session.free_slots == 4
    outcomes, _ = _drain(slotted, {0: _request("broken"), 1: _request("beside", PROMPTS[1])})
    assert set(outcomes) == {"broken", "beside"}
    assert all(isinstance(o, GeneratedAudio) for o in outcomes.values()), outcomes


def test_musicgen_slots__cancel_of_a_key_it_never_took_is_false_and_touches_nothing(
        slotted: MusicGenGenerator) -> None:
    """The daemon cancels every job whose start() raised, also one refused before it took a slot:
    cancel() of a key it does not hold returns False, and the job decoding beside it goes on."""
    kept = _request("kept", PROMPTS[2], duration=0.5, seed=3)
    (alone,) = slotted.generate([kept])
    assert slotted.cancel("never-started") is False  # before any loop exists
    slotted.start(kept)
    with pytest.raises(PermanentGeneratorError, match="duration"):
        slotted.start(_request("refused", duration=1e6))
    assert slotted.cancel("refused") is False and slotted.free_slots == 3
    outcomes, _ = _drain(slotted, {})
    result = outcomes["kept"]
    assert isinstance(result, GeneratedAudio) and isinstance(alone, GeneratedAudio)
    assert np.array_equal(result.samples, alone.samples)
