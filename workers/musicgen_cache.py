"""A preallocated key/value cache whose rows each sit at their own position: transformers' cache classes
with one change, so that jobs that joined at different steps share one decoding step.

transformers' ``StaticLayer`` preallocates ``(batch, heads, max_len, head_dim)`` and writes every
row at one shared position; :class:`SlotLayer` writes row ``r`` at ``positions[r]``, a tensor the
session advances in place. Every row keeps its own timeline from column 0, so a job's attention
covers the same columns whether it runs alone or joins a batch half done. The tensors are
allocated once and only written in place (fixed addresses, as CUDA graphs need).

The cross-attention half holds each slot's projected text, written once when a job joins; the
decoder's layers read it without projecting again because the cache marks every layer as updated.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer


class SlotLayer(StaticLayer):  # type: ignore[no-untyped-call]  # transformers' __init_subclass__ is unannotated
    """One decoder layer's keys and values, ``(rows, heads, length, head_dim)``, written per row."""

    def __init__(self, rows: int, heads: int, length: int, head_dim: int, *, positions: torch.Tensor,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(max_cache_len=length)
        self.device = device
        self.batch_size, self.num_heads = rows, heads
        self.k_head_dim = self.v_head_dim = head_dim
        # Typed twins of transformers' Optional attributes, the same tensors.
        self._keys = self.keys = torch.zeros((rows, heads, length, head_dim), dtype=dtype, device=device)
        self._values = self.values = torch.zeros_like(self._keys)
        self.is_initialized = True
        self._rows = torch.arange(rows, device=device)
        self._positions = positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's keys and values, row ``r`` at column ``positions[r]``; return the whole cache."""
        self._keys[self._rows, :, self._positions] = key_states[:, :, 0]
        self._values[self._rows, :, self._positions] = value_states[:, :, 0]
        return self._keys, self._values

    def get_seq_length(self) -> int:
        """The full length: rows differ, and the mask, not this number, says which columns count."""
        return int(self.max_cache_len)

    def write_rows(self, rows: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace ``rows`` whole: a slot's projected text in the cross-attention half."""
        self._keys[rows] = keys
        self._values[rows] = values

    def clear_rows(self, rows: list[int]) -> None:
        """Zero what a previous occupant left in ``rows``."""
        self._keys[rows] = 0
        self._values[rows] = 0


def slot_cache(layers: int, rows: int, heads: int, head_dim: int, *, length: int, text_length: int,
               positions: torch.Tensor, dtype: torch.dtype, device: torch.device) -> Any:
    """An ``EncoderDecoderCache`` of :class:`SlotLayer`: self-attention over ``length`` steps,
    cross-attention over ``text_length`` text tokens, every layer marked as holding its text."""
    def half(size: int) -> Cache:
        return Cache(layers=[SlotLayer(rows, heads, size, head_dim, positions=positions, dtype=dtype, device=device)
                             for _ in range(layers)])

    cache = EncoderDecoderCache(half(length), half(text_length))
    cache.is_updated = dict.fromkeys(range(layers), True)
    return cache
