"""A swarm server: loads a span of blocks, announces it in the DHT, serves it until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from typing import Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from molink_swarm import __version__
from molink_swarm.dht import (
    ModelRecord,
    Reachability,
    ServerRecord,
    ServerState,
    declare_server,
    fetch_servers,
    start_dht,
)
from molink_swarm.dht.identity import identity_key_of
from molink_swarm.dht.records import is_peer_maddr
from molink_swarm.errors import UserError
from molink_swarm.models import block_digests, fetch_tensors, load_config, read_tensors, resolve_model, tensor_names
from molink_swarm.models.blocks import BlockSpan
from molink_swarm.models.family import adapter_for
from molink_swarm.models.packed import PackedStep
from molink_swarm.models.quant import QuantMode, build_quantized, bytes_per_weight, quantized_digest
from molink_swarm.net.ports import free_port
from molink_swarm.net.reachability import RelayRegistration, check_reachability
from molink_swarm.protocol.messages import relay_peer_id
from molink_swarm.protocol.tensors import WireDtype, resolve_wire_dtype
from molink_swarm.routing.placement import Peer, best_span, block_capacity, should_move
from molink_swarm.server.faults import FaultInjection
from molink_swarm.server.handler import BlockServicer
from molink_swarm.server.metrics import ServerMetrics, start_metrics_server
from molink_swarm.server.neighbours import NextServerPinger
from molink_swarm.server.rebalancing import block_bytes, blocks_that_fit, placed_peers, typical_throughput
from molink_swarm.server.scheduler import ComputeQueue
from molink_swarm.server.sessions import SessionTable
from molink_swarm.swarm_key import load_swarm_key

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANT_BUILD_BYTES = 512 << 20  # --quant: blocks are built (at full precision) and quantized this much at a time


class BadBlockRangeError(UserError):
    pass


class ServerConfig(BaseModel):
    """Everything a `join` process is configured with (one object per process)."""

    model_config = ConfigDict(frozen=True)

    model: str
    blocks: Optional[tuple[int, int]] = None
    num_blocks: Optional[int] = Field(default=None, gt=0)
    initial_peers: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    quant: QuantMode = "none"  # how the weights of the blocks are kept in memory (models/quant.py)
    wire_dtype: WireDtype = "auto"  # how this server sends hidden states (replies and pushes); auto: as computed
    host: str = "0.0.0.0"
    port: int = 0
    public_ip: Optional[str] = None
    announce_maddrs: tuple[str, ...] = ()
    public_name: Optional[str] = None
    max_sessions: int = Field(default=32, gt=0)
    cache_tokens: int = Field(default=32768, gt=0)
    max_length: int = Field(default=8192, gt=0)
    update_period: float = Field(default=15.0, gt=0)
    identity_path: Optional[str] = None
    swarm_key: Optional[str] = None  # path of the key file of a private swarm (None: a public swarm)
    session_idle_timeout: float = Field(default=300.0, gt=0)
    shutdown_grace: float = Field(default=5.0, ge=0)
    metrics_port: Optional[int] = Field(default=None, ge=0, le=65535)
    force_relay: bool = False
    chunk_tokens: Optional[int] = Field(default=None, gt=0)  # None: measured (see _measure_chunk_tokens)
    max_batch_size: int = Field(default=32, gt=0)  # sessions' steps computed in one pass; 1: no batching
    threads: Optional[int] = Field(default=None, gt=0)  # torch threads for the blocks (None: torch's default)
    # Without --blocks: move when the blocks elsewhere are weaker than ours would be without us by this much.
    rebalance_margin: float = Field(default=0.05, ge=0)
    # Testing only (hidden flags): noise of this many times the RMS on a fraction of the outputs (server/faults.py).
    debug_fault_noise: float = Field(default=0.0, ge=0)
    debug_fault_rate: float = Field(default=1.0, gt=0, le=1)


def parse_block_range(text: str) -> tuple[int, int]:
    """``"A:B"`` -> (A, B): half-open, like Python slices."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise BadBlockRangeError(f"--blocks {text!r}: expected START:END, e.g. --blocks 0:15") from None
    if start < 0 or end <= start:
        raise BadBlockRangeError(f"--blocks {text!r}: need 0 <= START < END, e.g. --blocks 0:15")
    return start, end


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.swarm_key = load_swarm_key(config.swarm_key)  # a bad key file fails before the model loads
        self.dtype = DTYPES[config.dtype]
        self.device = torch.device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)  # before the compute thread starts: it takes the count when it does
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was given but no CUDA GPU is available; use --device cpu")
        self.source = resolve_model(config.model, progress=True)
        self.model_config = load_config(self.source)
        self.adapter = adapter_for(self.model_config)
        self.total_blocks = self.adapter.num_blocks
        self.model_record = ModelRecord(
            model_id=self.source.model_id,
            name=self.source.name,
            num_blocks=self.total_blocks,
            fingerprint=self.source.fingerprint,
            model_type=self.model_config.model_type,
        )
        if config.blocks is not None and config.blocks[1] > self.total_blocks:
            raise BadBlockRangeError(
                f"--blocks {config.blocks[0]}:{config.blocks[1]} is out of range: "
                f"{self.source.name} has {self.total_blocks} blocks (0:{self.total_blocks})"
            )
        self.start: int = -1
        self.end: int = -1
        self.peer_id = None
        self.identity = None  # the RSA key of our peer id (dht/identity.py)
        self.visible_maddrs: list[str] = []
        self.throughput = 0.0  # lone decode, block-tokens/s
        self.batch_throughput: Optional[float] = None  # decode steps of several sessions in one pass
        self.prefill_throughput: Optional[float] = None
        self.next_rtts: dict[str, float] = {}
        self.network_throughput: Optional[float] = None  # tokens/s to the next servers, as measured
        self.metrics_url: Optional[str] = None
        self.reachability = Reachability.DIRECT
        self.relays: Optional[RelayRegistration] = None
        self.wire_dtype = resolve_wire_dtype(config.wire_dtype, self.dtype)
        self.metrics: Optional[ServerMetrics] = None
        self.block_digests: Optional[tuple[str, ...]] = None  # known once the blocks are loaded

    async def run(self, stop: asyncio.Event, on_online: Callable[["Server"], None] = lambda server: None) -> None:
        """The server's life: check reachability, join the DHT, load the blocks, announce them, serve them with a
        heartbeat until ``stop`` is set, then leave."""
        async with contextlib.AsyncExitStack() as resources:
            port, relays = await self._check_reachability()
            dht, validator = self._join_dht(port, relays)
            resources.callback(dht.shutdown)
            p2p = await dht.replicate_p2p()
            if relays:
                await self._register_with_relays(p2p, relays, resources)
            if self.config.blocks:
                self.start, self.end = self.config.blocks
                await asyncio.to_thread(self._announce, dht, validator, ServerState.JOINING, sessions=None)
            else:
                await self._claim_blocks(dht, validator)
            metrics = await self._start_metrics(resources)

            blocks = await asyncio.to_thread(self._load_blocks)
            servicer = await self._serve(p2p, blocks, relays, metrics, resources)
            await asyncio.to_thread(self._announce, dht, validator, ServerState.ONLINE, servicer.sessions)
            on_online(self)

            pinger = self._pinger(dht, p2p, resources)
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.config.update_period)
                except asyncio.TimeoutError:
                    await self._heartbeat(dht, validator, pinger, servicer.sessions)
                    if self.config.blocks is None and not stop.is_set():
                        target = await self._rebalance_target(dht)
                        if target is not None:
                            servicer = await self._move(target, dht, validator, p2p, servicer, relays, metrics, resources)
                            pinger = self._pinger(dht, p2p, resources)
            await self._leave(dht, validator, p2p, servicer)

    def _pinger(self, dht, p2p, resources: contextlib.AsyncExitStack) -> NextServerPinger:
        pinger = NextServerPinger(dht, p2p, self.source.model_id, self.total_blocks, self.end, self.peer_id)
        resources.push_async_callback(pinger.close)
        return pinger

    # ---- placement: blocks chosen by the server (no --blocks), and moving where the swarm needs it more

    async def _claim_blocks(self, dht, validator, settle_s: float = 1.5) -> None:
        """Choose a span, announce it as joining before loading anything, then look again: two servers that joined
        at the same moment and chose the same span see each other, and the one with the larger peer id chooses
        again with the other counted."""
        for _ in range(4):
            self.start, self.end = await asyncio.to_thread(self._choose_blocks, dht)
            await asyncio.to_thread(self._announce, dht, validator, ServerState.JOINING, sessions=None)
            await asyncio.sleep(settle_s * (1 + random.random()))
            servers = await asyncio.to_thread(fetch_servers, dht, self.source.model_id, self.total_blocks)
            rivals = [
                s
                for s in servers
                if s.peer_id != self.peer_id
                and s.record.state == ServerState.JOINING
                and (s.record.start, s.record.end) == (self.start, self.end)
                and str(s.peer_id) < str(self.peer_id)
            ]
            if not rivals:
                break
            logger.info("Blocks %d:%d were claimed at the same time by %s; choosing again", self.start, self.end, rivals[0].peer_id)
        logger.info("Chose blocks %d:%d", self.start, self.end)

    def _choose_blocks(self, dht) -> tuple[int, int]:
        servers = fetch_servers(dht, self.source.model_id, self.total_blocks)
        count = min(self.config.num_blocks or self._blocks_that_fit(), self.total_blocks)
        me = self._as_peer(servers, count)
        capacity = block_capacity(self.total_blocks, placed_peers(servers, exclude=self.peer_id))
        return best_span(me, capacity, lengths=[count])

    def _as_peer(self, servers, blocks: int) -> Peer:
        """This server as placement sees it: measured once loaded, else like the others (or 1 if alone)."""
        compute = self.batch_throughput or self.throughput or typical_throughput(servers, exclude=self.peer_id) or 1.0
        return Peer(str(self.peer_id), compute, blocks, self.network_throughput or math.inf)

    def _blocks_that_fit(self) -> int:
        """Without --num-blocks: as many blocks as half of the free memory holds (weights and their cache)."""
        weight_bytes = bytes_per_weight(self.config.quant, self.dtype.itemsize)
        per_block = block_bytes(self.model_config, self.dtype.itemsize, self.config.cache_tokens, weight_bytes)
        count = blocks_that_fit(per_block, self.device)
        logger.info("%d blocks fit in half of this device's free memory", count)
        return count

    async def _rebalance_target(self, dht) -> Optional[tuple[int, int]]:
        """The span to move to if the swarm needs this server more elsewhere (checked again after a random pause,
        so that two servers seeing the same hole do not both leave their blocks for it)."""
        for attempt in range(2):
            servers = await asyncio.to_thread(fetch_servers, dht, self.source.model_id, self.total_blocks)
            others = placed_peers(servers, exclude=self.peer_id)
            me = self._as_peer(servers, self.end - self.start)
            me = Peer(me.peer_id, me.compute, max_blocks=self.end - self.start)
            target = should_move(me, (self.start, self.end), self.total_blocks, others, margin=self.config.rebalance_margin)
            if target is None:
                return None
            if attempt == 0:
                await asyncio.sleep(random.uniform(0.0, 2.0))
        return target

    async def _move(self, target, dht, validator, p2p, servicer, relays, metrics, resources) -> BlockServicer:
        """Leave the blocks held (clients move their sessions, as when a server leaves), load only the missing
        ones, serve the new span."""
        logger.info("Moving from blocks %d:%d to %d:%d, where the swarm needs it more", self.start, self.end, *target)
        old_blocks = servicer.blocks
        await self._leave(dht, validator, p2p, servicer)
        servicer.compute.shutdown()
        self.start, self.end = target
        self.block_digests = None  # computed again for the new span as it loads
        await asyncio.to_thread(self._announce, dht, validator, ServerState.JOINING, sessions=None)
        blocks = await asyncio.to_thread(self._load_blocks, old_blocks)
        servicer = await self._serve(p2p, blocks, relays, metrics, resources)
        await asyncio.to_thread(self._announce, dht, validator, ServerState.ONLINE, servicer.sessions)
        logger.info("Moved: serving blocks %d:%d online", self.start, self.end)
        return servicer

    async def _check_reachability(self) -> tuple[int, list[str]]:
        """The port to listen on, and the relays to register with if the swarm cannot dial us (none if it can)."""
        cfg = self.config
        if cfg.public_ip and cfg.port == 0:
            raise UserError("--public-ip needs an explicit --port (the port forwarded to this machine)")
        if ((cfg.public_ip or cfg.announce_maddrs) and not cfg.force_relay) or not cfg.initial_peers:
            return cfg.port, []
        port = cfg.port or free_port(cfg.host)
        started = time.perf_counter()
        reach = await check_reachability(cfg.initial_peers, cfg.host, port, swarm_key=self.swarm_key)
        relays = reach.relays if not reach.reachable or cfg.force_relay else []
        if cfg.force_relay and not relays:
            raise UserError("--force-relay: none of the initial peers runs a relay (start them with `molink-swarm dht`)")
        if relays:
            self.reachability = Reachability.RELAYED
        logger.info(
            "Reachability: %s (public IP %s, checked in %.1f s)",
            self.reachability.value, reach.observed_ip, time.perf_counter() - started,
        )
        return port, relays

    def _join_dht(self, port: int, relays: list[str]):
        cfg = self.config
        announce = [f"/ip4/{cfg.public_ip}/tcp/{cfg.port}"] if cfg.public_ip else list(cfg.announce_maddrs) or None
        dht, validator = start_dht(
            cfg.initial_peers,
            host_maddrs=[f"/ip4/{cfg.host}/tcp/{port}"],
            announce_maddrs=announce,
            identity_path=cfg.identity_path,
            announcing=True,
            swarm_key=self.swarm_key,
            client_mode=bool(relays),  # peers cannot dial our DHT node
            # Behind a NAT: also hold libp2p circuit reservations at the relays, so that clients can reach us
            # over a circuit and upgrade it to a direct connection by hole punching (DCUtR).
            **(dict(use_auto_relay=True, trusted_relays=relays, force_reachability="private") if relays else {}),
        )
        self.peer_id = dht.peer_id
        self.identity = identity_key_of(validator, dht.peer_id)  # signs our end of channels through relays
        if self.identity is None:
            logger.warning("The identity key is not our peer id's: callers through relays will not reach us")
        self.visible_maddrs = [str(m) for m in dht.get_visible_maddrs()]
        return dht, validator

    async def _register_with_relays(self, p2p, relays: list[str], resources: contextlib.AsyncExitStack) -> None:
        self.relays = RelayRegistration(p2p, relays)
        resources.push_async_callback(self.relays.close)
        if not await self.relays.wait_registered(timeout=30.0):
            raise UserError(
                "This machine cannot be reached from the swarm and no relay accepted it; "
                "forward a port and pass --public-ip IP --port P"
            )

    async def _start_metrics(self, resources: contextlib.AsyncExitStack) -> ServerMetrics:
        metrics = self.metrics = ServerMetrics()
        if self.config.metrics_port is not None:
            resources.push_async_callback((await self._serve_metrics(metrics)).cleanup)
        return metrics

    async def _serve(
        self, p2p, blocks: BlockSpan, relays: list[str], metrics: ServerMetrics, resources: contextlib.AsyncExitStack
    ) -> BlockServicer:
        """Measure the blocks (once: a server that moves keeps its figures per block), then answer RPCs for them."""
        cfg = self.config
        if not self.throughput:
            self.throughput = await asyncio.to_thread(self._measure_throughput, blocks)
            self.batch_throughput = await asyncio.to_thread(self._measure_batch_throughput, blocks)
        chunk_tokens = cfg.chunk_tokens or await asyncio.to_thread(self._measure_chunk_tokens, blocks)
        compute = ComputeQueue(
            f"compute-{self.start}-{self.end}",
            max_batch=cfg.max_batch_size,
            max_batch_tokens=chunk_tokens,
            prefill_worker=self.device.type == "cpu",  # a GPU runs one pass at a time anyway (see scheduler.py)
        )
        resources.callback(compute.shutdown)
        sessions = SessionTable(
            max_sessions=cfg.max_sessions,
            cache_tokens=cfg.cache_tokens,
            max_length=min(cfg.max_length, getattr(self.model_config, "max_position_embeddings", cfg.max_length)),
        )
        metrics.blocks.set(self.end - self.start)
        compute.on_batch = metrics.observe_batch
        metrics.track_sessions(
            lambda: len(sessions), lambda: sessions.cache_tokens - sessions.free_cache_tokens, sessions.cache_tokens
        )
        servicer = BlockServicer(
            blocks,
            compute,
            sessions,
            model_id=self.source.model_id,
            dtype=self.dtype,
            device=self.device,
            session_idle_timeout=cfg.session_idle_timeout,
            chunk_tokens=chunk_tokens,
            metrics=metrics,
            wire_dtype=self.wire_dtype,
            quant=cfg.quant,
            fault=FaultInjection(cfg.debug_fault_noise, cfg.debug_fault_rate) if cfg.debug_fault_noise > 0 else None,
        )
        servicer.trusted_relays = {relay_peer_id(relay) for relay in relays}
        servicer.identity = self.identity
        await servicer.add_p2p_handlers(p2p)
        servicer.p2p = p2p
        return servicer

    async def _leave(self, dht, validator, p2p, servicer: BlockServicer) -> None:
        """Announce offline first, so that clients move their sessions before the streams close."""
        servicer.closing = True
        await asyncio.to_thread(self._announce, dht, validator, ServerState.OFFLINE, servicer.sessions)
        deadline = time.monotonic() + self.config.shutdown_grace
        while len(servicer.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await servicer.remove_p2p_handlers(p2p)

    async def _serve_metrics(self, metrics: ServerMetrics):
        host = "127.0.0.1" if self.config.host == "127.0.0.1" else "0.0.0.0"
        try:
            runner = await start_metrics_server(metrics.registry, host, self.config.metrics_port)
        except OSError as e:
            raise UserError(f"Cannot serve metrics on port {self.config.metrics_port} ({e.strerror}); pass another --metrics-port") from None
        port = runner.addresses[0][1]
        self.metrics_url = f"http://{'127.0.0.1' if host == '127.0.0.1' else 'localhost'}:{port}/metrics"
        logger.info("Metrics at %s", self.metrics_url)
        return runner

    def _load_blocks(self, held: Optional[BlockSpan] = None) -> BlockSpan:
        """Fetch (from the hub, if the model comes from there), digest and load our blocks' tensors, and only those;
        blocks already in ``held`` (a server that moves) are kept, not read again."""
        started = time.perf_counter()
        names = tensor_names(self.source)
        by_block = {index: self.adapter.block_tensor_names(names, index) for index in range(self.start, self.end)}
        fetch_tensors(self.source, [name for block in by_block.values() for name in block], progress=True)
        digests = block_digests(self.source.path, by_block, progress=True, model_name=self.source.name)
        # A quantized block computes other numbers: it announces another digest, so no client mixes it with others.
        self.block_digests = tuple(quantized_digest(digests[i], self.config.quant) for i in range(self.start, self.end))
        kept = range(max(self.start, held.start), min(self.end, held.end)) if held is not None else range(0)

        def build_span(first: int, last: int) -> BlockSpan:
            return self.adapter.build_blocks(
                first, last, names, lambda wanted: read_tensors(self.source, wanted), dtype=self.dtype, device=self.device
            )

        def build(start: int, end: int) -> BlockSpan:
            at_once = QUANT_BUILD_BYTES // max(1, block_bytes(self.model_config, self.dtype.itemsize, 0))
            return build_quantized(build_span, start, end, self.config.quant, blocks_at_once=at_once)

        if not kept:
            blocks = build(self.start, self.end)
        else:
            parts = [build(self.start, kept.start)] if self.start < kept.start else []
            parts.append(held.slice(kept.start, kept.stop))
            if kept.stop < self.end:
                parts.append(build(kept.stop, self.end))
            blocks = BlockSpan.join(parts)
        logger.info(
            "Loaded blocks %d:%d in %.1f s%s; computing with %d torch threads", self.start, self.end,
            time.perf_counter() - started, f" (kept {kept.start}:{kept.stop})" if kept else "", torch.get_num_threads(),
        )
        return blocks

    def _measure_chunk_tokens(self, blocks: BlockSpan, target_s: float = 0.25) -> int:
        """How many prompt tokens this span computes in about ``target_s``: long prompts and forward passes run in
        chunks of this size, so a decode step of another session waits at most about that long."""
        hidden = torch.randn(1, 64, self.model_config.hidden_size, device=self.device, dtype=self.dtype)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            blocks(hidden, cache=blocks.new_cache())
            timings.append(time.perf_counter() - started)
        tokens_per_s = 64 / max(sorted(timings)[1], 1e-6)
        self.prefill_throughput = min(1e6, tokens_per_s * (self.end - self.start))
        return int(min(512, max(16, target_s * tokens_per_s)))

    def _measure_throughput(self, blocks: BlockSpan) -> float:
        """Decode tokens/s through one block (what the router needs to estimate compute time per block)."""
        hidden_size = self.model_config.hidden_size
        cache = blocks.new_cache()
        blocks(torch.randn(1, 8, hidden_size, device=self.device, dtype=self.dtype), cache=cache)
        hidden = torch.randn(1, 1, hidden_size, device=self.device, dtype=self.dtype)
        position, timings = 8, []
        deadline = time.perf_counter() + 1.0
        while len(timings) < 5 or (len(timings) < 50 and time.perf_counter() < deadline):
            started = time.perf_counter()
            blocks(hidden, position=position, cache=cache)
            timings.append(time.perf_counter() - started)
            position += 1
        per_block = sorted(timings)[len(timings) // 2] / (self.end - self.start)  # median: robust to hiccups
        return 1.0 / max(per_block, 1e-6)

    def _measure_batch_throughput(self, blocks: BlockSpan, sessions: int = 16) -> float:
        """Block-tokens/s of ``sessions`` decode steps in one pass: this server's capacity under load."""
        hidden_size = self.model_config.hidden_size
        caches = [blocks.new_cache() for _ in range(sessions)]
        for cache in caches:
            blocks(torch.randn(1, 8, hidden_size, device=self.device, dtype=self.dtype), cache=cache)
        timings = []
        for position in range(8, 11):
            steps = [PackedStep(torch.randn(1, 1, hidden_size, device=self.device, dtype=self.dtype), position, cache) for cache in caches]
            started = time.perf_counter()
            blocks.forward_packed(steps)
            timings.append(time.perf_counter() - started)
        return min(1e6, sessions * (self.end - self.start) / max(sorted(timings)[1], 1e-6))

    async def _heartbeat(self, dht, validator, pinger: NextServerPinger, sessions: SessionTable) -> None:
        """Measure the next servers and re-announce. Whatever fails is logged and retried at the next heartbeat:
        a server that stops announcing vanishes from the swarm when its record expires."""
        try:
            self.next_rtts = await pinger.refresh()
            if pinger.bandwidth:
                sent = self.metrics.bytes_per_token("out") if self.metrics is not None else None
                per_token = sent or self.model_config.hidden_size * self.dtype.itemsize
                self.network_throughput = min(1e6, pinger.bandwidth / per_token)
        except Exception as e:
            logger.warning("Could not measure the next servers (%r); announcing the last RTTs", e)
        try:
            await asyncio.to_thread(self._announce, dht, validator, ServerState.ONLINE, sessions)
        except Exception as e:
            logger.warning("Heartbeat failed to announce (%r); retrying in %.0f s", e, self.config.update_period)

    def _announce(self, dht, validator, state: ServerState, sessions: Optional[SessionTable]) -> None:
        """Store our record under every block key; blocks on the DHT, so call it off the event loop."""
        record = ServerRecord(
            state=state,
            start=self.start,
            end=self.end,
            model_fingerprint=self.source.fingerprint,
            throughput=self.throughput,
            batch_throughput=self.batch_throughput,
            prefill_throughput=self.prefill_throughput,
            network_throughput=self.network_throughput,
            free_cache_tokens=sessions.free_cache_tokens if sessions is not None else 0,
            max_sessions=self.config.max_sessions,
            active_sessions=len(sessions) if sessions is not None else 0,
            addrs=tuple([a for a in self.visible_maddrs if is_peer_maddr(a)][:16]),
            reachability=self.reachability,
            # Clients spread over these by load (net/paths.choose_relay); the order is ours, not a preference.
            relay_addrs=tuple(sorted(self.relays.active))[:16] if self.relays is not None else (),
            software_version=__version__,
            public_name=self.config.public_name,
            torch_dtype=self.config.dtype,
            quant=self.config.quant,
            next_rtts=self.next_rtts,
            wire_dtype=self.wire_dtype,
            wire_bytes_per_token=self.metrics.bytes_per_token("out") if self.metrics is not None else None,
            block_digests=self.block_digests,
        )
        ttl = self.config.update_period * 2.5 if state != ServerState.OFFLINE else self.config.update_period
        if declare_server(dht, validator, self.model_record, record, ttl=ttl):
            return
        if state == ServerState.OFFLINE:  # peers leaving with us may miss it; our online record expires anyway
            logger.info("Could not announce leaving on every DHT peer; our last record expires within %.0f s", self.config.update_period * 2.5)
        else:
            logger.warning("Could not announce all blocks in the DHT (will retry at the next heartbeat)")
