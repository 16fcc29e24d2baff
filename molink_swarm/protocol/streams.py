"""RPC streams with limits a hostile peer cannot get around.

hivemind frames every stream message as one marker byte, an 8-byte length and a protobuf; its own stream
handler reads each frame whole, whatever length it declares, with no deadline, and reads ahead of the handler.
Here the same frames (so hivemind's stubs still talk to us) are read one at a time, when the handler asks for
the next message: the declared length is checked before a byte of the body is read, the body must arrive
within a deadline, the bytes of messages being handled come out of one budget per process, and a peer holds
only so many streams at once. What is not read stays in the daemon's flow-controlled buffers, not in ours.

In a private swarm (a swarm key bound to the p2p daemon, see protocol/auth.py) every call and every answer begins
with a proof of the key, checked before anything else is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto.p2pd_pb2 import RPCError

from molink_swarm.protocol.auth import (
    PRIVATE_SWARM_HINT,
    PROOF_BYTES,
    RpcAuth,
    SwarmKeyRefused,
    auth_of,
    nonce_of,
    split_proof,
)
from molink_swarm.protocol.e2e import ChannelBroken
from molink_swarm.protocol.errors import ProtocolError, ServerBusy

logger = logging.getLogger(__name__)

_MESSAGE, _ERROR, _PROOF = b"\x00", b"\x01", b"\x02"
_LENGTH_BYTES = 8
_DISCARD_MAX_BYTES = 64 << 20  # an oversized message up to this size is read past (not kept) before refusing it


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """What one stream may cost the side that reads it."""

    max_message_bytes: int = 64 << 20
    first_message_s: float = 30.0  # a new stream that says nothing for this long is closed
    idle_s: float = 300.0  # the most time between two messages of a stream
    frame_s: float = 10.0  # once a frame has begun, its header must follow within this, and its body within
    min_bytes_per_s: float = 256 << 10  # this plus its size at this pace


class ByteBudget:
    """Bytes of received messages held at once in this process (read, or being handled)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._freed = asyncio.Event()

    async def take(self, size: int, timeout: float) -> None:
        if size > self.limit:
            raise ProtocolError(f"Message of {size} bytes exceeds this server's {self.limit} byte budget")
        try:
            async with asyncio.timeout(timeout):
                while self.used + size > self.limit:
                    self._freed.clear()
                    await self._freed.wait()
        except TimeoutError:
            raise ServerBusy("receiving other messages; try again later") from None
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        self._freed.set()


class RefusalLog:
    """One log line per refused call, at most one per peer every ``period`` seconds (a bad peer must not be able
    to fill a volunteer's disk); the lines held back are counted in the next one."""

    def __init__(self, period: float = 10.0, max_peers: int = 4096):
        self.period, self.max_peers = period, max_peers
        self._last: dict[str, tuple[float, int]] = {}  # peer -> (time of its last line, refusals held back)

    def refused(self, peer: Any, method: str, reason: object) -> None:
        key, now = str(peer), time.monotonic()
        last, held = self._last.get(key, (-float("inf"), 0))
        if now - last < self.period:
            self._last[key] = (last, held + 1)
            return
        if len(self._last) >= self.max_peers:
            self._last.clear()
        self._last[key] = (now, 0)
        more = f" (+{held} more refused)" if held else ""
        logger.info("Refused %s from %s: %s%s", method, key, str(reason)[:200], more)


async def read_frame(reader: asyncio.StreamReader, limits: StreamLimits, wait_s: float) -> tuple[bytes, bytes]:
    """``(marker, body)`` of the next frame; EOFError when the stream ends cleanly between frames."""
    try:
        async with asyncio.timeout(wait_s):
            marker = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        raise EOFError("stream closed") from None
    except TimeoutError:
        raise ProtocolError(f"No message within {wait_s:.0f} s; closing the stream") from None
    if marker not in (_MESSAGE, _ERROR, _PROOF):
        raise ProtocolError(f"Invalid frame marker {marker!r}")
    try:
        async with asyncio.timeout(limits.frame_s):
            length = int.from_bytes(await reader.readexactly(_LENGTH_BYTES), "big")
        deadline = limits.frame_s + length / limits.min_bytes_per_s
        if length > limits.max_message_bytes:
            if length <= _DISCARD_MAX_BYTES:  # an honest caller that sent too much: skip it, so it reads our answer
                async with asyncio.timeout(deadline):
                    await _discard(reader, length)
            raise ProtocolError(f"Message of {length} bytes exceeds the {limits.max_message_bytes} byte limit")
        async with asyncio.timeout(deadline):
            body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("Stream closed in the middle of a message") from None
    except TimeoutError:
        raise ProtocolError("Message arrived too slowly; closing the stream") from None
    return marker, body


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        length -= len(await reader.readexactly(min(length, 1 << 16)))


async def write_frame(writer: asyncio.StreamWriter, message: Message | RPCError) -> None:
    data = message.SerializeToString()
    writer.write((_ERROR if isinstance(message, RPCError) else _MESSAGE) + len(data).to_bytes(_LENGTH_BYTES, "big"))
    writer.write(data)
    await writer.drain()


def parse(message_type: type[Message], body: bytes) -> Message:
    message = message_type()
    try:
        message.ParseFromString(body)
    except DecodeError:
        raise ProtocolError(f"Malformed {message_type.__name__}") from None
    return message


async def queued(queue: asyncio.Queue) -> AsyncIterator[Any]:
    """What is put into ``queue``, until a None: the messages of an outgoing stream, fed by its owner."""
    while (item := await queue.get()) is not None:
        yield item


class GuardedServicer(ServicerBase):
    """A hivemind servicer whose streaming RPCs go through the guarded reader above, both where it serves them
    and in its stubs (unary RPCs stay with hivemind: its daemon caps them at a few MiB).

    ``stream_limits`` maps a method name to the limits its incoming streams are read with."""

    max_streams_per_peer = 64
    max_streams = 2048
    reply_limits = StreamLimits(max_message_bytes=(512 << 20) + (1 << 20), idle_s=600.0)

    def __init__(self, stream_limits: Optional[dict[str, StreamLimits]] = None, *, received_bytes: int = 1 << 30):
        self.stream_limits = stream_limits or {}
        self.refusals = RefusalLog()
        self.received_budget = ByteBudget(received_bytes)
        self._streams_by_peer: dict[PeerID, int] = {}

    @property
    def open_streams(self) -> int:
        return sum(self._streams_by_peer.values())

    @classmethod
    def _make_rpc_caller(cls, handler):
        if not handler.stream_output:
            public_caller = super()._make_rpc_caller(handler)

            async def unary_caller(stub, request: Message, timeout: Optional[float] = None) -> Message:
                auth = auth_of(stub._p2p)
                if auth is None:
                    return await public_caller(stub, request, timeout=timeout)
                name = cls._get_handle_name(stub._namespace, handler.method_name)
                return await asyncio.wait_for(
                    call_unary_with_proof(stub._p2p, stub._peer, name, request, handler.response_type, auth), timeout
                )

            unary_caller.__name__ = handler.method_name
            return unary_caller

        async def caller(stub, requests: AsyncIterator[Message], timeout: Optional[float] = None) -> AsyncIterator[Message]:
            name = cls._get_handle_name(stub._namespace, handler.method_name)
            return await call_stream(stub._p2p, stub._peer, name, requests, handler.response_type, cls.reply_limits)

        caller.__name__ = handler.method_name
        return caller

    async def add_p2p_handlers(self, p2p: P2P, wrapper: Any = None, *, namespace: Optional[str] = None, balanced: bool = False) -> None:
        self._collect_rpc_handlers()
        auth = auth_of(p2p)  # a private swarm: every call must prove the key
        for handler in self._rpc_handlers:
            name = self._get_handle_name(namespace, handler.method_name)
            method = getattr(self, handler.method_name)
            if handler.stream_input or handler.stream_output:
                limits = self.stream_limits.get(handler.method_name, StreamLimits())
                await p2p.add_binary_stream_handler(
                    name, self._stream_handler(name, method, handler.request_type, limits, p2p, auth)
                )
            elif auth is not None:
                unary = self._unary_handler(handler.method_name, method)
                await p2p._client.add_unary_handler(name, self._keyed_unary_handler(name, unary, handler.request_type, p2p, auth))
            else:
                await p2p.add_protobuf_handler(name, self._unary_handler(handler.method_name, method), handler.request_type)

    async def remove_p2p_handlers(self, p2p: P2P, *, namespace: Optional[str] = None) -> None:
        self._collect_rpc_handlers()
        for handler in self._rpc_handlers:
            name = self._get_handle_name(namespace, handler.method_name)
            if handler.stream_input or handler.stream_output:
                await p2p.remove_binary_stream_handler(name)
            else:
                await p2p.remove_protobuf_handler(name)

    def _unary_handler(self, method_name: str, method: Callable):
        async def handle(request: Message, context: P2PContext) -> Message:
            try:
                return await method(request, context)
            except (ProtocolError, P2PHandlerError, P2PDaemonError) as e:
                self.refusals.refused(context.remote_id, method_name, e)
                raise

        return handle

    def _keyed_unary_handler(self, name: str, handle: Callable, request_type: type[Message], p2p: P2P, auth: RpcAuth):
        """A unary handler of a private swarm: ``proof + request`` in, ``proof + reply`` out (see protocol/auth.py)."""
        method_name = name.rsplit(".", 1)[-1]

        async def handle_bytes(data: bytes, remote_id: PeerID) -> bytes:
            proof, body = split_proof(data)
            try:
                nonce = auth.check_request(proof, name, remote_id, p2p.peer_id)
            except SwarmKeyRefused as e:
                self.refusals.refused(remote_id, method_name, e)
                raise
            context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=remote_id)
            reply = await handle(parse(request_type, body), context)
            return auth.reply_proof(name, remote_id, p2p.peer_id, nonce) + reply.SerializeToString()

        return handle_bytes

    def _stream_handler(
        self, name: str, method: Callable, request_type: type[Message], limits: StreamLimits, p2p: P2P, auth: Optional[RpcAuth] = None
    ):
        method_name = name.rsplit(".", 1)[-1]

        async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = info.peer_id
            context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=peer)
            with contextlib.closing(writer):
                if self._streams_by_peer.get(peer, 0) >= self.max_streams_per_peer or self.open_streams >= self.max_streams:
                    self.refusals.refused(peer, method_name, "too many open streams")
                    with contextlib.suppress(Exception):
                        await write_frame(writer, RPCError(message="Too many open streams from your peer; close some first"))
                    return
                self._streams_by_peer[peer] = self._streams_by_peer.get(peer, 0) + 1
                requests = _GuardedRequests(reader, request_type, limits, self.received_budget)
                try:
                    if auth is not None:
                        await _exchange_proofs(reader, writer, auth, name, peer, p2p.peer_id, limits)
                    async for response in method(requests, context):
                        await write_frame(writer, response)
                except (ProtocolError, P2PHandlerError, P2PDaemonError) as e:  # refused here, or where we relay to
                    self.refusals.refused(peer, method_name, e)
                    with contextlib.suppress(Exception):
                        await write_frame(writer, RPCError(message=str(e)))
                        # Closing on its unread requests would reset the stream before the caller reads why.
                        if isinstance(e, (SwarmKeyRefused, ChannelBroken)):
                            await _read_past(reader, max_bytes=1 << 20, timeout=2.0)
                except (ConnectionError, OSError) as e:  # the caller went away
                    logger.debug("%s stream from %s broke: %r", method_name, peer, e)
                except Exception as e:
                    logger.exception("%s failed for %s", method_name, peer)
                    with contextlib.suppress(Exception):
                        await write_frame(writer, RPCError(message=f"Internal error: {e!r}"[:500]))
                finally:
                    requests.release()
                    self._streams_by_peer[peer] -= 1
                    if not self._streams_by_peer[peer]:
                        del self._streams_by_peer[peer]

        return handle


class _GuardedRequests:
    """The requests of one incoming stream, read only when the handler asks for the next one. The bytes of the
    message being handled count against the process's budget until the handler asks for the next message."""

    def __init__(self, reader: asyncio.StreamReader, request_type: type[Message], limits: StreamLimits, budget: ByteBudget):
        self._reader, self._type, self._limits, self._budget = reader, request_type, limits, budget
        self._held = 0
        self._first = True
        self._ended = False

    def __aiter__(self) -> "_GuardedRequests":
        return self

    async def __anext__(self) -> Message:
        self.release()
        if self._ended:
            raise StopAsyncIteration
        wait_s = self._limits.first_message_s if self._first else self._limits.idle_s
        try:
            marker, body = await read_frame(self._reader, self._limits, wait_s)
        except EOFError:
            self._ended = True
            raise StopAsyncIteration from None
        self._first = False
        if marker == _ERROR:  # the caller's end-of-stream message
            self._ended = True
            raise StopAsyncIteration
        if marker == _PROOF:
            raise ProtocolError("This peer does not belong to a private swarm: call it without --swarm-key")
        self._held = len(body)
        await self._budget.take(self._held, timeout=10.0)
        if len(body) > 1 << 20:  # decoding megabytes would stall every other stream of the event loop
            return await asyncio.to_thread(parse, self._type, body)
        return parse(self._type, body)

    def release(self) -> None:
        if self._held:
            held, self._held = self._held, 0
            self._budget.give(held)


async def call_stream(
    p2p: P2P,
    peer: PeerID,
    handle_name: str,
    requests: AsyncIterator[Message],
    response_type: type[Message],
    limits: StreamLimits = StreamLimits(),
) -> AsyncIterator[Message]:
    """Open a stream to ``peer`` and iterate its replies, read with the same limits (a server cannot make a
    client hold an unbounded message or wait forever between two bytes of one)."""
    _info, reader, writer = await p2p.call_binary_stream_handler(peer, handle_name)
    auth = auth_of(p2p)
    proof = auth.request_proof(handle_name, p2p.peer_id, peer) if auth is not None else None

    async def send() -> None:
        if proof is not None:
            await _write_proof(writer, proof)
        async for request in requests:
            await write_frame(writer, request)
        await write_frame(writer, RPCError())  # end of stream, as hivemind's callers send it

    sending = asyncio.create_task(send())

    async def replies() -> AsyncIterator[Message]:
        with contextlib.closing(writer):
            try:
                proven = proof is None
                while True:
                    try:
                        marker, body = await read_frame(reader, limits, limits.idle_s)
                    except EOFError:
                        break
                    if marker == _ERROR:
                        error = parse(RPCError, body)
                        raise P2PHandlerError(f"Failed to call handler `{handle_name}` at {peer}: {error.message}")
                    if not proven:  # a private swarm: the server's proof comes before its first reply
                        auth.check_reply(body if marker == _PROOF else b"", handle_name, p2p.peer_id, peer, nonce_of(proof))
                        proven = True
                        continue
                    if marker == _PROOF:
                        raise ProtocolError(f"{peer} answered with a proof of a swarm key to a call made without one")
                    yield parse(response_type, body)
            finally:
                sending.cancel()  # the server has answered all it will; a request still queued is moot

    return replies()


async def call_unary_with_proof(
    p2p: P2P, peer: PeerID, handle_name: str, request: Message, response_type: type[Message], auth: RpcAuth
) -> Message:
    """A unary call in a private swarm: ``proof + request`` out, ``proof + reply`` back (see protocol/auth.py)."""
    proof = auth.request_proof(handle_name, p2p.peer_id, peer)
    data = await p2p._client.call_unary_handler(peer, handle_name, proof + request.SerializeToString())
    reply_proof, body = split_proof(data)
    auth.check_reply(reply_proof, handle_name, p2p.peer_id, peer, nonce_of(proof))
    return parse(response_type, body)


async def _read_past(reader: asyncio.StreamReader, max_bytes: int, timeout: float) -> None:
    """Read and drop what a refused caller sends, up to a bound, until it closes its side."""
    async with asyncio.timeout(timeout):
        while max_bytes > 0 and (chunk := await reader.read(min(max_bytes, 1 << 16))):
            max_bytes -= len(chunk)


async def _write_proof(writer: asyncio.StreamWriter, proof: bytes) -> None:
    writer.write(_PROOF + len(proof).to_bytes(_LENGTH_BYTES, "big") + proof)
    await writer.drain()


async def _exchange_proofs(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, auth: RpcAuth, name: str, caller: PeerID, local: PeerID,
    limits: StreamLimits,
) -> None:
    """A private swarm's stream: the caller's proof must be its first frame (nothing else is read before it is
    checked); ours goes before our first reply."""
    try:
        async with asyncio.timeout(limits.first_message_s):
            marker = await reader.readexactly(1)
        if marker != _PROOF:
            raise SwarmKeyRefused(PRIVATE_SWARM_HINT)
        async with asyncio.timeout(limits.frame_s):
            length = int.from_bytes(await reader.readexactly(_LENGTH_BYTES), "big")
            if length != PROOF_BYTES:
                raise SwarmKeyRefused(f"Malformed proof of the swarm key ({length} bytes)")
            proof = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("Stream closed before its proof of the swarm key") from None
    except TimeoutError:
        raise ProtocolError("No proof of the swarm key in time; closing the stream") from None
    nonce = auth.check_request(proof, name, caller, local)
    await _write_proof(writer, auth.reply_proof(name, caller, local, nonce))
