"""The swarm as seen from one peer: a snapshot (models, servers, block coverage) for `status` and the web app."""

from __future__ import annotations

import asyncio
import time
from typing import Optional, Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from molink_swarm.dht import ServerState, fetch_models, fetch_servers, start_dht
from molink_swarm.relay import connect, hole_punch, relay_of, server_stub
from molink_swarm.routing.placement import block_coverage
from molink_swarm.routing.planner import format_blocks
from molink_swarm.wire import relay_peer_id


class ServerView(BaseModel):
    peer_id: str
    name: Optional[str]
    start: int
    end: int
    state: str
    throughput: float
    active_sessions: int
    max_sessions: int
    free_cache_tokens: int
    reachability: str  # as announced: direct | relayed
    relay: Optional[str] = None  # peer id of the relay a relayed server is reached through
    path: Optional[str] = None  # from here: direct | hole-punched | relayed (None: not checked)
    version: str
    dtype: str
    rtt_ms: Optional[float] = None


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


async def swarm_snapshot(dht, p2p: Optional[P2P] = None, model: Optional[str] = None) -> SwarmView:
    """Every announced model with its servers; with ``p2p``, also the RTT from here to each server."""
    models = await asyncio.to_thread(fetch_models, dht)
    if model:
        models = {k: v for k, v in models.items() if model in (k, v.name)}
    servers_by_model = {
        m: await asyncio.to_thread(fetch_servers, dht, m, r.num_blocks) for m, r in sorted(models.items())
    }
    rtts: dict[PeerID, Optional[float]] = {}
    paths: dict[PeerID, str] = {}
    salt = dht.peer_id.to_base58()  # like a client here would: spread over a server's relays
    via = {s.peer_id: relay_of(s.record, salt=salt) for servers in servers_by_model.values() for s in servers}
    if p2p is not None:
        routes = dict(via)
        await asyncio.gather(*(connect(p2p, r) for r in set(routes.values()) if r is not None), return_exceptions=True)
        relayed = [peer for peer, relay in routes.items() if relay is not None]
        punched = await asyncio.gather(*(hole_punch(p2p, peer, routes[peer], wait_s=3.0) for peer in relayed))
        paths = {peer: "direct" for peer, relay in routes.items() if relay is None}
        paths.update({peer: "hole-punched" if ok else "relayed" for peer, ok in zip(relayed, punched)})
        routes.update({peer: None for peer in relayed if paths[peer] == "hole-punched"})
        rtts = dict(await asyncio.gather(*(_ping(p2p, peer, relay) for peer, relay in routes.items())))
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
                active_sessions=s.record.active_sessions,
                max_sessions=s.record.max_sessions,
                free_cache_tokens=s.record.free_cache_tokens,
                reachability=s.record.reachability.value,
                relay=str(relay_peer_id(via[s.peer_id])) if via[s.peer_id] else None,
                path=paths.get(s.peer_id),
                version=s.record.software_version,
                dtype=s.record.torch_dtype,
                rtt_ms=None if rtts.get(s.peer_id) is None else rtts[s.peer_id] * 1000,
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


async def _ping(p2p: P2P, peer_id: PeerID, relay: Optional[str]) -> tuple[PeerID, Optional[float]]:
    started = time.perf_counter()
    try:
        await server_stub(p2p, peer_id, relay).rpc_ping(runtime_pb2.ExpertRequest(), timeout=5)
    except Exception:  # unreachable: shown as such
        return peer_id, None
    return peer_id, time.perf_counter() - started


def print_status(initial_peers: Sequence[str], model: Optional[str] = None, console: Optional[Console] = None) -> None:
    """`molink-swarm status`: one rich table per model."""
    console = console or Console()
    dht, _ = start_dht(initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:

        async def take() -> SwarmView:
            return await swarm_snapshot(dht, await dht.replicate_p2p(), model)

        view = asyncio.run(take())
    finally:
        dht.shutdown()
    if not view.models:
        console.print("No models are announced in this swarm yet. Start a server: molink-swarm join --model M --initial-peers ...")
        return
    for m in view.models:
        # Names come from peers' records: shown as plain text, never parsed as rich markup ("[/x]" would raise).
        table = Table(title=Text(f"{m.name}  ({m.model_id}, {m.num_blocks} blocks, {m.model_type})"))
        for column in ("peer", "name", "blocks", "state", "tokens/s/block", "sessions", "free cache", "path", "RTT"):
            table.add_column(column)
        for s in m.servers:
            state_style = {ServerState.ONLINE.value: "green", ServerState.JOINING.value: "yellow"}.get(s.state, "red")
            table.add_row(
                s.peer_id[-10:],
                Text(s.name or ""),
                f"{s.start}:{s.end}",
                Text(s.state, style=state_style),
                f"{s.throughput:.0f}",
                f"{s.active_sessions}/{s.max_sessions}",
                str(s.free_cache_tokens),
                Text(describe_path(s)),
                f"{s.rtt_ms:.1f} ms" if s.rtt_ms is not None else Text("unreachable", style="red"),
            )
        console.print(table)
        if m.missing:
            console.print(Text(f"Missing blocks: {m.missing}", style="bold red"))
        else:
            console.print(Text(f"All {m.num_blocks} blocks are served.", style="green"))


def describe_path(server: ServerView) -> str:
    """How this peer reaches the server: "direct", "hole-punched", or "relayed via …<relay>"."""
    path = server.path or server.reachability
    return f"relayed via …{server.relay[-8:]}" if path == "relayed" and server.relay else path
