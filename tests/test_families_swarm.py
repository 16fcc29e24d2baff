"""Families other than Llama through real server processes: each tiny model split over two servers gives what local
transformers gives (tests/test_generate_tiny.py does Llama; tests/test_families.py every family in-process).

One per kind of block: sliding and full layers with soft caps (gemma2), a rotary table per layer type (gemma3_text),
Falcon's and Bloom's own attention run one step at a time (ALiBi), learned positions added by the client (gpt2), MoE
(qwen3_moe), cached latents (deepseek_v3).
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from transformers import AutoModelForCausalLM

from molink_swarm import AutoDistributedModelForCausalLM
from tests.conftest import _swarm_factory
from tests.test_families import prompt, saved
from tests.test_generate_tiny import assert_batched_since, batch_totals

FAMILIES = ["gemma2", "gemma3_text", "falcon-alibi", "bloom", "gpt2", "qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("swarm-families")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, models_dir):
    """(name, swarm, distributed model, local model) of one family over two server processes (stopped before the
    next family's start)."""
    path = saved(request.param, models_dir)
    logs = models_dir / f"logs-{request.param}"
    logs.mkdir()
    for start in _swarm_factory(logs):
        swarm = start(path, ["0:2", "2:4"], "--metrics-port", "0", "--chunk-tokens", "64")
        distributed = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield request.param, swarm, distributed, local
        distributed.shutdown()


def greedy(model, ids, new_tokens):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return model.generate(ids, **kwargs, output_logits=True, return_dict_in_generate=True)


def test_greedy_generation_over_two_servers_equals_local(family):
    _name, _swarm, distributed, local = family
    ids = prompt(11, seed=3)
    with distributed.inference_session(max_length=ids.shape[1] + 16) as session:
        got = greedy(distributed, ids, 16)
        assert session.failovers == 0
    want = greedy(local, ids, 16)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=0)


def test_a_session_continues_where_it_left_off(family):
    """The second turn's tokens sit after the first's on the servers (positions, windows, learned embeddings)."""
    _name, _swarm, distributed, local = family
    first, second = prompt(9, seed=4), prompt(5, seed=5)
    with distributed.inference_session(max_length=64):
        out1 = distributed.generate(first, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        out2 = distributed.generate(second, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected1 = local.generate(first, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected2 = local.generate(torch.cat([expected1, second], dim=1), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out1, expected1) and torch.equal(out2, expected2)


def test_concurrent_sessions_are_batched_and_equal_alone(family):
    """Sessions of different lengths at once share the servers' passes (packed, or one step after the other for
    Falcon, Bloom and DeepSeek V3) and each gets what it gets alone."""
    name, swarm, distributed, local = family
    if name not in ("gemma2", "bloom"):  # a sliding-window family and an ALiBi one; the rest do it in-process
        pytest.skip("checked in-process for this family (tests/test_families.py)")
    before = batch_totals(swarm.servers)
    jobs = [(prompt(3 + 4 * i, seed=20 + i), 8 + 2 * (i % 3)) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(lambda job: greedy(distributed, *job), jobs))
    for (ids, new_tokens), got in zip(jobs, outputs):
        want = greedy(local, ids, new_tokens)
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=0)
    assert_batched_since(swarm.servers, before)
