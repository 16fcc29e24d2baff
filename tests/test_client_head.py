"""The client's head (final norm, LM head, the family's own last touches) gives the logits of the family's forward."""

from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

from molink_swarm.client.model import _distributed_class
from molink_swarm.models.families import family_for, submodule
from molink_swarm.models.family import adapter_for

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

CONFIGS = {
    "llama": LlamaConfig(**TINY),
    "gemma2": Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=2.0),  # a low cap: most logits feel it
    "cohere": CohereConfig(**TINY, logit_scale=0.25),
    "granite": GraniteConfig(**TINY, logits_scaling=4.0),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_head_logits_equal_the_family_forward(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = CONFIGS[family]
    local = AutoModelForCausalLM.from_config(config).eval()
    client = _distributed_class(type(local))(adapter_for(config).client_config()).eval()
    missing, _unused = client.load_state_dict(local.state_dict(), strict=False)
    assert not missing

    last_hidden = []  # what the final norm receives: the last block's output, as servers send it to the client
    norm = submodule(local.base_model, family_for(config).head[0].path)  # the family's final norm
    norm.register_forward_hook(lambda _module, args, _output: last_hidden.append(args[0]))
    ids = torch.randint(0, config.vocab_size, (1, 7))
    with torch.inference_mode():
        expected = local(ids).logits
        logits = client.head_logits(last_hidden[0])
        plain = client.get_output_embeddings()(norm(last_hidden[0]))
    assert torch.allclose(logits, expected, atol=1e-5)
    if family != "llama":  # the family's last touch is large enough here to matter
        assert not torch.allclose(plain, expected, atol=1e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_lm_head_of_several_rows_runs_in_slices_of_the_vocabulary_with_the_same_logits(monkeypatch, bias):
    from torch.nn import functional

    from molink_swarm.models import families

    monkeypatch.setattr(families, "HEAD_SLICE", 128)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=bias)  # 3 full slices and a shorter last one
    model = type("Model", (), {"get_output_embeddings": lambda self: head})()
    calls = []
    linear = functional.linear
    monkeypatch.setattr(functional, "linear", lambda *args: calls.append(args[1].shape[0]) or linear(*args))
    with torch.inference_mode():
        for shape in [(1, 5, 32), (4, 1, 32)]:
            hidden = torch.randn(*shape)
            calls.clear()
            logits = families.LmHead()(model, hidden)
            assert calls == [128, 128, 128, 116]
            assert logits.shape == (*shape[:2], 500) and torch.allclose(logits, linear(hidden, head.weight, head.bias), atol=1e-6)
        one = torch.randn(1, 1, 32)
        expected = head(one)
        calls.clear()
        assert torch.equal(families.LmHead()(model, one), expected) and calls == [500]  # one row: the plain head
