"""A client's view of the swarm: its DHT peer, P2P connection, known servers and measured latencies."""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from typing import Optional, Sequence

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from molink_swarm.client.chunking import DecodePace, LinkThroughput
from molink_swarm.client.group_step import GroupChannels
from molink_swarm.client.link_gate import LinkGate
from molink_swarm.client.loop import run_sync
from molink_swarm.client.spot_check import SpotCheckStats, WrongOutputs
from molink_swarm.dht import ServerInfo, ServerState, fetch_servers, start_dht
from molink_swarm.net.links import PeerLinks
from molink_swarm.protocol.errors import is_busy
from molink_swarm.protocol.messages import ServerStatus, decode_metadata
from molink_swarm.protocol.tensors import WireDtype, resolve_wire_dtype
from molink_swarm.routing.copies import AnnouncedServer, CopyChoice, choose_copy
from molink_swarm.routing.planner import UNREACHABLE_RTT_S, Candidate, Hop, format_blocks
from molink_swarm.swarm_key import SwarmKey

logger = logging.getLogger(__name__)


BUSY_AVOID_S = 2.0  # a server that said it has no room now is left alone this long (not banned)
MISSED_READS_TO_LEAVE = 2
CONVICTED_BAN_S = 3600.0  # a server caught computing wrong outputs (doubling each time it is caught again)  # one DHT read can miss a healthy server; only a second miss in a row means it left


class SwarmClient:
    """Finds the servers of one model and keeps their round-trip times (exponential moving average).

    Only servers with the same fingerprint *and* dtype as this client are chained: a model with another config, or
    the same weights computed in another precision, would change the output. Among those, servers whose block
    digests disagree hold different copies (other weights, storage dtype or quantization), and only one copy is
    chained, block by block, with one quantization for the whole chain (routing/copies.py): once it has chained a
    block, the client keeps its digest and the quantization, so a session never switches copy, failovers included.
    """

    def __init__(
        self,
        initial_peers: Sequence[str],
        model_id: str,
        fingerprint: str,
        num_blocks: int,
        *,
        torch_dtype: str = "float32",
        wire_dtype: WireDtype = "auto",
        refresh_period: float = 5.0,
        hole_punching: bool = True,
        swarm_key: Optional[SwarmKey] = None,
        spot_check: float = 0.0,
    ):
        """``spot_check``: the fraction of steps its sessions re-run on a second server (client/spot_check.py)."""
        self.model_id, self.fingerprint, self.num_blocks = model_id, fingerprint, num_blocks
        self.torch_dtype = torch_dtype
        self.dtype: torch.dtype = getattr(torch, torch_dtype)  # what replies are decoded to
        self.wire_dtype = resolve_wire_dtype(wire_dtype, self.dtype)  # how this client sends hidden states
        self.refresh_period = refresh_period
        # Listening on every interface makes outgoing connections leave from that port, so a NAT maps them all
        # to one public address that peers can observe: hole punching needs it.
        self.dht, _ = start_dht(initial_peers, client_mode=True, host_maddrs=["/ip4/0.0.0.0/tcp/0"], swarm_key=swarm_key)
        self.p2p: P2P = run_sync(self.dht.replicate_p2p())
        self.links = PeerLinks(self.p2p, hole_punching=hole_punching)
        # Shared by every session of this process, since they share the links: decode steps first on each.
        self.gate = LinkGate()
        self.group_channels = GroupChannels(self)  # group steps' streams (client/group_step.py)
        self.link_throughput = LinkThroughput()
        self.decode_pace = DecodePace()  # decode steps' times through each server, for sizing prompt chunks
        self.departed: set[PeerID] = set()  # were online, now offline or gone from the DHT
        self.other_dtypes: list[ServerInfo] = []  # online servers of these weights in another dtype (for errors)
        self._servers: dict[PeerID, ServerInfo] = {}  # online as of the last reads
        self._missed: dict[PeerID, int] = {}  # online server -> DHT reads in a row that did not find it
        self._fetched_at = -float("inf")
        self._refreshing: Optional[asyncio.Future] = None
        self._bans: dict[PeerID, tuple[int, float]] = {}  # peer -> (times banned, banned until)
        self.pinned: dict[int, str] = {}  # block -> the digest this client chains for it, since it first chained it
        self.pinned_quant: Optional[str] = None  # the quantization of its chains, since it first chained a server
        self.quant: Optional[str] = None  # the quantization of the servers it chains now
        self.rejected: dict[PeerID, tuple[int, ...]] = {}  # online servers of another copy -> blocks that differ
        self._warned: set[tuple[PeerID, Optional[tuple[str, ...]]]] = set()
        self.spot_checks = SpotCheckStats(rate=spot_check)
        self.unchecked_spans: dict[tuple[int, int], float] = {}  # span no second server held -> when (monotonic)
        self._closed = False
        atexit.register(self.shutdown)  # users forget; a clean exit beats "Task was destroyed" noise

    async def servers(self, refresh: bool = False) -> list[ServerInfo]:
        """Online servers of this model with the same fingerprint and dtype, and of the copy this client chains."""
        if refresh or time.monotonic() - self._fetched_at > self.refresh_period:
            found = await asyncio.to_thread(fetch_servers, self.dht, self.model_id, self.num_blocks)
            same_weights = [s for s in found if s.record.model_fingerprint == self.fingerprint]
            self.other_dtypes = [
                s for s in same_weights if s.record.torch_dtype != self.torch_dtype and s.record.state == ServerState.ONLINE
            ]
            self._track_departures([s for s in same_weights if s.record.torch_dtype == self.torch_dtype])
            self._fetched_at = time.monotonic()
            await self.links.update({peer: s.record.relays for peer, s in self._servers.items()})
        return self._chainable(self._choose_copy())

    def _chainable(self, choice: CopyChoice) -> list[ServerInfo]:
        servers = [s for peer, s in self._servers.items() if peer in choice.chainable]
        return sorted(servers, key=lambda s: (s.record.start, s.record.end, str(s.peer_id)))

    def _choose_copy(self) -> CopyChoice:
        """Which of the online servers hold the copy this client chains (see routing/copies.py): servers it cannot
        reach or has banned do not vote."""
        no_vote = self.links.unreachable() | self.banned()
        announced = [
            AnnouncedServer(
                peer, s.record.start, s.record.end, s.record.block_digests, votes=peer not in no_vote, quant=s.record.quant_mode
            )
            for peer, s in self._servers.items()
        ]
        choice = choose_copy(announced, self.pinned, self.pinned_quant)
        self.rejected, self.quant = dict(choice.rejected), choice.quant
        for peer, blocks in choice.rejected.items():
            self._warn_rejected(peer, blocks, choice)
        return choice

    def _warn_rejected(self, peer: PeerID, blocks: tuple[int, ...], choice: CopyChoice) -> None:
        """One warning per server and announced digests, naming the servers it disagrees with."""
        record = self._servers[peer].record
        if (peer, record.block_digests) in self._warned:
            return
        self._warned.add((peer, record.block_digests))
        span = f"server {peer} (blocks {record.start}:{record.end}) of {self.model_id}"
        if record.block_digests is None:
            logger.warning("Not chaining %s: it announces no digests of its blocks (an older version?)", span)
            return
        if choice.quant is not None and record.quant_mode != choice.quant:
            logger.warning(
                "Not chaining %s: its weights are %s, and this client chains %s servers (one quantization per chain)",
                span, describe_quant(record.quant_mode), describe_quant(choice.quant),
            )
            return
        others = sorted(
            str(other)
            for other in choice.chainable
            if other in self._servers and set(blocks) & _blocks(self._servers[other].record)
        )
        more = " ..." if len(others) > 4 else ""
        agreed = f"servers {', '.join(others[:4])}{more}" if others else "the servers this client chained"
        logger.warning(
            "Not chaining %s: its weights of blocks %s differ from those of %s (another copy of the model: other "
            "weights, dtype or quantization)",
            span, format_blocks(blocks), agreed,
        )

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

    async def report_failure(self, peer_id: PeerID, error: Optional[BaseException] = None) -> None:
        """A call to ``peer_id`` failed: a server that said it is busy is avoided for a moment (not a failure);
        one behind a relay that announced another is reached through that one next (the relay may be what failed);
        otherwise the server is banned."""
        if isinstance(error, WrongOutputs):
            self.convict(peer_id, str(error))
            return
        if error is not None and is_busy(error):
            self._bans.setdefault(peer_id, (0, 0.0))
            count = self._bans[peer_id][0]  # its failure count stays as it was
            self._bans[peer_id] = (count, max(self._bans[peer_id][1], time.monotonic() + BUSY_AVOID_S))
            logger.info("%s is busy (%s); trying others for %.0f s", peer_id, error, BUSY_AVOID_S)
            return
        relay = self.links.relay_for(peer_id)
        if relay is not None and await self.links.next_relay(peer_id, relay) is not None:
            return
        self.ban(peer_id)

    def _load(self, server: ServerInfo) -> float:
        """The server's load, or its relay's if that is busier (a relayed hop shares the relay with others)."""
        load = server.record.active_sessions / max(server.record.max_sessions, 1)
        relay = self.links.relay_for(server.peer_id)
        return max(load, self.links.relay_loads.get(relay, 0.0)) if relay is not None else load

    async def refresh_departures(self, max_age: float = 1.0) -> None:
        """Re-read the servers unless the last read is younger than ``max_age`` seconds. Sessions ask every second
        or so; however many there are, they share one DHT read."""
        if time.monotonic() - self._fetched_at < max_age:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_quietly())
        await asyncio.shield(self._refreshing)

    async def _refresh_quietly(self) -> None:
        try:
            await self.servers(refresh=True)
        except Exception:  # a failed look-up must not break the session that asked in the background
            logger.debug("Background server refresh failed", exc_info=True)

    def ban(self, peer_id: PeerID, base_s: float = 5.0, max_s: float = 300.0) -> None:
        """Avoid a failed server for a while, longer each time it fails again (exponential backoff)."""
        count = self._bans.get(peer_id, (0, 0.0))[0] + 1
        self._bans[peer_id] = (count, time.monotonic() + min(max_s, base_s * 2 ** (count - 1)))
        logger.info("Banned %s for %.0f s", peer_id, self._bans[peer_id][1] - time.monotonic())

    def convict(self, peer_id: PeerID, reason: str) -> None:
        """A server answered wrong outputs (a spot check caught it): banned for an hour (more if caught again), not
        first retried through another relay as after a failure, and reported in the logs and the client's stats."""
        self.spot_checks.caught[str(peer_id)] = reason
        logger.warning("Spot check caught server %s: %s; banning it", peer_id, reason)
        self.ban(peer_id, base_s=CONVICTED_BAN_S, max_s=24 * 3600.0)

    def banned(self) -> set[PeerID]:
        now = time.monotonic()
        return {peer for peer, (_count, until) in self._bans.items() if until > now}

    async def candidates(self, refresh: bool = False) -> list[Candidate]:
        """The servers a chain may be planned over. Every online server is pinged first (those of other copies too:
        only live servers vote on the copy)."""
        await self.servers(refresh)
        await self.links.ping_all([peer for peer in self._servers if peer not in self.links.rtts])
        servers = self._chainable(self._choose_copy())
        unreachable = self.links.unreachable()
        return [
            Candidate(
                peer_id=s.peer_id,
                start=s.record.start,
                end=s.record.end,
                throughput=s.record.throughput,
                rtt_s=UNREACHABLE_RTT_S if s.peer_id in unreachable else self.links.rtts.get(s.peer_id),
                load=self._load(s),
                free_cache_tokens=s.record.free_cache_tokens,
                next_rtts=_peer_keys(s.record.next_rtts),
            )
            for s in servers
        ]

    def pin(self, hops: Sequence[Hop]) -> None:
        """From now on, chain for these hops' blocks only the digests their servers announce (routing/copies.py).
        Servers the client cannot reach are not pinned: a forged record must not decide which copy it keeps."""
        no_vote = self.links.unreachable() | self.banned()
        for hop in hops:
            info = self._servers.get(hop.peer_id)
            if info is None or hop.peer_id in no_vote or info.record.block_digests is None:
                continue
            if self.pinned_quant is None:
                self.pinned_quant = info.record.quant_mode
            for block in range(hop.start, hop.end):
                digest = info.record.digest_of(block)
                if digest is not None:
                    self.pinned.setdefault(block, digest)

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

    def missing_in_other_copies(self, missing: Sequence[int]) -> str:
        """Why blocks may be missing although servers hold them: e.g. "server(s) <peer> hold blocks 3:6 with other
        weights than the ones this client chains" ("" when no rejected server holds any of ``missing``)."""
        reasons = []
        chained = self.pinned_quant or self.quant
        whys = {
            "weights": "with other weights than the ones this client chains (another copy of the model)",
            "digests": "but announce no digests of their weights (an older version?)",
            **{
                quant: f"{describe_quant(quant)}, and this client chains {describe_quant(chained)} servers "
                "(one quantization per chain)"
                for quant in sorted({s.record.quant_mode for s in self._servers.values()} - {chained})
            },
        }

        def why(record) -> str:
            if record.block_digests is None:
                return "digests"
            return record.quant_mode if chained is not None and record.quant_mode != chained else "weights"

        for kind, why_text in whys.items():
            held = {
                peer: set(blocks) & set(missing)
                for peer, blocks in self.rejected.items()
                if peer in self._servers and why(self._servers[peer].record) == kind
            }
            peers = sorted(str(peer) for peer, blocks in held.items() if blocks)
            if peers:
                blocks = sorted(set().union(*held.values()))
                more = " ..." if len(peers) > 4 else ""
                reasons.append(f"server(s) {', '.join(peers[:4])}{more} hold blocks {format_blocks(blocks)} {why_text}")
        return "; ".join(reasons)

    def stub(self, peer_id: PeerID):
        return self.links.stub(peer_id)

    async def info(self, peer_id: PeerID, timeout: float = 10.0) -> ServerStatus:
        reply = await self.stub(peer_id).rpc_info(runtime_pb2.ExpertRequest(), timeout=timeout)
        return decode_metadata(reply.metadata, ServerStatus)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            run_sync(_close_channels(self.group_channels), timeout=5)
        except Exception:  # the loop may be gone at interpreter exit
            logger.debug("Could not close the group-step streams", exc_info=True)
        try:
            run_sync(self.links.close(), timeout=5)
        except Exception:  # the loop may be gone at interpreter exit
            logger.debug("Could not stop hole punching", exc_info=True)
        try:
            run_sync(self.p2p.shutdown(), timeout=5)
        except Exception:  # the daemon may already be gone with the DHT process
            logger.debug("P2P shutdown failed", exc_info=True)
        self.dht.shutdown()


async def _close_channels(channels: GroupChannels) -> None:
    channels.close()


def _blocks(record) -> set[int]:
    return set(range(record.start, record.end))


def _peer_keys(rtts: dict[str, float]) -> dict[PeerID, float]:
    """Announced RTTs keyed by PeerID (as the planner's candidates are); malformed ids are dropped."""
    parsed = {}
    for peer, rtt in rtts.items():
        try:
            parsed[PeerID.from_base58(peer)] = rtt
        except Exception:  # a malformed id in someone's record: ignore that entry
            continue
    return parsed


def describe_quant(quant: Optional[str]) -> str:
    """How a server keeps its weights, in words: "int8-quantized", "unquantized"."""
    return "unquantized" if quant in (None, "none") else f"{quant}-quantized"
