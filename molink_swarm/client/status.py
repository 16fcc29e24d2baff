"""The swarm as seen from one peer: a snapshot (models, servers, block coverage) for `status` and the web app."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from hivemind.p2p import P2P
from pydantic import BaseModel

from molink_swarm.dht import ServerState, fetch_models, fetch_servers
from molink_swarm.net.links import PeerLinks
from molink_swarm.protocol.messages import relay_peer_id
from molink_swarm.routing.placement import block_coverage
from molink_swarm.routing.planner import format_blocks


class ServerView(BaseModel):
    peer_id: str
    name: Optional[str]
    start: int
    end: int
    state: str
    throughput: float  # block-tokens/s of one session's decode steps
    batch_throughput: Optional[float] = None  # of many sessions' steps batched (None: a server from before)
    network_throughput: Optional[float] = None  # tokens/s its link carries to the next servers (None: unmeasured)
    active_sessions: int
    max_sessions: int
    free_cache_tokens: int
    reachability: str  # as announced: direct | relayed
    relay: Optional[str] = None  # peer id of the relay a relayed server is reached through
    path: str  # from here: direct | hole-punched | relayed
    version: str
    dtype: str
    quant: str = "none"  # how its weights are quantized: none, int8, nf4
    rtt_ms: Optional[float] = None
    wire_dtype: Optional[str] = None  # how it sends hidden states (None: a server from before --wire-dtype)
    wire_bytes_per_token: Optional[float] = None  # measured average (None: it has sent nothing yet)


class ModelView(BaseModel):
    model_id: str
    name: str
    model_type: str
    num_blocks: int
    servers: list[ServerView]
    coverage: list[int]  # online servers per block
    missing: str  # uncovered blocks as "a:b,c:d" ("" when all are served)


class SwarmView(BaseModel):
    models: list[ModelView]
    taken_at: float


async def swarm_snapshot(dht, p2p: P2P, model: Optional[str] = None) -> SwarmView:
    """Every announced model with its servers, and how this peer reaches each one (path, RTT)."""
    models = await asyncio.to_thread(fetch_models, dht)
    if model:
        models = {k: v for k, v in models.items() if model in (k, v.name)}
    servers_by_model = {
        m: await asyncio.to_thread(fetch_servers, dht, m, r.num_blocks) for m, r in sorted(models.items())
    }
    # Like a client here would reach them: through their relays, or hole-punched.
    links = PeerLinks(p2p, punch_attempts=1)
    every = [s for servers in servers_by_model.values() for s in servers]
    await links.update({s.peer_id: s.record.relays for s in every})
    await links.wait_hole_punching(timeout=3.0)
    await links.ping_all([s.peer_id for s in every])
    await links.close()

    views = []
    for model_id, servers in servers_by_model.items():
        record = models[model_id]
        online = [(s.record.start, s.record.end) for s in servers if s.record.state == ServerState.ONLINE]
        coverage = block_coverage(record.num_blocks, online)
        rows = [
            ServerView(
                peer_id=str(s.peer_id),
                name=s.record.public_name,
                start=s.record.start,
                end=s.record.end,
                state=s.record.state.value,
                throughput=s.record.throughput,
                batch_throughput=s.record.batch_throughput,
                network_throughput=s.record.network_throughput,
                active_sessions=s.record.active_sessions,
                max_sessions=s.record.max_sessions,
                free_cache_tokens=s.record.free_cache_tokens,
                reachability=s.record.reachability.value,
                relay=str(relay_peer_id(links.routes[s.peer_id])) if s.peer_id in links.routes else None,
                path=links.path_kind(s.peer_id),
                version=s.record.software_version,
                dtype=s.record.torch_dtype,
                quant=s.record.quant_mode,
                rtt_ms=links.rtts[s.peer_id] * 1000 if s.peer_id in links.rtts else None,
                wire_dtype=s.record.wire_dtype,
                wire_bytes_per_token=s.record.wire_bytes_per_token,
            )
            for s in sorted(servers, key=lambda s: (s.record.start, s.record.end, str(s.peer_id)))
        ]
        views.append(
            ModelView(
                model_id=model_id,
                name=record.name,
                model_type=record.model_type,
                num_blocks=record.num_blocks,
                servers=rows,
                coverage=coverage,
                missing=format_blocks([i for i, c in enumerate(coverage) if c == 0]),
            )
        )
    return SwarmView(models=views, taken_at=time.time())
