"""Making the tokenizer that transformers exports from a GGUF agree with the GGUF's own metadata."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def repair_gguf_tokenizer(tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any]) -> PreTrainedTokenizerBase:
    """Make the tokenizer agree with the GGUF metadata, which transformers' GGUF export has got wrong (4.57 did).

    It sets eos to the bos token (so generation would not stop at ``<|im_end|>``), always prepends bos, and for
    byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``, e.g. SmolLM2) adds SentencePiece decoding
    steps and drops SmolLM's one-digit-per-token split. Prompts must tokenize like the original model's.
    """
    specials: dict[str, str] = {}
    for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            specials[role] = str(tokenizer.convert_ids_to_tokens(token_id))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if meta.get("tokenizer.ggml.model") != "gpt2":
        for role, token in specials.items():
            setattr(tokenizer, role, token)
        return tokenizer

    from tokenizers import Tokenizer
    from transformers import GPT2TokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    state["normalizer"] = None
    if meta.get("tokenizer.ggml.pre") == "smollm":
        digits = {"type": "Digits", "individual_digits": True}
        state["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    else:
        state["pre_tokenizer"] = byte_level
    state["decoder"] = {**byte_level, "add_prefix_space": True}
    state["model"]["byte_fallback"] = False
    state["post_processor"] = _post_processor(specials, add_bos, add_eos, tokenizer)

    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length")
    repaired = GPT2TokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        add_prefix_space=False,
        add_bos_token=add_bos,
        chat_template=tokenizer.chat_template,
        **specials,
        **({"model_max_length": int(context)} if isinstance(context, int) else {}),
    )
    return repaired


def _post_processor(
    specials: dict[str, str], add_bos: bool, add_eos: bool, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """tokenizers' post-processor JSON that adds bos/eos exactly when the GGUF asks for it."""
    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    prefix = [bos] if add_bos and bos else []
    suffix = [eos] if add_eos and eos else []
    if not prefix and not suffix:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}

    def special(token: str, type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": token, "type_id": type_id}}

    def sequence(seq: str, type_id: int) -> list[dict[str, Any]]:
        body = {"Sequence": {"id": seq, "type_id": type_id}}
        return [special(t, type_id) for t in prefix] + [body] + [special(t, type_id) for t in suffix]

    used = prefix + suffix
    return {
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": sequence("A", 0) + sequence("B", 1),
        "special_tokens": {t: {"id": t, "ids": [tokenizer.convert_tokens_to_ids(t)], "tokens": [t]} for t in used},
    }
