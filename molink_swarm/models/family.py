"""How a transformers model family is cut into blocks: the one place that knows family internals.

A *block* is one decoder layer. A server runs a contiguous span of blocks on hidden states; the client keeps
what comes before the first block (embeddings) and after the last (final norm, LM head). For the families
whose transformers implementation follows the Llama layout (a ``model.layers`` list, model-level rotary
embeddings, layers called with ``position_embeddings``) nothing family-specific is needed; other layouts get
their own :class:`FamilyAdapter` subclass registered in :data:`_ADAPTERS`.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from molink_swarm.errors import UserError

logger = logging.getLogger(__name__)

TensorReader = Callable[[Iterable[str]], Mapping[str, torch.Tensor]]


class UnsupportedModelError(UserError):
    pass


class SpanCache(DynamicCache):
    """A session's KV cache for blocks ``start..end-1`` of a server.

    Attention modules address the cache by their *global* layer index; this cache holds only the span's
    layers, so it shifts the index. Everything else (mask sizes, lengths) already uses local indices.
    """

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__(config=_span_config(config, start, end))
        self.offset = start

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return super().update(key_states, value_states, layer_idx - self.offset, cache_kwargs)


def _span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    span = copy.copy(config)
    span.num_hidden_layers = end - start
    if getattr(config, "layer_types", None) is not None:
        span.layer_types = list(config.layer_types[start:end])
    return span


class BlockSpan(nn.Module):
    """Blocks ``start..end-1`` of a model, runnable on hidden states with an optional per-session cache."""

    def __init__(self, config: PretrainedConfig, start: int, layers: nn.ModuleList, rotary_emb: nn.Module):
        super().__init__()
        self.config = config
        self.start, self.end = start, start + len(layers)
        self.layers = layers
        self.rotary_emb = rotary_emb
        self._sliding = getattr(config, "sliding_window", None) is not None and getattr(
            config, "use_sliding_window", True
        )

    def new_cache(self, start: Optional[int] = None, end: Optional[int] = None) -> SpanCache:
        return SpanCache(self.config, self.start if start is None else start, self.end if end is None else end)

    @torch.inference_mode()
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
        tokens the cache already holds.
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        seq_len = hidden_states.shape[1]
        cache_position = torch.arange(position, position + seq_len, device=hidden_states.device)
        position_ids = cache_position.unsqueeze(0).expand(hidden_states.shape[0], -1)
        mask_kwargs = dict(
            config=self.config,
            input_embeds=hidden_states,
            attention_mask=None,
            cache_position=cache_position,
            past_key_values=cache,
            position_ids=position_ids,
        )
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if self._sliding:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers[start - self.start : end - self.start]:
            attention_type = getattr(layer, "attention_type", "sliding_attention" if self._sliding else "full_attention")
            out = layer(
                hidden_states,
                attention_mask=masks.get(attention_type, masks["full_attention"]),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                cache_position=cache_position,
                position_embeddings=position_embeddings,
            )
            hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states


class FamilyAdapter:
    """Llama-layout families: ``model.layers.<i>.*`` tensors, model-level rotary embeddings."""

    layer_prefix = "model.layers."

    def __init__(self, config: PretrainedConfig):
        self.config = config
        if getattr(config, "_attn_implementation", None) is None:
            # What transformers picks when it loads a model itself: the same kernels give the same numbers.
            config._attn_implementation = "sdpa"
        try:
            self.base_model_class = AutoModel._model_mapping[type(config)]
        except KeyError:
            raise UnsupportedModelError(
                f"Model type {config.model_type!r} is not supported by this transformers version"
            ) from None
        module = sys.modules[self.base_model_class.__module__]
        layer_names = getattr(self.base_model_class, "_no_split_modules", None) or []
        self.layer_class = next((getattr(module, n) for n in layer_names if hasattr(module, n)), None)
        rotary_names = [n for n in dir(module) if n.endswith("RotaryEmbedding") and not n.startswith("_")]
        self.rotary_class = getattr(module, min(rotary_names, key=len)) if rotary_names else None
        if self.layer_class is None or self.rotary_class is None:
            raise UnsupportedModelError(
                f"Model type {config.model_type!r} does not have the layer layout molink-swarm supports yet"
            )

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    def block_tensor_names(self, all_names: Iterable[str], index: int) -> list[str]:
        prefix = f"{self.layer_prefix}{index}."
        return [name for name in all_names if name.startswith(prefix)]

    def build_blocks(
        self,
        start: int,
        end: int,
        all_names: Iterable[str],
        read: TensorReader,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> BlockSpan:
        """Build blocks ``start..end-1`` reading only their tensors (memory-mapped by ``read``)."""
        all_names = list(all_names)
        layers = nn.ModuleList()
        for index in range(start, end):
            with torch.device("meta"):
                layer = self.layer_class(self.config, index)
            names = self.block_tensor_names(all_names, index)
            prefix = f"{self.layer_prefix}{index}."
            state = {name[len(prefix) :]: tensor.to(device=device, dtype=dtype) for name, tensor in read(names).items()}
            missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
            still_meta = [n for n, p in layer.named_parameters() if p.is_meta]
            if still_meta or unexpected:
                raise ValueError(f"Block {index}: missing weights {still_meta}, unexpected {unexpected}")
            layers.append(layer.eval())
        rotary = self.rotary_class(config=self.config, device=device)
        return BlockSpan(self.config, start, layers, rotary).eval()


_ADAPTERS: dict[str, type[FamilyAdapter]] = {}


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for ``config``'s family (the one mapping from family to block code)."""
    return _ADAPTERS.get(config.model_type, FamilyAdapter)(config)
