"""A client's view of the swarm: its DHT peer, P2P connection, known servers and measured latencies."""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from typing import Optional, Sequence

from hivemind.p2p import PeerID
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from molink_swarm.client.loop import run_sync
from molink_swarm.dht import ServerInfo, ServerState, fetch_servers, start_dht
from molink_swarm.relay import connect, hole_punch, relay_load, relay_of, server_stub
from molink_swarm.routing.planner import Candidate
from molink_swarm.wire import ServerStatus, decode_metadata, relay_peer_id

logger = logging.getLogger(__name__)


class SwarmClient:
    """Finds the servers of one model and keeps their round-trip times (exponential moving average)."""

    def __init__(
        self,
        initial_peers: Sequence[str],
        model_id: str,
        fingerprint: str,
        num_blocks: int,
        *,
        refresh_period: float = 5.0,
        hole_punching: bool = True,
    ):
        self.model_id, self.fingerprint, self.num_blocks = model_id, fingerprint, num_blocks
        self.refresh_period = refresh_period
        self.hole_punching = hole_punching
        # Listening on every interface makes outgoing connections leave from that port, so a NAT maps them all
        # to one public address that peers can observe: hole punching needs it.
        self.dht, _ = start_dht(initial_peers, client_mode=True, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
        self.p2p: P2P = run_sync(self.dht.replicate_p2p())
        self.rtts: dict[PeerID, float] = {}
        self.departed: set[PeerID] = set()  # were online, now offline or gone from the DHT
        self.routes: dict[PeerID, str] = {}  # servers behind NATs -> the relay (multiaddr) to reach them through
        self._relays_dialled: set[str] = set()
        self.hole_punched: set[PeerID] = set()  # relayed servers we now hold a direct connection to
        self.relay_loads: dict[str, float] = {}  # relay multiaddr -> fraction of its capacity in use
        self._punching: dict[PeerID, asyncio.Task] = {}
        self._servers: list[ServerInfo] = []
        self._fetched_at = -float("inf")
        self._bans: dict[PeerID, tuple[int, float]] = {}  # peer -> (times banned, banned until)
        self._closed = False
        atexit.register(self.shutdown)  # users forget; a clean exit beats "Task was destroyed" noise

    async def servers(self, refresh: bool = False) -> list[ServerInfo]:
        """Online servers of this model with the same fingerprint (a different copy is never chained)."""
        if refresh or time.monotonic() - self._fetched_at > self.refresh_period:
            found = await asyncio.to_thread(fetch_servers, self.dht, self.model_id, self.num_blocks)
            online = [
                s for s in found if s.record.state == ServerState.ONLINE and s.record.model_fingerprint == self.fingerprint
            ]
            now_online = {s.peer_id for s in online}
            self.departed = (self.departed | {s.peer_id for s in self._servers}) - now_online
            self._servers = online
            self._fetched_at = time.monotonic()
            self.routes = {s.peer_id: relay for s in online if (relay := relay_of(s.record)) is not None}
            await asyncio.gather(*(self._dial_relay(r) for r in set(self.routes.values()) - self._relays_dialled))
            relays = sorted(set(self.routes.values()))
            self.relay_loads = dict(zip(relays, await asyncio.gather(*(relay_load(self.p2p, r) for r in relays))))
            for peer, relay in self.routes.items() if self.hole_punching else ():
                if peer not in self.hole_punched and (peer not in self._punching or self._punching[peer].done()):
                    self._punching[peer] = asyncio.create_task(self._hole_punch(peer, relay))
        return self._servers

    async def _hole_punch(self, peer: PeerID, relay: str) -> None:
        """Until then, the relay carries the calls; a fresh peer's public address takes seconds to be confirmed,
        so this tries a few times."""
        if await hole_punch(self.p2p, peer, relay, attempts=6):
            self.hole_punched.add(peer)
            logger.info("Hole punched to %s", peer)
        else:
            logger.info("No direct connection to %s (its NAT or ours does not allow it); staying relayed", peer)

    async def wait_hole_punching(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every hole-punching attempt started so far has succeeded or given up."""
        tasks = [task for task in self._punching.values() if not task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _stop_punching(self) -> None:
        for task in self._punching.values():
            task.cancel()

    def _load(self, server: ServerInfo) -> float:
        """The server's load, or its relay's if that is busier (a relayed hop shares the relay with others)."""
        load = server.record.active_sessions / max(server.record.max_sessions, 1)
        relay = self.relay_for(server.peer_id)
        return max(load, self.relay_loads.get(relay, 0.0)) if relay is not None else load

    def relay_for(self, peer_id: PeerID) -> Optional[str]:
        """The relay this client goes through to reach ``peer_id`` (None: directly, or hole-punched)."""
        return None if peer_id in self.hole_punched else self.routes.get(peer_id)

    def path(self, peer_id: PeerID) -> str:
        if peer_id in self.hole_punched:
            return "hole-punched"
        relay = self.routes.get(peer_id)
        return f"relayed via {relay_peer_id(relay)}" if relay else "direct"

    async def _dial_relay(self, relay: str) -> None:
        try:
            await connect(self.p2p, relay)
            self._relays_dialled.add(relay)
        except Exception as e:  # calls through it will fail and ban the servers behind it
            logger.warning("Cannot reach relay %s: %r", relay, e)

    async def refresh_departures(self) -> None:
        try:
            await self.servers(refresh=True)
        except Exception:  # a failed look-up must not break the session that asked in the background
            logger.debug("Background server refresh failed", exc_info=True)

    def ban(self, peer_id: PeerID, base_s: float = 5.0, max_s: float = 300.0) -> None:
        """Avoid a failed server for a while, longer each time it fails again (exponential backoff)."""
        count = self._bans.get(peer_id, (0, 0.0))[0] + 1
        self._bans[peer_id] = (count, time.monotonic() + min(max_s, base_s * 2 ** (count - 1)))
        logger.info("Banned %s for %.0f s", peer_id, self._bans[peer_id][1] - time.monotonic())

    def banned(self) -> set[PeerID]:
        now = time.monotonic()
        return {peer for peer, (_count, until) in self._bans.items() if until > now}

    async def candidates(self, refresh: bool = False) -> list[Candidate]:
        servers = await self.servers(refresh)
        unmeasured = [s.peer_id for s in servers if s.peer_id not in self.rtts]
        if unmeasured:
            await self.ping_all(unmeasured)
        return [
            Candidate(
                peer_id=s.peer_id,
                start=s.record.start,
                end=s.record.end,
                throughput=s.record.throughput,
                rtt_s=self.rtts.get(s.peer_id),
                load=self._load(s),
                free_cache_tokens=s.record.free_cache_tokens,
                next_rtts=_peer_keys(s.record.next_rtts),
            )
            for s in servers
        ]

    def stub(self, peer_id: PeerID):
        return server_stub(self.p2p, peer_id, self.relay_for(peer_id))

    async def ping(self, peer_id: PeerID, timeout: float = 5.0) -> Optional[float]:
        started = time.perf_counter()
        try:
            await self.stub(peer_id).rpc_ping(runtime_pb2.ExpertRequest(), timeout=timeout)
        except Exception as e:  # an unreachable server is simply not measured (the planner assumes it is far)
            logger.debug("Ping to %s failed: %r", peer_id, e)
            return None
        rtt = time.perf_counter() - started
        previous = self.rtts.get(peer_id)
        self.rtts[peer_id] = rtt if previous is None else 0.8 * previous + 0.2 * rtt
        return rtt

    async def ping_all(self, peer_ids: Sequence[PeerID]) -> None:
        await asyncio.gather(*(self.ping(p) for p in peer_ids))

    async def info(self, peer_id: PeerID, timeout: float = 10.0) -> ServerStatus:
        reply = await self.stub(peer_id).rpc_info(runtime_pb2.ExpertRequest(), timeout=timeout)
        return decode_metadata(reply.metadata, ServerStatus)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            run_sync(self._stop_punching(), timeout=5)
        except Exception:  # the loop may be gone at interpreter exit
            logger.debug("Could not stop hole punching", exc_info=True)
        try:
            run_sync(self.p2p.shutdown(), timeout=5)
        except Exception:  # the daemon may already be gone with the DHT process
            logger.debug("P2P shutdown failed", exc_info=True)
        self.dht.shutdown()


def _peer_keys(rtts: dict[str, float]) -> dict[PeerID, float]:
    """Announced RTTs keyed by PeerID (as the planner's candidates are); malformed ids are dropped."""
    parsed = {}
    for peer, rtt in rtts.items():
        try:
            parsed[PeerID.from_base58(peer)] = rtt
        except Exception:  # a malformed id in someone's record: ignore that entry
            continue
    return parsed
