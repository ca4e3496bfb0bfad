"""The real MusicGen code path, offline on CPU: a tiny random model saved to disk and loaded back.

The model is built by :mod:`tests.support.tiny_musicgen` and loaded through the same
``from_pretrained`` path production uses for ``facebook/musicgen-small``. Random weights make
noise, so these tests pin structure: shapes, rates, limits, errors, batching and OOM recovery.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import sys
import wave
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dgxqueue.audio import read_wav, write_wav_atomic
from dgxqueue.errors import ConfigError, JobCancelledError, PermanentGeneratorError, TransientGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationRequest, Generator, JobControl, create_generator
from dgxqueue.machine_faults import machine_fault
from tests.support.tiny_musicgen import PROMPTS, build_tiny_musicgen
from workers.musicgen import MusicGenGenerator

# Nothing may reach the hub; huggingface_hub reads these when transformers first imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch = pytest.importorskip("torch", reason="MusicGen tests need the extra: pip install .[musicgen]")
pytest.importorskip("transformers", reason="MusicGen tests need the extra: pip install .[musicgen]")

RATE = 32000
MODEL = "tiny-musicgen"


def _request(
    prompt: str = PROMPTS[0],
    *,
    duration: float = 0.5,
    channels: int = 1,
    seed: int = 7,
    sample_rate: int = RATE,
    metadata: dict[str, Any] | None = None,
    job_id: str = "job",
) -> GenerationRequest:
    return GenerationRequest(
        job_id=job_id,
        prompt=prompt,
        model_name=MODEL,
        duration_seconds=duration,
        sample_rate=sample_rate,
        channels=channels,
        seed=seed,
        metadata=metadata or {},
    )


def _audio(outcome: object) -> GeneratedAudio:
    assert isinstance(outcome, GeneratedAudio), outcome
    return outcome


def _load(folder: Path, **options: Any) -> MusicGenGenerator:
    generator = MusicGenGenerator(model=str(folder), models=[MODEL], **options)
    generator.load()
    return generator


@pytest.fixture(scope="module")
def mono(tmp_path_factory: pytest.TempPathFactory) -> MusicGenGenerator:
    return _load(build_tiny_musicgen(tmp_path_factory.mktemp("musicgen-mono")))


@pytest.fixture(scope="module")
def stereo(tmp_path_factory: pytest.TempPathFactory) -> MusicGenGenerator:
    return _load(build_tiny_musicgen(tmp_path_factory.mktemp("musicgen-stereo"), stereo=True))


@pytest.fixture(scope="module")
def looped(mono: MusicGenGenerator) -> MusicGenGenerator:
    """The same model through our decode loop, in 4 slots."""
    return _load(Path(mono.model_id), decode="loop", max_batch_size=4)


@pytest.fixture(params=["generate", "loop"])
def either(request: pytest.FixtureRequest) -> MusicGenGenerator:
    """The mono model through each decoder."""
    generator: MusicGenGenerator = request.getfixturevalue("mono" if request.param == "generate" else "looped")
    return generator


Wrapper = Callable[..., Any]


@pytest.fixture
def wrap_generate(mono: MusicGenGenerator, monkeypatch: pytest.MonkeyPatch) -> Callable[[Wrapper], None]:
    """Route the loaded model's ``generate`` through ``wrapper(real_generate, **kwargs)`` for one test."""
    real = mono._model.generate

    def install(wrapper: Wrapper) -> None:
        monkeypatch.setattr(mono._model, "generate", lambda **kwargs: wrapper(real, **kwargs))

    return install


def _batch_size(kwargs: dict[str, Any]) -> int:
    return int(kwargs["input_ids"].shape[0])


def test_musicgen__batch_of_mixed_requests_has_exact_shapes(either: MusicGenGenerator) -> None:
    """A batch mixing durations and channel counts gives (channels, round(d*32000)) float32 each."""
    mono = either
    requests = [
        _request(PROMPTS[0], duration=1.0, channels=1),
        _request(PROMPTS[1], duration=1.0, channels=2),
        _request(PROMPTS[2], duration=0.75, channels=1),  # 37.5 frames: rendered 38, trimmed
        _request(PROMPTS[3], duration=0.01, channels=2),  # shorter than one frame
    ]
    outcomes = mono.generate(requests)
    assert len(outcomes) == len(requests)
    for request, outcome in zip(requests, outcomes, strict=True):
        audio = _audio(outcome)
        assert audio.samples.shape == (request.channels, round(request.duration_seconds * RATE))
        assert audio.samples.dtype == np.float32
        assert audio.sample_rate == RATE
        assert np.isfinite(audio.samples).all()
        assert np.abs(audio.samples).max() <= 1.0
        assert audio.metadata["model"] == mono.model_id
    duplicated = _audio(outcomes[1]).samples
    assert np.array_equal(duplicated[0], duplicated[1]), "a mono model's second channel is a copy"


def test_musicgen__stereo_model_renders_two_distinct_channels(stereo: MusicGenGenerator) -> None:
    """The 8-codebook stereo model gives distinct left/right channels, averaged for a mono request."""
    outcomes = stereo.generate(
        [_request(PROMPTS[4], channels=2), _request(PROMPTS[5], channels=1), _request(channels=2)]
    )
    shapes = [_audio(o).samples.shape for o in outcomes]
    assert shapes == [(2, RATE // 2), (1, RATE // 2), (2, RATE // 2)]
    left, right = _audio(outcomes[0]).samples
    assert not np.array_equal(left, right)
    assert all(np.isfinite(_audio(o).samples).all() for o in outcomes)


def test_musicgen__same_prompt_and_seed_alone_repeat_different_prompts_differ(
    either: MusicGenGenerator,
) -> None:
    """Rendered alone, a request repeats exactly; another prompt with the same seed sounds different."""
    mono = either
    first = _audio(mono.generate([_request(PROMPTS[0])])[0]).samples
    again = _audio(mono.generate([_request(PROMPTS[0])])[0]).samples
    other = _audio(mono.generate([_request(PROMPTS[1])])[0]).samples
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_musicgen__batch_and_sequential_agree_on_shapes(mono: MusicGenGenerator) -> None:
    """One batched call and one call per request give the same shapes and rates."""
    requests = [_request(p, channels=1 + i % 2, seed=i) for i, p in enumerate(PROMPTS[:4])]
    batched = [_audio(o) for o in mono.generate(requests)]
    sequential = [_audio(mono.generate([r])[0]) for r in requests]
    assert [a.samples.shape for a in batched] == [a.samples.shape for a in sequential]
    assert {a.sample_rate for a in batched + sequential} == {RATE}


@pytest.mark.parametrize("channels", [1, 2])
def test_musicgen__wav_reads_back_with_exact_sample_count(
    either: MusicGenGenerator, tmp_path: Path, channels: int
) -> None:
    """The audio written as 16-bit PCM WAV reads back with the exact frame count, rate and channels."""
    mono = either
    audio = _audio(mono.generate([_request(duration=0.63, channels=channels)])[0])
    path = tmp_path / "out.wav"
    assert write_wav_atomic(path, audio) == path.stat().st_size
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (channels, 2, RATE)
        assert wav.getnframes() == round(0.63 * RATE)
    samples, rate = read_wav(path)
    assert rate == RATE
    assert samples.shape == (channels, round(0.63 * RATE))
    assert np.allclose(samples, audio.samples, atol=1 / 32767)


def test_musicgen__request_over_30_seconds_is_permanent(either: MusicGenGenerator) -> None:
    """A request above the model's 30 s limit is refused naming the limit, and fails only itself."""
    mono = either
    too_long = _request(duration=30.5, job_id="long")
    with pytest.raises(PermanentGeneratorError, match="30 s"):
        mono.validate(too_long)
    outcomes = mono.generate([_request(), too_long])
    assert isinstance(outcomes[0], GeneratedAudio)
    assert isinstance(outcomes[1], PermanentGeneratorError)


def test_musicgen__other_sample_rate_is_permanent(mono: MusicGenGenerator) -> None:
    """A request at a rate other than the model's native 32000 Hz is refused naming that rate."""
    with pytest.raises(PermanentGeneratorError, match="sample_rate=32000"):
        mono.validate(_request(sample_rate=44100))


def test_musicgen__unserved_model_name_is_permanent(mono: MusicGenGenerator) -> None:
    """A job for a model name this backend does not serve is refused, listing what it serves."""
    request = GenerationRequest("j", "x", "musicgen-large", 1.0, RATE, 1, 1)
    with pytest.raises(PermanentGeneratorError, match=MODEL):
        mono.validate(request)


@pytest.mark.parametrize(
    ("key", "value"),
    [("guidance_scale", "loud"), ("guidance_scale", 0.5), ("temperature", 0), ("top_k", -1), ("top_k", 2.5)],
)
def test_musicgen__invalid_override_is_permanent_naming_key(
    mono: MusicGenGenerator, key: str, value: object
) -> None:
    """A bad per-job sampling override in metadata is refused naming the key."""
    with pytest.raises(PermanentGeneratorError, match=f"metadata {key}="):
        mono.validate(_request(metadata={key: value}))


def test_musicgen__override_reaches_generate(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None]
) -> None:
    """guidance_scale/temperature/top_k from metadata are passed to generate and reported back."""
    seen: list[dict[str, Any]] = []

    def spy(real: Wrapper, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(**kwargs)

    wrap_generate(spy)
    overrides = {"guidance_scale": 1.5, "temperature": 0.7, "top_k": 10}
    custom, default = _request(metadata=overrides), _request()
    assert mono.batch_key(custom) != mono.batch_key(default)
    outcome = _audio(mono.generate([custom])[0])
    assert {k: seen[0][k] for k in overrides} == overrides
    assert {k: outcome.metadata[k] for k in overrides} == overrides


def test_musicgen__oom_halves_the_batch_until_it_fits(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None]
) -> None:
    """CUDA OOM on any batch above one halves recursively (4 -> 2,2 -> 1,1,1,1); every job succeeds."""
    sizes: list[int] = []

    def oom_above_one(real: Wrapper, **kwargs: Any) -> Any:
        sizes.append(_batch_size(kwargs))
        if sizes[-1] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kwargs)

    wrap_generate(oom_above_one)
    outcomes = mono.generate([_request(p, seed=i) for i, p in enumerate(PROMPTS[:4])])
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert [_audio(o).samples.shape for o in outcomes] == [(1, RATE // 2)] * 4


def test_musicgen__oom_retry_runs_after_the_failed_call_is_freed(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None]
) -> None:
    """The halves are rendered once the failed call's frames are gone: its tensors (a KV cache on
    a GPU) no longer take memory the retry needs. The exception's traceback used to keep them."""
    held: list[weakref.ref[Any]] = []
    alive_at_retry: list[bool] = []

    def oom_at_two(real: Wrapper, **kwargs: Any) -> Any:
        if _batch_size(kwargs) > 1:
            cache = torch.ones(1024)  # what a failed call holds when it runs out of memory
            held.append(weakref.ref(cache))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        alive_at_retry.append(held[0]() is not None)
        return real(**kwargs)

    wrap_generate(oom_at_two)
    outcomes = mono.generate([_request(p) for p in PROMPTS[:2]])
    assert alive_at_retry == [False, False]
    assert all(isinstance(o, GeneratedAudio) for o in outcomes)


def test_musicgen__a_chosen_seed_is_never_shared(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None]
) -> None:
    """A call seeds one random stream from its first request, so jobs whose producers chose
    different seeds (metadata.seed) never share a call; jobs without one still batch together."""
    sizes: list[int] = []

    def count(real: Wrapper, **kwargs: Any) -> Any:
        sizes.append(_batch_size(kwargs))
        return real(**kwargs)

    wrap_generate(count)
    chosen = [_request(PROMPTS[0], seed=222, metadata={"seed": 222}),
              _request(PROMPTS[1], seed=999, metadata={"seed": 999})]
    assert mono.batch_key(chosen[0]) != mono.batch_key(chosen[1])
    assert mono.batch_key(_request(PROMPTS[0], seed=1)) == mono.batch_key(_request(PROMPTS[1], seed=2))
    outcomes = mono.generate([*chosen, _request(PROMPTS[2], seed=1), _request(PROMPTS[3], seed=2)])
    assert sorted(sizes) == [1, 1, 2] and all(isinstance(o, GeneratedAudio) for o in outcomes)
    alone = mono.generate([chosen[1]])[0]
    assert np.array_equal(_audio(alone).samples, _audio(outcomes[1]).samples)


def test_musicgen__persistent_oom_is_transient_per_request(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None]
) -> None:
    """An OOM even at batch size one returns TransientGeneratorError for each job, not a crash."""
    sizes: list[int] = []

    def always_oom(real: Wrapper, **kwargs: Any) -> Any:
        sizes.append(_batch_size(kwargs))
        raise RuntimeError("CUDA error: out of memory")

    wrap_generate(always_oom)
    outcomes = mono.generate([_request(), _request(PROMPTS[1])])
    assert sizes == [2, 1, 1]
    assert all(isinstance(o, TransientGeneratorError) for o in outcomes)


def test_musicgen__failure_of_one_prompt_fails_only_that_job(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None]
) -> None:
    """A non-OOM failure is isolated by splitting: the request that breaks fails, the rest render."""
    poison = mono._processor.tokenizer(PROMPTS[5])["input_ids"]

    def break_on_poison(real: Wrapper, **kwargs: Any) -> Any:
        if any(row[: len(poison)].tolist() == poison for row in kwargs["input_ids"]):
            raise ValueError("this prompt breaks the model")
        return real(**kwargs)

    wrap_generate(break_on_poison)
    outcomes = mono.generate([_request(PROMPTS[0]), _request(PROMPTS[5]), _request(PROMPTS[1])])
    assert isinstance(outcomes[0], GeneratedAudio)
    assert isinstance(outcomes[1], PermanentGeneratorError)
    assert "this prompt breaks the model" in str(outcomes[1])
    assert isinstance(outcomes[2], GeneratedAudio)


@pytest.mark.parametrize(("fault", "reason"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "gpu"),
    (RuntimeError("CUDA error: device-side assert triggered"), "gpu"),
    (MemoryError("cannot allocate"), "memory"),
    (OSError(errno.EMFILE, "Too many open files"), "descriptors"),
    (OSError(errno.ENOSPC, "No space left on device"), "scratch_disk_full"),
], ids=["illegal_access", "device_assert", "memory_error", "emfile", "scratch_enospc"])
def test_musicgen__machine_fault_fails_the_call_freed(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None], fault: BaseException, reason: str
) -> None:
    """A lost GPU, a MemoryError, no descriptors left or a full disk of its own fails the whole
    call, unsplit, with an error the daemon reads as the machine's, holding neither the failed
    call's frames nor its tensors; it used to fail each request for good ("MusicGen failed: ..."),
    and every later job the same way (an OSError did so until the rule read a plain one)."""
    held: list[weakref.ref[Any]] = []
    sizes: list[int] = []

    def broken_machine(real: Wrapper, **kwargs: Any) -> Any:
        sizes.append(_batch_size(kwargs))
        cache = torch.ones(1024)  # what the failed call holds
        held.append(weakref.ref(cache))
        raise fault

    wrap_generate(broken_machine)
    with pytest.raises(type(fault)) as caught:
        mono.generate([_request(PROMPTS[0]), _request(PROMPTS[1])])
    error = caught.value
    assert machine_fault(error) == reason
    assert sizes == [2]
    assert error.__cause__ is None and error.__context__ is None
    frames: list[str] = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "broken_machine" not in frames and "_render_once" not in frames, frames
    assert held[0]() is None, "the failed call's tensor is still alive"


def test_musicgen__job_errors_stay_the_jobs(
    mono: MusicGenGenerator, wrap_generate: Callable[[Wrapper], None]
) -> None:
    """An ordinary error still fails the request for good, and CUDA's out-of-memory error is still
    halved and then a transient failure: neither is read as the machine's."""
    def fail(real: Wrapper, **kwargs: Any) -> Any:
        if kwargs["max_new_tokens"] > 30:
            raise RuntimeError("CUDA error: out of memory")
        raise ValueError("this prompt breaks the model")

    wrap_generate(fail)
    broken, oom = mono.generate([_request(PROMPTS[0]), _request(PROMPTS[1], duration=1.0)])
    assert isinstance(broken, PermanentGeneratorError) and machine_fault(broken) is None
    assert isinstance(oom, TransientGeneratorError) and machine_fault(oom) is None


@pytest.mark.parametrize("model", ["{tmp}/no-such-model", "nobody/no-such-musicgen"])
def test_musicgen__missing_model_is_config_error(tmp_path: Path, model: str) -> None:
    """A folder that does not exist, or a hub id not cached offline, is a ConfigError naming the option."""
    generator = MusicGenGenerator(model=model.format(tmp=tmp_path), models=[MODEL])
    with pytest.raises(ConfigError, match=r"generator\.options\.model"):
        generator.load()


def test_musicgen__missing_extra_is_config_error_naming_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch, load fails with a ConfigError that says how to install the extra."""
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'dgxqueue\[musicgen\]'"):
        MusicGenGenerator().load()


def test_musicgen__validate_needs_no_weights() -> None:
    """Limits are checked without loading the model, so validation is cheap anywhere."""
    generator = MusicGenGenerator(models=[MODEL])
    with pytest.raises(PermanentGeneratorError, match="30 s"):
        generator.validate(_request(duration=31))
    generator.validate(_request())
    assert generator._model is None


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_batch_size", 0), ("temperature", -1.0), ("dtype", "int8"), ("max_duration_seconds", 60),
     ("decode", "beam"), ("window_seconds", 31), ("overlap_seconds", 30.0), ("compile_step", "yes"),
     ("compile_step", True)],
)
def test_musicgen__bad_option_is_config_error(option: str, value: Any) -> None:
    """A bad [generator.options] value fails at construction, naming the key."""
    with pytest.raises(ConfigError, match=rf"generator\.options\.{option}"):
        MusicGenGenerator(**{option: value})


# Inductor's own imports call a deprecated torch.jit API; the warning is torch's, not ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_musicgen__compile_step_compiles_at_load_not_in_a_jobs_time(mono: MusicGenGenerator) -> None:
    """[generator.options] compile_step = true compiles the loop's step in load(), before the first
    claim: the first job's steps compile nothing (tens of seconds a job's time limit would be
    charged with); the default stays eager."""
    from torch._dynamo.utils import counters

    # The session shape (2 slots of 1 s windows) and thread count of test_musicgen_decode's compile tests,
    # which run on this worker (TORCH_COMPILE in tests/conftest.py): inductor's on-disk cache then holds
    # the code whichever runs first compiled. Dynamo forgets what this process traced: its guards would
    # let load reuse the step those tests traced for their own model, and load would trace nothing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch._dynamo.reset()
        counters.clear()
        generator = _load(Path(mono.model_id), decode="loop", compile_step=True, max_batch_size=2,
                          window_seconds=1.0, overlap_seconds=0.4)
        session = generator._loop_session()
        assert session.compile_step is True and session.free_slots == 2 and session.max_frames == 50
        compiled = counters["stats"]["unique_graphs"]
        assert compiled >= 1, dict(counters)
        [result] = generator.generate([_request(duration=0.2)])
        assert _audio(result).metadata["compile_step"] is True
        assert counters["stats"]["unique_graphs"] == compiled, dict(counters)
    finally:
        torch.set_num_threads(threads)
    assert _load(Path(mono.model_id), decode="loop")._loop_session().compile_step is False


def test_musicgen__registered_and_serves_name_from_model_id() -> None:
    """The entry point builds a Generator; served names default to the model id's last part."""
    generator = create_generator("musicgen", {})
    assert isinstance(generator, MusicGenGenerator)
    assert isinstance(generator, Generator)
    assert generator.models == frozenset({"musicgen-small"})


def test_musicgen__loop_stereo_renders_two_distinct_channels(stereo: MusicGenGenerator) -> None:
    """The loop decodes a stereo model's interleaved codebooks into distinct left and right channels."""
    looped = _load(Path(stereo.model_id), decode="loop", max_batch_size=2)
    left, right = _audio(looped.generate([_request(PROMPTS[4], channels=2)])[0]).samples
    assert not np.array_equal(left, right)


def test_musicgen__loop_job_renders_the_same_audio_in_any_batch(looped: MusicGenGenerator) -> None:
    """Through the loop a job's audio is the same alone and beside jobs of other lengths, settings and
    chosen seeds, all in one batch: no batch needs to be split for a seed or a duration."""
    job = _request(PROMPTS[0], duration=0.5, seed=11, job_id="job")
    others = [
        _request(PROMPTS[1], duration=1.0, seed=222, metadata={"seed": 222}, job_id="a"),
        _request(PROMPTS[2], duration=0.2, seed=3, metadata={"guidance_scale": 1.5, "top_k": 5}, job_id="b"),
        _request(PROMPTS[3], duration=0.7, seed=4, metadata={"temperature": 0.6}, job_id="c"),
    ]
    assert len({looped.batch_key(r) for r in [job, *others]}) == 1
    alone = _audio(looped.generate([job])[0]).samples
    together = looped.generate([others[0], job, *others[1:]])
    assert np.array_equal(_audio(together[1]).samples, alone)
    assert [_audio(o).samples.shape[1] for o in together] == [RATE, RATE // 2, round(0.2 * RATE), round(0.7 * RATE)]


def test_musicgen__loop_greedy_audio_equals_generate(mono: MusicGenGenerator) -> None:
    """With do_sample = false both decoders render the same audio for the same batch."""
    requests = [_request(p, duration=0.4, seed=i) for i, p in enumerate(PROMPTS[:3])]
    folder = Path(mono.model_id)
    by_generate = _load(folder, do_sample=False).generate(requests)
    by_loop = _load(folder, do_sample=False, decode="loop", max_batch_size=3).generate(requests)
    for a, b in zip(by_generate, by_loop, strict=True):
        assert np.allclose(_audio(a).samples, _audio(b).samples, atol=1e-6)


@pytest.mark.parametrize("decode", ["generate", "loop"])
def test_musicgen__metadata_names_revision_and_settings(mono: MusicGenGenerator, decode: str) -> None:
    """Each result names the model's revision (a plain folder: the SHA-256 of its files), the
    decoder, the seed and every sampling setting, so the WAV can be made again."""
    generator = _load(Path(mono.model_id), decode=decode, max_batch_size=2)
    metadata = _audio(generator.generate([_request(seed=99, metadata={"top_k": 7})])[0]).metadata
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", metadata["model_revision"])
    assert metadata["model_revision"] == _audio(mono.generate([_request()])[0]).metadata["model_revision"]
    assert {k: metadata[k] for k in ("decode", "seed", "top_k", "guidance_scale", "temperature", "do_sample")} == {
        "decode": decode, "seed": 99, "top_k": 7, "guidance_scale": 3.0, "temperature": 1.0, "do_sample": True}
    assert {"torch", "transformers", "dtype", "device", "model"} <= set(metadata)
    if decode == "loop":
        assert metadata["slots"] == 2 and "lowbias32" in metadata["sampler"] and metadata["compile_step"] is False


def test_musicgen__loop_oom_leaves_fewer_slots_not_failed_jobs(
    mono: MusicGenGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory in a loop of more than one slot rebuilds it with half the slots; every job renders."""
    import workers.musicgen_decode as decode

    real = decode.DecodeSession.step
    slot_counts: list[int] = []

    def step(self: Any) -> Any:
        slot_counts.append(self.slots)
        if self.slots > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)

    monkeypatch.setattr(decode.DecodeSession, "step", step)
    generator = _load(Path(mono.model_id), decode="loop", max_batch_size=4)
    outcomes = generator.generate([_request(p, duration=0.1, seed=i) for i, p in enumerate(PROMPTS[:4])])
    assert sorted(set(slot_counts)) == [1, 2, 4]
    assert all(_audio(o).metadata["slots"] == 1 for o in outcomes)


def test_musicgen__loop_prompt_too_long_fails_alone(looped: MusicGenGenerator) -> None:
    """A prompt longer than the loop's text cache fails its own job for good; the others render."""
    too_long = " ".join(PROMPTS * 8)
    outcomes = looped.generate([_request(PROMPTS[0]), _request(too_long)])
    assert isinstance(outcomes[0], GeneratedAudio)
    assert isinstance(outcomes[1], PermanentGeneratorError) and "tokens" in str(outcomes[1])


def test_musicgen__loop_machine_fault_fails_the_call_and_a_fresh_loop_follows(
    mono: MusicGenGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost GPU inside the loop fails the whole call, unsplit, as the machine's; the next call
    starts a new loop rather than one with the failed call's slots still taken."""
    import workers.musicgen_decode as decode

    real = decode.DecodeSession.step
    calls: list[int] = []

    def broken_once(self: Any) -> Any:
        calls.append(self.free_slots)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self)

    monkeypatch.setattr(decode.DecodeSession, "step", broken_once)
    generator = _load(Path(mono.model_id), decode="loop", max_batch_size=2)
    with pytest.raises(RuntimeError) as caught:
        generator.generate([_request(PROMPTS[0], duration=0.1), _request(PROMPTS[1], duration=0.1)])
    assert machine_fault(caught.value) == "gpu"
    assert calls == [0]
    outcomes = generator.generate([_request(PROMPTS[0], duration=0.1)])
    assert isinstance(outcomes[0], GeneratedAudio)
    assert calls[1] == 1, "the new loop starts with one of its two slots free"


def test_musicgen__loop_renders_past_the_window_by_continuation(mono: MusicGenGenerator) -> None:
    """Through the loop a job may be longer than the model's window (here 1 s windows overlapping by
    0.4 s, for 30 s and 12 s): it gets its exact length, and its metadata names the windowing; the
    generate decoder still refuses more than 30 s."""
    generator = _load(Path(mono.model_id), decode="loop", max_batch_size=2, max_duration_seconds=600,
                      window_seconds=1.0, overlap_seconds=0.4)
    assert generator.max_duration_seconds == 600
    audio = _audio(generator.generate([_request(duration=2.5, seed=3)])[0])
    assert audio.samples.shape == (1, round(2.5 * RATE))
    assert (audio.metadata["window_frames"], audio.metadata["overlap_frames"]) == (50, 20)
    with pytest.raises(ConfigError, match=r"max_duration_seconds"):
        MusicGenGenerator(max_duration_seconds=31)


class _CancelAt(JobControl):
    """A control whose cancel comes from the generator thread at step ``at``, standing in for the
    daemon's (which sets the same flag from its own thread)."""

    __slots__ = ("at", "reports")

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at = at
        self.reports: list[tuple[int, int]] = []

    def report(self, done: int, total: int) -> None:
        super().report(done, total)
        self.reports.append((done, total))
        if self.at is not None and done >= self.at:
            self.cancel()


def _batch_of_four(cancel: int | None) -> list[GenerationRequest]:
    controls = [_CancelAt(5 if i == cancel else None) for i in range(4)]
    return [dataclasses.replace(_request(PROMPTS[i], seed=7, job_id=f"job-{i}"), control=controls[i])
            for i in range(4)]


def test_musicgen__cancel_one_of_a_batch_of_four_keeps_the_others_audio(either: MusicGenGenerator) -> None:
    """A request cancelled at step 5 stops (a JobCancelledError, its decoding cut short) while the
    other three render exactly the audio they render when nobody is cancelled."""
    reference = either.generate(_batch_of_four(None))
    requests = _batch_of_four(2)
    outcomes = either.generate(requests)
    assert isinstance(outcomes[2], JobCancelledError)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(_audio(outcomes[i]).samples, _audio(reference[i]).samples)
    stopped = requests[2].control
    assert isinstance(stopped, _CancelAt)
    last_done, total = stopped.reports[-1]
    assert 5 <= last_done < total  # it stopped reporting once cancelled: no further decoding of it


def test_musicgen__reports_progress_up_to_its_total(either: MusicGenGenerator) -> None:
    """Every request's progress rises, step by step, to done == total."""
    requests = _batch_of_four(None)
    either.generate(requests)
    for request in requests:
        reports = request.control.reports  # type: ignore[attr-defined]
        assert len(reports) > 3
        assert [d for d, _ in reports] == sorted(d for d, _ in reports)
        assert reports[-1][0] == reports[-1][1] > 0
