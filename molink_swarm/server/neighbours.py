"""A server measures its round trip to the servers that may come after it in a chain, and announces them.

Clients cannot measure server-to-server latency themselves; with these announced RTTs the planner can cost a
chain whose servers forward activations straight to each other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm.dht import ServerState, fetch_servers
from molink_swarm.relay import hole_punch, relay_of, server_stub

logger = logging.getLogger(__name__)

MAX_ANNOUNCED = 32


class NextServerPinger:
    def __init__(self, dht, p2p: P2P, model_id: str, num_blocks: int, end: int, own_peer_id: PeerID):
        self.dht, self.p2p = dht, p2p
        self.model_id, self.num_blocks, self.end, self.own_peer_id = model_id, num_blocks, end, own_peer_id
        self.rtts: dict[PeerID, float] = {}
        self.hole_punched: set[PeerID] = set()

    def next_candidates(self, servers) -> dict[PeerID, Optional[str]]:
        """Online servers that can take a chain from where this server's span ends, with their relays."""
        return {
            s.peer_id: relay_of(s.record, salt=self.own_peer_id.to_base58())
            for s in servers
            if s.peer_id != self.own_peer_id and s.record.state == ServerState.ONLINE and s.record.start <= self.end < s.record.end
        }

    async def refresh(self, timeout: float = 2.0) -> dict[str, float]:
        """Ping the candidates; returns ``{peer id: smoothed RTT in seconds}`` of the closest ones."""
        if self.end >= self.num_blocks:
            return {}
        servers = await asyncio.to_thread(fetch_servers, self.dht, self.model_id, self.num_blocks)
        peers = self.next_candidates(servers)
        results = await asyncio.gather(*(self._ping(peer, relay, timeout) for peer, relay in peers.items()))
        for peer, rtt in zip(peers, results):
            if rtt is None:
                self.rtts.pop(peer, None)
            else:
                previous = self.rtts.get(peer)
                self.rtts[peer] = rtt if previous is None else 0.7 * previous + 0.3 * rtt
        for gone in set(self.rtts) - set(peers):
            del self.rtts[gone]
        closest = sorted(self.rtts.items(), key=lambda item: item[1])[:MAX_ANNOUNCED]
        return {peer.to_base58(): round(rtt, 6) for peer, rtt in closest}

    async def _ping(self, peer: PeerID, relay: Optional[str], timeout: float) -> Optional[float]:
        if relay is not None and await hole_punch(self.p2p, peer, relay, wait_s=timeout):
            relay = None  # pushes to it will go direct too (PushChannel checks for the connection)
            if peer not in self.hole_punched:
                self.hole_punched.add(peer)
                logger.info("Hole punched to the next server %s", peer)
        started = time.perf_counter()
        try:
            await server_stub(self.p2p, peer, relay).rpc_ping(runtime_pb2.ExpertRequest(), timeout=timeout)
        except Exception as e:  # unreachable neighbours are simply not announced
            logger.debug("Ping to next server %s failed: %r", peer, e)
            return None
        return time.perf_counter() - started
