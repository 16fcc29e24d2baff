"""The glue between a server and placement: which announced servers count, and a move that keeps the blocks a
server already holds (reads only the weights it lacks, computes exactly as a fresh load)."""

from __future__ import annotations

import torch

from molink_swarm.dht import ServerInfo, ServerRecord, ServerState
from molink_swarm.server import server as server_module
from molink_swarm.server.rebalancing import placed_peers
from molink_swarm.server.server import Server, ServerConfig
from tests.test_swarm_client import peer


def record(state: ServerState, start: int, end: int, **fields) -> ServerRecord:
    return ServerRecord(
        state=state, start=start, end=end, model_fingerprint="f" * 16, throughput=10.0, free_cache_tokens=1,
        max_sessions=1, software_version="test", **fields,
    )


def test_joining_and_online_servers_count_in_placement_offline_ones_and_ourselves_do_not():
    servers = [
        ServerInfo(peer("online"), record(ServerState.ONLINE, 0, 3, batch_throughput=50.0, network_throughput=5.0), 0),
        ServerInfo(peer("joining"), record(ServerState.JOINING, 3, 6), 0),
        ServerInfo(peer("offline"), record(ServerState.OFFLINE, 0, 6), 0),
        ServerInfo(peer("me"), record(ServerState.ONLINE, 0, 6), 0),
    ]
    placed = placed_peers(servers, exclude=peer("me"))
    assert [(p.peer_id, span) for p, span in placed] == [(str(peer("online")), (0, 3)), (str(peer("joining")), (3, 6))]
    online, joining = placed[0][0], placed[1][0]
    assert (online.compute, online.network, online.max_blocks) == (50.0, 5.0, 3)  # batched capacity, its link
    assert joining.compute == 10.0 and joining.network == float("inf")


def test_a_moving_server_reads_only_the_blocks_it_lacks(tiny_llama_path, monkeypatch):
    server = Server(ServerConfig(model=str(tiny_llama_path), blocks=(0, 4)))
    server.start, server.end = 0, 4
    held = server._load_blocks()
    read: list[str] = []
    original = server_module.read_tensors
    monkeypatch.setattr(server_module, "read_tensors", lambda source, names: original(source, read.extend(names) or names))
    server.start, server.end = 2, 6
    moved = server._load_blocks(held)
    assert read and {name.split(".")[2] for name in read} == {"4", "5"}
    monkeypatch.setattr(server_module, "read_tensors", original)
    fresh = server._load_blocks()
    hidden = torch.randn(1, 5, moved.config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert (moved.start, moved.end) == (2, 6)
    assert torch.equal(moved(hidden), fresh(hidden))


def test_the_memory_of_a_block_is_estimated_from_the_config_alone(tiny_llama_local):
    from molink_swarm.server.rebalancing import block_bytes

    layer = tiny_llama_local.model.layers[0]
    weights = sum(p.numel() for name, p in layer.named_parameters() if "norm" not in name)
    assert block_bytes(tiny_llama_local.config, 4, cache_tokens=0) == weights * 4
    config = tiny_llama_local.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = 100 * 2 * config.num_key_value_heads * head_dim * 4
    assert block_bytes(config, 4, cache_tokens=100) == weights * 4 + cache
