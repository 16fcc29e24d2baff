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
from hivemind.utils import get_dht_time

from molink_swarm.client.loop import run_sync
from molink_swarm.dht import Reachability, ServerInfo, ServerState, fetch_servers, start_dht
from molink_swarm.relay import choose_relay, connect, hole_punch, relay_load, server_stub
from molink_swarm.routing.planner import UNREACHABLE_RTT_S, Candidate, format_blocks
from molink_swarm.wire import ServerStatus, decode_metadata, relay_peer_id

logger = logging.getLogger(__name__)


MISSED_READS_TO_LEAVE = 2  # one DHT read can miss a healthy server; only a second miss in a row means it left


class SwarmClient:
    """Finds the servers of one model and keeps their round-trip times (exponential moving average).

    Only servers with the same fingerprint *and* dtype as this client are chained: a differently quantized or
    altered copy, or the same weights computed in another precision, would change the output.
    """

    unreachable_for_s = 30.0  # a server whose ping failed counts as far (and is not pinged again) this long

    def __init__(
        self,
        initial_peers: Sequence[str],
        model_id: str,
        fingerprint: str,
        num_blocks: int,
        *,
        torch_dtype: str = "float32",
        refresh_period: float = 5.0,
        hole_punching: bool = True,
    ):
        self.model_id, self.fingerprint, self.num_blocks = model_id, fingerprint, num_blocks
        self.torch_dtype = torch_dtype
        self.refresh_period = refresh_period
        self.hole_punching = hole_punching
        # Listening on every interface makes outgoing connections leave from that port, so a NAT maps them all
        # to one public address that peers can observe: hole punching needs it.
        self.dht, _ = start_dht(initial_peers, client_mode=True, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
        self.p2p: P2P = run_sync(self.dht.replicate_p2p())
        self.rtts: dict[PeerID, float] = {}
        self.departed: set[PeerID] = set()  # were online, now offline or gone from the DHT
        self.other_dtypes: list[ServerInfo] = []  # online servers of these weights in another dtype (for errors)
        self.routes: dict[PeerID, str] = {}  # servers behind NATs -> the relay (multiaddr) to reach them through
        self._relays_dialled: set[str] = set()
        self.hole_punched: set[PeerID] = set()  # relayed servers we now hold a direct connection to
        self.relay_loads: dict[str, float] = {}  # relay multiaddr -> fraction of its capacity in use
        self._punching: dict[PeerID, asyncio.Task] = {}
        self._servers: dict[PeerID, ServerInfo] = {}  # online as of the last reads
        self._missed: dict[PeerID, int] = {}  # online server -> DHT reads in a row that did not find it
        self._fetched_at = -float("inf")
        self._bans: dict[PeerID, tuple[int, float]] = {}  # peer -> (times banned, banned until)
        self._unreachable: dict[PeerID, float] = {}  # peer whose ping failed -> until when it counts as far
        self._failed_relays: dict[tuple[PeerID, str], float] = {}  # (server, relay) that failed -> until when
        self._closed = False
        atexit.register(self.shutdown)  # users forget; a clean exit beats "Task was destroyed" noise

    async def servers(self, refresh: bool = False) -> list[ServerInfo]:
        """Online servers of this model with the same fingerprint and dtype (no other copy is ever chained)."""
        if refresh or time.monotonic() - self._fetched_at > self.refresh_period:
            found = await asyncio.to_thread(fetch_servers, self.dht, self.model_id, self.num_blocks)
            same_weights = [s for s in found if s.record.model_fingerprint == self.fingerprint]
            self.other_dtypes = [
                s for s in same_weights if s.record.torch_dtype != self.torch_dtype and s.record.state == ServerState.ONLINE
            ]
            self._track_departures([s for s in same_weights if s.record.torch_dtype == self.torch_dtype])
            self._fetched_at = time.monotonic()
            await self._update_routes()
        return sorted(self._servers.values(), key=lambda s: (s.record.start, s.record.end, str(s.peer_id)))

    def _track_departures(self, found: list[ServerInfo]) -> None:
        """A server has left when it announced OFFLINE, when its record expired, or when two reads in a row did
        not find it; one missed read (a DHT hiccup) must not make a session replay onto another server."""
        seen = {s.peer_id: s for s in found}
        now = get_dht_time()
        for peer, known in list(self._servers.items()):
            if peer in seen:
                continue
            self._missed[peer] = self._missed.get(peer, 0) + 1
            if self._missed[peer] >= MISSED_READS_TO_LEAVE or known.expiration_time <= now:
                del self._servers[peer], self._missed[peer]
                self.departed.add(peer)
        for peer, info in seen.items():
            self._missed.pop(peer, None)
            if info.record.state == ServerState.ONLINE:
                self._servers[peer] = info
                self.departed.discard(peer)
            elif self._servers.pop(peer, None) is not None or info.record.state == ServerState.OFFLINE:
                self.departed.add(peer)

    async def _update_routes(self) -> None:
        """Choose a relay for every server behind a NAT, from the relays it announced and how loaded they are."""
        relayed = [s for s in self._servers.values() if s.record.reachability == Reachability.RELAYED and s.record.relay_addrs]
        relays = sorted({relay for s in relayed for relay in s.record.relay_addrs})
        await asyncio.gather(*(self._dial_relay(r) for r in set(relays) - self._relays_dialled))
        loads = await asyncio.gather(*(relay_load(self.p2p, r) if r in self._relays_dialled else _busy() for r in relays))
        self.relay_loads = dict(zip(relays, loads))
        self.routes = {s.peer_id: self._choose_relay(s) for s in relayed}
        for peer, relay in self.routes.items() if self.hole_punching else ():
            if peer not in self.hole_punched and (peer not in self._punching or self._punching[peer].done()):
                self._punching[peer] = asyncio.create_task(self._hole_punch(peer, relay))

    def _choose_relay(self, server: ServerInfo) -> str:
        choice = self._usable_relay(server)
        if choice is None:  # every relay failed it: start over (it was banned when the last one failed)
            for relay in server.record.relay_addrs:
                self._failed_relays.pop((server.peer_id, relay), None)
            choice = self._usable_relay(server)
        return choice

    def _usable_relay(self, server: ServerInfo) -> Optional[str]:
        """The relay for ``server`` among those that have not failed it lately (ties spread by our peer id)."""
        now = time.monotonic()
        failed = {relay for (peer, relay), until in self._failed_relays.items() if peer == server.peer_id and until > now}
        return choose_relay(server.record.relay_addrs, loads=self.relay_loads, failed=failed, salt=self.dht.peer_id.to_base58())

    async def _next_relay(self, peer_id: PeerID, failed_relay: str) -> Optional[str]:
        """Calls to ``peer_id`` through ``failed_relay`` failed: route it through its next relay, if it has one."""
        self._failed_relays[(peer_id, failed_relay)] = time.monotonic() + self.unreachable_for_s
        server = self._servers.get(peer_id)
        relay = self._usable_relay(server) if server is not None else None
        if relay is None:
            return None
        if relay not in self._relays_dialled:
            await self._dial_relay(relay)
        self.routes[peer_id] = relay
        logger.info("Calls to %s through relay %s failed; trying relay %s", peer_id, relay_peer_id(failed_relay), relay_peer_id(relay))
        return relay

    async def report_failure(self, peer_id: PeerID) -> None:
        """A call to ``peer_id`` failed: if it sits behind a relay and announced another, go through that one
        next (the relay may be what failed); otherwise ban the server."""
        relay = self.relay_for(peer_id)
        if relay is not None and await self._next_relay(peer_id, relay) is not None:
            return
        self.ban(peer_id)

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
            await asyncio.wait_for(connect(self.p2p, relay), 10.0)
            self._relays_dialled.add(relay)
        except Exception as e:  # it ranks last (fully loaded); calls through it fail over to the next relay
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

    def unreachable(self) -> set[PeerID]:
        """Servers whose last ping failed recently: the planner takes them as far, and they are not re-pinged."""
        now = time.monotonic()
        return {peer for peer, until in self._unreachable.items() if until > now}

    async def candidates(self, refresh: bool = False) -> list[Candidate]:
        servers = await self.servers(refresh)
        unreachable = self.unreachable()
        unmeasured = [s.peer_id for s in servers if s.peer_id not in self.rtts and s.peer_id not in unreachable]
        if unmeasured:
            await self.ping_all(unmeasured)
            unreachable = self.unreachable()
        return [
            Candidate(
                peer_id=s.peer_id,
                start=s.record.start,
                end=s.record.end,
                throughput=s.record.throughput,
                rtt_s=UNREACHABLE_RTT_S if s.peer_id in unreachable else self.rtts.get(s.peer_id),
                load=self._load(s),
                free_cache_tokens=s.record.free_cache_tokens,
                next_rtts=_peer_keys(s.record.next_rtts),
            )
            for s in servers
        ]

    def missing_in_other_dtypes(self, missing: Sequence[int]) -> str:
        """Why blocks may be missing although servers hold them: e.g. "servers of blocks 0:3 run float16; pass
        dtype=torch.float16" ("" when no server of another dtype holds any of ``missing``)."""
        by_dtype: dict[str, set[int]] = {}
        for s in self.other_dtypes:
            held = set(range(s.record.start, s.record.end)) & set(missing)
            if held:
                by_dtype.setdefault(s.record.torch_dtype, set()).update(held)
        return "; ".join(
            f"servers of blocks {format_blocks(sorted(blocks))} run {dtype}; pass dtype=torch.{dtype}"
            for dtype, blocks in sorted(by_dtype.items())
        )

    def stub(self, peer_id: PeerID):
        return server_stub(self.p2p, peer_id, self.relay_for(peer_id))

    async def ping(self, peer_id: PeerID, timeout: float = 5.0) -> Optional[float]:
        """Measure the round trip to a server (through its relays in turn, if it is behind a NAT). A server that
        does not answer is remembered as unreachable for ``unreachable_for_s`` rather than pinged on every plan."""
        while True:
            relay = self.relay_for(peer_id)
            started = time.perf_counter()
            try:
                await self.stub(peer_id).rpc_ping(runtime_pb2.ExpertRequest(), timeout=timeout)
                break
            except Exception as e:
                logger.debug("Ping to %s failed: %r", peer_id, e)
                if relay is not None and await self._next_relay(peer_id, relay) is not None:
                    continue
                self._unreachable[peer_id] = time.monotonic() + self.unreachable_for_s
                return None
        self._unreachable.pop(peer_id, None)
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


async def _busy() -> float:
    return 1.0  # a relay we could not dial: ranked last


def _peer_keys(rtts: dict[str, float]) -> dict[PeerID, float]:
    """Announced RTTs keyed by PeerID (as the planner's candidates are); malformed ids are dropped."""
    parsed = {}
    for peer, rtt in rtts.items():
        try:
            parsed[PeerID.from_base58(peer)] = rtt
        except Exception:  # a malformed id in someone's record: ignore that entry
            continue
    return parsed
