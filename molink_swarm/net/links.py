"""How this peer reaches each server it calls, and how far each one is.

A client (its routes), a server (its announced RTTs to the next servers) and the status page (its path and RTT
columns) all ask the same two questions, so they share this one answer:
- the route to a server: directly; through the least loaded of the relays it announced that has not failed us
  (different callers spread over equally loaded relays); or directly again once a hole is punched to it;
- its round-trip time: pinged over that route and smoothed. A server that does not answer counts as
  unreachable for a while and is not pinged again meanwhile (a dead peer must not cost a timeout per plan).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping, Optional, Sequence

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm.net.paths import choose_relay, connect, hole_punch, relay_load, server_stub
from molink_swarm.protocol.messages import relay_peer_id

logger = logging.getLogger(__name__)

RTT_SMOOTHING = 0.2  # weight of a new sample in the moving average: one slow ping must not reroute sessions
RELAY_DIAL_TIMEOUT_S = 10.0


class PeerLinks:
    unreachable_for_s = 30.0

    def __init__(self, p2p: P2P, *, hole_punching: bool = True, punch_attempts: int = 6):
        self.p2p = p2p
        self.hole_punching, self.punch_attempts = hole_punching, punch_attempts
        self.salt = p2p.peer_id.to_base58()  # spreads callers over equally loaded relays
        self.rtts: dict[PeerID, float] = {}  # smoothed, in seconds
        self.bandwidths: dict[PeerID, float] = {}  # bytes/s we could send to them, smoothed
        self.routes: dict[PeerID, str] = {}  # server behind a NAT -> the relay (multiaddr) chosen to reach it
        self.hole_punched: set[PeerID] = set()  # relayed servers we now hold a direct connection to
        self.relay_loads: dict[str, float] = {}  # relay multiaddr -> fraction of its capacity in use
        self._announced: dict[PeerID, tuple[str, ...]] = {}  # server -> the relays it announced
        self._relays_dialled: set[str] = set()
        self._punching: dict[PeerID, asyncio.Task] = {}
        self._unreachable: dict[PeerID, float] = {}  # server whose ping failed -> until when it counts as far
        self._failed_relays: dict[tuple[PeerID, str], float] = {}  # (server, relay) that failed -> until when

    async def update(self, relays: Mapping[PeerID, Sequence[str]]) -> None:
        """The servers we may call, with the relays each announced (none: dial it directly). Chooses a relay for
        each server behind a NAT and starts punching holes to them; forgets servers no longer listed."""
        self._announced = {peer: tuple(addrs) for peer, addrs in relays.items()}
        for gone in set(self.rtts) - set(relays):
            del self.rtts[gone]
        every_relay = sorted({relay for addrs in self._announced.values() for relay in addrs})
        await asyncio.gather(*(self._dial_relay(r) for r in set(every_relay) - self._relays_dialled))
        loads = await asyncio.gather(*(self._relay_load(r) for r in every_relay))
        self.relay_loads = dict(zip(every_relay, loads))
        self.routes = {peer: self._relay_choice(peer) for peer, addrs in self._announced.items() if addrs}
        for peer, relay in self.routes.items() if self.hole_punching else ():
            if peer not in self.hole_punched and (peer not in self._punching or self._punching[peer].done()):
                self._punching[peer] = asyncio.create_task(self._hole_punch(peer, relay))

    def relay_for(self, peer: PeerID) -> Optional[str]:
        """The relay our calls to ``peer`` go through (None: directly, or hole-punched)."""
        return None if peer in self.hole_punched else self.routes.get(peer)

    def path_kind(self, peer: PeerID) -> str:
        """"direct", "hole-punched" or "relayed"."""
        if peer in self.hole_punched:
            return "hole-punched"
        return "relayed" if peer in self.routes else "direct"

    def path(self, peer: PeerID) -> str:
        """Like :meth:`path_kind`, naming the relay: "relayed via <relay peer id>"."""
        kind = self.path_kind(peer)
        return f"relayed via {relay_peer_id(self.routes[peer])}" if kind == "relayed" else kind

    def stub(self, peer: PeerID):
        return server_stub(self.p2p, peer, self.relay_for(peer))

    def unreachable(self) -> set[PeerID]:
        """Servers whose last ping failed recently."""
        now = time.monotonic()
        return {peer for peer, until in self._unreachable.items() if until > now}

    async def ping(self, peer: PeerID, timeout: float = 5.0) -> Optional[float]:
        """One round trip to ``peer`` (through its relays in turn, if it is behind a NAT); None if it does not
        answer, and then it counts as unreachable for ``unreachable_for_s``. The first ping of a peer is taken twice:
        the first also opened the connection (a dial, the security and muxer handshakes), which later calls do not
        pay."""
        first = peer not in self.rtts
        rtt = await self._round_trip(peer, timeout)
        if rtt is not None and first:
            rtt = await self._round_trip(peer, timeout) or rtt
        if rtt is not None:
            previous = self.rtts.get(peer)
            self.rtts[peer] = rtt if previous is None else (1 - RTT_SMOOTHING) * previous + RTT_SMOOTHING * rtt
        return rtt

    async def _round_trip(self, peer: PeerID, timeout: float) -> Optional[float]:
        while True:
            relay = self.relay_for(peer)
            started = time.perf_counter()
            try:
                await self.stub(peer).rpc_ping(runtime_pb2.ExpertRequest(), timeout=timeout)
                break
            except Exception as e:
                logger.debug("Ping to %s failed: %r", peer, e)
                if relay is not None and await self.next_relay(peer, relay) is not None:
                    continue
                self._unreachable[peer] = time.monotonic() + self.unreachable_for_s
                self.rtts.pop(peer, None)
                return None
        self._unreachable.pop(peer, None)
        return time.perf_counter() - started

    async def measure_bandwidth(self, peer: PeerID, payload_bytes: int = 256 << 10, timeout: float = 10.0) -> Optional[float]:
        """Bytes/s to ``peer``: a ping carrying ``payload_bytes`` (the server echoes only a few of them) against a
        plain one. None if either fails."""
        try:
            started = time.perf_counter()
            await self.stub(peer).rpc_ping(runtime_pb2.ExpertRequest(), timeout=timeout)
            empty_s = time.perf_counter() - started
            started = time.perf_counter()
            await self.stub(peer).rpc_ping(runtime_pb2.ExpertRequest(metadata=bytes(payload_bytes)), timeout=timeout)
            full_s = time.perf_counter() - started
        except Exception as e:
            logger.debug("Bandwidth probe to %s failed: %r", peer, e)
            return None
        rate = payload_bytes / max(full_s - empty_s, 1e-4)
        previous = self.bandwidths.get(peer)
        self.bandwidths[peer] = rate if previous is None else (1 - RTT_SMOOTHING) * previous + RTT_SMOOTHING * rate
        return rate

    async def ping_all(self, peers: Sequence[PeerID], timeout: float = 5.0) -> None:
        """Ping every one of ``peers`` that is not known to be unreachable."""
        unreachable = self.unreachable()
        await asyncio.gather(*(self.ping(peer, timeout) for peer in peers if peer not in unreachable))

    async def next_relay(self, peer: PeerID, failed_relay: str) -> Optional[str]:
        """Calls to ``peer`` through ``failed_relay`` failed: route them through its next relay, if it has one."""
        self._failed_relays[(peer, failed_relay)] = time.monotonic() + self.unreachable_for_s
        relay = self._usable_relay(peer)
        if relay is None:
            return None
        if relay not in self._relays_dialled:
            await self._dial_relay(relay)
        self.routes[peer] = relay
        logger.info("Calls to %s through relay %s failed; trying relay %s", peer, relay_peer_id(failed_relay), relay_peer_id(relay))
        return relay

    async def wait_hole_punching(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every hole punching started so far has succeeded or given up."""
        tasks = [task for task in self._punching.values() if not task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        for task in self._punching.values():
            task.cancel()
        await asyncio.gather(*self._punching.values(), return_exceptions=True)

    def _relay_choice(self, peer: PeerID) -> str:
        choice = self._usable_relay(peer)
        if choice is None:  # every relay failed it: start over
            for relay in self._announced[peer]:
                self._failed_relays.pop((peer, relay), None)
            choice = self._usable_relay(peer)
        return choice

    def _usable_relay(self, peer: PeerID) -> Optional[str]:
        now = time.monotonic()
        failed = {relay for (p, relay), until in self._failed_relays.items() if p == peer and until > now}
        return choose_relay(self._announced.get(peer, ()), loads=self.relay_loads, failed=failed, salt=self.salt)

    async def _hole_punch(self, peer: PeerID, relay: str) -> None:
        """Until it succeeds the relay carries the calls; a fresh peer's public address takes seconds to be
        confirmed, hence a few attempts."""
        if await hole_punch(self.p2p, peer, relay, attempts=self.punch_attempts):
            self.hole_punched.add(peer)
            logger.info("Hole punched to %s", peer)
        else:
            logger.info("No direct connection to %s (its NAT or ours does not allow it); staying relayed", peer)

    async def _dial_relay(self, relay: str) -> None:
        try:
            await asyncio.wait_for(connect(self.p2p, relay), RELAY_DIAL_TIMEOUT_S)
            self._relays_dialled.add(relay)
        except Exception as e:  # it ranks last (fully loaded); calls through it fail over to the next relay
            logger.warning("Cannot reach relay %s: %r", relay, e)

    async def _relay_load(self, relay: str) -> float:
        return await relay_load(self.p2p, relay) if relay in self._relays_dialled else 1.0
