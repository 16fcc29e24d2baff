"""Only your blocks' weights: a server opens, hashes and downloads only the shards that hold its blocks, a client
only those of the embeddings, final norm and head; and servers whose weights of a block differ are never chained.

The checkpoint is a tiny Llama cut into 4 shards the way big checkpoints are (the embeddings with the first
blocks, the final norm and head with the last). A local HTTP server stands in for the Hugging Face Hub
(``HF_ENDPOINT``) and counts the files it serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.loop import run_sync
from molink_swarm.client.model import _client_tensors
from molink_swarm.client.session import SwarmError
from molink_swarm.models import block_digests, resolve_model, tensor_names
from molink_swarm.models import fingerprint as fingerprint_module
from molink_swarm.models.checkpoint import INDEX
from molink_swarm.models.family import adapter_for
from molink_swarm.models.resolve import load_config
from molink_swarm.server.server import Server, ServerConfig
from tests.conftest import make_tiny_llama

NAME = "tiny-sharded"
SHARDS = {
    "model-00001-of-00004.safetensors": ("model.embed_tokens.", "model.layers.0."),
    "model-00002-of-00004.safetensors": ("model.layers.1.", "model.layers.2."),
    "model-00003-of-00004.safetensors": ("model.layers.3.", "model.layers.4."),
    "model-00004-of-00004.safetensors": ("model.layers.5.", "model.norm.", "lm_head."),
}
SHARD = sorted(SHARDS)  # SHARD[0] is the first shard
METADATA = ["config.json", "generation_config.json", INDEX]


def write_sharded(model: LlamaForCausalLM, path: Path, shards=SHARD) -> Path:
    """The model as a Hugging Face folder of 4 shards and their index, holding only ``shards`` of them."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    weight_map = {}
    for file, prefixes in SHARDS.items():
        part = {name: tensor for name, tensor in state.items() if name.startswith(prefixes)}
        weight_map.update(dict.fromkeys(part, file))
        if file in shards:
            save_file(part, path / file, metadata={"format": "pt"})
    assert weight_map.keys() == state.keys()
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def reference() -> LlamaForCausalLM:
    return make_tiny_llama(seed=7)


@pytest.fixture
def fresh_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fingerprint_module, "_tensor_hashes_in_process", {})


def layer_bytes(model: LlamaForCausalLM, *layers: int) -> int:
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n.startswith(prefixes))


# --- what the code opens ---------------------------------------------------------------------------------------

_opened: Optional[list[str]] = None


def _audit(event: str, args: tuple) -> None:
    """Every file Python opens (io.open, os.open, mmap's file) while a test records them."""
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only between start and stop below


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.hashed_bytes = 0
        hash_tensor = fingerprint_module._hash_tensor

        def counting(file: Path, begin: int, end: int, advance=lambda nbytes: None) -> str:
            self.hashed_bytes += end - begin
            return hash_tensor(file, begin, end, advance)

        monkeypatch.setattr(fingerprint_module, "_hash_tensor", counting)

    def __enter__(self) -> "Recorder":
        global _opened
        _opened = []
        return self

    def __exit__(self, *exc) -> None:
        global _opened
        self.opened, _opened = _opened, None

    def files_in(self, folder: Path) -> set[str]:
        """Names of the files opened in ``folder`` (our digest cache and its temp files as one)."""
        names = {Path(p).name for p in self.opened if Path(p).resolve().parent == folder.resolve()}
        return {fingerprint_module.DIGEST_CACHE if n.startswith(fingerprint_module.DIGEST_CACHE) else n for n in names}


def load_server(model: str, blocks: tuple[int, int]) -> Server:
    """What `join --model M --blocks A:B` does before it serves: resolve, then fetch, digest and load its blocks."""
    server = Server(ServerConfig(model=model, blocks=blocks))
    server.start, server.end = blocks
    server.span = server._load_blocks()
    return server


def test_a_server_opens_and_hashes_only_the_shards_of_its_blocks(reference, tmp_path, fresh_hashes, monkeypatch):
    full = write_sharded(reference, tmp_path / "full" / NAME)

    with Recorder(monkeypatch) as record:
        server = load_server(str(full), (0, 2))

    assert record.files_in(full) <= {*METADATA, SHARD[0], SHARD[1], fingerprint_module.DIGEST_CACHE}
    assert {SHARD[0], SHARD[1]} <= record.files_in(full)  # not vacuous: it did open the shards it needs
    assert record.hashed_bytes == layer_bytes(reference, 0, 1)  # not block 2, although it is in the second shard
    for name, param in server.span.layers[1].state_dict().items():
        assert torch.equal(param, reference.model.layers[1].state_dict()[name]), name

    # Python's audit hook does not see what safetensors opens in Rust: a folder without the other shards works too.
    share = write_sharded(reference, tmp_path / "share" / NAME, shards=SHARD[:2])
    fingerprint_module._tensor_hashes_in_process.clear()
    with Recorder(monkeypatch) as record:
        same = load_server(str(share), (0, 2))
    assert record.hashed_bytes == layer_bytes(reference, 0, 1)
    assert same.block_digests == server.block_digests and same.source.model_id == server.source.model_id


def test_a_client_reads_only_the_embeddings_norm_and_head(reference, tmp_path):
    folder = write_sharded(reference, tmp_path / "client" / NAME, shards=[SHARD[0], SHARD[3]])
    source = resolve_model(folder)

    tensors = _client_tensors(source, adapter_for(load_config(source)))

    assert sorted(tensors) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference.state_dict()[name])


def test_a_missing_shard_of_a_local_folder_is_named(reference, tmp_path):
    share = write_sharded(reference, tmp_path / "share" / NAME, shards=SHARD[:2])

    with pytest.raises(Exception) as error:
        load_server(str(share), (2, 4))

    message = str(error.value)
    assert SHARD[2] in message and "copy them there" in message and "\n" not in message


# --- the same through a hub ----------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """The few Hugging Face Hub endpoints huggingface_hub calls to list a repository and download its files."""

    def __init__(self, repo_id: str, folder: Path):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repo_id, self.folder = repo_id, folder
        self.served: list[str] = []  # files downloaded (GET), in order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub, path = self.server, urllib.parse.urlparse(self.path).path
        if path in (f"/api/models/{hub.repo_id}", f"/api/models/{hub.repo_id}/revision/main", f"/api/models/{hub.repo_id}/revision/{COMMIT}"):
            files = sorted(p.name for p in hub.folder.iterdir())
            siblings = [{"rfilename": name, "size": (hub.folder / name).stat().st_size} for name in files]
            return self._send(json.dumps({"id": hub.repo_id, "sha": COMMIT, "siblings": siblings}).encode(), body, {})
        prefix = f"/{hub.repo_id}/resolve/"
        if path.startswith(prefix):
            revision, _, name = urllib.parse.unquote(path[len(prefix) :]).partition("/")
            file = hub.folder / name
            if revision in ("main", COMMIT) and file.is_file():
                content = file.read_bytes()
                if body:
                    hub.served.append(name)
                etag = hashlib.sha256(content).hexdigest()
                return self._send(content, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})
        self._send(b'{"error": "not found"}', body, {"X-Error-Code": "EntryNotFound"}, status=404)

    def _send(self, content: bytes, body: bool, headers: dict, status: int = 200) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(reference, tmp_path, monkeypatch) -> Iterator[FakeHub]:
    """``org/tiny-sharded`` on a local hub, with an empty download cache."""
    import huggingface_hub
    from huggingface_hub import constants

    server = FakeHub(f"org/{NAME}", write_sharded(reference, tmp_path / "hub-repo" / NAME))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(fingerprint_module, "_tensor_hashes_in_process", {})
    huggingface_hub.utils.close_session()  # a fresh HTTP client for this endpoint
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        huggingface_hub.utils.close_session()  # a fresh HTTP client for this endpoint


def test_from_a_hub_a_server_and_a_client_download_only_the_shards_they_need(hub, reference, tmp_path, capsys):
    server = Server(ServerConfig(model=hub.repo_id, blocks=(0, 2)))
    assert sorted(hub.served) == sorted(METADATA)  # resolving reads the config and the index, no weights
    assert server.source.model_id == resolve_model(hub.folder).model_id  # the same model as a local copy

    server = load_server(hub.repo_id, (0, 2))
    assert sorted(hub.served) == sorted(METADATA + SHARD[:2])
    shown = capsys.readouterr().err  # progress bars (rich, on stderr)
    assert f"Downloading {hub.repo_id}" in shown and f"Hashing the weights of {NAME}" in shown
    local = block_digests(hub.folder, {i: [n for n in tensor_names(resolve_model(hub.folder)) if n.startswith(f"model.layers.{i}.")] for i in (0, 1)})
    assert server.block_digests == (local[0], local[1])

    client = resolve_model(hub.repo_id)
    tensors = _client_tensors(client, adapter_for(load_config(client)))
    assert sorted(tensors) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert sorted(hub.served) == sorted(METADATA + SHARD[:2] + [SHARD[3]])  # the first shard was there already
    assert SHARD[2] not in hub.served


# --- copies that differ in a block are never chained --------------------------------------------------------------


def test_each_peer_with_only_its_shards_and_a_copy_with_other_weights_is_never_chained(swarm, reference, tmp_path, caplog):
    """Servers 0:3 and 3:6 and the client each hold only their shards; a server of a copy whose block 4 differs
    joins: the client names it in a warning and never chains it, not even once the server of copy A leaves."""
    first = write_sharded(reference, tmp_path / "first" / NAME, shards=SHARD[:2])
    second = write_sharded(reference, tmp_path / "second" / NAME, shards=SHARD[2:])
    mine = write_sharded(reference, tmp_path / "client" / NAME, shards=[SHARD[0], SHARD[3]])
    altered_model = make_tiny_llama(seed=7)
    with torch.no_grad():
        altered_model.model.layers[4].mlp.down_proj.weight.mul_(-1.0)
    altered = write_sharded(altered_model, tmp_path / "altered" / NAME, shards=SHARD[2:])
    assert resolve_model(altered).model_id == resolve_model(first).model_id  # same name and config: one swarm

    local = swarm(first, [])  # the bootstrap peer; the servers start side by side
    started = [local.start_server("0:3", wait=False), local.start_server("3:6", "--model", str(second), wait=False)]
    for server in started:  # (the last --model wins: the second server has another folder of the same model)
        server.wait_online()
    model = AutoDistributedModelForCausalLM.from_pretrained(str(mine), initial_peers=local.initial_peers, wait_for_blocks_s=3)
    try:
        ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
        expected = reference.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), expected)

        impostor = local.start_server("3:6", "--model", str(altered))
        with caplog.at_level("WARNING", logger="molink_swarm.client.swarm"):
            servers = run_sync(model.swarm.servers(refresh=True))
        assert impostor.peer_id not in {str(s.peer_id) for s in servers}
        assert any(f"server {impostor.peer_id} (blocks 3:6)" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)
        with model.inference_session(max_length=32) as session:
            assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), expected)
            assert impostor.peer_id not in {str(hop.peer_id) for hop in session.chain}

        local.servers[1].stop()  # copy A's only server of 3:6 leaves: the impostor is the only one left there
        with pytest.raises(SwarmError) as error:
            model.generate(ids, max_new_tokens=2)
        message = str(error.value)
        assert "No server in the swarm holds blocks 3:6" in message
        assert impostor.peer_id in message and "other weights" in message
    finally:
        model.shutdown()
