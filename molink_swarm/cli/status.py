"""`molink-swarm status`: the swarm as rich tables."""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from molink_swarm.client.status import ServerView, SwarmView, swarm_snapshot
from molink_swarm.dht import ServerState, start_dht
from molink_swarm.swarm_key import load_swarm_key


def print_status(
    initial_peers: Sequence[str], model: Optional[str] = None, console: Optional[Console] = None, swarm_key=None
) -> None:
    """`molink-swarm status`: one rich table per model (``swarm_key``: a private swarm's key file or key)."""
    console = console or Console()
    key = load_swarm_key(swarm_key)
    dht, _ = start_dht(initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], swarm_key=key)
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
        for column in ("peer", "name", "blocks", "state", "tokens/s/block", "link tokens/s", "sessions", "free cache", "weights", "wire", "path", "RTT"):
            table.add_column(column)
        for s in m.servers:
            state_style = {ServerState.ONLINE.value: "green", ServerState.JOINING.value: "yellow"}.get(s.state, "red")
            table.add_row(
                s.peer_id[-10:],
                Text(s.name or ""),
                f"{s.start}:{s.end}",
                Text(s.state, style=state_style),
                describe_throughput(s),
                f"{s.network_throughput:.0f}" if s.network_throughput is not None else "",
                f"{s.active_sessions}/{s.max_sessions}",
                str(s.free_cache_tokens),
                Text(describe_weights(s)),
                Text(describe_wire(s)),
                Text(describe_path(s)),
                f"{s.rtt_ms:.1f} ms" if s.rtt_ms is not None else Text("unreachable", style="red"),
            )
        console.print(table)
        if m.missing:
            console.print(Text(f"Missing blocks: {m.missing}", style="bold red"))
        else:
            console.print(Text(f"All {m.num_blocks} blocks are served.", style="green"))


def describe_throughput(server: ServerView) -> str:
    """Decode tokens/s through one block, alone and batched across sessions: "52 (610 batched)"."""
    if server.batch_throughput is None:
        return f"{server.throughput:.0f}"
    return f"{server.throughput:.0f} ({server.batch_throughput:.0f} batched)"


def describe_weights(server: ServerView) -> str:
    """How the server holds its weights: "float32", or "int8 (float32)" when quantized (computing in float32)."""
    return server.dtype if server.quant == "none" else f"{server.quant} ({server.dtype})"


def describe_wire(server: ServerView) -> str:
    """How the server sends hidden states, and what that measured per token: "int8, 578 B/token"."""
    if server.wire_dtype is None:
        return "?"
    if server.wire_bytes_per_token is None:
        return server.wire_dtype
    return f"{server.wire_dtype}, {server.wire_bytes_per_token:.0f} B/token"


def describe_path(server: ServerView) -> str:
    """How this peer reaches the server: "direct", "hole-punched", or "relayed via …<relay>"."""
    path = server.path
    return f"relayed via …{server.relay[-8:]}" if path == "relayed" and server.relay else path
