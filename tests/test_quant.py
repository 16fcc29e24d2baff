"""Quantized blocks (``join --quant int8|nf4``, models/quant.py): the memory they take, how close their output stays to
the unquantized blocks', the layouts of other families (fused MoE experts, GPT-2's Conv1D), and a real swarm of int8
servers whose output matches local, which no client ever mixes with unquantized servers.

Tolerances, on tiny random Llamas (hidden size 64, 6 blocks) against the same blocks unquantized: the relative error
of the logits (``||quantized - none|| / ||none||``) stays under 3% for int8 (weights within 1% each) and 35% for nf4
(within ~9% each: 4 bits); the greedy token at each position (teacher-forced) is the same for at least 85% (int8) and
55% (nf4) of positions. A random model's logits are nearly flat, so these are loose; the SmolLM2 test and
benchmarks/bench_quant.py measure a real model.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.cli.status import describe_weights
from molink_swarm.client.loop import run_sync
from molink_swarm.client.status import swarm_snapshot
from molink_swarm.models import quant
from molink_swarm.models.family import adapter_for
from molink_swarm.models.quant import (
    NF4_LEVELS,
    Int8Weight,
    Nf4Weight,
    QuantizedLinear,
    build_quantized,
    module_bytes,
    quantize_blocks,
    quantized_digest,
)
from molink_swarm.server.rebalancing import block_bytes
from tests.conftest import make_tiny_llama

RELATIVE_ERROR = {"int8": 0.03, "nf4": 0.35}
SAME_TOKEN = {"int8": 0.85, "nf4": 0.55}
MEMORY_RATIO = {"int8": (0.25, 0.27), "nf4": (0.125, 0.15)}  # of float32; norms stay float32


def tokens(seed: int = 0, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(seed))


def build(model, mode: str, start: int = 0, end: int | None = None):
    """The blocks a server builds from ``model``'s weights with ``--quant mode`` (one block at a time, quantized)."""
    adapter = adapter_for(AutoConfig.for_model(**model.config.to_dict()))
    state = model.state_dict()
    end = adapter.num_blocks if end is None else end

    def build_span(first: int, last: int):
        return adapter.build_blocks(first, last, state.keys(), lambda names: {n: state[n] for n in names}, dtype=torch.float32)

    return build_quantized(build_span, start, end, mode)


def logits(model, blocks, ids: torch.Tensor) -> torch.Tensor:
    """What a client computes around the blocks: embeddings, then the blocks, then the final norm and head."""
    with torch.inference_mode():
        hidden = blocks(model.model.embed_tokens(ids))
        return model.lm_head(model.model.norm(hidden))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def llama():
    return make_tiny_llama(seed=1)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_blocks_take_a_quarter_or_an_eighth_of_the_memory(llama, mode):
    full, quantized = build(llama, "none"), build(llama, mode)

    ratio = module_bytes(quantized) / module_bytes(full)

    low, high = MEMORY_RATIO[mode]
    assert low <= ratio <= high, ratio
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_logits_stay_close_to_unquantized(llama, mode):
    ids = tokens()
    expected, got = logits(llama, build(llama, "none"), ids), logits(llama, build(llama, mode), ids)

    assert relative_error(got, expected) < RELATIVE_ERROR[mode]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= SAME_TOKEN[mode]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_decode_steps_with_a_cache_match_a_full_pass_of_the_quantized_blocks(llama, mode):
    blocks, hidden = build(llama, mode), torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    full = blocks(hidden)  # 12 rows: int8 runs the kernel, as for the decode steps

    cache = blocks.new_cache()
    steps = [blocks(hidden[:, :4], cache=cache)] + [blocks(hidden[:, i : i + 1], position=i, cache=cache) for i in range(4, 12)]

    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_int8_kernel_for_decode_steps_agrees_with_the_dense_path_for_prompts():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    layer = QuantizedLinear(linear.weight, linear.bias, "int8")
    x = torch.randn(64, 256)

    dense = layer(x)  # 64 rows: the dequantized weight and the dense matmul
    for rows in (1, 4, quant.INT8_KERNEL_MAX_ROWS):
        torch.testing.assert_close(layer(x[:rows]), dense[:rows], rtol=2e-2, atol=2e-2)  # activations in bfloat16
    assert (dense - linear(x)).abs().max() < 0.02 * linear(x).abs().max()


def test_int8_takes_activations_at_any_address():
    # torch's CPU kernel loads rows with aligned vector loads: a misaligned bfloat16 tensor (as one read from the wire
    # may be) would crash the process.
    torch.manual_seed(0)
    layer = QuantizedLinear(torch.randn(64, 576), None, "int8")
    misaligned = torch.randn(2000).bfloat16()[1:577].reshape(1, 576)

    assert misaligned.data_ptr() % 16
    torch.testing.assert_close(layer(misaligned), layer(misaligned.clone()))


def test_int8_keeps_one_scale_per_row_and_nf4_picks_the_nearest_level():
    torch.manual_seed(0)
    weight = torch.randn(8, 96)

    int8 = Int8Weight(weight)
    assert int8.qweight.dtype == torch.int8 and int8.scale.shape == (8,)
    assert ((int8.dequantize() - weight).abs() <= int8.scale[:, None] / 2 + 1e-6).all()

    nf4 = Nf4Weight(weight)
    assert nf4.packed.dtype == torch.uint8 and nf4.packed.numel() == weight.numel() // 2  # two codes per byte
    assert nf4.absmax.numel() == weight.numel() // quant.NF4_BLOCK
    blocks, absmax = weight.reshape(-1, quant.NF4_BLOCK), nf4.absmax.float().reshape(-1, 1)
    levels = torch.tensor(NF4_LEVELS)
    nearest = levels[(blocks[..., None] / absmax[..., None] - levels).abs().argmin(-1)] * absmax
    torch.testing.assert_close(nf4.dequantize().reshape(-1, quant.NF4_BLOCK), nearest)


def test_an_nf4_weight_of_any_size_and_an_expert_of_a_3d_weight_come_back_whole():
    torch.manual_seed(0)
    odd = torch.randn(5, 13)  # 65 values: not a whole number of blocks
    assert relative_error(Nf4Weight(odd).dequantize(), odd) < 0.15

    experts = torch.randn(4, 6, 40)
    quantized = Nf4Weight(experts)
    for index in (2, torch.tensor(3), torch.tensor([0, 3])):
        assert quantized[index].shape == experts[index].shape
        assert relative_error(quantized[index], experts[index]) < 0.15
    assert relative_error(Int8Weight(experts)[torch.tensor(1)], experts[1]) < 0.02


MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
}


@pytest.mark.parametrize("family", sorted(MOE))
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_fused_moe_experts_are_quantized_and_routers_kept(family, mode):
    config = AutoConfig.for_model(
        family, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **MOE[family],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = tokens(length=12)
    with torch.inference_mode():
        expected = model(ids).logits

    quantized = copy.deepcopy(model)
    report = quantize_blocks(quantized.model.layers, mode)
    with torch.inference_mode():
        got = quantized(ids).logits

    assert report.experts == 2 * 2 and not report.kept  # gate_up_proj and down_proj of each block
    assert report.bytes_after < (0.3 if mode == "int8" else 0.17) * report.bytes_before
    routers = [name for name, m in quantized.model.layers.named_modules() if name.endswith(("mlp.gate", "shared_expert_gate"))]
    assert routers and all(not isinstance(m, QuantizedLinear) for n, m in quantized.model.layers.named_modules() if n in routers)
    assert relative_error(got, expected) < RELATIVE_ERROR[mode]


def test_gpt2_conv1d_layers_are_quantized():
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = tokens(length=12)
    with torch.inference_mode():
        expected = model(ids).logits

    report = quantize_blocks(model.transformer.h, "int8")
    with torch.inference_mode():
        got = model(ids).logits

    assert report.linears == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj
    assert relative_error(got, expected) < RELATIVE_ERROR["int8"]


def test_the_quantization_is_part_of_each_block_digest():
    digest = "0123456789abcdef"

    assert quantized_digest(digest, "none") == digest
    assert len({digest, quantized_digest(digest, "int8"), quantized_digest(digest, "nf4")}) == 3
    assert quantized_digest(digest, "int8") == quantized_digest(digest, "int8")
    assert quantized_digest("fedcba9876543210", "int8") != quantized_digest(digest, "int8")
    with pytest.raises(ValueError, match="int4"):
        quantized_digest(digest, "int4")


def test_quantized_blocks_leave_room_for_more_blocks(llama):
    plain = block_bytes(llama.config, 4, cache_tokens=1000)
    int8 = block_bytes(llama.config, 4, cache_tokens=1000, weight_bytes=quant.bytes_per_weight("int8", 4))
    nf4 = block_bytes(llama.config, 4, cache_tokens=1000, weight_bytes=quant.bytes_per_weight("nf4", 4))

    assert nf4 < int8 < plain
    assert block_bytes(llama.config, 4, cache_tokens=0, weight_bytes=quant.bytes_per_weight("int8", 4)) < plain / 3.9


# --- the real default model ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_smollm2_quantized_answers_like_unquantized(smollm2, mode):
    """SmolLM2-135M (a 4-bit GGUF model to begin with) is sensitive: int8 and nf4 add their error to Q4_1's."""
    source, tokenizer, local = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence, then name three rivers."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=False,
    )
    with torch.inference_mode():
        greedy = local.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected = local(greedy).logits
    quantized = copy.deepcopy(local)
    quantize_blocks(quantized.model.layers, mode)
    with torch.inference_mode():
        got = quantized(greedy).logits

    answer = slice(ids.shape[1] - 1, -1)
    same = (got[0, answer].argmax(-1) == expected[0, answer].argmax(-1)).float().mean()
    assert same >= {"int8": 0.8, "nf4": 0.65}[mode]  # the greedy token, teacher-forced
    assert relative_error(got, expected) < {"int8": 0.08, "nf4": 0.5}[mode]


# --- a real swarm ---------------------------------------------------------------------------------------------------


def test_an_int8_swarm_matches_local_and_is_never_mixed_with_unquantized_servers(swarm, tiny_llama_path, tiny_llama_local, caplog):
    local = swarm(tiny_llama_path, ["0:3", "3:6"], "--quant", "int8")
    assert all("int8 weights" in server.wait_for(r"online.*", 5).group(0) for server in local.servers)
    reference = copy.deepcopy(tiny_llama_local)
    quantize_blocks(reference.model.layers, "int8")  # what the servers compute, in this process
    ids = tokens(length=8)[:1]
    with torch.inference_mode():
        expected, unquantized = reference(ids).logits, tiny_llama_local(ids).logits
        expected_tokens = reference.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)

    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_path, initial_peers=local.initial_peers)
    try:
        got = model(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
        assert relative_error(got, unquantized) < RELATIVE_ERROR["int8"]
        assert torch.equal(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), expected_tokens)

        plain = local.start_server("0:6")  # unquantized, all blocks: one chain never takes it next to int8 ones
        with caplog.at_level(logging.WARNING, logger="molink_swarm.client.swarm"):
            chained = {str(s.peer_id) for s in run_sync(model.swarm.servers(refresh=True))}
        assert chained == {server.peer_id for server in local.servers[:2]}
        assert any(plain.peer_id in r.getMessage() and "unquantized" in r.getMessage() for r in caplog.records)
        with model.inference_session(max_length=32) as session:
            assert torch.equal(model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), expected_tokens)
            assert plain.peer_id not in {str(hop.peer_id) for hop in session.chain}
            assert session.failovers == 0

        rows = run_sync(swarm_snapshot(model.swarm.dht, model.swarm.p2p)).models[0].servers
        assert sorted(describe_weights(row) for row in rows) == ["float32", "int8 (float32)", "int8 (float32)"]
    finally:
        model.shutdown()
