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
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging
from transformers.utils.loading_report import LoadStateDictInfo

from molink_swarm.errors import UserError
from molink_swarm.models.cache import SpanCache
from molink_swarm.models.packed import ATTENTION_KWARG, PackedBatch, PackedStep, packed_attention

logger = logging.getLogger(__name__)

TensorReader = Callable[[Iterable[str]], Mapping[str, torch.Tensor]]


class UnsupportedModelError(UserError):
    pass


class BlockSpan(nn.Module):
    """Blocks ``start..end-1`` of a model, runnable on hidden states with per-session caches.

    Every call runs as a packed batch (see packed.py): one session's step is a batch of one, so a lone session and
    a batch of many take the same path.
    """

    def __init__(self, config: PretrainedConfig, start: int, layers: nn.ModuleList, rotary_emb: nn.Module):
        super().__init__()
        self.config = config
        self.start, self.end = start, start + len(layers)
        self.layers = layers
        self.rotary_emb = rotary_emb

    def slice(self, start: int, end: int) -> "BlockSpan":
        """Blocks ``start..end-1`` of this span, sharing their weights."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"Blocks {start}:{end} are not all in {self.start}:{self.end}")
        return BlockSpan(self.config, start, self.layers[start - self.start : end - self.start], self.rotary_emb)

    @staticmethod
    def join(parts: Sequence["BlockSpan"]) -> "BlockSpan":
        """Consecutive spans as one (a server that moves keeps the blocks it already holds)."""
        for left, right in zip(parts, parts[1:]):
            if left.end != right.start:
                raise ValueError(f"Spans {left.start}:{left.end} and {right.start}:{right.end} are not consecutive")
        layers = nn.ModuleList([layer for part in parts for layer in part.layers])
        return BlockSpan(parts[0].config, parts[0].start, layers, parts[0].rotary_emb).eval()

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
        self, steps: Sequence[PackedStep], *, start: Optional[int] = None, end: Optional[int] = None
    ) -> list[torch.Tensor]:
        """Run blocks ``start..end-1`` on the steps of several sessions at once (their caches must cover these
        blocks); returns each step's output, as if each had run alone."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        batch = PackedBatch(steps)
        hidden_states = batch.pack([step.hidden for step in steps])
        position_ids = batch.position_ids(hidden_states.device)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers[start - self.start : end - self.start]:
            out = layer(
                hidden_states,
                attention_mask=None,  # each step's mask is made where it attends (PackedBatch.attend)
                position_ids=position_ids,
                cache=batch,
                use_cache=True,
                position_embeddings=position_embeddings,
                **{ATTENTION_KWARG: batch},
            )
            hidden_states = out[0] if isinstance(out, tuple) else out
        return batch.unpack(hidden_states)


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
        """Build blocks ``start..end-1`` reading only their tensors (memory-mapped by ``read``), one block at a time.

        The tensors load as transformers' ``from_pretrained`` loads them, through the family's checkpoint
        conversions: transformers 5 renames some checkpoint tensors and fuses others (a MoE layer's experts, stored
        one by one, run as one tensor), so a checkpoint's names need not be its modules' names. They load into a
        skeleton of the base model on the meta device (nothing allocated) of which only these blocks get weights.
        """
        all_names = list(all_names)
        # The blocks attend through the packed implementation, which runs this family's own attention per step.
        block_config = copy.deepcopy(self.config)
        block_config._attn_implementation = packed_attention(self.config._attn_implementation)
        with torch.device("meta"):
            skeleton = self.base_model_class(block_config)
        skeleton.to(dtype)  # the dtype each weight loads in
        conversions = get_model_conversion_mapping(skeleton)
        for index in range(start, end):
            tensors = read(self.block_tensor_names(all_names, index))
            info = _load_converted(skeleton, tensors, conversions, dtype, device)
            still_meta = [n for n, p in skeleton.layers[index].named_parameters() if p.is_meta]
            problems = [f"missing weights {still_meta}"] if still_meta else []
            if info.unexpected_keys:
                problems.append(f"unexpected {sorted(info.unexpected_keys)}")
            for name, got, wanted in sorted(info.mismatched_keys):
                problems.append(f"{name} has shape {tuple(got)}, not {tuple(wanted)}")
            if info.conversion_errors:
                problems.append(f"cannot convert {info.conversion_errors}")
            if problems:
                raise ValueError(f"Block {index}: " + "; ".join(problems))
        layers = nn.ModuleList(layer.eval() for layer in skeleton.layers[start:end])
        rotary = self.rotary_class(config=self.config).to(device)
        return BlockSpan(block_config, start, layers, rotary).eval()


def _load_converted(
    skeleton: nn.Module, tensors: Mapping[str, torch.Tensor], conversions: list, dtype: torch.dtype, device
) -> LoadStateDictInfo:
    """Load checkpoint ``tensors`` into ``skeleton`` the way ``from_pretrained`` does (renamed, fused, cast, placed)."""
    load_config = LoadStateDictConfig(device_map={"": device}, dtype=dtype, weight_mapping=conversions)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per block would flood the log; join shows its own progress
    try:
        info, _ = convert_and_load_state_dict_in_model(skeleton, dict(tensors), load_config)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return info


_ADAPTERS: dict[str, type[FamilyAdapter]] = {}


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for ``config``'s family (the one mapping from family to block code)."""
    return _ADAPTERS.get(config.model_type, FamilyAdapter)(config)
