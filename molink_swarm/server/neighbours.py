"""A server measures its round trip to the servers that may come after it in a chain, and announces them.

Clients cannot measure server-to-server latency themselves; with these announced RTTs the planner can cost a
chain whose servers forward activations straight to each other. Now and then it also measures how fast it can send
to the closest of them: the best of those is what its link carries at least (placement counts it, see
routing/placement.py).
"""

from __future__ import annotations

import asyncio
from typing import Optional

from hivemind.p2p import P2P, PeerID

from molink_swarm.dht import ServerState, fetch_servers
from molink_swarm.net.links import PeerLinks

MAX_ANNOUNCED = 32
BANDWIDTH_EVERY = 8  # refreshes between two bandwidth probes (each sends a few hundred KB to a few neighbours)
BANDWIDTH_PEERS = 3


class NextServerPinger:
    def __init__(self, dht, p2p: P2P, model_id: str, num_blocks: int, end: int, own_peer_id: PeerID):
        self.dht = dht
        self.model_id, self.num_blocks, self.end, self.own_peer_id = model_id, num_blocks, end, own_peer_id
        # Hole punches made here also serve the pushes to those servers (PushChannel checks for the connection).
        self.links = PeerLinks(p2p)
        self.refreshes = 0

    @property
    def bandwidth(self) -> Optional[float]:
        """Bytes/s this server could send to its best-connected next server (None: nothing measured)."""
        return max(self.links.bandwidths.values(), default=None)

    def next_candidates(self, servers) -> dict[PeerID, tuple[str, ...]]:
        """Online servers that can take a chain from where this server's span ends, with their relays."""
        return {
            s.peer_id: s.record.relays
            for s in servers
            if s.peer_id != self.own_peer_id and s.record.state == ServerState.ONLINE and s.record.start <= self.end < s.record.end
        }

    async def refresh(self, timeout: float = 2.0) -> dict[str, float]:
        """Ping the candidates; returns ``{peer id: smoothed RTT in seconds}`` of the closest ones."""
        if self.end >= self.num_blocks:
            return {}
        servers = await asyncio.to_thread(fetch_servers, self.dht, self.model_id, self.num_blocks)
        candidates = self.next_candidates(servers)
        await self.links.update(candidates)
        await self.links.ping_all(list(candidates), timeout)
        closest = sorted(self.links.rtts.items(), key=lambda item: item[1])[:MAX_ANNOUNCED]
        if self.refreshes % BANDWIDTH_EVERY == 0:
            await asyncio.gather(*(self.links.measure_bandwidth(peer) for peer, _ in closest[:BANDWIDTH_PEERS]))
        self.refreshes += 1
        return {peer.to_base58(): round(rtt, 6) for peer, rtt in closest}

    async def close(self) -> None:
        await self.links.close()
