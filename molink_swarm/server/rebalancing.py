"""What a server without --blocks needs to place itself: the swarm as routing/placement.py sees it, and how many
blocks fit here. The decisions themselves are pure (routing/placement.py); this is the glue to DHT records."""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import torch

from molink_swarm.dht.records import ServerState
from molink_swarm.routing.placement import Peer, Span

# A server counts in placement while it is joining (it has claimed its blocks) or online; an offline or expired
# record does not (expired ones are gone from the DHT within one TTL).
PLACED_STATES = (ServerState.JOINING, ServerState.ONLINE)


def record_capacity(record) -> float:
    """Block-tokens/s a server announced: batched decode if measured, else lone decode."""
    return record.batch_throughput or record.throughput


def placed_peers(servers: Iterable, exclude=None, default_throughput: float = 1.0) -> list[tuple[Peer, Span]]:
    """(peer, span) for every joining or online server but ``exclude``; one that has not measured itself yet
    (throughput 0) counts as ``default_throughput``."""
    placed = []
    for server in servers:
        record = server.record
        if server.peer_id == exclude or record.state not in PLACED_STATES:
            continue
        span = (record.start, record.end)
        compute = record_capacity(record) or default_throughput
        network = record.network_throughput or math.inf
        placed.append((Peer(str(server.peer_id), compute, record.end - record.start, network), span))
    return placed


def typical_throughput(servers: Iterable, exclude=None) -> Optional[float]:
    """The median announced capacity of the others: what a server that has not measured itself yet assumes."""
    figures = sorted(record_capacity(s.record) for s in servers if s.peer_id != exclude and record_capacity(s.record) > 0)
    return figures[len(figures) // 2] if figures else None


def block_bytes(config, itemsize: int, cache_tokens: int, weight_bytes: Optional[float] = None) -> int:
    """Memory one block takes, estimated from the config alone (its files may not be downloaded yet): attention
    and MLP weights (every expert's, for a mixture of experts) and its share of the sessions' cache. Weights take
    ``weight_bytes`` each (quantized: less than ``itemsize``, see models/quant.bytes_per_weight)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    intermediate = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None) or 4 * hidden
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1
    mlp = 3 * hidden * intermediate * experts
    cache = cache_tokens * 2 * kv_heads * head_dim
    return int((attention + mlp) * (itemsize if weight_bytes is None else weight_bytes) + cache * itemsize)


def blocks_that_fit(bytes_per_block: int, device: torch.device, share: float = 0.5) -> int:
    """How many blocks (weights and their share of the sessions' cache, ``bytes_per_block``) fit in ``share`` of
    this device's free memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, int(free * share // max(bytes_per_block, 1)))
