"""The relay: public peers carry the traffic of servers behind NATs.

A server behind a NAT (see reachability.py) keeps a registration stream open to each relay: the connection it
opened stays up, and the relay opens streams to the server over it. Callers reach the server through a relay
(paths.py): the relay pipes each RPC stream to the server at the application level, so, unlike libp2p's circuit
relay (capped at 128 KiB per connection), it carries whole inference sessions.

Every ``molink-swarm dht`` peer runs :class:`RelayService`. It relays only to servers registered with it and
only our own RPCs, so it is not an open proxy. What it pipes of a stream is sealed end to end between the caller
and the server (protocol/e2e.py): it reads the route in the first message, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from typing import AsyncIterator, Optional

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from molink_swarm.protocol import messages
from molink_swarm.protocol.rpc import RELAYED_UNARY_RPCS, STREAM_RPCS, block_stub
from molink_swarm.protocol.streams import GuardedServicer

logger = logging.getLogger(__name__)

ROUTE_PREFIX = "relay-to:"  # in ExpertRequest.uid of the first message: "relay-to:<peer id>:<method>"
DIAL_BACK_TIMEOUT = 3.0
TESTING_FAULTS_ENV = "MOLINK_SWARM_TESTING_RELAY_FAULTS"  # testing only: see _TestingFaults


class RelayService(GuardedServicer):
    """Runs on public peers: dial-back checks for joining servers, and RPC relaying to registered servers."""

    def __init__(
        self, p2p: P2P, *, max_registered: int = 1024, max_streams_per_target: int = 256, max_streams: int = 2048
    ):
        super().__init__()
        self.p2p = p2p
        self.max_registered, self.max_streams_per_target = max_registered, max_streams_per_target
        self.max_streams = max_streams
        self.registered: dict[PeerID, int] = {}  # server -> open registration streams
        self._streams: dict[PeerID, int] = {}  # server -> streams piped to it now
        self._faults = _TestingFaults.from_env(p2p.peer_id)

    async def rpc_dial_back(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Try to open a TCP connection to the caller's observed IP on each port it names."""
        asked = messages.decode_metadata(request.metadata, messages.DialBackRequest)
        ip = await observed_ip(self.p2p, context.remote_id)
        reachable = []
        if ip is not None:
            results = await asyncio.gather(*(_tcp_connects(ip, port) for port in asked.ports))
            reachable = [port for port, ok in zip(asked.ports, results) if ok]
        return runtime_pb2.ExpertResponse(metadata=messages.encode_metadata(messages.DialBackReply(observed_ip=ip, reachable_ports=reachable)))

    async def rpc_register(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A server behind a NAT keeps this stream open for as long as it wants to be relayed."""
        peer = context.remote_id
        if peer not in self.registered and len(self.registered) >= self.max_registered:
            raise messages.ProtocolError("This relay is full; try another one")
        self.registered[peer] = self.registered.get(peer, 0) + 1
        logger.info("Relaying for %s", peer)
        try:
            ip = await observed_ip(self.p2p, peer)
            yield runtime_pb2.ExpertResponse(metadata=messages.encode_metadata(messages.RelayRegistered(observed_ip=ip)))
            async for _ in requests:  # keep-alives; the stream ends when the server leaves
                pass
        finally:
            self.registered[peer] -= 1
            if not self.registered[peer]:
                del self.registered[peer]
                logger.info("Stopped relaying for %s", peer)

    async def rpc_relay_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        first = await anext(requests, None)
        if first is None:
            return
        target, method = self._route(first, STREAM_RPCS, context)
        if self._streams.get(target, 0) >= self.max_streams_per_target:
            raise messages.ProtocolError(f"Too many relayed streams to {target}")
        if self.open_streams >= self.max_streams:
            raise messages.ProtocolError("This relay is busy; try another one")

        faults = self._faults

        async def forward() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            yield faults.carried(first) if faults else first
            previous = first
            async for item in requests:
                if faults:
                    for request in faults.requests(method, previous, item):
                        yield request
                else:
                    yield item
                previous = item

        self._streams[target] = self._streams.get(target, 0) + 1
        try:
            replies = await getattr(block_stub(self.p2p, target), method)(forward())
            async for reply in replies:
                yield faults.reply(method, reply) if faults else reply
        finally:
            self._streams[target] -= 1
            if not self._streams[target]:
                del self._streams[target]

    @property
    def open_streams(self) -> int:
        return sum(self._streams.values())

    async def rpc_relay_load(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """What clients weigh when they route through this relay."""
        load = messages.RelayLoad(streams=self.open_streams, max_streams=self.max_streams)
        return runtime_pb2.ExpertResponse(metadata=messages.encode_metadata(load))

    async def rpc_relay_call(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        target, method = self._route(request, RELAYED_UNARY_RPCS, context)
        if self._faults:
            self._faults.carried(request)
        reply = await getattr(block_stub(self.p2p, target), method)(request, timeout=30.0)
        return self._faults.carried(reply) if self._faults else reply

    def _route(
        self, request: runtime_pb2.ExpertRequest, allowed: frozenset[str], context: P2PContext
    ) -> tuple[PeerID, str]:
        """Parse and check the route in the first message's uid, then replace it with the caller's peer id (the
        server takes a session's inputs only from the peers its owner named)."""
        if not request.uid.startswith(ROUTE_PREFIX):
            raise messages.ProtocolError("A relayed call must start with its route (relay-to:<peer id>:<method>)")
        try:
            peer_text, method = request.uid.removeprefix(ROUTE_PREFIX).split(":")
            target = PeerID.from_base58(peer_text)
        except Exception:
            raise messages.ProtocolError(f"Malformed relay route {request.uid[:120]!r}") from None
        if method not in allowed:
            raise messages.ProtocolError(f"{method!r} cannot be relayed")
        if target not in self.registered:
            raise messages.ProtocolError(f"{peer_text} is not registered with this relay")
        request.uid = messages.RELAYED_FROM + context.remote_id.to_base58()
        return target, method


class _TestingFaults:
    """TESTING ONLY (tests/test_relay_e2e.py): a relay that logs what it carries, or misbehaves on purpose.

    Inert unless the environment variable TESTING_FAULTS_ENV names a folder. Then, for each message it pipes,
    the relay looks there for files named after its peer id:
    - ``<peer id>.log`` exists: it appends the bytes of every message it carries (both ways) to ``<peer id>.carried``;
    - ``<peer id>.fault`` says ``flip``: it flips one bit of the next reply of an inference stream; ``replay``: it
      sends the previous request of an inference stream again before the next one. Either fires once, then the
      file is renamed ``<peer id>.fired``."""

    def __init__(self, folder: str, peer_id: PeerID):
        base = os.path.join(folder, peer_id.to_base58())
        self._log, self._carried, self._fault, self._fired = base + ".log", base + ".carried", base + ".fault", base + ".fired"

    @classmethod
    def from_env(cls, peer_id: PeerID) -> Optional["_TestingFaults"]:
        folder = os.environ.get(TESTING_FAULTS_ENV)
        if not folder:
            return None
        logger.warning("TESTING ONLY: this relay logs or alters what it carries when told to (%s)", TESTING_FAULTS_ENV)
        return cls(folder, peer_id)

    def carried(self, message):
        if os.path.exists(self._log):
            with open(self._carried, "ab") as f:
                f.write(message.SerializeToString())
        return message

    def requests(self, method: str, previous, request) -> list:
        if method == "rpc_inference" and self._fire("replay"):
            return [self.carried(previous), self.carried(request)]
        return [self.carried(request)]

    def reply(self, method: str, reply):
        if method == "rpc_inference" and reply.metadata and self._fire("flip"):
            data = bytearray(reply.metadata)
            data[len(data) // 2] ^= 0x01
            reply = runtime_pb2.ExpertResponse(metadata=bytes(data), tensors=reply.tensors)
        return self.carried(reply)

    def _fire(self, mode: str) -> bool:
        try:
            with open(self._fault) as f:
                if f.read().strip() != mode:
                    return False
            os.replace(self._fault, self._fired)
        except OSError:
            return False
        logger.warning("TESTING ONLY: %s a message on purpose", {"flip": "flipped a bit of", "replay": "replayed"}[mode])
        return True


async def observed_ip(p2p: P2P, peer: PeerID) -> Optional[str]:
    """The IP a peer's connection to us comes from (its NAT's public address, if it is behind one)."""
    for info in await p2p.list_peers():
        if info.peer_id == peer:
            for addr in info.addrs:
                ip = _ip_of(addr)
                if ip is not None:
                    return ip
    return None


def _ip_of(addr: Multiaddr) -> Optional[str]:
    if "p2p-circuit" in str(addr):
        return None  # a relayed connection: the address is the relay's
    for proto in ("ip4", "ip6"):
        with contextlib.suppress(Exception):
            return str(ipaddress.ip_address(addr.value_for_protocol(proto)))
    return None


async def _tcp_connects(ip: str, port: int, timeout: float = DIAL_BACK_TIMEOUT) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True
