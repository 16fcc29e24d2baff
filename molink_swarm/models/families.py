"""The model families molink-swarm serves and how each one differs from the Llama layout: the one registry.

A family is data (:class:`Family`): where its decoder layers live, how they learn token positions (``blocks``, the
name of the code that calls them on a server, see blocks.py), and the small steps the client runs before the first
block (:attr:`Family.embed`: scales, projections, learned position embeddings) and after the last one
(:attr:`Family.head`: final norm, LM head, soft caps and scales of the logits). Everything that is not listed here
is the family's own transformers code, run as is: its embedding module (Gemma's scales by sqrt(hidden_size)), its
decoder layers, its attention (softcaps, sliding windows per layer type).

This module loads neither torch nor transformers (the steps use the tensors they are given), so that
``molink-swarm join --help`` and the README can list the families from it without waiting for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from molink_swarm.errors import UserError


class UnsupportedModelError(UserError):
    pass


def submodule(root: Any, path: str) -> Any:
    """``root.a.b`` for ``path`` "a.b"; None where a part is missing or None (an optional module, like OPT's
    projections)."""
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


# ---- steps the client runs: each takes the client model (the family's *ForCausalLM without layers)


@dataclasses.dataclass(frozen=True)
class ScaleBy:
    """Multiply by the config value ``attr`` (Granite's embedding_multiplier, Cohere's logit_scale)."""

    attr: str

    def __call__(self, model, hidden, positions=None):
        value = getattr(model.config, self.attr, None)
        return hidden if value is None else hidden * value


@dataclasses.dataclass(frozen=True)
class DivideBy:
    """Divide by the config value ``attr`` (Granite's logits_scaling)."""

    attr: str

    def __call__(self, model, hidden, positions=None):
        value = getattr(model.config, self.attr, None)
        return hidden if value is None else hidden / value


@dataclasses.dataclass(frozen=True)
class SoftCap:
    """``tanh(x / cap) * cap`` with the config value ``attr`` as the cap, if set (Gemma 2 and 3's final logits)."""

    attr: str

    def __call__(self, model, logits, positions=None):
        cap = getattr(model.config, self.attr, None)
        return logits if cap is None else (logits / cap).tanh() * cap


@dataclasses.dataclass(frozen=True)
class Submodule:
    """The base model's module at ``path`` (a final norm, a projection); skipped where the config has none."""

    path: str

    def __call__(self, model, hidden, positions=None):
        module = submodule(model.base_model, self.path)
        return hidden if module is None else module(hidden)


@dataclasses.dataclass(frozen=True)
class LearnedPositions:
    """Add the learned position embedding at ``path`` of each token's position (GPT-2's wpe; OPT's table starts
    ``offset`` rows in)."""

    path: str
    offset: int = 0

    def __call__(self, model, hidden, positions):
        table = submodule(model.base_model, self.path)
        return hidden + table.weight[positions + self.offset].to(hidden.dtype)


# On a CPU, the LM head of several rows runs over slices of this many vocabulary entries at a time: a matmul of a few
# rows over a whole vocabulary writes an output too wide for the caches, and ran 20-30% slower than over slices (MKL,
# 16 rows x 49152 x 576 in float32: 19.5 -> 14 ms on this project's 2-core machine). One row gains nothing from it.
HEAD_SLICE = 2048


@dataclasses.dataclass(frozen=True)
class LmHead:
    """The LM head (the family's output embeddings)."""

    def __call__(self, model, hidden, positions=None):
        import torch
        from torch.nn import functional

        head = model.get_output_embeddings()
        rows = hidden.numel() // hidden.shape[-1]
        if type(head) is not torch.nn.Linear or hidden.device.type != "cpu" or rows < 2 or head.out_features <= HEAD_SLICE:
            return head(hidden)
        weights = head.weight.split(HEAD_SLICE)
        biases = head.bias.split(HEAD_SLICE) if head.bias is not None else [None] * len(weights)
        return torch.cat([functional.linear(hidden, w, b) for w, b in zip(weights, biases)], dim=-1)


# ---- the families


@dataclasses.dataclass(frozen=True)
class Family:
    """How a family is cut into blocks and what the client runs around them."""

    model_type: str
    # The decoder layers, in the base model (``model.layers`` is "layers" in LlamaModel).
    layers: str = "layers"
    # How a server calls them (blocks.py): "rotary" (model-level rotary embeddings, attention through transformers'
    # attention interface, packed), "rotary_by_layer_type" (one rotary table per layer type), "plain" (positions
    # were added by the client); one step at a time: "alibi_bloom", "falcon" (their own attention code),
    # "rotary_stepwise" (a cache of something else than keys and values).
    blocks: str = "rotary"
    # The keyword under which layers take their cache.
    cache_kwarg: str = "cache"
    # After the input embedding module, before the first block.
    embed: tuple = ()
    # After the last block: the logits.
    head: tuple = (Submodule("norm"), LmHead())
    # What the listing says besides the name.
    note: str = ""

    def embed_inputs(self, model, input_ids=None, position: int = 0, inputs_embeds=None):
        """What the first block takes for ``input_ids`` (or for token embeddings ``inputs_embeds``) at positions
        ``position``, ``position + 1``, ... (the tokens the servers already hold come before)."""
        hidden = model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        if not self.embed:
            return hidden
        import torch

        positions = torch.arange(position, position + hidden.shape[1], device=hidden.device)
        for step in self.embed:
            hidden = step(model, hidden, positions)
        return hidden

    def logits(self, model, hidden):
        """Logits for the last block's output, as the family's own forward() computes them."""
        for step in self.head:
            hidden = step(model, hidden)
        return hidden



def _with(head_step, head: tuple = (Submodule("norm"), LmHead())) -> tuple:
    return (*head, head_step)


FAMILIES: tuple[Family, ...] = (
    Family("llama"),
    Family("mistral", note="sliding window"),
    Family("mixtral", note="MoE"),
    Family("qwen2", note="sliding window on some layers"),
    Family("qwen2_moe", note="MoE"),
    Family("qwen3"),
    Family("qwen3_moe", note="MoE"),
    Family("gemma", note="embeddings scaled by sqrt(hidden_size)"),
    Family("gemma2", head=_with(SoftCap("final_logit_softcapping")), note="sliding and full layers, soft caps"),
    Family(
        "gemma3_text",
        blocks="rotary_by_layer_type",
        head=_with(SoftCap("final_logit_softcapping")),
        note="sliding and full layers, a rotary table each",
    ),
    Family("phi", head=(Submodule("final_layernorm"), LmHead())),
    Family("phi3"),
    Family(
        "falcon",
        layers="h",
        blocks="falcon",
        cache_kwarg="layer_past",
        head=(Submodule("ln_f"), LmHead()),
        note="rotary or ALiBi; batched steps run one after the other",
    ),
    Family(
        "bloom",
        layers="h",
        blocks="alibi_bloom",
        cache_kwarg="layer_past",
        embed=(Submodule("word_embeddings_layernorm"),),
        head=(Submodule("ln_f"), LmHead()),
        note="ALiBi; batched steps run one after the other",
    ),
    Family(
        "gpt2",
        layers="h",
        blocks="plain",
        embed=(LearnedPositions("wpe"),),
        head=(Submodule("ln_f"), LmHead()),
        note="learned positions",
    ),
    Family("gpt_neox", cache_kwarg="layer_past", head=(Submodule("final_layer_norm"), LmHead())),
    Family(
        "opt",
        layers="decoder.layers",
        blocks="plain",
        embed=(Submodule("decoder.project_in"), LearnedPositions("decoder.embed_positions", offset=2)),
        head=(Submodule("decoder.final_layer_norm"), Submodule("decoder.project_out"), LmHead()),
        note="learned positions",
    ),
    Family("stablelm"),
    Family("starcoder2"),
    Family("cohere", head=_with(ScaleBy("logit_scale")), note="scaled logits"),
    Family("olmo2"),
    Family(
        "granite",
        embed=(ScaleBy("embedding_multiplier"),),
        head=_with(DivideBy("logits_scaling")),
        note="scaled embeddings and logits",
    ),
    Family("deepseek_v3", blocks="rotary_stepwise", note="MLA attention, MoE; batched steps run one after the other"),
    # Llama-layout relatives (and their own last touches).
    Family("olmo"),
    Family("olmo3", blocks="rotary_by_layer_type", note="sliding and full layers, a rotary table each"),
    Family("glm"),
    Family("glm4"),
    Family("helium"),
    Family("smollm3"),
    Family("cohere2", head=_with(ScaleBy("logit_scale")), note="sliding and full layers, scaled logits"),
    Family(
        "granitemoe",
        embed=(ScaleBy("embedding_multiplier"),),
        head=_with(DivideBy("logits_scaling")),
        note="MoE, scaled embeddings and logits",
    ),
    Family("phimoe", note="MoE"),
    Family("ministral", note="sliding and full layers"),
    Family("exaone4", note="sliding and full layers"),
    Family("apertus"),
    Family("arcee"),
    Family("seed_oss"),
    Family("hunyuan_v1_dense"),
    Family("ernie4_5"),
    Family("nemotron"),
    Family("persimmon", head=(Submodule("final_layernorm"), LmHead())),
)

_BY_TYPE = {family.model_type: family for family in FAMILIES}


def supported_families() -> Sequence[Family]:
    return FAMILIES


def names() -> str:
    """The supported families' model types, in one line (``join --help``, error messages)."""
    return ", ".join(family.model_type for family in FAMILIES)


def listing() -> str:
    """The supported families as the README lists them (``python -m molink_swarm.models.families`` prints it)."""
    return "\n".join(f"- `{f.model_type}`" + (f": {f.note}" if f.note else "") for f in FAMILIES)


def family_for(config) -> Family:
    """The family of a transformers config; a clear error for the ones molink-swarm cannot serve."""
    model_type = getattr(config, "model_type", None)
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"Model type {model_type!r} is not supported by molink-swarm; supported families: {names()}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"This {model_type} model attends both ways (use_bidirectional_attention): it is an embedding model, "
            "not a causal LM; molink-swarm serves causal LMs"
        )
    return family


if __name__ == "__main__":
    print(listing())
