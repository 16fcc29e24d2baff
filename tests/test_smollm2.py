"""The embedded SmolLM2-135M-Instruct, split over three real servers, chats exactly like local transformers."""

from __future__ import annotations

import pytest
import torch

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.cli.chat import ChatSession
from molink_swarm.models import DEFAULT_MODEL_ALIAS
from tests.conftest import local_answer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def distributed(module_swarm, smollm2):
    swarm = module_swarm(DEFAULT_MODEL_ALIAS, ["0:10", "10:20", "20:30"])
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL_ALIAS, initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()


def test_greedy_chat_answer_is_token_identical(distributed, smollm2):
    _source, tokenizer, local = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = local.generate(ids, **kwargs)
    got = distributed.generate(ids, **kwargs)
    assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
    assert "Paris" in tokenizer.decode(got[0, ids.shape[1] :], skip_special_tokens=True)


def test_two_turn_chat_keeps_the_cache_and_matches_local(distributed, smollm2):
    _source, tokenizer, local = smollm2
    chat = ChatSession(distributed, tokenizer, max_length=512)
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        first = chat.reply(messages, max_new_tokens=32)
        assert first == local_answer(local, tokenizer, messages)
        session = chat._session
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
        second = chat.reply(messages, max_new_tokens=32)
        assert second == local_answer(local, tokenizer, messages)
        assert chat._session is session  # the same session went on: only the new turn was sent
    finally:
        chat.close()


def test_a_long_answer_in_one_session_is_token_identical_without_failover(distributed, smollm2):
    """200 greedy tokens, forwarded server to server over three hops (a long chat answer)."""
    _source, tokenizer, local = smollm2
    messages = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    kwargs = dict(max_new_tokens=200, min_new_tokens=200, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = local.generate(ids, **kwargs)
    with distributed.inference_session(max_length=ids.shape[1] + 200) as session:
        got = distributed.generate(ids, **kwargs)
        assert session.failovers == 0
        assert len(session.chain) == 3
    assert got.shape[1] == ids.shape[1] + 200
    assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
