"""Inference sessions: a chain of servers, each holding the KV cache of its blocks for this session."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator, Optional

import torch
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2

from molink_swarm import wire
from molink_swarm.client.loop import run_sync
from molink_swarm.client.swarm import SwarmClient
from molink_swarm.errors import UserError
from molink_swarm.routing.planner import Hop, MissingBlocksError, format_blocks, plan_chain

logger = logging.getLogger(__name__)


class SwarmError(UserError):
    """The swarm could not serve a request (missing blocks, every candidate failed)."""


class _HopStream:
    """The open inference stream to one server of the chain."""

    def __init__(self, swarm: SwarmClient, hop: Hop, spec: wire.SessionSpec, step_timeout: float):
        self.hop, self.spec, self.step_timeout = hop, spec, step_timeout
        self._swarm = swarm
        self._requests: asyncio.Queue[Optional[runtime_pb2.ExpertRequest]] = asyncio.Queue()
        self._responses: Optional[AsyncIterator[runtime_pb2.ExpertResponse]] = None
        self._opened = False
        self._step_id = 0

    async def _request_iterator(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            item = await self._requests.get()
            if item is None:
                return
            yield item

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if self._responses is None:
            self._responses = await self._swarm.stub(self.hop.peer_id).rpc_inference(self._request_iterator())
        message = wire.InferenceStep(
            open=None if self._opened else self.spec, position=position, step_id=self._step_id
        )
        self._opened = True
        self._step_id += 1
        self._requests.put_nowait(wire.request(message, hidden))
        try:
            reply = await asyncio.wait_for(anext(self._responses), self.step_timeout)
        except StopAsyncIteration:
            raise ConnectionError(f"Server {self.hop.peer_id} closed the session") from None
        result = wire.decode_metadata(reply.metadata, wire.StepResult)
        self.last_result = result
        if len(reply.tensors) != 1 or result.position != position + hidden.shape[1]:
            raise wire.ProtocolError(f"Server {self.hop.peer_id} sent an inconsistent step result")
        output = wire.deserialize_tensor(reply.tensors[0])
        if output.shape != hidden.shape:
            raise wire.ProtocolError(f"Server {self.hop.peer_id} returned shape {list(output.shape)}")
        return output

    async def close(self) -> None:
        self._requests.put_nowait(None)
        if self._responses is not None:
            try:
                await asyncio.wait_for(anext(self._responses), 2.0)
            except (StopAsyncIteration, asyncio.TimeoutError, P2PHandlerError, ConnectionError, OSError):
                pass
            except Exception:  # closing must never raise
                logger.debug("Error while closing a stream", exc_info=True)


class InferenceSession:
    """Keeps attention caches on the servers across steps (and across ``generate()`` calls).

    ``position`` is the number of tokens the servers hold; ``history`` the token ids the client has seen,
    which ``generate()`` uses to continue a conversation from where it left off.
    """

    def __init__(
        self,
        swarm: SwarmClient,
        *,
        max_length: int,
        model_name: str,
        step_timeout: float = 120.0,
        wait_for_blocks_s: float = 30.0,
    ):
        self.swarm = swarm
        self.max_length = max_length
        self.model_name = model_name
        self.step_timeout = step_timeout
        self.wait_for_blocks_s = wait_for_blocks_s
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.history: Optional[torch.Tensor] = None
        self._hops: list[_HopStream] = []
        self._batch_size: Optional[int] = None
        self.closed = False

    # ---- synchronous API (what the model classes call)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send hidden states for the next ``hidden.shape[1]`` tokens through the chain."""
        return run_sync(self.astep(hidden))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            run_sync(self._close_hops())

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- async implementation

    async def astep(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.closed:
            raise SwarmError("This inference session is closed")
        if self.position + hidden.shape[1] > self.max_length:
            raise SwarmError(
                f"The session would hold {self.position + hidden.shape[1]} tokens, over its max_length "
                f"{self.max_length}; open it with a larger inference_session(max_length=...)"
            )
        if self._batch_size is None:
            self._batch_size = hidden.shape[0]
        elif hidden.shape[0] != self._batch_size:
            raise SwarmError(f"Batch size changed from {self._batch_size} to {hidden.shape[0]} within a session")
        if not self._hops:
            self._hops = await self._open_chain()
        for hop in self._hops:
            try:
                hidden = await hop.step(hidden, self.position)
            except (P2PHandlerError, ConnectionError, OSError, asyncio.TimeoutError, wire.ProtocolError) as e:
                raise SwarmError(f"Server {hop.hop.peer_id} (blocks {hop.hop.start}:{hop.hop.end}) failed: {e}") from e
        self.position += hidden.shape[1]
        return hidden

    async def _open_chain(self) -> list[_HopStream]:
        hops = await plan_with_wait(self.swarm, self.wait_for_blocks_s, self.model_name, self.max_length * self._batch_size)
        logger.debug("Session %s chain: %s", self.session_id, [(str(h.peer_id), h.start, h.end) for h in hops])
        return [
            _HopStream(
                self.swarm,
                hop,
                wire.SessionSpec(
                    session_id=self.session_id,
                    start=hop.start,
                    end=hop.end,
                    max_length=self.max_length,
                    batch_size=self._batch_size,
                ),
                self.step_timeout,
            )
            for hop in hops
        ]

    async def _close_hops(self) -> None:
        await asyncio.gather(*(hop.close() for hop in self._hops), return_exceptions=True)
        self._hops = []


async def plan_with_wait(swarm: SwarmClient, wait_s: float, model_name: str, cache_tokens: int = 0) -> list[Hop]:
    """Plan a chain; if some blocks have no server, wait up to ``wait_s`` for one to join, then fail clearly."""
    deadline = time.monotonic() + wait_s
    refresh = False
    while True:
        candidates = await swarm.candidates(refresh=refresh)
        try:
            return plan_chain(swarm.num_blocks, candidates, min_cache_tokens=cache_tokens)
        except MissingBlocksError as e:
            if time.monotonic() >= deadline:
                blocks = format_blocks(e.missing)
                raise SwarmError(
                    f"No server in the swarm holds blocks {blocks} of {model_name}. "
                    f"Connect your GPU: molink-swarm join --model {model_name} --blocks {blocks.split(',')[0]} "
                    "--initial-peers ..."
                ) from None
            logger.info("Waiting for servers of blocks %s", format_blocks(e.missing))
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            refresh = True


async def forward_through_chain(swarm: SwarmClient, hidden: torch.Tensor, model_name: str, wait_s: float) -> torch.Tensor:
    """A cache-less pass of full sequences through every block (``model(input_ids)`` without a session)."""
    hops = await plan_with_wait(swarm, wait_s, model_name)
    for hop in hops:
        request = wire.request(wire.ForwardRequest(start=hop.start, end=hop.end), hidden)
        try:
            reply = await asyncio.wait_for(call_forward(swarm, hop.peer_id, request), 600)
        except (P2PHandlerError, ConnectionError, OSError, asyncio.TimeoutError) as e:
            raise SwarmError(f"Server {hop.peer_id} (blocks {hop.start}:{hop.end}) failed: {e}") from e
        if len(reply.tensors) != 1:
            raise SwarmError(f"Server {hop.peer_id} sent {len(reply.tensors)} tensors")
        output = wire.deserialize_tensor(reply.tensors[0])
        if output.shape != hidden.shape:
            raise SwarmError(f"Server {hop.peer_id} returned shape {list(output.shape)}")
        hidden = output
    return hidden


async def call_forward(swarm: SwarmClient, peer_id, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
    """One request, one reply, over a stream (unary calls are capped at 4 MiB)."""

    replied = asyncio.Event()

    async def one():
        yield request
        await replied.wait()  # end the stream only after the reply: closing early races with it

    try:
        replies = await swarm.stub(peer_id).rpc_forward(one())
        reply = await anext(replies, None)
    finally:
        replied.set()
    if reply is None:
        raise ConnectionError(f"Server {peer_id} closed the forward stream without a reply")
    return reply
