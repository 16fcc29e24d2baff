"""The RPCs a server answers over hivemind P2P: inference streams, forward passes, pushes, info and ping.

Every call is checked before it costs anything (see protocol/streams.py for the stream layer): sizes before
bytes are read, shapes and values before compute, budgets per peer before a session or a forward pass is
admitted. A refused call gets a clear error; everyone else keeps being served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import AsyncIterator

import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm import __version__
from molink_swarm.models.blocks import BlockSpan
from molink_swarm.models.cache import SpanCache
from molink_swarm.models.packed import PackedStep
from molink_swarm.net.push import PushChannel
from molink_swarm.protocol import messages
from molink_swarm.protocol.errors import ServerBusy
from molink_swarm.protocol.messages import (
    ForwardRequest,
    GroupPushTarget,
    GroupResult,
    GroupStep,
    InferenceStep,
    ProtocolError,
    PushStep,
    PushTarget,
    ServerStatus,
    StepResult,
    decode_metadata,
    decode_push,
    encode_metadata,
    is_decode,
    response,
)
from molink_swarm.protocol.rpc import BlockRPC
from molink_swarm.protocol.streams import StreamLimits
from molink_swarm.protocol.tensors import (
    WireDtype,
    check_tensor,
    deserialize_tensor,
    resolve_wire_dtype,
    serialize_tensor,
    wire_bytes,
)
from molink_swarm.server.faults import FaultInjection
from molink_swarm.server.metrics import ServerMetrics
from molink_swarm.server.scheduler import BatchWork, ComputeQueue, Priority, between_layers
from molink_swarm.server.sessions import EarlyPushes, Session, SessionTable

logger = logging.getLogger(__name__)

# Inputs (outputs) larger than this are decoded and checked (encoded) on a worker thread, not on the event loop.
_OFF_LOOP_BYTES = 1 << 20


class BlockServicer(BlockRPC):
    """Serves the blocks of one :class:`BlockSpan`. Bad input gets a clear error on that call only."""

    def __init__(
        self,
        blocks: BlockSpan,
        compute: ComputeQueue,
        sessions: SessionTable,
        *,
        model_id: str,
        dtype: torch.dtype,
        device: torch.device,
        session_idle_timeout: float = 300.0,
        chunk_tokens: int = 256,
        max_forwards_per_peer: int = 2,
        max_forwards: int = 8,
        metrics: ServerMetrics | None = None,
        wire_dtype: WireDtype = "auto",
        quant: str = "none",
        fault: FaultInjection | None = None,
    ):
        self.blocks = blocks
        self.fault = fault  # testing only: wrong outputs on purpose (server/faults.py)
        self.quant = quant
        self.compute = compute
        self.sessions = sessions
        self.model_id = model_id
        self.dtype = dtype
        self.device = device
        self.metrics = metrics or ServerMetrics()
        self.wire_dtype = resolve_wire_dtype(wire_dtype, dtype)  # how outputs travel (replies and pushes)
        self.hidden_size = blocks.config.hidden_size
        self.chunk_tokens = chunk_tokens
        # A forward pass is at most one session's worth of tokens; a few at once per peer, a few more in all.
        self.max_forward_tokens = sessions.max_length
        self.max_forwards_per_peer, self.max_forwards = max_forwards_per_peer, max_forwards
        self._forwards: collections.Counter[str] = collections.Counter()
        self.tokens_served = 0
        self.closing = False
        self.push_timeout = 30.0
        self.inputs_from_servers = 0
        self.early_pushes = EarlyPushes(ttl=self.push_timeout)
        self.trusted_relays: set[PeerID] = set()  # relays we registered with: they say whom they pipe calls for
        self.p2p = None  # set once the handlers are registered; needed to push to the next server
        # Every session may bring an inference stream and a push stream from the same upstream peer.
        self.max_streams_per_peer = max(self.max_streams_per_peer, 2 * sessions.max_sessions + 16)
        max_message = min(256 << 20, max(1 << 20, sessions.max_length * self.hidden_size * 4 + (64 << 10)))
        max_group_message = messages.MAX_GROUP * messages.DECODE_MAX_TOKENS * self.hidden_size * 4 + (256 << 10)
        super().__init__(
            {
                "rpc_inference": StreamLimits(max_message_bytes=max_message, idle_s=session_idle_timeout),
                "rpc_group_step": StreamLimits(max_message_bytes=max_group_message, idle_s=session_idle_timeout),
                "rpc_push_stream": StreamLimits(max_message_bytes=max(max_message, max_group_message), idle_s=session_idle_timeout),
                "rpc_forward": StreamLimits(max_message_bytes=max_message, idle_s=30.0),
            }
        )

    # ---- inference: one bidirectional stream per session, one message per step

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: Session | None = None
        channel: PushChannel | None = None
        try:
            async for request in requests:
                step = decode_metadata(request.metadata, InferenceStep)
                if session is None:
                    session = self._open_session(step, messages.origin(request.uid, context.remote_id, self.trusted_relays))
                elif step.open is not None:
                    raise ProtocolError("A stream carries one session; open a new stream for another")
                output, result = await self._inference_step(session, step, request)
                wire = await self._serialize(output)  # once: the next server and the client get the same bytes
                if step.push_to is not None:
                    # Next server first: it is on the critical path; the client's copy is for its records.
                    channel = self._push_channel(channel, session, step.push_to)
                    channel.push(step.position, wire)
                    self.metrics.count_activations("out", *wire_bytes(wire))
                yield response(result, wire)
        except Exception:
            self.metrics.errors.labels("inference").inc()
            raise
        finally:
            if channel is not None:
                channel.close()
            if session is not None:
                self.sessions.close(session.spec.session_id)
                logger.debug("Closed session %s", session.spec.session_id)

    async def _inference_step(
        self, session: Session, step: InferenceStep, request: runtime_pb2.ExpertRequest
    ) -> tuple[torch.Tensor, StepResult]:
        async with session.stepping():
            hidden = await self._step_input(session, step, request)
            self._check_step(session, step.position, hidden.shape[1])
            started = time.perf_counter()
            span = (session.spec.start, session.spec.end)
            output = await self._compute(span, session.cache, step.position, hidden, Priority.PREFILL)
            if self.fault is not None:
                output = self.fault.apply(output)
            session.stepped(step.position, hidden.shape[1])
        elapsed = time.perf_counter() - started
        self._count(hidden, elapsed, kind="decode" if is_decode(hidden.shape[1]) else "prefill")
        return output, StepResult(position=session.position, step_id=step.step_id, compute_s=elapsed)

    def _open_session(self, step: InferenceStep, owner: str) -> Session:
        spec = step.open
        if spec is None:
            raise ProtocolError("The first message of an inference stream must open a session")
        if self.closing:
            raise ServerBusy("shutting down; use another server")
        self._check_span(spec.start, spec.end)
        session = self.sessions.open(spec, self.blocks.new_cache(spec.start, spec.end, spec.max_length), owner=owner)
        logger.debug("Opened session %s for blocks %d:%d", spec.session_id, spec.start, spec.end)
        return session

    # ---- group steps: a client's micro-batch of decode steps, one message per hop (client/group_step.py)

    async def rpc_group_step(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One message per group step, answered in order. The stream is read ahead while a step runs: a caller that
        gives up on a step (a hop of its chain failed) closes the stream, and the step stops where it is, so that its
        sessions are free for the steps the caller then sends on their own streams."""
        caller: str | None = None
        channel: PushChannel | None = None
        incoming: asyncio.Queue = asyncio.Queue(maxsize=8)
        reader = asyncio.create_task(_read_into(requests, incoming))
        try:
            while not (reader.done() and incoming.empty()):
                if (request := await _next_or_none(incoming, reader)) is None:
                    break
                if caller is None:  # a relay names the caller in the first message only
                    caller = messages.origin(request.uid, context.remote_id, self.trusted_relays)
                step = decode_metadata(request.metadata, GroupStep)
                running = asyncio.ensure_future(self._group_step(step, request, caller))
                await asyncio.wait([running, reader], return_when=asyncio.FIRST_COMPLETED)
                if not running.done():  # the caller closed the stream: nobody waits for this step any more
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
                    break
                output, results = running.result()
                wire = await self._serialize(output)
                if step.push_to is not None:
                    channel = self._group_push_channel(channel, step.push_to)
                    steps = [PushStep(session_id=s, position=m.position) for s, m in zip(step.push_to.session_ids, step.members)]
                    channel.push_group(steps, wire)
                    self.metrics.count_activations("out", *wire_bytes(wire))
                yield response(GroupResult(results=results), wire)
            await reader  # the error that ended the stream, if any
        except Exception:
            self.metrics.errors.labels("group_step").inc()
            raise
        finally:
            reader.cancel()
            if channel is not None:
                channel.close()

    async def _group_step(
        self, step: GroupStep, request: runtime_pb2.ExpertRequest, caller: str
    ) -> tuple[torch.Tensor, list[StepResult]]:
        """Run the decode steps of a group step together: every member is checked first (its session open here, the
        caller's, one row, not stepping already), then they are queued at once, so they run in one pass."""
        if step.push_to is not None and len(step.push_to.session_ids) != len(step.members):
            raise ProtocolError("A group step names one next session per member")
        sessions = []
        for member in step.members:
            session = self.sessions.get(member.session_id)
            if session is None or session.owner != caller:
                raise ProtocolError(f"Session {member.session_id} is not open here for your peer")
            if session.spec.batch_size != 1:
                raise ProtocolError("A group step takes sessions of one sequence each")
            sessions.append(session)
        async with contextlib.AsyncExitStack() as guards:
            for session in sorted(sessions, key=lambda session: session.spec.session_id):  # one order: no deadlock
                await guards.enter_async_context(session.stepping())
            if step.expect_push:
                if request.tensors:
                    raise ProtocolError("A step that expects a pushed input must not carry a tensor")
                rows = await asyncio.gather(
                    *(self._pushed_input(s, m.position, step.push_from) for s, m in zip(sessions, step.members))
                )
                hidden = torch.cat(rows)
            else:
                hidden = await self._parse_hidden(request, batch_size=len(sessions))
            if not is_decode(hidden.shape[1]):
                raise ProtocolError(f"A group step carries decode steps (at most {messages.DECODE_MAX_TOKENS} tokens each)")
            for session, member in zip(sessions, step.members):
                self._check_step(session, member.position, hidden.shape[1])
            started = time.perf_counter()
            works = [
                self._work((s.spec.start, s.spec.end), s.cache, m.position, row, decode=True)
                for s, m, row in zip(sessions, step.members, hidden.split(1))
            ]
            output = torch.cat(await self.compute.run_together(works, Priority.DECODE))
            if self.fault is not None:
                output = self.fault.apply(output)
            for session, member in zip(sessions, step.members):
                session.stepped(member.position, hidden.shape[1])
        elapsed = time.perf_counter() - started
        self._count(hidden, elapsed, kind="decode")
        results = [StepResult(position=s.position, step_id=m.step_id, compute_s=elapsed) for s, m in zip(sessions, step.members)]
        return output, results

    def _group_push_channel(self, channel: PushChannel | None, target: GroupPushTarget) -> PushChannel:
        """A group stream pushes to one next server at a time (another after a failover closes the old channel)."""
        if channel is not None and (channel.peer_id.to_base58(), channel.relay) == (target.peer_id, target.relay):
            return channel
        if channel is not None:
            channel.close()
        return PushChannel(self.p2p, PeerID.from_base58(target.peer_id), None, target.relay)

    async def _step_input(self, session: Session, step: InferenceStep, request: runtime_pb2.ExpertRequest) -> torch.Tensor:
        if not step.expect_push:
            return await self._parse_hidden(request, batch_size=session.spec.batch_size)
        if request.tensors:
            raise ProtocolError("A step that expects a pushed input must not carry a tensor")
        return await self._pushed_input(session, step.position, step.push_from)

    async def _pushed_input(self, session: Session, position: int, push_from: str | None) -> torch.Tensor:
        """The input of ``session``'s step at ``position``, pushed by ``push_from`` (the previous server) or the
        session's owner, whenever it comes (possibly already)."""
        if push_from is not None:
            session.allow_upstream(push_from)
        if len(self.early_pushes):
            senders = [session.owner, *session.upstreams]
            for pushed_at, hidden in self.early_pushes.take(session.spec.session_id, senders):
                if hidden.shape[0] == session.spec.batch_size:
                    with contextlib.suppress(ProtocolError):  # one too many kept: the client's copy will come
                        session.deliver(pushed_at, hidden)
        future = session.expect(position)
        try:
            # Shielded: a step that is given up (a group step whose caller closed its stream) leaves the input to come
            # for the step the caller sends instead.
            return await asyncio.wait_for(asyncio.shield(future), self.push_timeout)
        except asyncio.TimeoutError:
            session.inbox.pop(position, None)
            raise ProtocolError(f"No input was pushed for position {position} within {self.push_timeout:.0f} s") from None

    def _push_channel(self, channel: PushChannel | None, session: Session, target: PushTarget) -> PushChannel:
        """One next server per session at a time: naming another (after a failover) closes the old channel."""
        if channel is not None and (channel.peer_id.to_base58(), channel.session_id, channel.relay) == (
            target.peer_id, target.session_id, target.relay
        ):
            return channel
        if channel is not None:
            channel.close()
        return PushChannel(self.p2p, PeerID.from_base58(target.peer_id), target.session_id, target.relay)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Receive a step's input from the previous server of a chain (or from the client)."""
        await self._accept_push(request, messages.origin(request.uid, context.remote_id, self.trusted_relays))
        return runtime_pb2.ExpertResponse()

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Many pushes over one stream (see net/push.py); a refused push ends the stream with an error."""
        sender = None
        async for request in requests:
            if sender is None:  # a relay names the caller in the first message only
                sender = messages.origin(request.uid, context.remote_id, self.trusted_relays)
            await self._accept_push(request, sender)
        return
        yield  # an async generator that answers nothing until the sender ends the stream

    async def _accept_push(self, request: runtime_pb2.ExpertRequest, sender: str) -> None:
        """A push: one session's step input, or a group step's (one row per session, see GroupPush)."""
        pushes = decode_push(request.metadata)
        if len(pushes) == 1:
            session = self.sessions.get(pushes[0].session_id)
            hidden = await self._parse_hidden(request, batch_size=None if session is None else session.spec.batch_size)
        else:
            hidden = await self._parse_hidden(request, batch_size=len(pushes))
        rows = [hidden] if len(pushes) == 1 else hidden.split(1)
        for push, row in zip(pushes, rows):
            session = self.sessions.get(push.session_id)
            if session is None or not session.may_push(sender):
                # Not open yet (the previous server outran the stream that opens it), its sender not named yet, or
                # someone else's session: kept until a step of the session claims it from an allowed sender (a row
                # of a group push is copied, so that what is kept is no more than what is counted).
                self.early_pushes.keep(push.session_id, push.position, row if len(pushes) == 1 else row.clone(), sender)
            elif row.shape[0] != session.spec.batch_size:
                raise ProtocolError(f"Batch size {row.shape[0]} differs from the session's {session.spec.batch_size}")
            elif session.deliver(push.position, row) and sender != session.owner:
                self.inputs_from_servers += 1  # the previous server beat the client's copy

    def _check_step(self, session: Session, position: int, tokens: int) -> None:
        if position > session.position:
            raise ProtocolError(f"Step starts at position {position} but the session holds {session.position} tokens")
        if position + tokens > session.spec.max_length:
            raise ProtocolError(
                f"Step would reach {position + tokens} tokens, over the session's max_length {session.spec.max_length}"
            )

    async def _compute(
        self, span: tuple[int, int], cache: SpanCache, position: int, hidden: torch.Tensor, priority: Priority
    ) -> torch.Tensor:
        """Run blocks ``span`` on ``hidden`` from ``position`` on, in passes batched with other sessions' work
        (see scheduler.py). A long input goes in chunks, run one per pass: between two chunks, and with each, other
        sessions' decode steps get their turn, and while they decode, chunks are small (``PassTimes.prompt_chunk``)."""
        tokens = hidden.shape[1]
        if is_decode(tokens):
            return await self.compute.run_batched(self._work(span, cache, position, hidden, decode=True), Priority.DECODE)
        size = max(1, self.compute.prompt_chunk(self.chunk_tokens) // hidden.shape[0])
        works = [
            self._work(span, cache, position + offset, hidden[:, offset : offset + size], decode=False)
            for offset in range(0, tokens, size)
        ]
        outputs = await self.compute.run_sequence(works, priority)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _work(
        self, span: tuple[int, int], cache: SpanCache, position: int, hidden: torch.Tensor, *, decode: bool
    ) -> BatchWork:
        """A decode step, or a chunk of a prompt or forward pass (``decode=False``, however short: the last chunk)."""
        tokens = hidden.shape[0] * hidden.shape[1]
        # The session's cache stands for the session (by id: the queue must not keep a closed session's cache).
        return BatchWork(span, tokens, (cache, position, hidden), run=self._run_pass, decode=decode, member=id(cache))

    def _run_pass(self, works: list[BatchWork]) -> list[torch.Tensor]:
        """One pass of the blocks over the steps of several sessions (on the compute thread)."""
        steps = []
        for work in works:
            cache, position, hidden = work.payload
            if position > cache.get_seq_length():  # an earlier chunk of its prompt failed
                raise ProtocolError(f"Position {position} is past the {cache.get_seq_length()} tokens cached")
            if position < cache.get_seq_length():
                cache.truncate(position)  # roll back (a replay or a regenerated suffix)
            steps.append(PackedStep(hidden.to(self.device, self.dtype), position, cache))
        start, end = works[0].key
        outputs = self.blocks.forward_packed(steps, start=start, end=end, between=between_layers)
        return [output.to("cpu", work.payload[2].dtype) for output, work in zip(outputs, works)]

    # ---- forward: a full sequence through some of the blocks, no cache. A stream (of one message each way)
    # because hivemind caps unary messages at 4 MiB, less than one long prompt's hidden states.

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            request = await anext(requests, None)
            if request is None:
                raise ProtocolError("Empty forward request")
            spec = decode_metadata(request.metadata, ForwardRequest)
            self._check_span(spec.start, spec.end)
            hidden = await self._parse_hidden(request)
            if hidden.shape[0] * hidden.shape[1] > self.max_forward_tokens:
                raise ProtocolError(
                    f"Forward pass of {hidden.shape[0]}x{hidden.shape[1]} tokens is too large "
                    f"(at most {self.max_forward_tokens} tokens); split it"
                )
            caller = messages.origin(request.uid, context.remote_id, self.trusted_relays)
            with self._forward_slot(caller):
                cache = self.blocks.new_cache(spec.start, spec.end)  # chunks of one pass see the earlier ones
                started = time.perf_counter()
                output = await self._compute((spec.start, spec.end), cache, 0, hidden, Priority.FORWARD)
                if self.fault is not None:
                    output = self.fault.apply(output)
                self._count(hidden, time.perf_counter() - started, kind="forward")
            yield response(None, await self._serialize(output))
            # Let the client end the stream: closing it from here first can break the client's pending write.
            with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration, ProtocolError):
                await asyncio.wait_for(anext(requests), 5.0)
        except Exception:
            self.metrics.errors.labels("forward").inc()
            raise

    @contextlib.contextmanager
    def _forward_slot(self, peer: str):
        if self._forwards[peer] >= self.max_forwards_per_peer:
            raise ProtocolError(f"Your peer already runs {self._forwards[peer]} forward passes here; wait for them")
        if sum(self._forwards.values()) >= self.max_forwards:
            raise ServerBusy("running other forward passes; try another server")
        self._forwards[peer] += 1
        try:
            yield
        finally:
            self._forwards[peer] -= 1
            if not self._forwards[peer]:
                del self._forwards[peer]

    def _count(self, hidden: torch.Tensor, seconds: float, kind: str) -> None:
        tokens = hidden.shape[0] * hidden.shape[1]
        self.tokens_served += tokens
        self.metrics.tokens.labels(kind).inc(tokens)
        self.metrics.step_seconds.labels(kind).observe(seconds)

    async def _serialize(self, output: torch.Tensor) -> runtime_pb2.Tensor:
        """``output`` as this server sends it (--wire-dtype); a large one is encoded off the event loop."""
        if output.numel() * output.element_size() > _OFF_LOOP_BYTES:
            wire = await asyncio.to_thread(serialize_tensor, output, self.wire_dtype)
        else:
            wire = serialize_tensor(output, self.wire_dtype)
        self.metrics.count_activations("out", *wire_bytes(wire))
        return wire

    # ---- info and ping

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        info = ServerStatus(
            model_id=self.model_id,
            start=self.blocks.start,
            end=self.blocks.end,
            version=__version__,
            torch_dtype=str(self.dtype).removeprefix("torch."),
            quant=self.quant,
            active_sessions=len(self.sessions),
            free_cache_tokens=self.sessions.free_cache_tokens,
            max_length=self.sessions.max_length,
            inputs_from_servers=self.inputs_from_servers,
        )
        return runtime_pb2.ExpertResponse(metadata=encode_metadata(info))

    async def rpc_ping(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=request.metadata[:64])

    # ---- validation

    def _check_span(self, start: int, end: int) -> None:
        if not self.blocks.start <= start < end <= self.blocks.end:
            raise ProtocolError(
                f"Blocks {start}:{end} requested, this server holds {self.blocks.start}:{self.blocks.end}"
            )

    async def _parse_hidden(self, request: runtime_pb2.ExpertRequest, batch_size: int | None = None) -> torch.Tensor:
        if len(request.tensors) != 1:
            raise ProtocolError(f"Expected 1 tensor (hidden states), got {len(request.tensors)}")
        proto = request.tensors[0]
        check_tensor(proto)
        if len(proto.size) != 3 or proto.size[2] != self.hidden_size:
            raise ProtocolError(f"Hidden states must be [batch, tokens, {self.hidden_size}], got {list(proto.size)}")
        if batch_size is not None and proto.size[0] != batch_size:
            raise ProtocolError(f"Batch size {proto.size[0]} differs from the session's {batch_size}")
        self.metrics.count_activations("in", *wire_bytes(proto))
        if len(proto.buffer) > _OFF_LOOP_BYTES:
            return await asyncio.to_thread(_decode_finite, proto, self.dtype)
        return _decode_finite(proto, self.dtype)


async def _read_into(requests: AsyncIterator[runtime_pb2.ExpertRequest], queue: asyncio.Queue) -> None:
    """Read a stream's requests into ``queue`` until it ends (or fails: the task then holds the error)."""
    async for request in requests:
        await queue.put(request)


async def _next_or_none(queue: asyncio.Queue, reader: asyncio.Task) -> runtime_pb2.ExpertRequest | None:
    """The next request ``reader`` queued, or None if the stream ended first."""
    getting = asyncio.ensure_future(queue.get())
    await asyncio.wait([getting, reader], return_when=asyncio.FIRST_COMPLETED)
    if getting.done():
        return getting.result()
    getting.cancel()
    return queue.get_nowait() if not queue.empty() else None


def _decode_finite(proto: runtime_pb2.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Decodes whatever codec the sender chose, in our compute dtype (checked there: a value that overflows it
    would poison the cache as surely as a NaN sent on purpose)."""
    hidden = deserialize_tensor(proto, dtype=dtype)
    if not torch.isfinite(hidden).all():
        raise ProtocolError("Hidden states contain NaN or infinite values")
    return hidden
