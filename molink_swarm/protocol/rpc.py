"""The RPCs a server answers: their names and message types, from which callers build stubs.

The server's handlers (server/handler.py) implement :class:`BlockRPC`; clients, relays and other servers call it
through :func:`block_stub` without importing the server.
"""

from __future__ import annotations

from typing import AsyncIterator, Optional

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from molink_swarm.protocol import e2e
from molink_swarm.protocol.messages import RELAYED_FROM
from molink_swarm.protocol.streams import GuardedServicer, StreamLimits

STREAM_RPCS = frozenset({"rpc_inference", "rpc_group_step", "rpc_forward", "rpc_push_stream"})
UNARY_RPCS = frozenset({"rpc_info", "rpc_ping", "rpc_push"})
# What a relay pipes: the streams (sealed end to end, see protocol/e2e.py) and the unary calls that carry no
# activations (a unary call cannot run a handshake; rpc_push has a stream form).
RELAYED_UNARY_RPCS = frozenset({"rpc_info", "rpc_ping"})


class BlockRPC(GuardedServicer):
    """A server of transformer blocks, as seen on the wire.

    Its streams also take calls sealed end to end (protocol/e2e.py: what callers send through relays), which
    needs ``identity``, the RSA key of the server's peer id."""

    identity: Optional[RSAPrivateKey] = None

    def _stream_handler(
        self, name: str, method, request_type, limits: StreamLimits, p2p: P2P, auth=None
    ):
        method_name = name.rsplit(".", 1)[-1]
        sealed = e2e.sealed_handler(method, method_name, p2p.peer_id, lambda: self.identity, RELAYED_FROM)
        return super()._stream_handler(name, sealed, request_type, limits, p2p, auth)

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        # The same handle names whichever subclass serves them (hivemind names them after the class).
        name = f"BlockServicer.{method_name}"
        return name if namespace is None else f"{namespace}::{name}"

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """An inference session: a SessionSpec, then one InferenceStep per message; one StepResult each."""
        raise NotImplementedError
        yield

    async def rpc_group_step(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Decode steps of several of the caller's sessions: one GroupStep per message; one GroupResult each."""
        raise NotImplementedError
        yield

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """A cache-less pass of full sequences (ForwardRequest plus hidden states)."""
        raise NotImplementedError
        yield

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The input of one step of a session (PushStep), or of a group step (GroupPush), sent by the previous hop."""
        raise NotImplementedError

    async def rpc_push_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Many pushes over one stream (see net/push.py)."""
        raise NotImplementedError
        yield

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The server's ServerStatus."""
        raise NotImplementedError

    async def rpc_ping(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Echoes (the first bytes of) the metadata: callers time the round trip."""
        raise NotImplementedError


def block_stub(p2p: P2P, peer: PeerID):
    """A stub that calls a server's RPCs directly (net/paths.py adds the relayed way)."""
    return BlockRPC.get_stub(p2p, peer)
