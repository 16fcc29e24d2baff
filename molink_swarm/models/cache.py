"""A session's KV cache on a server: one preallocated buffer per layer, written in place.

transformers' ``DynamicCache`` concatenates every step onto the whole cache (a copy of all of it per token).
Here each layer keeps a buffer that doubles when full (up to the session's max_length), so a step writes only its
own tokens, and the keys and values attention reads are views of the buffer. Batched steps of many sessions
(see packed.py) write into each session's buffer the same way: no per-step copy of any cache.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

_SLIDING_TYPES = ("sliding_attention", "chunked_attention")
_MIN_CAPACITY = 16


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values, ``[batch, kv_heads, capacity, head_dim]``; ``keys``/``values`` are views of
    the first ``length`` positions.

    Sliding-window layers keep every position too (windows are applied by the attention mask), so positions and
    mask sizes are the same for every layer.
    """

    def __init__(self, *, sliding: bool = False, max_length: Optional[int] = None):
        super().__init__()
        self.is_sliding = sliding
        self.max_length = max_length
        self.length = 0
        self._keys: Optional[torch.Tensor] = None
        self._values: Optional[torch.Tensor] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[-2]:
            self._grow(key_states, value_states, end)
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        capacity = max(needed, _MIN_CAPACITY, 2 * (0 if self._keys is None else self._keys.shape[-2]))
        if self.max_length is not None:
            capacity = max(needed, min(capacity, self.max_length))
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if self.length:
            keys[..., : self.length, :] = self._keys[..., : self.length, :]
            values[..., : self.length, :] = self._values[..., : self.length, :]
        self._keys, self._values = keys, values

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._keys[..., :length, :]
        self.values = self._values[..., :length, :]

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1 if self.max_length is None else self.max_length

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (the buffer stays: later steps overwrite the rest)."""
        if 0 <= length < self.length:
            self._set_length(length)

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop: ``-n`` removes the last ``n`` positions."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of positions to remove")
        self.truncate(max(0, self.length + tokens_to_remove))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("Server caches are never expanded for beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("Server caches are never reordered")


class SpanCache(Cache):
    """A session's KV cache for blocks ``start..end-1`` of a server.

    Attention modules address the cache by their *global* layer index; this cache holds only the span's layers,
    so it shifts the index. Everything else (mask sizes, lengths) already uses local indices.
    """

    def __init__(self, config: PretrainedConfig, start: int, end: int, max_length: Optional[int] = None):
        types = getattr(config, "layer_types", None)
        sliding = [bool(types) and types[index] in _SLIDING_TYPES for index in range(start, end)]
        super().__init__(layers=[PreallocatedLayer(sliding=s, max_length=max_length) for s in sliding])
        self.offset = start

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)

    def layer(self, layer_idx: int) -> PreallocatedLayer:
        """The cache of block ``layer_idx`` (a global index)."""
        return self.layers[layer_idx - self.offset]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer: roll back to a step the session replays."""
        for layer in self.layers:
            layer.truncate(length)
