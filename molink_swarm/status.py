"""`molink-swarm status`: a table of the swarm as seen from here."""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from molink_swarm.dht import ServerState, fetch_models, fetch_servers, start_dht
from molink_swarm.routing.placement import block_coverage
from molink_swarm.routing.planner import format_blocks


def print_status(initial_peers: Sequence[str], model: Optional[str] = None, console: Optional[Console] = None) -> None:
    from hivemind.proto import runtime_pb2

    from molink_swarm.server.handler import BlockServicer

    console = console or Console()
    dht, _ = start_dht(initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        models = fetch_models(dht)
        if model:
            models = {k: v for k, v in models.items() if model in (k, v.name)}
        if not models:
            console.print("No models are announced in this swarm yet. Start a server: molink-swarm join --model M --initial-peers ...")
            return

        async def ping_all(peer_ids) -> dict:
            p2p = await dht.replicate_p2p()

            async def ping(peer_id):
                loop = asyncio.get_running_loop()
                started = loop.time()
                try:
                    await BlockServicer.get_stub(p2p, peer_id).rpc_ping(runtime_pb2.ExpertRequest(), timeout=5)
                    return peer_id, loop.time() - started
                except Exception:  # unreachable: shown as such
                    return peer_id, None

            return dict(await asyncio.gather(*(ping(p) for p in peer_ids)))

        servers_by_model = {m: fetch_servers(dht, m, r.num_blocks) for m, r in models.items()}
        all_peers = {s.peer_id for servers in servers_by_model.values() for s in servers}
        rtts = asyncio.run(ping_all(all_peers)) if all_peers else {}
        for model_id, record in sorted(models.items()):
            servers = servers_by_model[model_id]
            table = Table(title=f"{record.name}  ({model_id}, {record.num_blocks} blocks, {record.model_type})")
            for column in ("peer", "name", "blocks", "state", "tokens/s/block", "sessions", "free cache", "reach", "RTT"):
                table.add_column(column)
            for s in servers:
                r = s.record
                rtt = rtts.get(s.peer_id)
                state_style = {ServerState.ONLINE: "green", ServerState.JOINING: "yellow"}.get(r.state, "red")
                table.add_row(
                    str(s.peer_id)[-10:],
                    r.public_name or "",
                    f"{r.start}:{r.end}",
                    Text(r.state.value, style=state_style),
                    f"{r.throughput:.0f}",
                    f"{r.active_sessions}/{r.max_sessions}",
                    str(r.free_cache_tokens),
                    r.reachability.value,
                    f"{rtt * 1000:.1f} ms" if rtt is not None else Text("unreachable", style="red"),
                )
            console.print(table)
            online = [(s.record.start, s.record.end) for s in servers if s.record.state == ServerState.ONLINE]
            missing = [i for i, c in enumerate(block_coverage(record.num_blocks, online)) if c == 0]
            if missing:
                console.print(Text(f"Missing blocks: {format_blocks(missing)}", style="bold red"))
            else:
                console.print(Text(f"All {record.num_blocks} blocks are served.", style="green"))
    finally:
        dht.shutdown()
