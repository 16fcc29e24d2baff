"""Push channels: a long-lived P2P stream that carries step inputs to one session on another server.

Opening a libp2p stream costs a protocol negotiation, a round trip on a WAN link; a channel opens its stream
once per (sender, receiving session) and then every push costs one one-way trip. Servers use channels to
forward their outputs to the next server of a chain; the client uses them for its fallback copies.

A push is an optimisation (the client delivers a copy of every input itself), so a channel never blocks and
never grows without bound: it holds a few pushes, drops the oldest when the receiver falls behind, and when
its stream breaks it opens a new one for the next push, after a pause that grows while the receiver keeps
failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm.net.paths import directly_connected, server_stub
from molink_swarm.protocol import messages
from molink_swarm.protocol.streams import queued

logger = logging.getLogger(__name__)

MAX_QUEUED = 8


class PushChannel:
    """Pushes to one server: the inputs of session ``session_id`` there (``push``), or of group steps (``push_group``:
    a channel for those has no session of its own)."""

    def __init__(self, p2p: P2P, peer_id: PeerID, session_id: Optional[str], relay: Optional[str] = None):
        self.p2p, self.peer_id, self.session_id, self.relay = p2p, peer_id, session_id, relay
        self._queue: asyncio.Queue[Optional[runtime_pb2.ExpertRequest]] = asyncio.Queue(MAX_QUEUED)
        self._task: Optional[asyncio.Task] = None
        self._failures = 0
        self._retry_at = 0.0
        self.dropped = 0
        self._closed = False

    def push(self, position: int, hidden: runtime_pb2.Tensor) -> None:
        """Queue the input of step ``position``, already serialized (the sender chose its wire dtype, and the same
        bytes may also go elsewhere); never blocks, never raises (a lost push only costs latency)."""
        self._send(messages.PushStep(session_id=self.session_id, position=position), hidden)

    def push_group(self, steps: list[messages.PushStep], hidden: runtime_pb2.Tensor) -> None:
        """Queue the inputs of several sessions' steps, ``hidden`` stacking one row per step (as :meth:`push`)."""
        self._send(messages.GroupPush(steps=steps), hidden)

    def _send(self, message: messages.PushStep | messages.GroupPush, hidden: runtime_pb2.Tensor) -> None:
        if self._closed:
            return
        if self._task is None or self._task.done():
            if time.monotonic() < self._retry_at:
                self.dropped += 1
                return  # the receiver failed recently: the chain falls back to the client's copies meanwhile
            self._queue = asyncio.Queue(MAX_QUEUED)  # whatever the dead stream held is stale now
            self._task = asyncio.create_task(self._run())
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(runtime_pb2.ExpertRequest(metadata=messages.encode_metadata(message), tensors=[hidden]))

    async def _run(self) -> None:
        try:
            # A hole punched to a relayed server (see NextServerPinger) makes the relay unnecessary.
            relay = None if self.relay is not None and await directly_connected(self.p2p, self.peer_id) else self.relay
            replies = await server_stub(self.p2p, self.peer_id, relay).rpc_push_stream(queued(self._queue))
            async for _ in replies:  # the receiver answers only at the end (or with an error)
                pass
            self._failures = 0
        except Exception as e:  # the receiving server died or refused: pushes pause, the chain falls back
            self._failures += 1
            pause = min(30.0, 0.5 * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + pause
            log = logger.info if self._failures == 1 else logger.debug
            log("Push channel to %s broke (%s); client copies carry the steps, retrying in %.1f s", self.peer_id, e, pause)

    def close(self) -> None:
        self._closed = True
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def aclose(self) -> None:
        self.close()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2.0)
