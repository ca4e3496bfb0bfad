"""Choosing MusicGen's next tokens per slot: guidance, temperature, top-k, and keyed noise.

Each slot brings its own settings, so jobs with different guidance scales, temperatures or top-k
values share one decoding step. The rules are those of ``model.generate`` with MusicGen's logits
processors, in their order: classifier-free guidance ``uncond + (cond - uncond) * scale`` on the
raw logits (float32), then division by the temperature, then keeping the ``top_k`` highest scores
(ties with the k-th kept, as ``TopKLogitsWarper`` does). Greedy decoding takes the arg-max of the
guided logits, as ``generate`` does with ``do_sample=False``.

Sampling is Gumbel-max: the arg-max of the scores plus Gumbel noise draws from their softmax. The
noise for token ``v`` of codebook ``k`` at a job's step ``n`` (the session folds a long job's window
into ``n``) is a pure function of ``(seed, n, k, v)``: a counter-based generator (the ``lowbias32``
integer hash, chained over the key), so a slot draws from no shared stream and a job samples the
same tokens whatever its companions, its slot, or when it joined. The hash is exact integer
arithmetic kept below 2**63, identical on every device.
"""

from __future__ import annotations

import torch

#: Named in each job's metadata, so a WAV can be traced to the noise that made it.
SAMPLER = "gumbel-max, lowbias32 keyed by (seed, step, codebook, token), v1"

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` below 2**32, in 16-bit halves so nothing overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32: a 32-bit integer hash with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(seeds: torch.Tensor, steps: torch.Tensor, codebooks: int, vocab: int) -> torch.Tensor:
    """Uniform floats in (0, 1) shaped (slots, codebooks, vocab), a pure function of each slot's key.

    ``seeds`` and ``steps`` are int64 tensors shaped (slots,); seeds may use all 64 bits.
    """
    h = _mix(seeds & _MASK32)
    h = _mix(h ^ ((seeds >> 32) & _MASK32))
    h = _mix(h ^ (steps & _MASK32))
    index = torch.arange(codebooks * vocab, device=seeds.device, dtype=torch.int64).view(1, codebooks, vocab)
    h = _mix(_mix(h.view(-1, 1, 1) ^ index))
    # The top 24 bits, centred in their interval: never exactly 0 or 1, exact in float32.
    return ((h >> 8).to(torch.float32) + 0.5) * 2.0**-24


def choose_tokens(
    logits: torch.Tensor,
    *,
    guided: torch.Tensor,
    guidance_scale: torch.Tensor,
    sample: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> torch.Tensor:
    """The next token of each slot's codebooks, shaped (slots, codebooks).

    ``logits`` is (2 * slots, codebooks, vocab): every slot's conditional row, then every slot's
    unconditional row (``generate``'s layout). Per-slot tensors, each shaped (slots,): ``guided``
    (bool: apply guidance), ``guidance_scale``, ``sample`` (bool: sample, else greedy),
    ``temperature``, ``top_k`` (int64; the vocabulary size keeps every token), ``seeds``, ``steps``.
    """
    slots, codebooks, vocab = logits.shape[0] // 2, logits.shape[1], logits.shape[2]
    scores = logits.to(torch.float32)
    cond, uncond = scores[:slots], scores[slots:]
    scale = guidance_scale.to(torch.float32).view(-1, 1, 1)
    scores = torch.where(guided.view(-1, 1, 1), uncond + (cond - uncond) * scale, cond)
    greedy = scores.argmax(dim=-1)
    warped = scores / temperature.to(torch.float32).view(-1, 1, 1)
    ranked = warped.sort(dim=-1, descending=True).values
    kth = ranked.gather(-1, (top_k.clamp(1, vocab) - 1).view(-1, 1, 1).expand(slots, codebooks, 1))
    warped = warped.masked_fill(warped < kth, float("-inf"))
    gumbel = -torch.log(-torch.log(keyed_uniform(seeds, steps, codebooks, vocab)))
    sampled = (warped + gumbel).argmax(dim=-1)
    return torch.where(sample.view(-1, 1), sampled, greedy)
