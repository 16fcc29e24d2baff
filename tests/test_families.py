"""Every supported family, distributed == local, on tiny random models built here.

In-process, through what a server and a client run: the blocks are built from the saved checkpoint by the
family's adapter and run through a server's packed (or step-by-step) passes with per-session caches, in two spans as
two servers hold them; the client is the one ``from_pretrained`` builds (embeddings, the family's steps around the
blocks, head), and ``generate()`` is its own. tests/test_families_swarm.py runs some of them through real servers.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from molink_swarm.client.model import load_client_model
from molink_swarm.client.session import SwarmError
from molink_swarm.models import load_config, read_tensors, resolve_model, tensor_names
from molink_swarm.models.families import FAMILIES, UnsupportedModelError, listing
from molink_swarm.models.family import adapter_for
from molink_swarm.models.packed import PackedStep

VOCAB = 96
# A few layers of tiny width; every family's own names for them.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

TINY: dict[str, dict] = {
    "llama": COMMON,
    "mistral": dict(COMMON, sliding_window=5),
    "mixtral": dict(COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "qwen2_moe": dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3": dict(COMMON, head_dim=8),
    "qwen3_moe": dict(COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "gemma": dict(COMMON, head_dim=8, tie_word_embeddings=True),
    "gemma2": dict(
        COMMON, head_dim=8, sliding_window=5, final_logit_softcapping=2.0, attn_logit_softcapping=5.0, query_pre_attn_scalar=8
    ),
    "gemma3_text": dict(
        COMMON, head_dim=8, sliding_window=5, layer_types=SLIDING, final_logit_softcapping=2.0, query_pre_attn_scalar=8,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    "phi": dict(COMMON, partial_rotary_factor=0.5),
    "phi3": COMMON,
    "falcon": dict(COMMON, new_decoder_architecture=True, num_kv_heads=2, bias=True),
    "falcon-alibi": dict(COMMON, alibi=True, multi_query=False, parallel_attn=False),
    "bloom": dict(vocab_size=VOCAB, hidden_size=32, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(COMMON, rotary_pct=0.5),
    "opt": dict(COMMON, ffn_dim=64, word_embed_proj_dim=16),  # projections in and out around the blocks
    "stablelm": COMMON,
    "starcoder2": dict(COMMON, sliding_window=5),
    "cohere": dict(COMMON, logit_scale=0.25),
    "olmo2": COMMON,
    "granite": dict(COMMON, embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "deepseek_v3": dict(
        COMMON,
        num_key_value_heads=4,  # multi-head latent attention: every head has its keys
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_shared_experts=1,
    ),
    # Llama-layout relatives.
    "olmo": COMMON,
    "olmo3": dict(COMMON, sliding_window=5, layer_types=SLIDING),
    "glm": COMMON,
    "glm4": COMMON,
    "helium": dict(COMMON, head_dim=8),
    "smollm3": COMMON,
    "cohere2": dict(COMMON, sliding_window=5, layer_types=SLIDING, logit_scale=0.25),
    "granitemoe": dict(
        COMMON,
        num_local_experts=4,
        num_experts_per_tok=2,
        embedding_multiplier=3.0,
        logits_scaling=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
    ),
    "phimoe": dict(COMMON, num_local_experts=4, num_experts_per_tok=2),
    "ministral": dict(COMMON, head_dim=8, sliding_window=5, layer_types=SLIDING),
    "exaone4": dict(COMMON, sliding_window=5, layer_types=SLIDING),
    "apertus": COMMON,
    "arcee": COMMON,
    "seed_oss": COMMON,
    "hunyuan_v1_dense": dict(COMMON, head_dim=8),
    "ernie4_5": COMMON,
    "nemotron": COMMON,
    "persimmon": dict(COMMON, num_key_value_heads=4),  # no grouped queries
}

SPANS = [(0, 2), (2, 4)]  # as two servers would hold them


def model_type(name: str) -> str:
    return name.split("-")[0]


def make_model(name: str, seed: int = 0):
    """A seeded tiny model of the family, every weight perturbed (norms and biases are not left at 1 and 0)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type(name), **TINY[name])
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@functools.cache
def saved(name: str, root: Path) -> Path:
    path = root / name
    make_model(name).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


class LocalChain:
    """An inference session whose servers are spans of blocks in this process (each with its own cache, as a
    server keeps one per session): what the client sees of a chain."""

    def __init__(self, spans, max_length: int, **kwargs):
        self.spans = spans
        self.caches = [span.new_cache(max_length=max_length) for span in spans]
        self.max_length = max_length
        self.position = 0
        self.history = None

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.position + hidden.shape[1] > self.max_length:
            raise SwarmError(f"The session would hold {self.position + hidden.shape[1]} tokens, over its max_length")
        for span, cache in zip(self.spans, self.caches):
            hidden = span(hidden, position=self.position, cache=cache)
        self.position += hidden.shape[1]
        return hidden

    def close(self) -> None:
        pass


def in_process(path: Path, dtype=torch.float32):
    """(client model, spans) built from ``path`` as from_pretrained and servers build them."""
    source = resolve_model(path)
    config = load_config(source)
    adapter = adapter_for(config)
    names = tensor_names(source)
    spans = [
        adapter.build_blocks(start, end, names, lambda wanted: read_tensors(source, wanted), dtype=dtype)
        for start, end in SPANS
    ]
    client = load_client_model(source, adapter, dtype)
    client._setup_swarm(None, source, config, wait_s=0.0)
    client._open_session = functools.partial(LocalChain, spans)
    return client.eval(), spans


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_distributed_equals_local(name, models_dir):
    path = saved(name, models_dir)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    client, spans = in_process(path)
    ids = prompt(11, seed=1)

    # A forward pass of the whole prompt, then the same prompt in two steps of one session.
    with torch.no_grad():
        expected = local(ids).logits
        with client.inference_session(max_length=32):
            whole = client(ids).logits
        with client.inference_session(max_length=32):
            parts = torch.cat([client(ids[:, :7]).logits, client(ids[:, 7:]).logits], dim=1)
    torch.testing.assert_close(whole, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(parts, expected, atol=1e-4, rtol=0)

    # Greedy generation: identical tokens, logits within float tolerance at every step.
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = local.generate(ids, **kwargs)
    got = client.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_packed_steps_equal_each_alone(name, models_dir):
    """Steps of sessions at different positions in one pass (a server's batch) equal each session run alone; one
    session has two rows (a batch of prompts), one sends a chunk of several tokens."""
    _client, spans = in_process(saved(name, models_dir))
    span = spans[1]
    hidden_size = span.config.hidden_size
    torch.manual_seed(2)
    rows = (1, 2, 1)
    prompts = [torch.randn(r, n, hidden_size) for r, n in zip(rows, (3, 8, 6))]
    alone, packed = [span.new_cache() for _ in prompts], [span.new_cache() for _ in prompts]
    for x, a, b in zip(prompts, alone, packed):
        span(x, cache=a)
        span(x, cache=b)
    positions = [x.shape[1] for x in prompts]
    for round_ in range(3):
        inputs = [torch.randn(r, 4 if i == 1 and round_ == 1 else 1, hidden_size) for i, r in enumerate(rows)]
        expected = [span(x, position=p, cache=c) for x, p, c in zip(inputs, positions, alone)]
        outputs = span.forward_packed([PackedStep(x, p, c) for x, p, c in zip(inputs, positions, packed)])
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        positions = [p + x.shape[1] for p, x in zip(positions, inputs)]


def test_every_registered_family_is_tested_here():
    assert {family.model_type for family in FAMILIES} == {model_type(name) for name in TINY}


@pytest.fixture(scope="module")
def mamba_path(tmp_path_factory) -> Path:
    """A model of a family molink-swarm does not serve (no attention layers to split)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("mamba", vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("mamba")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_join_refuses_an_unsupported_family_in_one_line(mamba_path):
    from tests.test_cli import UNREACHABLE_PEER, assert_one_line_error, run_cli

    result = run_cli("join", "--model", str(mamba_path), "--blocks", "0:1", "--initial-peers", UNREACHABLE_PEER)
    assert_one_line_error(result, "'mamba' is not supported", "supported families: llama")


def test_from_pretrained_refuses_an_unsupported_family_before_any_network(mamba_path):
    from molink_swarm import AutoDistributedModelForCausalLM
    from tests.test_cli import UNREACHABLE_PEER

    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported") as error:
        AutoDistributedModelForCausalLM.from_pretrained(mamba_path, initial_peers=[UNREACHABLE_PEER])
    assert "\n" not in str(error.value)


def test_join_help_lists_the_families():
    from tests.test_cli import run_cli

    result = run_cli("join", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert all(family.model_type in text for family in FAMILIES)


def test_readme_lists_the_registered_families():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    listed = re.search(r"<!-- families -->\n(.*?)\n<!-- /families -->", readme, re.S)
    assert listed, "README.md lacks the <!-- families --> list"
    assert listed.group(1) == listing(), "regenerate it: python -m molink_swarm.models.families"
