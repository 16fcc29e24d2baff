"""Push channels: a long-lived P2P stream that carries step inputs to one session on another server.

Opening a libp2p stream costs a protocol negotiation, a round trip on a WAN link; a channel opens its stream
once per (sender, receiving session) and then every push costs one one-way trip. Servers use channels to
forward their outputs to the next server of a chain; the client uses them for its fallback copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Optional

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm import wire

logger = logging.getLogger(__name__)


class PushChannel:
    def __init__(self, p2p: P2P, peer_id: PeerID, session_id: str, relay: Optional[str] = None):
        self.p2p, self.peer_id, self.session_id, self.relay = p2p, peer_id, session_id, relay
        self._queue: asyncio.Queue[Optional[runtime_pb2.ExpertRequest]] = asyncio.Queue()
        self._task: Optional[asyncio.Task] = None

    def push(self, position: int, hidden: torch.Tensor) -> None:
        """Queue the input of step ``position``; never blocks, never raises (a lost push only costs latency)."""
        self._queue.put_nowait(
            runtime_pb2.ExpertRequest(
                metadata=wire.encode_metadata(wire.PushStep(session_id=self.session_id, position=position)),
                tensors=[wire.serialize_tensor(hidden)],
            )
        )
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def _run(self) -> None:
        from molink_swarm.relay import directly_connected, server_stub

        try:
            # A hole punched to a relayed server (see NextServerPinger) makes the relay unnecessary.
            relay = None if self.relay is not None and await directly_connected(self.p2p, self.peer_id) else self.relay
            replies = await server_stub(self.p2p, self.peer_id, relay).rpc_push_stream(self._requests())
            async for _ in replies:  # the receiver answers only at the end (or with an error)
                pass
        except Exception as e:  # the receiving server died or refused: pushes stop, the chain falls back
            logger.debug("Push channel to %s closed: %r", self.peer_id, e)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def aclose(self) -> None:
        self.close()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2.0)
