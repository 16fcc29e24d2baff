"""Reaching servers behind NATs: a reachability check at join, and relays that carry their traffic.

A server behind a NAT can dial out but cannot be dialled. At ``join`` it asks its initial peers to dial it back
(:func:`check_reachability`). If none can, it keeps a registration stream open to each relay
(:class:`RelayRegistration`): the connection it opened stays up, and the relay opens streams to the server over
it. Clients and other servers then reach the server through a relay (:class:`RelayedStub`): the relay pipes
each RPC stream to the server at the application level, so, unlike libp2p's circuit relay (capped at 128 KiB
per connection), it carries whole inference sessions.

Every ``molink-swarm dht`` peer runs :class:`RelayService`. It relays only to servers registered with it and
only our own RPCs, so it is not an open proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
from typing import AsyncIterator, Collection, Mapping, Optional, Sequence

from hivemind.p2p import P2P, P2PContext, P2PDaemonError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from molink_swarm import wire
from molink_swarm.dht.records import Reachability
from molink_swarm.dht.swarm_dht import peers_unreachable
from molink_swarm.errors import UserError
from molink_swarm.protocol.streams import GuardedServicer
from molink_swarm.server.handler import BlockServicer

logger = logging.getLogger(__name__)

STREAM_METHODS = frozenset({"rpc_inference", "rpc_forward", "rpc_push_stream"})
UNARY_METHODS = frozenset({"rpc_info", "rpc_ping", "rpc_push"})
_ROUTE_PREFIX = "relay-to:"  # in ExpertRequest.uid of the first message: "relay-to:<peer id>:<method>"
DIAL_BACK_TIMEOUT = 3.0


# ---- the relay side


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

    async def rpc_dial_back(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Try to open a TCP connection to the caller's observed IP on each port it names."""
        asked = wire.decode_metadata(request.metadata, wire.DialBackRequest)
        ip = await observed_ip(self.p2p, context.remote_id)
        reachable = []
        if ip is not None:
            results = await asyncio.gather(*(_tcp_connects(ip, port) for port in asked.ports))
            reachable = [port for port, ok in zip(asked.ports, results) if ok]
        return runtime_pb2.ExpertResponse(metadata=wire.encode_metadata(wire.DialBackReply(observed_ip=ip, reachable_ports=reachable)))

    async def rpc_register(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A server behind a NAT keeps this stream open for as long as it wants to be relayed."""
        peer = context.remote_id
        if peer not in self.registered and len(self.registered) >= self.max_registered:
            raise wire.ProtocolError("This relay is full; try another one")
        self.registered[peer] = self.registered.get(peer, 0) + 1
        logger.info("Relaying for %s", peer)
        try:
            ip = await observed_ip(self.p2p, peer)
            yield runtime_pb2.ExpertResponse(metadata=wire.encode_metadata(wire.RelayRegistered(observed_ip=ip)))
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
        target, method = self._route(first, STREAM_METHODS, context)
        if self._streams.get(target, 0) >= self.max_streams_per_target:
            raise wire.ProtocolError(f"Too many relayed streams to {target}")
        if self.open_streams >= self.max_streams:
            raise wire.ProtocolError("This relay is busy; try another one")

        async def forward() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            yield first
            async for item in requests:
                yield item

        self._streams[target] = self._streams.get(target, 0) + 1
        try:
            replies = await getattr(BlockServicer.get_stub(self.p2p, target), method)(forward())
            async for reply in replies:
                yield reply
        finally:
            self._streams[target] -= 1
            if not self._streams[target]:
                del self._streams[target]

    @property
    def open_streams(self) -> int:
        return sum(self._streams.values())

    async def rpc_relay_load(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """What clients weigh when they route through this relay."""
        load = wire.RelayLoad(streams=self.open_streams, max_streams=self.max_streams)
        return runtime_pb2.ExpertResponse(metadata=wire.encode_metadata(load))

    async def rpc_relay_call(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        target, method = self._route(request, UNARY_METHODS, context)
        return await getattr(BlockServicer.get_stub(self.p2p, target), method)(request, timeout=30.0)

    def _route(
        self, request: runtime_pb2.ExpertRequest, allowed: frozenset[str], context: P2PContext
    ) -> tuple[PeerID, str]:
        """Parse and check the route in the first message's uid, then replace it with the caller's peer id (the
        server takes a session's inputs only from the peers its owner named)."""
        if not request.uid.startswith(_ROUTE_PREFIX):
            raise wire.ProtocolError("A relayed call must start with its route (relay-to:<peer id>:<method>)")
        try:
            peer_text, method = request.uid.removeprefix(_ROUTE_PREFIX).split(":")
            target = PeerID.from_base58(peer_text)
        except Exception:
            raise wire.ProtocolError(f"Malformed relay route {request.uid[:120]!r}") from None
        if method not in allowed:
            raise wire.ProtocolError(f"{method!r} cannot be relayed")
        if target not in self.registered:
            raise wire.ProtocolError(f"{peer_text} is not registered with this relay")
        request.uid = wire.RELAYED_FROM + context.remote_id.to_base58()
        return target, method


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


# ---- the caller side


class RelayedStub:
    """Has the methods of a :class:`BlockServicer` stub, but every call goes through ``relay``."""

    def __init__(self, p2p: P2P, relay: PeerID, target: PeerID):
        self._relay = RelayService.get_stub(p2p, relay)
        self._route = f"{_ROUTE_PREFIX}{target.to_base58()}:"

    def __getattr__(self, method: str):
        if method in STREAM_METHODS:

            async def call(requests: AsyncIterator[runtime_pb2.ExpertRequest]):
                return await self._relay.rpc_relay_stream(self._tagged_stream(requests, method))

        elif method in UNARY_METHODS:

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
        return BlockServicer.get_stub(p2p, peer)
    return RelayedStub(p2p, wire.relay_peer_id(relay), peer)


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


def relay_of(record, *, loads: Mapping[str, float] = {}, salt: str = "") -> Optional[str]:
    """The relay to reach a server through (None: dial it directly), from its :class:`ServerRecord`."""
    if record.reachability != Reachability.RELAYED or not record.relay_addrs:
        return None
    return choose_relay(record.relay_addrs, loads=loads, salt=salt)


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
        reply = await RelayService.get_stub(p2p, wire.relay_peer_id(relay)).rpc_relay_load(
            runtime_pb2.ExpertRequest(), timeout=timeout
        )
        load = wire.decode_metadata(reply.metadata, wire.RelayLoad)
    except Exception as e:
        logger.debug("Relay %s did not say its load: %r", relay, e)
        return 1.0
    return min(1.0, load.streams / load.max_streams)


async def directly_connected(p2p: P2P, peer: PeerID) -> bool:
    for info in await p2p.list_peers():
        if info.peer_id == peer and any("p2p-circuit" not in str(addr) for addr in info.addrs):
            return True
    return False


# ---- the server side


@dataclasses.dataclass
class ReachabilityCheck:
    reachable: bool
    observed_ip: Optional[str]
    relays: list[str]  # multiaddrs (with /p2p/<id>) of the initial peers that answered


async def check_reachability(initial_peers: Sequence[str], host: str, port: int, timeout: float = 10.0) -> ReachabilityCheck:
    """Ask the initial peers to dial ``port`` back at our public IP; a temporary listener answers them."""

    def on_connect(reader, writer):
        writer.close()

    try:
        listener = await asyncio.start_server(on_connect, host, port, reuse_address=True)
    except OSError as e:
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None
    try:
        p2p = await P2P.create(initial_peers=list(initial_peers), host_maddrs=["/ip4/0.0.0.0/tcp/0"], dht_mode="client")
    except P2PDaemonError as e:
        listener.close()
        raise peers_unreachable(initial_peers, e) from None
    try:
        peers = list(dict.fromkeys(initial_peers))[:4]
        request = runtime_pb2.ExpertRequest(metadata=wire.encode_metadata(wire.DialBackRequest(ports=[port])))

        async def ask(maddr: str) -> Optional[wire.DialBackReply]:
            try:
                await connect(p2p, maddr)
                stub = RelayService.get_stub(p2p, wire.relay_peer_id(maddr))
                reply = await stub.rpc_dial_back(request, timeout=timeout)
                return wire.decode_metadata(reply.metadata, wire.DialBackReply)
            except Exception as e:  # a peer without the service, or unreachable: it just does not count
                logger.debug("Dial-back via %s failed: %r", maddr, e)
                return None

        replies = await asyncio.gather(*(ask(m) for m in peers))
    finally:
        await p2p.shutdown()
        listener.close()
    answered = [(m, r) for m, r in zip(peers, replies) if r is not None]
    reachable = any(port in r.reachable_ports for _, r in answered)
    observed = next((r.observed_ip for _, r in answered if r.observed_ip), None)
    return ReachabilityCheck(reachable=reachable or not answered, observed_ip=observed, relays=[m for m, _ in answered])


class RelayRegistration:
    """Keeps a registration stream open to each relay, re-opening it when it drops."""

    def __init__(self, p2p: P2P, relays: Sequence[str], keepalive_s: float = 20.0):
        self.p2p, self.relays, self.keepalive_s = p2p, list(relays), keepalive_s
        self.active: set[str] = set()
        self._tasks = [asyncio.create_task(self._keep(relay)) for relay in self.relays]

    async def wait_registered(self, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return bool(self.active)

    async def _keep(self, relay: str) -> None:
        backoff = 1.0
        while True:
            try:
                await connect(self.p2p, relay)
                stop = asyncio.Event()

                async def keepalives():
                    yield runtime_pb2.ExpertRequest()
                    while not stop.is_set():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), self.keepalive_s)
                        yield runtime_pb2.ExpertRequest()

                replies = await RelayService.get_stub(self.p2p, wire.relay_peer_id(relay)).rpc_register(keepalives())
                try:
                    async for _ in replies:
                        self.active.add(relay)
                        backoff = 1.0
                finally:
                    stop.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("Relay %s dropped us (%r); re-registering in %.0f s", relay, e, backoff)
            self.active.discard(relay)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
