"""Our MusicGen decode loop (:mod:`workers.musicgen_decode`) on the tiny random model, offline on CPU.

A tiny-model "second" is 50 codec frames, as for the real model. Random weights make noise, so these
tests pin tokens: greedy decoding against ``model.generate``, and a sampled job's tokens alone,
beside random companions, joining late, in a reused slot, after a cancelled neighbour, on retry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.tiny_musicgen import PROMPTS, build_tiny_musicgen

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch = pytest.importorskip("torch", reason="MusicGen tests need the extra: pip install .[musicgen]")
transformers = pytest.importorskip("transformers", reason="MusicGen tests need the extra: pip install .[musicgen]")

from workers.musicgen_decode import (  # noqa: E402  (needs torch, skipped above without it)
    DecodeRequest,
    DecodeResult,
    DecodeSession,
    DecodeSettings,
)
from workers.musicgen_sampling import choose_tokens, keyed_uniform  # noqa: E402

SECOND = 50  # codec frames
HOP = 640  # samples per frame at 32 kHz
SAMPLED = DecodeSettings(do_sample=True, guidance_scale=3.0, temperature=1.0, top_k=250)
Loaded = tuple[Any, Any]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from threads, and on a shared machine a second thread only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(folder: Path) -> Loaded:
    model = transformers.MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    return model, transformers.AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def mono(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return _load(build_tiny_musicgen(tmp_path_factory.mktemp("decode-mono")))


@pytest.fixture(scope="module")
def stereo(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return _load(build_tiny_musicgen(tmp_path_factory.mktemp("decode-stereo"), stereo=True))


def _session(loaded: Loaded, slots: int = 8, max_frames: int = 4 * SECOND, **options: Any) -> DecodeSession:
    return DecodeSession(*loaded, slots=slots, max_frames=max_frames, **options)


def _job(key: str = "job", prompt: str = PROMPTS[0], frames: int = 2 * SECOND, seed: int = 1234,
         settings: DecodeSettings = SAMPLED) -> DecodeRequest:
    return DecodeRequest(key, prompt, frames, seed, settings)


def _companions(count: int, seed: int, *, min_frames: int = 5, max_frames: int = 3 * SECOND) -> list[DecodeRequest]:
    """Jobs with random prompts, lengths, seeds and sampling settings."""
    rng = np.random.default_rng(seed)
    return [
        _job(f"companion-{seed}-{i}", PROMPTS[int(rng.integers(len(PROMPTS)))],
             int(rng.integers(min_frames, max_frames)), int(rng.integers(2**40)),
             DecodeSettings(bool(rng.integers(2)), float(rng.uniform(1.0, 5.0)), float(rng.uniform(0.5, 1.5)),
                            int(rng.integers(1, 80))))
        for i in range(count)
    ]


def _drain(session: DecodeSession) -> dict[str, DecodeResult]:
    results: dict[str, DecodeResult] = {}
    while session.busy:
        results.update((r.key, r) for r in session.step())
    return results


@pytest.fixture(scope="module")
def alone(mono: Loaded) -> DecodeResult:
    """The sampled job's result in a session of its own."""
    return _session(mono).run([_job()])[0]


def _codes_into_codec(model: Any, monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> list[Any]:
    """The codes ``run`` hands to the model's codec, one tensor per decode call."""
    caught: list[Any] = []
    real = model.audio_encoder.decode

    def spy(codes: Any, *args: Any, **kwargs: Any) -> Any:
        caught.append(codes.clone())
        return real(codes, *args, **kwargs)

    monkeypatch.setattr(model.audio_encoder, "decode", spy)
    with torch.inference_mode():
        caught.append(run())
    monkeypatch.undo()
    return caught


def _generate_codes(loaded: Loaded, monkeypatch: pytest.MonkeyPatch, prompts: list[str], frames: int,
                    guidance: float) -> tuple[np.ndarray, np.ndarray]:
    """``model.generate``'s greedy codes (batch, codebooks, frames) and audio, the codes caught on
    their way into the codec."""
    model, processor = loaded
    inputs = processor(text=prompts, padding=True, return_tensors="pt")
    delay = model.decoder.config.num_codebooks // model.decoder.config.audio_channels - 1
    *caught, audio = _codes_into_codec(model, monkeypatch, lambda: model.generate(
        **inputs, max_new_tokens=frames + delay, do_sample=False, guidance_scale=guidance))
    if len(caught) == 1:
        return caught[0][0].numpy(), audio.numpy()
    # Stereo decodes the left and right codebooks apart: interleave them back.
    left, right = caught[0][0], caught[1][0]
    return torch.stack([left, right], dim=2).flatten(1, 2).numpy(), audio.numpy()


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode__greedy_tokens_equal_generate(
    mono: Loaded, monkeypatch: pytest.MonkeyPatch, batch: int, guidance: float
) -> None:
    """With do_sample=False the loop's tokens equal model.generate's, token for token, and so does the
    audio; a batch of different prompts, with and without classifier-free guidance."""
    prompts, frames = PROMPTS[:batch], 30
    expected, audio = _generate_codes(mono, monkeypatch, prompts, frames, guidance)
    greedy = DecodeSettings(do_sample=False, guidance_scale=guidance)
    results = _session(mono, slots=batch).run([_job(f"j{i}", p, frames, 1, greedy) for i, p in enumerate(prompts)])
    assert np.array_equal(np.stack([r.codes for r in results]), expected)
    assert np.allclose(np.stack([r.audio for r in results]), audio, atol=1e-6)
    assert results[0].audio.shape == (1, frames * HOP)


def test_decode__stereo_greedy_tokens_equal_generate(stereo: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stereo model's 8 interleaved codebooks, delayed in pairs, give generate's tokens too."""
    expected, audio = _generate_codes(stereo, monkeypatch, PROMPTS[:2], 20, 3.0)
    greedy = DecodeSettings(do_sample=False, guidance_scale=3.0)
    results = _session(stereo, slots=2).run([_job(f"j{i}", p, 20, 1, greedy) for i, p in enumerate(PROMPTS[:2])])
    assert np.array_equal(np.stack([r.codes for r in results]), expected)
    assert results[0].audio.shape == (2, 20 * HOP)
    assert np.allclose(np.stack([r.audio for r in results]), audio, atol=1e-6)


def test_decode__sampled_job_same_in_batch_of_8_with_random_companions(mono: Loaded, alone: DecodeResult) -> None:
    """Beside 7 random companions (other prompts, lengths, seeds, guidance, temperatures, top-k), in
    the fifth slot, a sampled job gets the tokens it gets alone."""
    companions = _companions(7, seed=1)
    results = _session(mono).run([*companions[:4], _job(), *companions[4:]])
    assert np.array_equal(results[4].codes, alone.codes)
    assert np.array_equal(results[4].audio, alone.audio)


def test_decode__job_joining_a_half_done_batch_gets_the_same_tokens(mono: Loaded, alone: DecodeResult) -> None:
    """A job that joins while 7 others are half way through gets the tokens it gets alone."""
    session = _session(mono)
    companions = _companions(7, seed=2, min_frames=2 * SECOND, max_frames=4 * SECOND)
    for companion in companions:
        session.add(companion)
    for _ in range(SECOND):
        session.step()
    assert [p.steps_done for p in session.progress()] == [SECOND] * 7
    session.add(_job())
    assert np.array_equal(_drain(session)["job"].codes, alone.codes)


def test_decode__retry_and_reused_slot_get_the_same_tokens(mono: Loaded, alone: DecodeResult) -> None:
    """A fresh session (a retry) and a slot that served other jobs before both render the same tokens."""
    assert np.array_equal(_session(mono).run([_job()])[0].codes, alone.codes)
    session = _session(mono, slots=1)
    session.run(_companions(2, seed=3))
    assert np.array_equal(session.run([_job()])[0].codes, alone.codes)


def test_decode__seed_decides_the_tokens(mono: Loaded, alone: DecodeResult) -> None:
    """Another seed samples other tokens; so does another prompt with the same seed."""
    session = _session(mono)
    other_seed, other_prompt = session.run([_job("a", seed=4321), _job("b", prompt=PROMPTS[1])])
    assert not np.array_equal(other_seed.codes, alone.codes)
    assert not np.array_equal(other_prompt.codes, alone.codes)


def test_session__jobs_of_2_5_and_10_seconds_share_slots(mono: Loaded) -> None:
    """Jobs of 2, 5 and 10 s in 2 slots: each ends at its own length (frames + 3 steps after it
    joined), the 5 s job in the slot the 2 s job left, and each gets the tokens it gets alone."""
    jobs = [_job("ten", PROMPTS[0], 10 * SECOND, 10), _job("two", PROMPTS[1], 2 * SECOND, 2),
            _job("five", PROMPTS[2], 5 * SECOND, 5)]
    session = _session(mono, slots=2, max_frames=10 * SECOND)
    pending, joined, ended, results, step = list(jobs), {}, {}, {}, 0
    while pending or session.busy:
        while pending and session.free_slots:
            joined[pending[0].key] = (step, session.add(pending[0]))
            pending.pop(0)
        step += 1
        for result in session.step():
            ended[result.key], results[result.key] = step, result
    assert joined == {"ten": (0, 0), "two": (0, 1), "five": (2 * SECOND + 3, 1)}
    for job in jobs:
        assert ended[job.key] - joined[job.key][0] == job.frames + 3
        assert results[job.key].codes.shape == (4, job.frames)
        assert results[job.key].audio.shape == (1, job.frames * HOP)
        assert np.array_equal(results[job.key].codes, _session(mono, slots=2, max_frames=10 * SECOND
                                                               ).run([job])[0].codes), job.key


def test_session__cancel_one_of_four_leaves_the_others_unchanged(mono: Loaded) -> None:
    """Cancelling one of four jobs half way frees its slot at once; the other three finish with the
    tokens they get when nobody is cancelled."""
    jobs = [_job(f"j{i}", PROMPTS[i], 2 * SECOND, i) for i in range(4)]
    expected = {r.key: r.codes for r in _session(mono, slots=4).run(jobs)}
    session = _session(mono, slots=4)
    for job in jobs:
        session.add(job)
    for _ in range(SECOND):
        session.step()
    assert session.cancel("j2") and session.free_slots == 1
    assert not session.cancel("j2")
    assert [(p.key, p.steps_done, p.steps_total) for p in session.progress()] == [
        ("j0", SECOND, 2 * SECOND + 3), ("j1", SECOND, 2 * SECOND + 3), ("j3", SECOND, 2 * SECOND + 3)]
    results = _drain(session)
    assert sorted(results) == ["j0", "j1", "j3"]
    for key, result in results.items():
        assert np.array_equal(result.codes, expected[key]), key


@pytest.mark.parametrize(("change", "message"), [
    ({"frames": 0}, "at least 1 frame"), ({"prompt": " ".join(PROMPTS)}, "tokens"),
])
def test_session__refuses_a_job_it_cannot_hold(mono: Loaded, change: dict[str, Any], message: str) -> None:
    """No frames, or a prompt longer than the text cache, is refused before it starts."""
    session = _session(mono, slots=1, text_tokens=64)
    with pytest.raises(ValueError, match=message):
        session.add(DecodeRequest(**{"key": "job", "prompt": PROMPTS[0], "frames": 10, "seed": 1,
                                     "settings": SAMPLED, **change}))
    assert session.free_slots == 1


def test_session__refuses_a_second_job_of_one_key_and_a_full_session(mono: Loaded) -> None:
    """One key decodes once at a time, and a session with no free slot says so."""
    session = _session(mono, slots=1)
    session.add(_job())
    with pytest.raises(ValueError, match="already decoding"):
        session.add(_job())
    with pytest.raises(ValueError, match="slots are taken"):
        session.add(_job("other"))


def test_settings__from_generation_config_with_overrides(mono: Loaded) -> None:
    """The settings default to the model's generation config (sampling, guidance 3) and take overrides."""
    config = mono[0].generation_config
    assert DecodeSettings.from_generation_config(config) == DecodeSettings(True, 3.0, 1.0, None)
    assert DecodeSettings.from_generation_config(config, top_k=10, do_sample=False) == DecodeSettings(
        False, 3.0, 1.0, 10)


def test_sampling__keyed_noise_is_a_pure_function_of_its_key() -> None:
    """The noise of (seed, step) is the same in any batch and differs for any other key; it is uniform."""
    seeds = torch.tensor([7, 7, 8, 2**40 + 7], dtype=torch.int64)
    steps = torch.tensor([3, 4, 3, 3], dtype=torch.int64)
    noise = keyed_uniform(seeds, steps, 4, 64)
    assert noise.shape == (4, 4, 64)
    assert torch.equal(keyed_uniform(seeds[:1], steps[:1], 4, 64)[0], noise[0])
    assert all(not torch.equal(noise[0], noise[i]) for i in (1, 2, 3))
    many = keyed_uniform(torch.arange(256), torch.zeros(256, dtype=torch.int64), 4, 64)
    assert float(many.min()) > 0 and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 0.01
    assert len(torch.unique(many)) > 0.99 * many.numel()


def test_sampling__gumbel_max_draws_from_the_softmax_within_top_k() -> None:
    """Over many seeds the sampled tokens follow softmax(logits / temperature) over the top k;
    greedy takes the arg-max of the guided logits."""
    slots = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(2 * slots, 1, 1)

    def choose(top_k: int, sample: bool = True, temperature: float = 1.0) -> Any:
        def full(value: Any, dtype: Any = torch.float32) -> Any:
            return torch.full((slots,), value, dtype=dtype)

        return choose_tokens(logits, guided=full(False, torch.bool), guidance_scale=full(1.0),
                             sample=full(sample, torch.bool), temperature=full(temperature),
                             top_k=full(top_k, torch.int64), seeds=torch.arange(slots), steps=full(0, torch.int64))

    counts = torch.bincount(choose(3, temperature=2.0).flatten(), minlength=5).double() / slots
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 2.0, dim=0).double()
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], expected, atol=0.015), counts
    assert bool((choose(5, sample=False) == 0).all())



# Windowed continuation, scaled down: windows of 1 s overlapping by 0.4 s and a job of 2.5 s stand for
# the real model's 30 s windows overlapping by 12 s and a job of 75 s.
WINDOW, OVERLAP, LONG = SECOND, 2 * SECOND // 5, 5 * SECOND // 2


def test_windows__long_job_continues_each_window_from_the_end_of_the_last(
    mono: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job longer than a window is rendered in windows of new frames 50, 30, 30, 15, each after a
    forced prefix of the previous 20: greedy, each window's new tokens are what model.generate
    continues with that prefix as its audio prompt, and the job has exactly its frames."""
    greedy = DecodeSettings(do_sample=False, guidance_scale=3.0)
    session = _session(mono, slots=1, max_frames=WINDOW)
    session.add(_job(frames=LONG, settings=greedy))
    assert session.progress()[0].steps_total == 53 + 53 + 53 + 38
    result = _drain(session)["job"]
    assert result.codes.shape == (4, LONG) and result.steps == 53 + 53 + 53 + 38
    assert result.audio.shape == (1, LONG * HOP)
    model, processor = mono
    inputs = processor(text=[PROMPTS[0]], return_tensors="pt")
    ends = [WINDOW, WINDOW + 30, WINDOW + 60, LONG]
    for start, end in zip([0, *ends[:-1]], ends, strict=True):
        # The previous window's last frames as generate's audio prompt (decoder_input_ids).
        extra = {"decoder_input_ids": torch.from_numpy(result.codes[:, start - OVERLAP : start])} if start else {}
        codes = _codes_into_codec(model, monkeypatch, lambda: model.generate(
            **inputs, **extra, max_new_tokens=end - start + 3, do_sample=False, guidance_scale=3.0))
        assert np.array_equal(codes[0][0, 0].numpy()[:, -(end - start):], result.codes[:, start:end]), (start, end)


def test_windows__no_silence_at_the_seams(mono: Loaded) -> None:
    """The whole job's codes are decoded at once: around every seam the audio is as loud as elsewhere."""
    audio = _session(mono, slots=1, max_frames=WINDOW).run([_job(frames=LONG)])[0].audio[0]
    level = float(np.sqrt(np.mean(audio**2)))
    for seam in (WINDOW, WINDOW + 30, WINDOW + 60):
        around = audio[(seam - 5) * HOP : (seam + 5) * HOP]
        assert float(np.sqrt(np.mean(around**2))) > 0.25 * level, seam
        assert np.count_nonzero(around == 0) < 0.01 * around.size, seam


def test_windows__long_sampled_job_same_alone_and_beside_others(mono: Loaded) -> None:
    """A windowed job's sampled tokens do not depend on a companion that joins and leaves mid-way,
    and its first window is the job of one window's length (same seed, same noise)."""
    alone = _session(mono, slots=2, max_frames=WINDOW).run([_job(frames=LONG)])[0]
    session = _session(mono, slots=2, max_frames=WINDOW)
    session.add(_job(frames=LONG))
    for _ in range(70):
        session.step()
    session.add(_companions(1, seed=5)[0])
    assert np.array_equal(_drain(session)["job"].codes, alone.codes)
    short = _session(mono, slots=2, max_frames=WINDOW).run([_job(frames=WINDOW)])[0]
    assert np.array_equal(short.codes, alone.codes[:, :WINDOW])


# compile_step: both tests use one session shape, so the second reuses the graph the first compiled; so does
# test_musicgen's compile test, on the same worker (TORCH_COMPILE in tests/conftest.py), from inductor's cache.
COMPILED_SHAPE = {"slots": 2, "max_frames": WINDOW}
GREEDY = DecodeSettings(do_sample=False, guidance_scale=3.0)
# Inductor's own imports call a deprecated torch.jit API; the warning is torch's, not ours.
COMPILING = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@COMPILING
def test_compile_step__greedy_tokens_equal_eager_as_jobs_join_and_leave(mono: Loaded) -> None:
    """Greedy, the compiled step chooses eager's tokens: a guided job, an unguided one joining it mid-run,
    and a third taking the slot the second left, two windows long."""
    def run(session: DecodeSession) -> dict[str, DecodeResult]:
        session.add(_job("first", PROMPTS[0], 40, 1, GREEDY))
        results: dict[str, DecodeResult] = {}
        for _ in range(10):
            results.update((r.key, r) for r in session.step())
        session.add(_job("joins", PROMPTS[1], 10, 2, DecodeSettings(do_sample=False, guidance_scale=1.0)))
        while session.busy:
            for result in session.step():
                results[result.key] = result
                if result.key == "joins":
                    session.add(_job("after", PROMPTS[2], WINDOW + 10, 3, GREEDY))
        return results

    eager = run(_session(mono, **COMPILED_SHAPE))
    compiled = run(_session(mono, **COMPILED_SHAPE, compile_step=True))
    assert sorted(compiled) == ["after", "first", "joins"]
    for key, result in eager.items():
        assert np.array_equal(compiled[key].codes, result.codes), key


@COMPILING
def test_compile_step__one_graph_serves_every_join_leave_cancel_and_window(mono: Loaded) -> None:
    """After the first step compiles, jobs joining, finishing, being cancelled and starting a new window
    reuse that graph: torch.compile is told to fail rather than compile again."""
    session = _session(mono, **COMPILED_SHAPE, compile_step=True)
    session.add(_job("first", frames=5))
    session.step()
    with torch.compiler.set_stance("fail_on_recompile"):
        session.add(_job("windowed", PROMPTS[1], WINDOW + 5, 2))
        assert sorted(_drain_until(session, "first")) == ["first"]
        session.add(_job("cancelled", PROMPTS[2], 20, 3, GREEDY))
        session.step()
        assert session.cancel("cancelled")
        session.add(_job("last", PROMPTS[3], 5, 4))
        assert sorted(_drain(session)) == ["last", "windowed"]


def _drain_until(session: DecodeSession, key: str) -> dict[str, DecodeResult]:
    """Step until job ``key`` finishes; the results of that step."""
    while True:
        results = {r.key: r for r in session.step()}
        if key in results:
            return results
