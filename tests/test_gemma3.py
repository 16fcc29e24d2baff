"""Gemma 3 270M, the second real model (sliding and full layers, a rotary table each, scaled embeddings), split over
two real servers, answers exactly like local transformers on the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.models import GEMMA3_ALIAS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def distributed(module_swarm, gemma3):
    swarm = module_swarm(GEMMA3_ALIAS, ["0:9", "9:18"])
    model = AutoDistributedModelForCausalLM.from_pretrained(GEMMA3_ALIAS, initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """The packaged GGUF is the base model (no chat template): plain text it continues."""
    return tokenizer(text, return_tensors="pt").input_ids


def test_the_model_has_eighteen_blocks_of_the_gemma3_family(gemma3):
    _source, _tokenizer, local = gemma3
    assert local.config.model_type == "gemma3_text" and local.config.num_hidden_layers == 18
    assert set(local.config.layer_types) == {"sliding_attention", "full_attention"}


def test_greedy_answer_is_token_identical(distributed, gemma3):
    _source, tokenizer, local = gemma3
    ids = text_ids(tokenizer, "The Eiffel Tower is located in the city of")
    kwargs = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = local.generate(ids, **kwargs)
    with distributed.inference_session(max_length=ids.shape[1] + 24) as session:
        got = distributed.generate(ids, **kwargs)
        assert session.failovers == 0
    assert torch.equal(got.sequences, expected.sequences), (
        tokenizer.decode(got.sequences[0]), tokenizer.decode(expected.sequences[0])
    )
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-3, rtol=1e-4)
    assert "Paris" in tokenizer.decode(got.sequences[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_prompt_longer_than_the_sliding_window_matches_local(distributed, gemma3):
    """Past the sliding window (512 tokens) its sliding layers see less than its full ones."""
    _source, tokenizer, local = gemma3
    window = local.config.sliding_window
    text = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(window // 4)) + " Which item is first?"
    ids = text_ids(tokenizer, text)
    assert ids.shape[1] > window
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = local.generate(ids, **kwargs)
    with distributed.inference_session(max_length=ids.shape[1] + 6) as session:
        got = distributed.generate(ids, **kwargs)
        assert session.failovers == 0
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-3, rtol=1e-4)
