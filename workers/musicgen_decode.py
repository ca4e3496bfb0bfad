"""Our own MusicGen decode loop: fixed slots, jobs that join at any step and leave when done.

It runs transformers' own modules (the T5 text encoder, the decoder's embeddings, layers, norm and
heads, the EnCodec codec) in the order ``MusicgenForConditionalGeneration.generate`` runs them,
but one step at a time for a set of slots that each hold a job at its own step:

- the text is encoded once, when a job joins, and projected into the cross-attention cache;
- the decoder runs one token per slot per step over a preallocated key/value cache
  (:mod:`workers.musicgen_cache`), each slot at its own position in the codebook delay pattern;
- every slot has a conditional and an unconditional row (classifier-free guidance, its own
  scale), and its own temperature, top-k and seed (:mod:`workers.musicgen_sampling`);
- a job that has all its tokens leaves at once, its audio decoded by the codec;
- a job longer than ``max_frames`` (the model's 30 s) is rendered in windows, each one continuing
  from the last ``overlap_frames`` of the one before as its forced prefix (audiocraft's way of
  extending MusicGen), in the same slot; its codes are decoded to audio once, whole, so the codec
  leaves no seam.

The API a service drives (all calls from one thread)::

    session = DecodeSession(model, processor, slots=8, max_frames=1500)
    session.add(DecodeRequest("job-1", "lofi piano", frames=250, seed=7, settings=settings))
    while session.busy:
        for result in session.step():  # one decoding step of every occupied slot
            ...                          # result.key, result.codes, result.audio
        session.progress()              # [SlotProgress(slot, key, steps_done, steps_total)]
        session.cancel("job-1")         # frees its slot; the others go on untouched
        session.free_slots              # how many more jobs add() accepts now

``add`` may be called between any two steps while ``free_slots`` is positive; ``run(requests)``
does all of the above for a list. Progress counts every step of every window.

A job's tokens depend only on its prompt, settings, seed and the session's shape (slot count,
lengths, overlap, device, dtype): not on its companions, its slot, or the step at which it joined.
Matrix kernels pick their blocking by the batch's shape, so a session with another slot count may
differ in the last bits of a logit, which changes a token only where two scores nearly tie.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers.masking_utils import create_bidirectional_mask

from workers.musicgen_cache import slot_cache
from workers.musicgen_sampling import SAMPLER, choose_tokens

__all__ = ["SAMPLER", "DecodeRequest", "DecodeResult", "DecodeSession", "DecodeSettings", "SlotProgress"]


@dataclass(frozen=True)
class DecodeSettings:
    """How a job's tokens are chosen; ``top_k=None`` keeps the whole vocabulary."""

    do_sample: bool = True
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int | None = 250

    @classmethod
    def from_generation_config(cls, config: Any, **overrides: Any) -> DecodeSettings:
        """The settings ``model.generate`` would use with ``config`` and these keyword overrides."""
        def pick(key: str, default: Any) -> Any:
            value = overrides.get(key, getattr(config, key, None))
            return default if value is None else value

        return cls(bool(pick("do_sample", False)), float(pick("guidance_scale", 1.0)),
                   float(pick("temperature", 1.0)), overrides.get("top_k", getattr(config, "top_k", None)))


@dataclass(frozen=True)
class DecodeRequest:
    """One job: ``frames`` codec frames (50 a second for every published MusicGen), any number."""

    key: str
    prompt: str
    frames: int
    seed: int
    settings: DecodeSettings


@dataclass(frozen=True)
class DecodeResult:
    """A finished job: its codes (codebooks, frames) and audio (channels, samples), float32."""

    key: str
    codes: npt.NDArray[np.int64]
    audio: npt.NDArray[np.float32]
    steps: int


@dataclass(frozen=True)
class SlotProgress:
    """Where an occupied slot's job stands."""

    slot: int
    key: str
    steps_done: int
    steps_total: int


@dataclass
class _Occupant:
    request: DecodeRequest
    windows: list[tuple[int, int]]  # (frames of forced prefix, new frames) of each window
    steps_total: int
    steps_done: int = 0
    window: int = 0
    window_steps: int = 0
    codes: list[torch.Tensor] = field(default_factory=list)  # each finished window's new frames


class DecodeSession:
    """``slots`` jobs of up to ``text_tokens`` prompt tokens each, decoded together one step at a time
    on ``model``'s device and dtype, in windows of at most ``max_frames`` frames that overlap by
    ``overlap_frames`` (two fifths of a window unless told: 12 s of 30, as audiocraft extends).

    ``compile_step=True`` runs each step's tensor work through ``torch.compile``: one graph per session
    shape, reused as jobs join and leave, replayed as a CUDA graph on CUDA. The first step pays the
    compile; greedy tokens match eager ones unless two scores nearly tie (fused kernels round differently)."""

    def __init__(self, model: Any, processor: Any, *, slots: int, max_frames: int, text_tokens: int = 256,
                 overlap_frames: int | None = None, compile_step: bool = False) -> None:
        if slots < 1 or max_frames < 1 or text_tokens < 1:
            raise ValueError(f"slots, max_frames and text_tokens must be >= 1: {slots}, {max_frames}, {text_tokens}")
        overlap = max_frames * 2 // 5 if overlap_frames is None else overlap_frames
        if not 0 <= overlap < max_frames:
            raise ValueError(f"overlap_frames must be in 0..{max_frames - 1}, got {overlap}")
        self.overlap_frames = overlap
        self._model, self._processor = model, processor
        self._lm = model.decoder  # MusicgenForCausalLM: lm_heads on top of the decoder
        self._decoder = self._lm.model.decoder
        config = self._lm.config
        generation = model.generation_config
        self.slots, self.max_frames, self.text_tokens = slots, max_frames, text_tokens
        self._codebooks, self._channels = int(config.num_codebooks), int(config.audio_channels)
        self._vocab = int(config.vocab_size)
        # generate masks the delay pattern with the decoder start token (MusicGen's pad too).
        start = generation.decoder_start_token_id
        self._start = int(start if start is not None else generation.bos_token_id)
        # Stereo interleaves left and right codebooks, staggered in pairs.
        self.delay = self._codebooks // self._channels - 1
        self._max_steps = max_frames + self.delay
        positions_known = int(self._decoder.embed_positions.weights.shape[0])
        if self._max_steps > positions_known:
            raise ValueError(f"{max_frames} frames need {self._max_steps} positions; the decoder has {positions_known}")
        self._layer_norm, self._layers = self._decoder.layer_norm, self._decoder.layers
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        device, rows = self.device, 2 * slots
        self._positions = torch.zeros(rows, dtype=torch.int64, device=device)
        heads = int(config.num_attention_heads)
        self._heads, self._head_dim = heads, int(config.hidden_size) // heads
        self._cache = slot_cache(
            len(self._layers), rows, heads, self._head_dim, length=self._max_steps, text_length=text_tokens,
            positions=self._positions, dtype=self.dtype, device=device,
        )
        self._tokens = torch.full((slots, self._codebooks, self._max_steps + 1), self._start, dtype=torch.int64,
                                  device=device)
        self._offsets = torch.arange(self._codebooks, device=device) // self._channels + 1  # first position
        self._frames = torch.zeros(slots, dtype=torch.int64, device=device)
        self._text_mask = torch.zeros(rows, text_tokens, dtype=torch.bool, device=device)
        self._guided = torch.zeros(slots, dtype=torch.bool, device=device)
        self._sample = torch.zeros(slots, dtype=torch.bool, device=device)
        self._scale = torch.ones(slots, dtype=torch.float32, device=device)
        self._temperature = torch.ones(slots, dtype=torch.float32, device=device)
        self._top_k = torch.full((slots,), self._vocab, dtype=torch.int64, device=device)
        self._seeds = torch.zeros(slots, dtype=torch.int64, device=device)
        self._forced = torch.zeros(slots, dtype=torch.int64, device=device)  # prefix frames of the window
        self._window_keys = torch.zeros(slots, dtype=torch.int64, device=device)  # the window, in the noise key
        self._occupants: list[_Occupant | None] = [None] * slots
        self._occupied = torch.zeros(rows, dtype=torch.bool, device=device)  # both rows of each slot
        self._slot_rows = torch.arange(slots, device=device)
        self._columns = torch.arange(self._max_steps, device=device)
        # Cross-attention reads the cached text, but a layer runs that block only when given states.
        self._text_placeholder = torch.zeros(rows, 1, int(config.hidden_size), dtype=self.dtype, device=device)
        # Made here and rewritten in place as jobs join, so a compiled step reads it at one address.
        self._cross_mask = self._text_attention_mask()
        self.compile_step = compile_step
        self._advance = self._advance_eager
        if compile_step:
            self._advance = self._compiled_advance()

    @property
    def free_slots(self) -> int:
        return sum(o is None for o in self._occupants)

    @property
    def busy(self) -> bool:
        return self.free_slots < self.slots

    def progress(self) -> list[SlotProgress]:
        return [SlotProgress(i, o.request.key, o.steps_done, o.steps_total)
                for i, o in enumerate(self._occupants) if o is not None]

    def prompt_tokens(self, prompt: str) -> int:
        """How many text tokens ``prompt`` takes; ``add`` refuses more than ``text_tokens``."""
        return len(self._processor.tokenizer(prompt)["input_ids"])

    def add(self, request: DecodeRequest) -> int:
        """Start ``request`` in a free slot at the next step; return the slot. ValueError if it cannot."""
        if request.frames < 1:
            raise ValueError(f"a job needs at least 1 frame, got {request.frames}")
        if request.key in {o.request.key for o in self._occupants if o is not None}:
            raise ValueError(f"job {request.key!r} is already decoding")
        if not self.free_slots:
            raise ValueError(f"all {self.slots} slots are taken")
        slot = self._occupants.index(None)
        try:
            with torch.inference_mode():
                self._encode(slot, request.prompt)
                settings = request.settings
                self._guided[slot] = settings.guidance_scale > 1  # generate adds guidance only above 1
                self._scale[slot] = settings.guidance_scale
                self._sample[slot] = settings.do_sample
                self._temperature[slot] = settings.temperature
                self._top_k[slot] = self._vocab if settings.top_k is None else min(settings.top_k, self._vocab)
                self._seeds[slot] = request.seed
                self._occupied[[slot, self.slots + slot]] = True
            windows = self._windows(request.frames)
            occupant = _Occupant(request, windows, sum(prefix + new + self.delay for prefix, new in windows))
            self._occupants[slot] = occupant
            self._start_window(slot, occupant)
        except BaseException:
            # All or nothing: a slot half filled would decode for a key its caller never recorded,
            # which no cancel() of that key could free (MusicGenGenerator.cancel asks its own table).
            self._release(slot)
            raise
        return slot

    def cancel(self, key: str) -> bool:
        """Free the slot of job ``key``; False if it holds none. The other slots are not touched."""
        for slot, occupant in enumerate(self._occupants):
            if occupant is not None and occupant.request.key == key:
                self._release(slot)
                return True
        return False

    def step(self) -> list[DecodeResult]:
        """Advance every occupied slot by one token; return the jobs that finished, audio decoded."""
        if not self.busy:
            return []
        with torch.inference_mode():
            self._advance()
        finished = []
        for slot, occupant in enumerate(self._occupants):
            if occupant is None:
                continue
            occupant.steps_done += 1
            occupant.window_steps += 1
            prefix, new = occupant.windows[occupant.window]
            if occupant.window_steps < prefix + new + self.delay:
                continue
            with torch.inference_mode():
                where = self._offsets.view(-1, 1) + torch.arange(prefix, prefix + new, device=self.device)
                occupant.codes.append(self._tokens[slot].gather(1, where))
            occupant.window += 1
            if occupant.window < len(occupant.windows):
                self._start_window(slot, occupant)
            else:
                finished.append(self._finish(slot, occupant))
        return finished

    def run(self, requests: Iterable[DecodeRequest]) -> list[DecodeResult]:
        """Decode every request, joining as slots free up; results in the order of ``requests``."""
        pending = collections.deque(requests)
        order = [r.key for r in pending]
        done: dict[str, DecodeResult] = {}
        while pending or self.busy:
            while pending and self.free_slots:
                self.add(pending.popleft())
            done.update((r.key, r) for r in self.step())
        return [done[key] for key in order]

    def _advance_eager(self) -> None:
        """One step's tensor work, every slot at once: read each slot's token, choose the next, write it,
        move the occupied rows on. Fixed shapes and no Python numbers that change from step to step, so
        ``compile_step`` compiles it once per session shape."""
        steps = self._positions[: self.slots]
        current = self._tokens[self._slot_rows, :, steps]
        tokens = self._choose(self._logits(current.repeat(2, 1)), steps)
        # The delay pattern: each codebook is silent (the start token) before its offset and after its
        # frames; a continued window's first frames are forced to the end of the window before.
        frame = (steps.view(-1, 1) + 1) - self._offsets
        inside = (frame >= 0) & (frame < self._frames.view(-1, 1))
        chosen = torch.where(inside, tokens, self._start)
        kept = self._tokens[self._slot_rows, :, steps + 1]
        self._tokens[self._slot_rows, :, steps + 1] = torch.where(frame < self._forced.view(-1, 1), kept, chosen)
        self._positions += self._occupied

    def _compiled_advance(self) -> Any:
        """:meth:`_advance_eager` through ``torch.compile``: CUDA graphs on CUDA ("reduce-overhead"),
        inductor's default elsewhere (CUDA graphs exist only on CUDA)."""
        # A CUDA graph replays fixed addresses: the tensors a step reads or writes in place are marked as
        # such, so that they are neither copied in each replay nor a reason to skip the graph.
        own, cross = self._cache.self_attention_cache.layers, self._cache.cross_attention_cache.layers
        fixed = [t for layer in (*own, *cross) for t in (layer.keys, layer.values)]
        fixed += [self._positions, self._tokens, self._frames, self._text_mask, self._guided, self._sample, self._scale,
                  self._temperature, self._top_k, self._seeds, self._forced, self._window_keys, self._occupied]
        if isinstance(self._cross_mask, torch.Tensor):
            fixed.append(self._cross_mask)
        for tensor in fixed:
            torch._dynamo.mark_static_address(tensor)
        return torch.compile(self._advance_eager, dynamic=False, fullgraph=True, options=self._inductor_options())

    def _inductor_options(self) -> dict[str, Any]:
        """Mode "reduce-overhead" on CUDA (its one option), plus a lower recompute limit: the sampler's hash
        uses each value twice per round, and inductor, inlining values it does not store, re-traces the
        rounds exponentially at compile time; so it stores a value every few ops instead."""
        options: dict[str, Any] = torch._inductor.list_mode_options("reduce-overhead" if self.device.type == "cuda"
                                                                      else "default")
        return options | {"realize_opcount_threshold": 10, "realize_cpu_opcount_threshold": 10}

    def _text_attention_mask(self) -> Any:
        """The cross-attention mask of every row's text, as MusicgenDecoder.forward makes it."""
        return create_bidirectional_mask(config=self._decoder.config, inputs_embeds=self._text_placeholder,
                                         attention_mask=self._text_mask, allow_is_bidirectional_skip=False)

    def _windows(self, frames: int) -> list[tuple[int, int]]:
        """(forced prefix, new frames) of each window of a job of ``frames`` frames."""
        windows = [(0, min(frames, self.max_frames))]
        done = windows[0][1]
        while done < frames:
            new = min(self.max_frames - self.overlap_frames, frames - done)
            windows.append((self.overlap_frames, new))
            done += new
        return windows

    def _start_window(self, slot: int, occupant: _Occupant) -> None:
        """Set ``slot`` at step 0 of its job's current window, the window's prefix written in place;
        the text stays, what the previous window or occupant left in the self-attention rows goes."""
        prefix, new = occupant.windows[occupant.window]
        rows = [slot, self.slots + slot]
        with torch.inference_mode():
            for own in self._cache.self_attention_cache.layers:
                own.clear_rows(rows)
            self._tokens[slot] = self._start
            if prefix:
                where = self._offsets.view(-1, 1) + torch.arange(prefix, device=self.device)
                self._tokens[slot].scatter_(1, where, torch.cat(occupant.codes, dim=1)[:, -prefix:])
            self._forced[slot] = prefix
            self._frames[slot] = prefix + new
            self._window_keys[slot] = occupant.window << 16
            self._positions[rows] = 0
        occupant.window_steps = 0

    def _encode(self, slot: int, prompt: str) -> None:
        """Encode ``prompt`` as generate does and write its cross-attention keys and values into ``slot``."""
        inputs = self._processor(text=[prompt], return_tensors="pt").to(self.device)
        length = int(inputs["input_ids"].shape[1])
        if length > self.text_tokens:
            raise ValueError(f"the prompt is {length} tokens; this session takes at most {self.text_tokens}")
        model = self._model
        states = model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                                    ).last_hidden_state
        if model.text_encoder.config.hidden_size != self._lm.config.hidden_size and (
            self._lm.config.cross_attention_hidden_size is None
        ):
            states = model.enc_to_dec_proj(states)
        states = states * inputs["attention_mask"][..., None]
        # The conditional row holds the text, the unconditional one zeros: generate's null input.
        text = torch.zeros(2, self.text_tokens, states.shape[-1], dtype=self.dtype, device=self.device)
        text[0, :length] = states[0]
        rows = [slot, self.slots + slot]
        for layer, cross in zip(self._layers, self._cache.cross_attention_cache.layers, strict=True):
            shape = (2, self.text_tokens, self._heads, self._head_dim)
            attention = layer.encoder_attn
            cross.write_rows(rows, attention.k_proj(text).view(shape).transpose(1, 2),
                             attention.v_proj(text).view(shape).transpose(1, 2))
        self._text_mask[rows] = False
        self._text_mask[slot, :length] = True
        mask = self._text_attention_mask()
        if isinstance(self._cross_mask, torch.Tensor) and isinstance(mask, torch.Tensor):
            self._cross_mask.copy_(mask)
        else:  # an attention implementation whose mask is no tensor (flash attention's may be None)
            self._cross_mask = mask

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's logits (rows, codebooks, vocab) for one token per row: MusicgenDecoder.forward
        and MusicgenForCausalLM's heads, with each row at its own position."""
        embedded = sum(embed(tokens[:, k]) for k, embed in enumerate(self._decoder.embed_tokens))
        assert isinstance(embedded, torch.Tensor)
        positions = self._decoder.embed_positions.weights.index_select(0, self._positions)
        hidden = (embedded + positions).unsqueeze(1)
        config = self._decoder.config
        own_mask = create_bidirectional_mask(config=config, inputs_embeds=hidden,
                                             attention_mask=self._columns <= self._positions.view(-1, 1),
                                             allow_is_bidirectional_skip=False)
        for layer in self._layers:
            hidden = layer(hidden, own_mask, self._text_placeholder, encoder_attention_mask=self._cross_mask,
                           cache=self._cache, use_cache=True)
        hidden = self._layer_norm(hidden)
        return torch.stack([head(hidden[:, 0]) for head in self._lm.lm_heads], dim=1)

    def _choose(self, logits: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return choose_tokens(logits, guided=self._guided, guidance_scale=self._scale, sample=self._sample,
                             temperature=self._temperature, top_k=self._top_k, seeds=self._seeds,
                             steps=steps + self._window_keys)

    def _finish(self, slot: int, occupant: _Occupant) -> DecodeResult:
        with torch.inference_mode():
            codes = torch.cat(occupant.codes, dim=1)
            audio = self._decode_audio(codes)
        self._release(slot)
        return DecodeResult(occupant.request.key, codes.cpu().numpy(), audio, occupant.steps_total)

    def _decode_audio(self, codes: torch.Tensor) -> npt.NDArray[np.float32]:
        """The codec's audio for one job's codes, as generate decodes them (left and right apart)."""
        codec = self._model.audio_encoder
        frames = codes[None, None]  # (chunks, batch, codebooks, frames)
        if self._channels == 1:
            values = codec.decode(frames, audio_scales=[None]).audio_values
        else:
            left = codec.decode(frames[:, :, ::2], audio_scales=[None]).audio_values
            right = codec.decode(frames[:, :, 1::2], audio_scales=[None]).audio_values
            values = torch.cat([left, right], dim=1)
        audio: npt.NDArray[np.float32] = values[0].float().cpu().numpy()
        return audio

    def _release(self, slot: int) -> None:
        self._occupants[slot] = None
        self._positions[[slot, self.slots + slot]] = 0
        self._occupied[[slot, self.slots + slot]] = False
