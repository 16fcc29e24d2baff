"""How a model family is cut into blocks on a server: the adapter over the registry (families.py).

A *block* is one decoder layer. A server runs a contiguous span of blocks on hidden states; the client keeps
what comes before the first block (embeddings) and after the last (final norm, LM head). What differs between
families is data in families.py (where the layers are, how they learn positions, the client's steps around them);
this module turns it into blocks read from a checkpoint, and blocks.py runs them.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging
from transformers.utils.loading_report import LoadStateDictInfo

from molink_swarm.models.blocks import (
    BlockSpan,
    BloomLayers,
    FalconLayers,
    LayerRunner,
    PlainLayers,
    RotaryByLayerTypeLayers,
    RotaryLayers,
    RotaryStepwiseLayers,
)
from molink_swarm.models.families import Family, UnsupportedModelError, family_for, submodule
from molink_swarm.models.packed import packed_attention

__all__ = ["BlockSpan", "FamilyAdapter", "UnsupportedModelError", "adapter_for"]

logger = logging.getLogger(__name__)

TensorReader = Callable[[Iterable[str]], Mapping[str, torch.Tensor]]


class FamilyAdapter:
    """Builds a family's blocks from a checkpoint, reading only their tensors; runs them as the family's own model
    would (see blocks.py for how its layers are called)."""

    def __init__(self, config: PretrainedConfig, family: Family):
        self.config = config
        self.family = family
        try:
            self.base_model_class = AutoModel._model_mapping[type(config)]
        except KeyError:
            raise UnsupportedModelError(
                f"Model type {config.model_type!r} is not supported by this transformers version"
            ) from None
        if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            # What transformers picks when it loads a model itself (Gemma 2 has no sdpa: its soft caps need eager):
            # the same kernels give the same numbers. (Flash and flex kernels take packed sequences their own way.)
            config._attn_implementation = "sdpa" if getattr(self.base_model_class, "_supports_sdpa", False) else "eager"
        if family.blocks not in _RUNNERS:
            raise UnsupportedModelError(f"Model type {config.model_type!r}: no way to run blocks {family.blocks!r}")

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    def block_tensor_names(self, all_names: Iterable[str], index: int) -> list[str]:
        """Block ``index``'s tensors: ``<base prefix>.<layers>.<index>.*`` (checkpoints of the base model alone,
        like GPT-2's, leave the base prefix out)."""
        layer = f"{self.family.layers}.{index}."
        prefixes = (f"{self.base_model_class.base_model_prefix}.{layer}", layer)
        return [name for name in all_names if name.startswith(prefixes)]

    def is_layer_tensor(self, name: str) -> bool:
        """A tensor of the layer list (any layer, also ones past the blocks, like multi-token prediction heads)."""
        layers = f"{self.family.layers}."
        return name.startswith((f"{self.base_model_class.base_model_prefix}.{layers}", layers))

    def client_config(self) -> PretrainedConfig:
        """The config the client's model is built with: the same model without layers (embeddings, final norm, LM
        head only)."""
        config = copy.deepcopy(self.config)
        config.num_hidden_layers = 0
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = []
        return config

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
        runner_class = _RUNNERS[self.family.blocks]
        block_config = copy.deepcopy(self.config)
        if runner_class.packed:
            # The blocks attend through the packed implementation, which runs this family's own attention per step.
            block_config._attn_implementation = packed_attention(self.config._attn_implementation)
        with torch.device("meta"):
            skeleton = self.base_model_class(block_config)
        skeleton.to(dtype)  # the dtype each weight loads in
        all_layers = submodule(skeleton, self.family.layers)
        conversions = get_model_conversion_mapping(skeleton)
        for index in range(start, end):
            tensors = read(self.block_tensor_names(all_names, index))
            info = _load_converted(skeleton, tensors, conversions, dtype, device)
            still_meta = [n for n, p in all_layers[index].named_parameters() if p.is_meta]
            problems = [f"missing weights {still_meta}"] if still_meta else []
            if info.unexpected_keys:
                problems.append(f"unexpected {sorted(info.unexpected_keys)}")
            for name, got, wanted in sorted(info.mismatched_keys):
                problems.append(f"{name} has shape {tuple(got)}, not {tuple(wanted)}")
            if info.conversion_errors:
                problems.append(f"cannot convert {info.conversion_errors}")
            if problems:
                raise ValueError(f"Block {index}: " + "; ".join(problems))
        layers = nn.ModuleList(layer.eval() for layer in all_layers[start:end])
        extra = {"rotary": type(skeleton.rotary_emb)(config=self.config).to(device)} if runner_class.needs_rotary else {}
        runner = runner_class(block_config, self.family.cache_kwarg, **extra)
        return BlockSpan(block_config, start, layers, runner).eval()


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


# How each Family.blocks is run (blocks.py).
_RUNNERS: dict[str, type[LayerRunner]] = {
    "rotary": RotaryLayers,
    "rotary_by_layer_type": RotaryByLayerTypeLayers,
    "plain": PlainLayers,
    "alibi_bloom": BloomLayers,
    "falcon": FalconLayers,
    "rotary_stepwise": RotaryStepwiseLayers,
}


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for ``config``'s family; a clear error for families molink-swarm cannot serve."""
    return FamilyAdapter(config, family_for(config))
