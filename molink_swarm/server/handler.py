"""The RPCs a server answers over hivemind P2P: inference streams, forward passes, info and ping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

import torch
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from molink_swarm import __version__
from molink_swarm.metrics import ServerMetrics
from molink_swarm.models.family import BlockSpan
from molink_swarm.push import PushChannel
from molink_swarm.server.scheduler import ComputeQueue, Priority
from molink_swarm.server.sessions import EarlyPushes, Session, SessionTable
from molink_swarm.wire import (
    ForwardRequest,
    InferenceStep,
    ProtocolError,
    PushStep,
    PushTarget,
    ServerStatus,
    StepResult,
    decode_metadata,
    deserialize_tensor,
    encode_metadata,
    response,
)

logger = logging.getLogger(__name__)

# A step of at most this many tokens per sequence counts as decoding and jumps ahead of prefills.
DECODE_MAX_TOKENS = 4


class BlockServicer(ServicerBase):
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
        metrics: ServerMetrics | None = None,
    ):
        self.blocks = blocks
        self.compute = compute
        self.sessions = sessions
        self.model_id = model_id
        self.dtype = dtype
        self.device = device
        self.session_idle_timeout = session_idle_timeout
        self.metrics = metrics or ServerMetrics()
        self.hidden_size = blocks.config.hidden_size
        self.tokens_served = 0
        self.closing = False
        self.push_timeout = 30.0
        self.inputs_from_servers = 0
        self.early_pushes = EarlyPushes(ttl=self.push_timeout)
        self.p2p = None  # set once the handlers are registered; needed to push to the next server

    # ---- inference: one bidirectional stream per session, one message per step

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: Session | None = None
        channels: dict[PushTarget, PushChannel] = {}
        try:
            while True:
                try:
                    request = await asyncio.wait_for(anext(requests), self.session_idle_timeout)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise ProtocolError(f"Session closed after {self.session_idle_timeout:.0f} s without a step")
                step = decode_metadata(request.metadata, InferenceStep)
                if session is None:
                    session = self._open_session(step, context)
                elif step.open is not None:
                    raise ProtocolError("A stream carries one session; open a new stream for another")
                if step.expect_push:
                    if request.tensors:
                        raise ProtocolError("A step that expects a pushed input must not carry a tensor")
                    hidden = await self._await_push(session, step.position)
                else:
                    hidden = self._parse_hidden(request, batch_size=session.spec.batch_size)
                self._check_step(session, step, hidden)
                priority = Priority.DECODE if hidden.shape[1] <= DECODE_MAX_TOKENS else Priority.PREFILL
                started = time.perf_counter()
                output = await self.compute.run(lambda: self._run_step(session, step.position, hidden), priority)
                session.last_active = time.monotonic()
                self._count(priority, hidden, time.perf_counter() - started)
                if step.push_to is not None:
                    # Next server first: it is on the critical path; the client's copy is for its records.
                    channel = channels.get(step.push_to)
                    if channel is None:
                        if len(channels) >= 8:
                            raise ProtocolError("Too many push targets for one session")
                        peer = PeerID.from_base58(step.push_to.peer_id)
                        channel = channels[step.push_to] = PushChannel(
                            self.p2p, peer, step.push_to.session_id, step.push_to.relay
                        )
                    channel.push(step.position, output)
                result = StepResult(
                    position=session.position, step_id=step.step_id, compute_s=time.perf_counter() - started
                )
                yield response(result, output)
        except Exception:
            self.metrics.errors.labels("inference").inc()
            raise
        finally:
            for channel in channels.values():
                channel.close()
            if session is not None:
                self.sessions.close(session.spec.session_id)
                logger.debug("Closed session %s", session.spec.session_id)

    async def _await_push(self, session: Session, position: int) -> torch.Tensor:
        future = session.pushed_input(position)
        try:
            return await asyncio.wait_for(future, self.push_timeout)
        except asyncio.TimeoutError:
            raise ProtocolError(f"No input was pushed for position {position} within {self.push_timeout:.0f} s") from None
        finally:
            session.inbox.pop(position, None)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Receive a step's input from the previous server of a chain (or from the client)."""
        self._accept_push(request, context)
        return runtime_pb2.ExpertResponse()

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Many pushes over one stream (see push.py); a malformed push ends the stream with an error."""
        async for request in requests:
            self._accept_push(request, context)
        return
        yield  # an async generator that answers nothing until the sender ends the stream

    def _accept_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> None:
        push = decode_metadata(request.metadata, PushStep)
        session = self.sessions.get(push.session_id)
        hidden = self._parse_hidden(request, batch_size=None if session is None else session.spec.batch_size)
        if session is None:
            # Not open yet (the previous server outran the stream that opens it) or closed already (then it
            # expires unused).
            self.early_pushes.keep(push.session_id, push.position, hidden, str(context.remote_id))
        else:
            self._deliver(session, push.position, hidden, str(context.remote_id))

    def _deliver(self, session: Session, position: int, hidden: torch.Tensor, sender: str) -> None:
        if session.deliver(position, hidden) and sender != session.peer:
            # The previous server beat the client's copy. (Through a relay both come from the relay: not counted.)
            self.inputs_from_servers += 1

    def _open_session(self, step: InferenceStep, context: P2PContext) -> Session:
        spec = step.open
        if spec is None:
            raise ProtocolError("The first message of an inference stream must open a session")
        if self.closing:
            raise ProtocolError("Server is shutting down; use another server")
        self._check_span(spec.start, spec.end)
        cache = self.blocks.new_cache(spec.start, spec.end)
        session = self.sessions.open(spec, cache, peer=str(context.remote_id))
        for position, hidden, sender in self.early_pushes.take(spec.session_id):
            if hidden.shape[0] == spec.batch_size:
                self._deliver(session, position, hidden, sender)
        logger.debug("Opened session %s for blocks %d:%d", spec.session_id, spec.start, spec.end)
        return session

    def _check_step(self, session: Session, step: InferenceStep, hidden: torch.Tensor) -> None:
        if step.position > session.position:
            raise ProtocolError(
                f"Step starts at position {step.position} but the session holds {session.position} tokens"
            )
        if step.position + hidden.shape[1] > session.spec.max_length:
            raise ProtocolError(
                f"Step would reach {step.position + hidden.shape[1]} tokens, over the session's max_length "
                f"{session.spec.max_length}"
            )

    def _run_step(self, session: Session, position: int, hidden: torch.Tensor) -> torch.Tensor:
        if position < session.position:
            session.cache.crop(position)  # roll back (a replay or a regenerated suffix)
        output = self.blocks(
            hidden.to(self.device, self.dtype),
            position=position,
            cache=session.cache,
            start=session.spec.start,
            end=session.spec.end,
        )
        session.position = position + hidden.shape[1]
        return output.to("cpu", hidden.dtype)

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
            hidden = self._parse_hidden(request)
            if hidden.shape[0] * hidden.shape[1] > self.sessions.max_length * 8:
                raise ProtocolError(f"Forward pass of {hidden.shape[0]}x{hidden.shape[1]} tokens is too large")

            def run() -> torch.Tensor:
                output = self.blocks(hidden.to(self.device, self.dtype), start=spec.start, end=spec.end)
                return output.to("cpu", hidden.dtype)

            started = time.perf_counter()
            output = await self.compute.run(run, Priority.FORWARD)
            self._count(Priority.FORWARD, hidden, time.perf_counter() - started)
            yield response(None, output)
            # Let the client end the stream: closing it from here first can break the client's pending write.
            with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration):
                await asyncio.wait_for(anext(requests), 5.0)
        except Exception:
            self.metrics.errors.labels("forward").inc()
            raise

    def _count(self, priority: Priority, hidden: torch.Tensor, seconds: float) -> None:
        tokens = hidden.shape[0] * hidden.shape[1]
        self.tokens_served += tokens
        kind = priority.name.lower()
        self.metrics.tokens.labels(kind).inc(tokens)
        self.metrics.step_seconds.labels(kind).observe(seconds)

    # ---- info and ping

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        info = ServerStatus(
            model_id=self.model_id,
            start=self.blocks.start,
            end=self.blocks.end,
            version=__version__,
            torch_dtype=str(self.dtype).removeprefix("torch."),
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

    def _parse_hidden(self, request: runtime_pb2.ExpertRequest, batch_size: int | None = None) -> torch.Tensor:
        if len(request.tensors) != 1:
            raise ProtocolError(f"Expected 1 tensor (hidden states), got {len(request.tensors)}")
        hidden = deserialize_tensor(request.tensors[0])
        if hidden.ndim != 3 or hidden.shape[2] != self.hidden_size or hidden.shape[1] == 0:
            raise ProtocolError(
                f"Hidden states must be [batch, tokens>0, {self.hidden_size}], got {list(hidden.shape)}"
            )
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise ProtocolError(f"Batch size {hidden.shape[0]} differs from the session's {batch_size}")
        if not torch.isfinite(hidden).all():
            raise ProtocolError("Hidden states contain NaN or infinite values")
        return hidden
