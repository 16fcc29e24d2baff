"""A span of decoder layers run on hidden states with per-session caches, and the ways families call their layers.

Most families' attention goes through transformers' attention interface: their layers run *packed* (packed.py), the
steps of several sessions laid end to end in one pass, each attending to its own cache. What differs between them
is what the layers are told about positions (:class:`RotaryLayers`, :class:`RotaryByLayerTypeLayers`,
:class:`PlainLayers`). Bloom and Falcon compute attention in their own modules (ALiBi biases, their own sdpa
calls), which could not tell the sessions of a pack apart, and DeepSeek V3 caches compressed latents that it expands
after reading them: their layers run *one step at a time* within a pass (:class:`StepwiseLayers`), each step with
its own cache, mask and biases, built as their model's forward builds them. A pass of several sessions is then no
cheaper than the sessions one by one, but equal to them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from molink_swarm.models.cache import SpanCache
from molink_swarm.models.packed import PackedBatch, PackedStep, allowed_positions


class LayerRunner:
    """Runs layers ``first, first + 1, ...`` (global indices) on the steps of a pass."""

    packed = False  # the steps' tokens in one pass through the packed attention implementation (packed.py)
    needs_rotary = False  # built with the model's rotary embedding module

    def __init__(self, config: PretrainedConfig, cache_kwarg: str):
        self.config = config
        self.cache_kwarg = cache_kwarg

    def run(
        self, layers: Sequence[nn.Module], first: int, steps: Sequence[PackedStep], between: Optional[Callable[[], None]] = None
    ) -> list[torch.Tensor]:
        """``between()``, if given, is called between two layers (a pass that gives way to more urgent ones)."""
        raise NotImplementedError


class PackedLayers(LayerRunner):
    """Steps packed end to end (packed.py); subclasses say what the layers learn about positions."""

    packed = True

    def position_kwargs(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Callable[[int], dict]:
        """The position keywords of layer ``index`` (global) for this pack."""
        return lambda index: {}

    def run(
        self, layers: Sequence[nn.Module], first: int, steps: Sequence[PackedStep], between: Optional[Callable[[], None]] = None
    ) -> list[torch.Tensor]:
        batch = PackedBatch(steps)
        hidden = batch.pack([step.hidden for step in steps])
        position_ids = batch.position_ids(hidden.device)
        positions = self.position_kwargs(hidden, position_ids)
        with batch.active():
            for index, layer in enumerate(layers, start=first):
                if between is not None and index > first:
                    between()
                out = layer(
                    hidden,
                    attention_mask=None,  # each step's mask is made where it attends (PackedBatch.attend)
                    position_ids=position_ids,
                    use_cache=True,
                    **{self.cache_kwarg: batch},
                    **positions(index),
                )
                hidden = out[0] if isinstance(out, tuple) else out
        return batch.unpack(hidden)


class PlainLayers(PackedLayers):
    """Layers that need no positions (the client added learned position embeddings: GPT-2, OPT)."""


class RotaryLayers(PackedLayers):
    """Rotary embeddings computed once per pass from each token's position (Llama and most families)."""

    needs_rotary = True

    def __init__(self, config: PretrainedConfig, cache_kwarg: str, rotary: nn.Module):
        super().__init__(config, cache_kwarg)
        self.rotary = rotary

    def position_kwargs(self, hidden, position_ids):
        embeddings = self.rotary(hidden, position_ids)
        return lambda index: {"position_embeddings": embeddings}


class RotaryByLayerTypeLayers(RotaryLayers):
    """One rotary table per layer type (Gemma 3: local base frequency on sliding layers, global on full ones)."""

    def position_kwargs(self, hidden, position_ids):
        types = self.config.layer_types
        embeddings = {kind: self.rotary(hidden, position_ids, kind) for kind in set(types)}
        return lambda index: {"position_embeddings": embeddings[types[index]]}


class StepwiseLayers(LayerRunner):
    """Each step through every layer on its own, with its own cache: for attention that cannot run packed."""

    def step_kwargs(self, step: PackedStep) -> dict:
        raise NotImplementedError

    def run(
        self, layers: Sequence[nn.Module], first: int, steps: Sequence[PackedStep], between: Optional[Callable[[], None]] = None
    ) -> list[torch.Tensor]:
        outputs = []
        for step in steps:
            hidden, kwargs = step.hidden, self.step_kwargs(step)
            for index, layer in enumerate(layers):
                if between is not None and (index or outputs):
                    between()
                out = layer(hidden, use_cache=True, **{self.cache_kwarg: step.cache}, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            outputs.append(hidden)
        return outputs

    def _allowed(self, step: PackedStep) -> torch.Tensor:
        """[tokens, positions] causal mask of the step over its cache after this step (True: may attend)."""
        return allowed_positions(step.position, step.tokens, step.position + step.tokens, None, step.hidden.device)

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _causal_mask(self, step: PackedStep) -> torch.Tensor:
        """The causal mask transformers' attention functions take: bool for sdpa, additive for eager."""
        allowed = self._allowed(step)[None, None]
        return allowed if self.config._attn_implementation == "sdpa" else self._additive(allowed, step.hidden.dtype)


class RotaryStepwiseLayers(StepwiseLayers):
    """Rotary families whose cache holds something else than the keys and values attention reads (DeepSeek V3 keeps
    the compressed latents and expands them after reading): one step at a time."""

    needs_rotary = True

    def __init__(self, config: PretrainedConfig, cache_kwarg: str, rotary: nn.Module):
        super().__init__(config, cache_kwarg)
        self.rotary = rotary

    def step_kwargs(self, step: PackedStep) -> dict:
        position_ids = torch.arange(step.position, step.position + step.tokens, device=step.hidden.device)[None]
        return {
            "attention_mask": None if step.tokens == 1 else self._causal_mask(step),  # one new token sees everything
            "position_ids": position_ids,
            "position_embeddings": self.rotary(step.hidden, position_ids),
        }


class BloomLayers(StepwiseLayers):
    """Bloom: ALiBi biases by key position, an additive causal mask (Bloom's attention is eager only)."""

    def step_kwargs(self, step: PackedStep) -> dict:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        keys = torch.ones(step.rows, step.position + step.tokens, dtype=torch.long, device=step.hidden.device)
        alibi = build_alibi_tensor(keys, self.config.n_head, step.hidden.dtype)  # [rows * heads, 1, keys]
        mask = None if step.tokens == 1 else self._additive(self._allowed(step), step.hidden.dtype)[None, None]
        return {"alibi": alibi, "attention_mask": mask}


class FalconLayers(RotaryStepwiseLayers):
    """Falcon: rotary embeddings, or ALiBi biases folded into the mask (as FalconModel.forward does); its attention
    calls sdpa itself, with that mask."""

    def step_kwargs(self, step: PackedStep) -> dict:
        device, dtype = step.hidden.device, step.hidden.dtype
        position_ids = torch.arange(step.position, step.position + step.tokens, device=device)[None]
        allowed = self._allowed(step)
        if not self.config.alibi:
            return {
                "alibi": None,
                "attention_mask": self._causal_mask(step),  # Falcon's eager attention needs one, even for a token
                "position_ids": position_ids,
                "position_embeddings": self.rotary(step.hidden, position_ids),
            }
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        heads, length = self.config.num_attention_heads, step.position + step.tokens
        keys = torch.ones(step.rows, length, dtype=torch.long, device=device)
        alibi = build_alibi_tensor(keys, heads, dtype)  # [rows * heads, 1, keys]
        scaled = alibi.reshape(step.rows, heads, 1, length) / math.sqrt(self.config.hidden_size // heads)
        mask = scaled.masked_fill(~allowed, torch.finfo(dtype).min)
        return {"alibi": alibi, "attention_mask": mask, "position_ids": position_ids}


class BlockSpan(nn.Module):
    """Blocks ``start..end-1`` of a model, runnable on hidden states with per-session caches.

    Every call runs as a pass over the steps of one or more sessions (a lone session's step is a pass of one), so
    a lone session and a batch of many take the same path.
    """

    def __init__(self, config: PretrainedConfig, start: int, layers: nn.ModuleList, runner: LayerRunner):
        super().__init__()
        self.config = config
        self.start, self.end = start, start + len(layers)
        self.layers = layers
        self.runner = runner

    def slice(self, start: int, end: int) -> "BlockSpan":
        """Blocks ``start..end-1`` of this span, sharing their weights."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"Blocks {start}:{end} are not all in {self.start}:{self.end}")
        return BlockSpan(self.config, start, self.layers[start - self.start : end - self.start], self.runner)

    @staticmethod
    def join(parts: Sequence["BlockSpan"]) -> "BlockSpan":
        """Consecutive spans as one (a server that moves keeps the blocks it already holds)."""
        for left, right in zip(parts, parts[1:]):
            if left.end != right.start:
                raise ValueError(f"Spans {left.start}:{left.end} and {right.start}:{right.end} are not consecutive")
        layers = nn.ModuleList([layer for part in parts for layer in part.layers])
        return BlockSpan(parts[0].config, parts[0].start, layers, parts[0].runner).eval()

    def new_cache(self, start: Optional[int] = None, end: Optional[int] = None, max_length: Optional[int] = None) -> SpanCache:
        start = self.start if start is None else start
        return SpanCache(self.config, start, self.end if end is None else end, max_length=max_length)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position: int = 0,
        cache: Optional[SpanCache] = None,
        start: Optional[int] = None,
        end: Optional[int] = None,
    ) -> torch.Tensor:
        """Run blocks ``start..end-1`` (default: all) on ``hidden_states`` [batch, seq, hidden].

        ``position`` is the index of the first token in the sequence; with a cache it must equal the number of
        tokens the cache already holds. Without one, the sequence is computed on its own.
        """
        cache = self.new_cache(start, end) if cache is None else cache
        return self.forward_packed([PackedStep(hidden_states, position, cache)], start=start, end=end)[0]

    @torch.inference_mode()
    def forward_packed(
        self,
        steps: Sequence[PackedStep],
        *,
        start: Optional[int] = None,
        end: Optional[int] = None,
        between: Optional[Callable[[], None]] = None,
    ) -> list[torch.Tensor]:
        """Run blocks ``start..end-1`` on the steps of several sessions at once (their caches must cover these
        blocks); returns each step's output, as if each had run alone. ``between()`` is called between layers."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        return self.runner.run(self.layers[start - self.start : end - self.start], start, steps, between)
