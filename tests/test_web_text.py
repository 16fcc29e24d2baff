"""Streaming text from token ids (web/engine.py): whole characters only, stop strings never shown."""

from __future__ import annotations

import pytest

from molink_swarm.web.engine import TextAssembler, TokenOffsets

pytestmark = pytest.mark.slow  # needs the real SmolLM2 tokenizer (converted once per machine)


def stream(tokenizer, text: str, stop=()) -> tuple[list[str], TextAssembler]:
    assembler = TextAssembler(tokenizer, stop)
    pieces = [assembler.add([token]) for token in tokenizer(text)["input_ids"]]
    pieces.append(assembler.finish())
    return pieces, assembler


def test_pieces_add_up_to_the_text_and_never_split_a_character(smollm2):
    tokenizer = smollm2[1]
    text = "Un café ☕ à Tōkyō 日本語 🐉 ok"
    pieces, _ = stream(tokenizer, text)
    assert "".join(pieces) == tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for p in pieces if p) > 5


def test_a_stop_string_spanning_tokens_is_cut_and_never_shown(smollm2):
    tokenizer = smollm2[1]
    pieces, assembler = stream(tokenizer, "The capital of France is Paris. It is big.", stop=["Paris"])
    assert "".join(pieces) == "The capital of France is "
    assert assembler.stopped
    assert not any("Par" in piece for piece in pieces)


def test_text_held_back_for_a_possible_stop_string_is_released(smollm2):
    tokenizer = smollm2[1]
    text = "Pasta and Pancakes and Pa"
    pieces, assembler = stream(tokenizer, text, stop=["Pan!", "Paris"])
    assert "".join(pieces) == text
    assert not assembler.stopped


def test_token_offsets_found_incrementally_agree_with_the_tokenizers_own(smollm2):
    tokenizer = smollm2[1]
    text = "Un café ☕ à Tōkyō 日本語 🐉 ok. The end."
    encoded = tokenizer(text, return_offsets_mapping=True)
    offsets = TokenOffsets(tokenizer)
    assert [offsets.add(token) for token in encoded["input_ids"]] == [start for start, _ in encoded["offset_mapping"]]
    assert offsets.text == text and offsets.length == len(text)
