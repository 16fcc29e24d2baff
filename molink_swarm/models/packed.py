"""Steps of many sessions as one forward pass through a span of blocks (continuous batching on a server).

The steps are *packed*: their tokens are laid end to end in one sequence ``[1, total_tokens, hidden]``, so they may
differ in length (a decode token next to a prompt chunk) and in position. Everything in a block except attention
works token by token and runs once for the whole pack: that is where batching pays, since every weight is read
once per pass instead of once per session. Attention runs step by step, each step's queries against its own
session's cache (see cache.py), with its own causal and sliding-window mask; no cache is copied or padded to a
common length.

transformers' own paged cache gathers every page of every request into one tensor each step and masks across the
whole batch; for the small batches and long caches of a swarm server, attending per step costs less.

The blocks get :class:`PackedBatch` as their cache, and it is the *active* batch while they run (a context
variable: some families' layers do not pass keywords on to their attention); the attention implementation
registered by :func:`packed_attention` splits the pack for the model's own attention function (sdpa or the
family's eager code) and joins the outputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import sys
from typing import Callable, Optional, Sequence

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from molink_swarm.models.cache import SpanCache

_ACTIVE: contextvars.ContextVar[Optional["PackedBatch"]] = contextvars.ContextVar("molink_packed_batch", default=None)


@dataclasses.dataclass
class PackedStep:
    """One session's step: ``hidden`` [batch, tokens, hidden] at ``position``, cached in ``cache``."""

    hidden: torch.Tensor
    position: int
    cache: SpanCache

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]


class PackedBatch:
    """Stands for the cache of every step in a pack while its blocks run."""

    def __init__(self, steps: Sequence[PackedStep]):
        self.steps = list(steps)
        offsets = [0]
        for step in self.steps:
            offsets.append(offsets[-1] + step.rows * step.tokens)
        self._bounds = list(zip(offsets[:-1], offsets[1:]))
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._kv_layer: Optional[int] = None
        self._masks: dict[tuple, torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self):
        """While the blocks run this pack: their attention finds it here."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @property
    def total_tokens(self) -> int:
        return self._bounds[-1][1]

    def pack(self, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """[1, total_tokens, hidden] from one [batch, tokens, hidden] tensor per step."""
        flat = [h.reshape(1, -1, h.shape[-1]) for h in hidden]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def unpack(self, packed: torch.Tensor) -> list[torch.Tensor]:
        return [
            packed[0, start:end].reshape(step.rows, step.tokens, -1) for step, (start, end) in zip(self.steps, self._bounds)
        ]

    def position_ids(self, device: torch.device) -> torch.Tensor:
        ids = [torch.arange(s.position, s.position + s.tokens, device=device).repeat(s.rows) for s in self.steps]
        return torch.cat(ids).unsqueeze(0)

    def _split(self, states: torch.Tensor, index: int) -> torch.Tensor:
        """Step ``index``'s part of packed ``states`` [1, heads, total_tokens, dim] as [batch, heads, tokens, dim]."""
        step, (start, end) = self.steps[index], self._bounds[index]
        part = states[0, :, start:end]
        return part.unsqueeze(0) if step.rows == 1 else part.reshape(part.shape[0], step.rows, step.tokens, -1).transpose(0, 1)

    # ---- called by the attention modules

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write each step's new keys and values into its own cache; attention then reads them (see attend)."""
        self._kv = [
            step.cache.update(self._split(key_states, i), self._split(value_states, i), layer_idx)
            for i, step in enumerate(self.steps)
        ]
        self._kv_layer = layer_idx
        return key_states, value_states

    def attend(self, module: torch.nn.Module, query: torch.Tensor, attention: Callable, eager: bool, **kwargs):
        layer = getattr(module, "layer_idx", self._kv_layer)
        if layer != self._kv_layer:  # never attend to another layer's keys
            raise RuntimeError(f"Attention of layer {layer} ran without writing its keys to the cache first")
        outputs = []
        # Families name their window in the attention call (mistral, qwen2, gemma2, ...) or on the module.
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        for i, (step, (keys, values)) in enumerate(zip(self.steps, self._kv)):
            mask = self._mask(step, keys.shape[-2], window, query.dtype, eager, query.device)
            output, _ = attention(module, self._split(query, i), keys, values, mask, **kwargs)
            outputs.append(output.reshape(1, step.rows * step.tokens, *output.shape[2:]))  # [1, tokens, heads, dim]
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None

    def _mask(
        self, step: PackedStep, length: int, window: Optional[int], dtype: torch.dtype, eager: bool, device
    ) -> Optional[torch.Tensor]:
        """Causal (and sliding-window) mask of one step's queries over its ``length`` cached positions: query ``j``
        (at position ``position + j``) sees positions ``p`` with ``position + j - window < p <= position + j``."""
        if step.tokens == 1 and (window is None or length <= window):
            return None  # one new token sees every cached position
        key = (step.position, step.tokens, length, window, dtype, eager)
        if key not in self._masks:  # the same for every layer of the pass
            mask = allowed_positions(step.position, step.tokens, length, window, device)[None, None]
            if eager:
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
            self._masks[key] = mask
        return self._masks[key]


def allowed_positions(position: int, tokens: int, length: int, window: Optional[int], device) -> torch.Tensor:
    """[tokens, length] bool: query ``j`` (at ``position + j``) may attend to position ``p`` of its cache when
    ``position + j - window < p <= position + j`` (transformers' causal mask and sliding-window overlay)."""
    query_positions = torch.arange(position, position + tokens, device=device)[:, None]
    key_positions = torch.arange(length, device=device)[None, :]
    allowed = key_positions <= query_positions
    if window is not None:
        allowed &= key_positions > query_positions - window
    return allowed


def packed_attention(base: str) -> str:
    """The name of an attention implementation that runs packed batches with ``base`` ("sdpa", "eager", ...) and
    behaves exactly as ``base`` otherwise. Set it as ``config._attn_implementation`` of the blocks a server runs."""
    if base not in ("sdpa", "eager"):  # others (flash) take packed sequences their own way, not per step
        raise ValueError(f"Attention implementation {base!r} cannot run packed batches; use sdpa or eager")
    name = f"molink_packed_{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(_packed_attention, base=base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _packed_attention(module, query, key, value, attention_mask, *, base: str, **kwargs):
    batch: Optional[PackedBatch] = _ACTIVE.get()
    if base == "eager":  # each family has its own eager attention (softcaps and the like)
        attention = sys.modules[type(module).__module__].eager_attention_forward
    else:
        attention = ALL_ATTENTION_FUNCTIONS[base]
    if batch is None:
        return attention(module, query, key, value, attention_mask, **kwargs)
    return batch.attend(module, query, attention, eager=base == "eager", **kwargs)
