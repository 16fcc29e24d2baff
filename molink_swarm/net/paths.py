"""How a caller reaches a server: directly, through one of the relays it announced, or hole-punched.

A server behind a NAT announces relays (reachability.py); a caller picks the least loaded one
(:func:`choose_relay`) and wraps its calls in the route the relay reads (:class:`RelayedStub`). Meanwhile it
tries to punch a hole to the server (:func:`hole_punch`); once it holds a direct connection, calls go direct.

A relay sees what it pipes, so relayed streams (the ones that carry activations) run an end-to-end channel keyed
to the server's peer identity (protocol/e2e.py): the relay reads the route and nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import AsyncIterator, Collection, Mapping, Optional, Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from molink_swarm.net.relay import ROUTE_PREFIX, RelayService
from molink_swarm.protocol import e2e, messages
from molink_swarm.protocol.rpc import RELAYED_UNARY_RPCS, STREAM_RPCS, block_stub

logger = logging.getLogger(__name__)


# Benchmarks only (benchmarks/bench_relay_e2e.py compares both): False sends relayed streams in clear.
END_TO_END = True


class RelayedStub:
    """Has the methods of a :class:`BlockRPC` stub, but every call goes through ``relay``. Its streams are sealed
    end to end (protocol/e2e.py); its unary calls (ping, info: no activations) go as they are."""

    def __init__(self, p2p: P2P, relay: PeerID, target: PeerID):
        self._relay = RelayService.get_stub(p2p, relay)
        self._route = f"{ROUTE_PREFIX}{target.to_base58()}:"
        self._caller, self._target = p2p.peer_id, target

    def __getattr__(self, method: str):
        if method in STREAM_RPCS:

            async def call(requests: AsyncIterator[runtime_pb2.ExpertRequest]):
                def open_stream(sent: AsyncIterator[runtime_pb2.ExpertRequest]):
                    return self._relay.rpc_relay_stream(self._tagged_stream(sent, method))

                if not END_TO_END:
                    return await open_stream(requests)
                return await e2e.call_sealed(open_stream, requests, method=method, caller=self._caller, server=self._target)

        elif method in RELAYED_UNARY_RPCS:

            async def call(request: runtime_pb2.ExpertRequest, timeout: Optional[float] = None):
                return await self._relay.rpc_relay_call(self._tagged(request, method), timeout=timeout)

        else:
            raise AttributeError(method)
        return call

    def _tagged(self, request: runtime_pb2.ExpertRequest, method: str) -> runtime_pb2.ExpertRequest:
        """A copy of ``request`` that carries the route (the caller's message is left as it is)."""
        tagged = runtime_pb2.ExpertRequest()
        tagged.CopyFrom(request)
        tagged.uid = self._route + method
        return tagged

    async def _tagged_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], method: str):
        first = True
        async for request in requests:
            yield self._tagged(request, method) if first else request
            first = False


def server_stub(p2p: P2P, peer: PeerID, relay: Optional[str] = None):
    """A stub that calls ``peer`` directly, or through the relay (a multiaddr ending in /p2p/<id>) if given."""
    if relay is None:
        return block_stub(p2p, peer)
    return RelayedStub(p2p, messages.relay_peer_id(relay), peer)


def choose_relay(
    relays: Sequence[str], *, loads: Mapping[str, float] = {}, failed: Collection[str] = (), salt: str = ""
) -> Optional[str]:
    """Which of the relays a server announced to go through: the least loaded one that has not failed (loads
    within 5% count as equal); among equals, the one that ``salt`` (the caller's peer id) hashes first, so that
    different callers spread over them instead of all piling onto one. None if every relay has failed."""
    usable = [relay for relay in relays if relay not in failed]
    if not usable:
        return None

    def rank(relay: str) -> tuple[int, bytes]:
        return round(20 * min(max(loads.get(relay, 0.0), 0.0), 1.0)), hashlib.sha256(f"{salt}|{relay}".encode()).digest()

    return min(usable, key=rank)


async def connect(p2p: P2P, maddr: str) -> None:
    """Make sure we have a connection to the peer at ``maddr`` (dialling it if needed)."""
    addr = Multiaddr(maddr)
    peer = PeerID.from_base58(addr.value_for_protocol("p2p"))
    await p2p._client.connect(peer, [addr.decapsulate(Multiaddr(f"/p2p/{peer.to_base58()}"))])


async def hole_punch(p2p: P2P, peer: PeerID, relay: str, *, attempts: int = 1, wait_s: float = 5.0) -> bool:
    """Try to get a direct connection to a server behind a NAT; True if we hold one.

    We open a libp2p circuit-relay connection through ``relay`` (where the server holds a reservation). That
    connection carries little (libp2p caps it), but over it both sides run DCUtR: they learn each other's
    public addresses and dial each other at once, which NATs that drop unsolicited packets let through."""
    for _ in range(attempts):
        if await directly_connected(p2p, peer):
            return True
        try:
            await p2p._client.connect(peer, [Multiaddr(f"{relay}/p2p-circuit")])
        except Exception as e:  # no reservation there (yet)
            logger.debug("Circuit connection to %s failed: %r", peer, e)
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline:
            if await directly_connected(p2p, peer):
                return True
            await asyncio.sleep(0.25)
    return False


async def relay_load(p2p: P2P, relay: str, timeout: float = 5.0) -> float:
    """The fraction of its stream capacity a relay uses (1.0 if it does not answer)."""
    try:
        reply = await RelayService.get_stub(p2p, messages.relay_peer_id(relay)).rpc_relay_load(
            runtime_pb2.ExpertRequest(), timeout=timeout
        )
        load = messages.decode_metadata(reply.metadata, messages.RelayLoad)
    except Exception as e:
        logger.debug("Relay %s did not say its load: %r", relay, e)
        return 1.0
    return min(1.0, load.streams / load.max_streams)


async def directly_connected(p2p: P2P, peer: PeerID) -> bool:
    for info in await p2p.list_peers():
        if info.peer_id == peer and any("p2p-circuit" not in str(addr) for addr in info.addrs):
            return True
    return False
