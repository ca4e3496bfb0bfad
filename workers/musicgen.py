"""MusicGen through Hugging Face transformers: text prompts to 32 kHz audio, batched, on CUDA or CPU.

Needs the ``musicgen`` extra (``pip install 'dgxqueue[musicgen]'``); torch and transformers are
imported in :meth:`MusicGenGenerator.load`, so importing this module stays cheap without them.

What a request may ask for:

- ``sample_rate`` must be the model's native rate (32000 Hz for every published MusicGen);
  anything else is refused with a :class:`~dgxqueue.errors.PermanentGeneratorError` naming it.
- ``duration_seconds`` up to ``max_duration_seconds`` (30 s, what the model was trained on; with
  ``decode = "loop"`` up to 3600 s, rendered in windows of ``window_seconds`` that each continue from
  the last ``overlap_seconds`` of the one before).
- ``channels`` 1 or 2: a mono model's output is duplicated, a stereo model's is averaged.
- ``metadata`` may override ``guidance_scale``, ``temperature`` and ``top_k`` for that job.

Two decoders, chosen by ``[generator.options] decode``:

- ``"generate"`` (the default) hands each batch to transformers' ``model.generate``. Each call seeds
  torch with the seed of its *first* request. A job rendered alone, on the same device, model and
  versions, gives the same audio on every attempt (CUDA kernels may still differ in the last bits);
  a job batched with others shares their random stream and its padding, so a different batch
  composition gives different audio. A job whose producer chose ``metadata.seed`` is only batched
  with jobs of the same seed, so that seed always applies. Only jobs of one length and one set of
  sampling settings share a call.
- ``"loop"`` runs our own decode loop (:mod:`workers.musicgen_decode`) over ``max_batch_size``
  fixed slots: jobs of any length, settings and seed share a batch, a job joins as a slot frees
  and leaves when its tokens are done, and its sampling noise is keyed by its own seed and step,
  so it renders the same tokens alone, beside any companions and on retry (same device, dtype,
  slot count and versions). Greedy decoding gives ``generate``'s tokens. ``compile_step = true``
  runs each step through ``torch.compile`` (CUDA graphs on CUDA): the first step of each slot count
  pays the compile, and fused kernels may round a near-tie of two scores the other way.

Each result's metadata names the model's revision and every setting that decided its tokens.
"""

from __future__ import annotations

import collections
import importlib
import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from dgxqueue.errors import (
    CapacityError,
    ConfigError,
    GeneratorError,
    JobCancelledError,
    PermanentGeneratorError,
    TransientGeneratorError,
)
from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest, JobControl
from dgxqueue.machine_faults import detached_machine_fault
from dgxqueue.storage.validation import steering_value

# numpy and structlog are imported where audio is made and where a warning is logged: a producer's
# ``enqueue`` builds this backend only to read the models it serves (torch waits for load() too).
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

INSTALL_HINT = "pip install 'dgxqueue[musicgen]'"
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_OVERRIDES = ("guidance_scale", "temperature", "top_k")
_DECODERS = ("generate", "loop")


def _warn(event: str, **fields: Any) -> None:
    """A warning through structlog, imported here: see above."""
    import structlog

    structlog.get_logger(__name__).warning(event, **fields)


# One rule with the door (dgxqueue.storage.validation), so a job it accepts is never refused here.
_sampling_value = steering_value


@dataclass(frozen=True)
class _Plan:
    """What requests must agree on to share one ``generate`` call."""

    tokens: int
    guidance_scale: float
    temperature: float
    top_k: int
    # A call samples from one random stream, seeded by its first request: a seed the producer
    # chose (metadata.seed) is honoured only if the call has no other.
    seed: int | None = None


class MusicGenGenerator:
    """``MusicgenForConditionalGeneration`` loaded once from a hub id or a local folder.

    ``max_batch_size`` (default 16): prompts per ``generate`` call. Decoding is bound by per-token
    overhead, not by the GPU's arithmetic, so a wider batch costs little more wall time than one
    prompt: batch as wide as memory allows. A batch that runs out of memory is halved and retried.
    A machine fault (:mod:`dgxqueue.machine_faults`: a lost GPU, a ``MemoryError``, an ``OSError``
    of no memory, no descriptors or a full disk) fails the whole call instead of its requests.
    """

    name = "musicgen"
    #: What the ``musicgen`` extra installs; ``dgxqueue config check`` looks for them without
    #: importing them (importing torch takes seconds).
    required_modules = ("torch", "transformers")
    install_hint = INSTALL_HINT

    def __init__(
        self,
        *,
        model: str = "facebook/musicgen-small",
        models: Sequence[str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 250,
        do_sample: bool = True,
        max_duration_seconds: float = 30.0,
        decode: str = "generate",
        window_seconds: float = 30.0,
        overlap_seconds: float = 12.0,
        compile_step: bool = False,
    ) -> None:
        def bad(key: str, value: object, allowed: str) -> ConfigError:
            return ConfigError(f"generator.options.{key}", value, allowed)

        if not isinstance(model, str) or not model:
            raise bad("model", model, "a hub id or a local folder")
        if not isinstance(device, str) or not device:
            raise bad("device", device, "auto, cpu, cuda or cuda:N")
        if dtype not in _DTYPES:
            raise bad("dtype", dtype, "one of " + ", ".join(_DTYPES))
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise bad("max_batch_size", max_batch_size, "an integer >= 1")
        if decode not in _DECODERS:
            raise bad("decode", decode, "one of " + ", ".join(_DECODERS))
        # Only the loop continues a window from the last; generate renders one window at most.
        longest = 3600 if decode == "loop" else 30
        if not isinstance(max_duration_seconds, int | float) or not 0 < max_duration_seconds <= longest:
            raise bad("max_duration_seconds", max_duration_seconds,
                      f"a number in (0, {longest}]" + (", the model's limit" if longest == 30 else ""))
        if not isinstance(window_seconds, int | float) or not 0 < window_seconds <= 30:
            raise bad("window_seconds", window_seconds, "a number in (0, 30], the model's limit")
        if not isinstance(overlap_seconds, int | float) or not 0 <= overlap_seconds < window_seconds:
            raise bad("overlap_seconds", overlap_seconds, f"a number in [0, window_seconds={window_seconds:g})")
        if not isinstance(do_sample, bool):
            raise bad("do_sample", do_sample, "true or false")
        if not isinstance(compile_step, bool):
            raise bad("compile_step", compile_step, "true or false")
        if compile_step and decode != "loop":  # generate's own loop has no step of ours to compile
            raise bad("compile_step", compile_step, 'false unless decode = "loop"')
        defaults: dict[str, float | int] = {}
        for key, value in zip(_OVERRIDES, (guidance_scale, temperature, top_k), strict=True):
            try:
                defaults[key] = _sampling_value(key, value)
            except ValueError as exc:
                raise bad(key, value, str(exc)) from None
        self.model_id = model
        if isinstance(models, str):  # one name, not its letters
            models = [models]
        self.models = frozenset(models if models is not None else [PurePath(self.model_id).name])
        self.max_batch_size = max_batch_size
        self.max_duration_seconds = float(max_duration_seconds)
        self.do_sample = do_sample
        self._defaults = defaults
        self._device_option = device
        self._dtype_option = dtype
        self.decode = decode
        self.window_seconds, self.overlap_seconds = float(window_seconds), float(overlap_seconds)
        self.compile_step = compile_step
        self._torch: Any = None
        self._model: Any = None
        self._processor: Any = None
        self._device = "cpu"
        self._provenance: dict[str, Any] = {}
        # The loop's session, built at the first batch and kept; fewer slots after running out of memory.
        self._session: Any = None
        self._slots = max_batch_size
        # The requests started in the session's slots through start() (continuous batching), by job id.
        self._started: dict[str, tuple[GenerationRequest, _Plan]] = {}
        # Every published MusicGen's geometry until load() reads the real config.
        self.sample_rate = 32000
        self._frame_rate = 50
        self._delay = 3

    def load(self) -> None:
        """Load the weights once, move them to the device in eval mode. Safe to call again."""
        if self._model is not None:
            return
        try:  # untyped on purpose: the extra is optional and its annotations are partial
            torch: Any = importlib.import_module("torch")
            transformers: Any = importlib.import_module("transformers")
        except ImportError as exc:
            raise ConfigError(
                "generator.name", self.name, f"its extra installed: {INSTALL_HINT} ({exc})"
            ) from exc
        device = self._device_option
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = self._dtype_option
        if dtype_name == "auto":
            dtype_name = "float16" if device.startswith("cuda") else "float32"
        looks_like_path = PurePath(self.model_id).is_absolute() or self.model_id.startswith(".")
        if looks_like_path and not os.path.isdir(self.model_id):  # transformers would say "bad repo id"
            raise ConfigError("generator.options.model", self.model_id, "an existing folder or a hub id")
        try:
            model = transformers.MusicgenForConditionalGeneration.from_pretrained(self.model_id)
            processor = transformers.AutoProcessor.from_pretrained(self.model_id)
        except (OSError, ValueError) as exc:  # a missing folder, an unknown hub id, no network
            raise ConfigError(
                "generator.options.model", self.model_id, f"a MusicGen hub id or saved folder ({exc})"
            ) from exc
        try:
            model.to(device=device, dtype=getattr(torch, dtype_name)).eval()
        except RuntimeError as exc:
            raise ConfigError(
                "generator.options.device", self._device_option, f"a usable device ({exc})"
            ) from exc
        config = model.config
        self.sample_rate = int(config.audio_encoder.sampling_rate)
        self._frame_rate = int(config.audio_encoder.frame_rate)
        # The delay pattern staggers each channel's codebooks by one step; stereo interleaves two
        # channels' sets (8 codebooks), which are staggered side by side: still 3 extra steps, not 7.
        self._delay = int(config.decoder.num_codebooks) // int(config.decoder.audio_channels) - 1
        self._torch, self._model, self._processor, self._device = torch, model, processor, device
        provenance = importlib.import_module("workers.musicgen_provenance")
        self._provenance = {
            "model": self.model_id,
            "model_revision": provenance.model_revision(self.model_id),
            "decode": self.decode,
            "device": torch.device(device).type,
            "dtype": dtype_name,
            **provenance.software_versions(),
        }
        if self.compile_step:
            self._compile_now()

    def _compile_now(self) -> None:
        """Compile the loop's step before the first claim: a first step that compiles takes tens
        of seconds, which a job's time limit must not be charged with (the machine's cost, not
        the job's). One step of a throwaway request in a session of the slot count jobs get."""
        decode: Any = importlib.import_module("workers.musicgen_decode")
        session = self._loop_session()
        session.add(decode.DecodeRequest("compile", "warm up", 2, 0, decode.DecodeSettings(self.do_sample)))
        session.step()
        session.cancel("compile")

    def _plan(self, request: GenerationRequest) -> _Plan:
        """Check a request and work out its generation settings, or raise PermanentGeneratorError.

        Needs no weights: before :meth:`load` the published models' geometry stands in for the config.
        """
        if request.model_name not in self.models:
            raise PermanentGeneratorError(
                f"model {request.model_name!r} is not served here; served: {', '.join(sorted(self.models))}"
            )
        if not 0 < request.duration_seconds <= self.max_duration_seconds:
            raise PermanentGeneratorError(
                f"duration {request.duration_seconds} s is outside what MusicGen renders: "
                f"more than 0 and at most {self.max_duration_seconds:g} s"
            )
        if request.sample_rate != self.sample_rate:
            raise PermanentGeneratorError(
                f"sample_rate {request.sample_rate} is not supported: MusicGen renders at "
                f"{self.sample_rate} Hz only; ask for sample_rate={self.sample_rate}"
            )
        if request.channels not in (1, 2):
            raise PermanentGeneratorError(f"channels {request.channels} is not supported: expected 1 or 2")
        settings = dict(self._defaults)
        for key in _OVERRIDES:
            if key in request.metadata:
                try:
                    settings[key] = _sampling_value(key, request.metadata[key])
                except ValueError as exc:
                    raise PermanentGeneratorError(
                        f"metadata {key}={request.metadata[key]!r} is invalid: expected {exc}"
                    ) from None
        # Whole frames, rounded up so the audio is trimmed rather than padded with silence.
        frames = max(1, math.ceil(request.duration_seconds * self._frame_rate - 1e-9))
        return _Plan(
            tokens=frames + self._delay,
            guidance_scale=float(settings["guidance_scale"]),
            temperature=float(settings["temperature"]),
            top_k=int(settings["top_k"]),
            seed=request.seed if "seed" in request.metadata else None,
        )

    def validate(self, request: GenerationRequest) -> None:
        """Refuse a request over the duration limit, at another rate, or with bad overrides."""
        self._plan(request)

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Same token count and sampling settings (any, for the loop); an invalid request is alone."""
        try:
            return self._group(self._plan(request))
        except GeneratorError:
            return ("invalid", request.job_id)

    def _group(self, plan: _Plan) -> Hashable:
        # The loop gives every slot its own length, settings and seed.
        return "loop" if self.decode == "loop" else plan

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        """Render compatible requests together; a bad request fails alone."""
        self.load()
        outcomes: dict[int, GenerationOutcome] = {}
        plans: dict[int, _Plan] = {}
        groups: dict[Hashable, list[int]] = {}
        for index, request in enumerate(requests):
            try:
                plans[index] = self._plan(request)
            except GeneratorError as exc:
                outcomes[index] = exc
                continue
            groups.setdefault(self._group(plans[index]), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch_size):
                chunk = indices[start : start + self.max_batch_size]
                results = self._render([requests[i] for i in chunk], [plans[i] for i in chunk])
                outcomes.update(zip(chunk, results, strict=True))
        return [outcomes[i] for i in range(len(requests))]

    def _render(self, batch: list[GenerationRequest], plans: list[_Plan]) -> list[GenerationOutcome]:
        """One ``generate`` call or loop run; on failure, halve the batch and retry each half."""
        try:
            return self._render_once(batch, plans)
        except Exception as exc:
            oom = self._is_oom(exc)
            fault = None if oom else detached_machine_fault(exc)
            error = f"{type(exc).__name__}: {exc}"
        # Retried or raised only here, after the except block: the exception's traceback holds the
        # failed call's frames and every tensor in them, which empty_cache() cannot free while it lives.
        if self._session is not None:  # a failed run leaves its slots taken; and after an OOM, fewer slots
            self._session, self._started = None, {}
            if oom:
                self._slots = max(1, min(self._slots, len(batch)) // 2)
        if fault is not None:
            # The machine's (a lost GPU, no memory or descriptors): the whole call fails, so that the daemon gives
            # the jobs back rather than each request failing for good, and exits for a new process.
            raise fault
        if oom and self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()
        if len(batch) == 1:
            if oom:
                return [TransientGeneratorError(f"out of memory rendering one request on {self._device}")]
            return [PermanentGeneratorError(f"MusicGen failed: {error}")]
        # Halving both fits memory after an OOM and isolates a request that breaks the batch.
        _warn("musicgen_batch_split", batch_size=len(batch), out_of_memory=oom, error=error)
        half = len(batch) // 2
        return self._render(batch[:half], plans[:half]) + self._render(batch[half:], plans[half:])

    def _is_oom(self, exc: BaseException) -> bool:
        oom_type = getattr(self._torch.cuda, "OutOfMemoryError", ())
        return isinstance(exc, oom_type) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))

    def _render_once(self, batch: list[GenerationRequest], plans: list[_Plan]) -> list[GenerationOutcome]:
        if self.decode == "loop":
            return self._render_loop(batch, plans)
        plan = plans[0]  # one group: every plan is the same
        torch = self._torch
        inputs = self._processor(text=[r.prompt for r in batch], padding=True, return_tensors="pt")
        sampling: dict[str, Any] = {"do_sample": self.do_sample, "guidance_scale": plan.guidance_scale}
        if self.do_sample:  # greedy decoding warns about sampling settings it would ignore
            sampling |= {"temperature": plan.temperature, "top_k": plan.top_k}
        torch.manual_seed(batch[0].seed)
        watch = _Watch([r.control for r in batch], plan.tokens, torch)
        with torch.inference_mode():
            audio = self._model.generate(**inputs.to(self._device), max_new_tokens=plan.tokens,
                                         stopping_criteria=self._criteria([watch]), **sampling)
        values: npt.NDArray[np.float32] = audio.float().clamp(-1.0, 1.0).cpu().numpy()
        metadata = {**self._provenance, "batch_size": len(batch), "seed": batch[0].seed, **sampling}
        return [
            _cancelled(request) if request.control.cancelled
            else GeneratedAudio(self._shape(values[i], request), self.sample_rate, dict(metadata))
            for i, request in enumerate(batch)
        ]

    def _criteria(self, criteria: list[Any]) -> Any:
        return importlib.import_module("transformers").StoppingCriteriaList(criteria)

    def _loop_session(self) -> Any:
        """The loop's session, built on first use with the current slot count."""
        if self._session is None:
            decode: Any = importlib.import_module("workers.musicgen_decode")
            window = math.ceil(min(self.window_seconds, self.max_duration_seconds) * self._frame_rate - 1e-9)
            self._session = decode.DecodeSession(
                self._model, self._processor, slots=self._slots, max_frames=window,
                overlap_frames=min(window - 1, round(self.overlap_seconds * self._frame_rate)),
                compile_step=self.compile_step,
            )
        return self._session

    def _decode_request(self, key: str, request: GenerationRequest, plan: _Plan) -> Any:
        """The loop's request for ``request``; a prompt too long for its text cache is refused."""
        decode: Any = importlib.import_module("workers.musicgen_decode")
        session = self._loop_session()
        tokens = session.prompt_tokens(request.prompt)
        if tokens > session.text_tokens:
            raise PermanentGeneratorError(
                f"the prompt is {tokens} tokens; MusicGen's decode loop takes at most {session.text_tokens}"
            )
        settings = decode.DecodeSettings(self.do_sample, plan.guidance_scale, plan.temperature, plan.top_k)
        return decode.DecodeRequest(key, request.prompt, plan.tokens - self._delay, request.seed, settings)

    def _loop_audio(self, result: Any, request: GenerationRequest, plan: _Plan) -> GeneratedAudio:
        import numpy as np

        session = self._session
        metadata = {**self._provenance, "slots": session.slots, "window_frames": session.max_frames,
                    "overlap_frames": session.overlap_frames, "compile_step": session.compile_step,
                    "seed": request.seed,
                    "sampler": importlib.import_module("workers.musicgen_decode").SAMPLER,
                    "do_sample": self.do_sample, "guidance_scale": plan.guidance_scale,
                    "temperature": plan.temperature, "top_k": plan.top_k}
        samples = np.clip(result.audio, -1.0, 1.0)
        return GeneratedAudio(self._shape(samples, request), self.sample_rate, metadata)

    # --- continuous batching (dgxqueue.generators.SlotGenerator), decode = "loop" only -----------

    @property
    def slots(self) -> int:
        """The loop's slot count (fewer after running out of memory); 0 with ``decode = "generate"``,
        which cannot join a running batch."""
        return self._slots if self.decode == "loop" else 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._started)

    def start(self, request: GenerationRequest) -> None:
        """Put ``request`` in a free slot of the loop, to decode from the next :meth:`step`."""
        if self.decode != "loop":
            raise PermanentGeneratorError('musicgen: slots need decode = "loop"')
        self.load()
        plan = self._plan(request)
        if request.job_id in self._started:
            raise PermanentGeneratorError(f"musicgen: job {request.job_id} is decoding already")
        if not self.free_slots:
            raise TransientGeneratorError(f"musicgen: all {self._slots} slots are taken")
        self._loop_session().add(self._decode_request(request.job_id, request, plan))
        self._started[request.job_id] = (request, plan)

    def step(self) -> list[tuple[str, GenerationOutcome]]:
        """One decoding step of every slot; each job that finished, with its audio."""
        if not self._started:
            return []
        session = self._session
        try:
            results = session.step()
        except Exception as exc:
            oom = self._is_oom(exc)
            fault = None if oom else detached_machine_fault(exc)
            error = f"{type(exc).__name__}: {exc}"
        else:
            done: list[tuple[str, GenerationOutcome]] = []
            for result in results:
                request, plan = self._started.pop(result.key)
                request.control.report(result.steps, result.steps)
                done.append((result.key, self._loop_audio(result, request, plan)))
            for slot in session.progress():
                self._started[slot.key][0].control.report(slot.steps_done, slot.steps_total)
            return done
        # Raised only after the except block, so the failed step's tensors can be freed (see _render).
        held = len(self._started)
        self._session, self._started = None, {}
        if fault is not None:
            raise fault
        if not oom:
            raise TransientGeneratorError(f"MusicGen's decode step failed: {error}")
        if self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()
        if held > 1 and self._slots > 1:
            self._slots = max(1, min(self._slots, held) // 2)
            _warn("musicgen_slots_halved", slots=self._slots, error=error)
            raise CapacityError(f"out of memory decoding {held} jobs on {self._device}; {self._slots} slots now")
        raise TransientGeneratorError(f"out of memory decoding one job on {self._device}")

    def cancel(self, job_id: str) -> bool:
        """Free the slot of ``job_id``; the other slots decode on, untouched."""
        if self._started.pop(job_id, None) is None:
            return False
        return bool(self._session.cancel(job_id))

    def _render_loop(self, batch: list[GenerationRequest], plans: list[_Plan]) -> list[GenerationOutcome]:
        """Every request through the loop's slots, joining as slots free up."""
        session = self._loop_session()
        outcomes: dict[int, GenerationOutcome] = {}
        jobs = []
        for index, (request, plan) in enumerate(zip(batch, plans, strict=True)):
            try:  # keyed by place in the batch: job ids need not be unique in a call
                jobs.append(self._decode_request(str(index), request, plan))
            except PermanentGeneratorError as exc:
                outcomes[index] = exc
        for result in _run_watched(session, jobs, [r.control for r in batch]):
            if isinstance(result, str):  # cancelled: its slot was freed, the others went on
                outcomes[int(result)] = _cancelled(batch[int(result)])
                continue
            index = int(result.key)
            outcomes[index] = self._loop_audio(result, batch[index], plans[index])
        return [outcomes[i] for i in range(len(batch))]

    def _shape(self, samples: npt.NDArray[np.float32], request: GenerationRequest) -> npt.NDArray[np.float32]:
        """Match the request's channel count and exact frame count."""
        import numpy as np

        if request.channels != samples.shape[0]:
            samples = (
                np.repeat(samples, request.channels, axis=0)
                if samples.shape[0] == 1
                else samples.mean(axis=0, keepdims=True)
            )
        frames = round(request.duration_seconds * self.sample_rate)
        out = np.zeros((request.channels, frames), np.float32)
        kept = min(frames, samples.shape[1])
        out[:, :kept] = samples[:, :kept]
        return out


def _cancelled(request: GenerationRequest) -> JobCancelledError:
    return JobCancelledError(f"musicgen: job {request.job_id} cancelled while it decoded")


class _Watch:
    """A stopping criterion called once per decoding step of ``generate``: it reports each
    request's step and stops the rows of a cancelled one (per sequence: the others decode on,
    their tokens untouched). Per step it costs a few attribute stores and, only once some
    request is cancelled, one small mask."""

    def __init__(self, controls: list[JobControl], total: int, torch: Any) -> None:
        self.controls = controls
        self.total = total
        self.torch = torch
        self.start: int | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        length = int(input_ids.shape[-1])
        if self.start is None:
            self.start = length - 1
        done = min(self.total, length - self.start)
        stopped = [control.cancelled for control in self.controls]
        for control, cancelled in zip(self.controls, stopped, strict=True):
            if not cancelled:  # a stopped row's progress stays where it stopped
                control.report(done, self.total)
        rows = int(input_ids.shape[0])
        if not any(stopped) or rows % len(self.controls):
            return self.torch.zeros(rows, dtype=self.torch.bool, device=input_ids.device)
        # Rows are request-major (each request's codebooks, then the next request's).
        per = rows // len(self.controls)
        mask = self.torch.tensor(stopped, dtype=self.torch.bool).repeat_interleave(per)
        return mask.to(input_ids.device)


def _run_watched(session: Any, requests: list[Any], controls: list[JobControl]) -> list[Any]:
    """``session.run(requests)``, reporting each slot's steps after every step and cancelling the
    slot of a cancelled request (:meth:`DecodeSession.cancel` leaves the other slots untouched).
    Returns each request's result, or its key where it was cancelled, in the order given."""
    pending = collections.deque(requests)
    order = [r.key for r in pending]
    done: dict[str, Any] = {}
    while pending or session.busy:
        while pending and session.free_slots:
            request = pending.popleft()
            if controls[int(request.key)].cancelled:
                done[request.key] = request.key
                continue
            session.add(request)
        for slot in session.progress():
            control = controls[int(slot.key)]
            if control.cancelled and session.cancel(slot.key):
                done[slot.key] = slot.key
            else:
                control.report(slot.steps_done, slot.steps_total)
        for result in session.step():
            done[result.key] = result
            control = controls[int(result.key)]
            if control.progress is not None:  # its last step freed the slot: report it complete
                control.report(control.progress[1], control.progress[1])
    return [done[key] for key in order]
