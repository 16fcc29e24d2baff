"""Shared fixtures: tiny seeded models saved to disk, and real local swarms (bootstrap + server processes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from molink_swarm.local_swarm import LocalSwarm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes tens of seconds (real SmolLM2 weights, many processes)")


def make_tiny_llama(seed: int = 0, num_layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 6-block random Llama saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_local(tiny_llama_path: Path) -> LlamaForCausalLM:
    """The same weights loaded by plain transformers: the reference every swarm output is compared to."""
    return AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()


SwarmFactory = Callable[..., LocalSwarm]


def _swarm_factory(log_dir: Path) -> Iterator[SwarmFactory]:
    swarms: list[LocalSwarm] = []

    def start(model: str | Path, blocks: Sequence[str], *server_args: str) -> LocalSwarm:
        swarm = LocalSwarm(str(model), log_dir=log_dir)
        swarms.append(swarm)
        swarm.start(list(blocks), *server_args)  # no blocks: just the bootstrap peer (add servers yourself)
        return swarm

    try:
        yield start
    finally:
        for swarm in swarms:
            swarm.stop()


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[SwarmFactory]:
    """``swarm(model, ["0:3", "3:6"])`` starts a bootstrap peer and one server process per range; all stop at teardown."""
    yield from _swarm_factory(tmp_path)


@pytest.fixture(scope="module")
def module_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmFactory]:
    """Like ``swarm`` but shared by the tests of one module (starting processes costs seconds)."""
    yield from _swarm_factory(tmp_path_factory.mktemp("swarm-logs"))
