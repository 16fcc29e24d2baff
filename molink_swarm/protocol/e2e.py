"""End-to-end channels through relays: a relay carries only ciphertext it can neither read nor alter unnoticed.

A direct libp2p connection is already encrypted and authenticated to the peer id (noise). A relay (net/relay.py)
ends the caller's libp2p stream and opens another to the server, so it sees every message in clear. Over such a
stream the caller and the server therefore run their own channel, inside the messages:

1. The caller's first message: its route (read by the relay) and ``HELLO`` + an ephemeral X25519 key.
2. The server's first reply: ``SERVER_HELLO`` + its ephemeral X25519 key + its RSA identity public key (the key
   its libp2p peer id is the hash of, see dht/identity.py) + its signature, with that key, of the transcript:
   the method, the caller's peer id as the server was told it, the server's peer id and both ephemeral keys.
   The caller checks that the key hashes to the peer id it meant to reach and that the signature holds: a relay
   (or anyone else) without the server's identity key cannot complete the handshake, and one that lies about
   who the caller is or which method is called breaks the signature.
3. Keys: HKDF-SHA256 of the X25519 secret, salted with the transcript hash; one key per direction.
4. Every later message, each way, is the whole protobuf of the message it stands for (tensors, metadata), sealed
   with ChaCha20-Poly1305 into the ``metadata`` of an otherwise empty message. The nonce is a counter per
   direction that both ends keep and nobody sends: an altered, dropped, reordered, replayed or reflected
   message fails to open (:class:`ChannelBroken`, a ProtocolError), and callers treat that as a failure of the
   server (the client bans it or moves to its next relay, and replays its inputs elsewhere).

The channel costs one round trip when a relayed stream opens (plus about 0.8 KB of handshake and an RSA signature
on the server, 1-3 ms), and 19 bytes per message (the 16-byte tag and a protobuf field header): 0.8% more bytes
per SmolLM2 decode token in float32, and tens of microseconds (benchmarks/bench_relay_e2e.py). Direct streams
never use it. Errors a server answers with still travel as plain RPC errors (they carry no activations; a relay
could forge one, as it could drop the stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from typing import AsyncIterator, Awaitable, Callable, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from molink_swarm.peer_keys import peer_id_of_owner_key
from molink_swarm.protocol.errors import ProtocolError

HELLO = b"\x00mle2e1c"  # metadata of the caller's first message (JSON metadata never starts with a zero byte)
SERVER_HELLO = b"\x00mle2e1s"
_LABEL = b"molink-swarm e2e v1"
_KEY_BYTES = 32
_MAX_IDENTITY_BYTES = 2048  # an OpenSSH RSA public key of up to 8192 bits, well under this
_OFF_LOOP_BYTES = 1 << 20  # larger messages are sealed and opened on a worker thread
HANDSHAKE_TIMEOUT_S = 30.0


class ChannelBroken(ProtocolError):
    """The handshake failed, or a message did not open: the path to the server (a relay) altered, dropped,
    reordered or replayed something, or the peer is not the server it claims to be."""


def is_hello(request: runtime_pb2.ExpertRequest) -> bool:
    return request.metadata.startswith(HELLO)


class Channel:
    """One direction-keyed AEAD channel, as seen from one end."""

    def __init__(self, send_key: bytes, receive_key: bytes, *, send_label: bytes, receive_label: bytes):
        self._send, self._receive = ChaCha20Poly1305(send_key), ChaCha20Poly1305(receive_key)
        self._send_label, self._receive_label = send_label, receive_label
        self._sent = self._received = 0

    def seal(self, plaintext: bytes) -> bytes:
        return self._send.encrypt(self._next_nonce(), plaintext, self._send_label)

    def _next_nonce(self) -> bytes:
        nonce, self._sent = _nonce(self._sent), self._sent + 1
        return nonce

    def open(self, ciphertext: bytes) -> bytes:
        nonce = _nonce(self._received)
        try:
            plaintext = self._receive.decrypt(nonce, ciphertext, self._receive_label)
        except InvalidTag:
            raise ChannelBroken(
                f"End-to-end check failed on message {self._received}: altered, replayed, reordered or dropped on "
                "the way (the relay is faulty or hostile)"
            ) from None
        self._received += 1
        return plaintext

    async def seal_message(self, message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse):
        """``message`` sealed into the metadata of an empty message of its type (a large one on a worker thread;
        the counter is taken before the thread starts, so concurrent sealing cannot reorder it)."""
        data, nonce = message.SerializeToString(), self._next_nonce()
        if len(data) > _OFF_LOOP_BYTES:
            sealed = await asyncio.to_thread(self._send.encrypt, nonce, data, self._send_label)
        else:
            sealed = self._send.encrypt(nonce, data, self._send_label)
        return type(message)(metadata=sealed)

    async def open_message(self, sealed, message_type):
        if sealed.tensors:
            raise ChannelBroken("A sealed message carries something outside its ciphertext")
        if len(sealed.metadata) > _OFF_LOOP_BYTES:
            data = await asyncio.to_thread(self.open, sealed.metadata)
        else:
            data = self.open(sealed.metadata)
        message = message_type()
        try:
            message.ParseFromString(data)
        except Exception:  # authentic but malformed: the peer itself is broken
            raise ProtocolError(f"Malformed {message_type.__name__} inside the end-to-end channel") from None
        return message


class ClientHandshake:
    """The caller's side: makes the hello, then checks the server's answer and derives the channel."""

    def __init__(self, method: str, caller: PeerID, server: PeerID):
        self.method, self.caller, self.server = method, caller, server
        self._ephemeral = X25519PrivateKey.generate()
        self.public = _raw(self._ephemeral.public_key())

    def hello(self) -> bytes:
        return HELLO + self.public

    def finish(self, server_hello: bytes) -> Channel:
        if not server_hello.startswith(SERVER_HELLO) or len(server_hello) < len(SERVER_HELLO) + _KEY_BYTES + 2:
            raise ChannelBroken(f"{self.server} did not answer the end-to-end handshake")
        rest = server_hello[len(SERVER_HELLO) :]
        server_public, rest = rest[:_KEY_BYTES], rest[_KEY_BYTES:]
        (identity_len,) = struct.unpack(">H", rest[:2])
        identity, signature = rest[2 : 2 + identity_len], rest[2 + identity_len :]
        if len(identity) != identity_len or peer_id_of_owner_key(identity) != self.server:
            raise ChannelBroken(f"The end-to-end handshake was answered with a key that is not {self.server}'s")
        transcript = _transcript(self.method, self.caller.to_base58(), self.server, self.public, server_public)
        if not RSAPublicKey.from_bytes(identity).verify(_LABEL + b" server" + transcript, signature):
            raise ChannelBroken(f"{self.server}'s end-to-end handshake is not signed by it (or not for this call)")
        c2s, s2c = _keys(self._ephemeral, server_public, transcript)
        return Channel(c2s, s2c, send_label=b"c2s", receive_label=b"s2c")


def accept(hello: bytes, method: str, caller: str, server: PeerID, identity: RSAPrivateKey) -> tuple[bytes, Channel]:
    """The server's side: its answer to a caller's ``hello``, and the channel. ``caller`` is the peer id the server
    was told the call comes from (by the relay); signing it lets the caller check that."""
    client_public = hello[len(HELLO) :]
    if len(client_public) != _KEY_BYTES:
        raise ChannelBroken("Malformed end-to-end hello")
    ephemeral = X25519PrivateKey.generate()
    server_public = _raw(ephemeral.public_key())
    transcript = _transcript(method, caller, server, client_public, server_public)
    c2s, s2c = _keys(ephemeral, client_public, transcript)
    public = identity.get_public_key().to_bytes()
    signature = identity.sign(_LABEL + b" server" + transcript)
    answer = SERVER_HELLO + server_public + struct.pack(">H", len(public)) + public + signature
    return answer, Channel(s2c, c2s, send_label=b"s2c", receive_label=b"c2s")


# ---- streams: what the caller's stub and the server's handler wrap around a relayed call


async def call_sealed(
    open_stream: Callable[[AsyncIterator[runtime_pb2.ExpertRequest]], Awaitable[AsyncIterator[runtime_pb2.ExpertResponse]]],
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
    *,
    method: str,
    caller: PeerID,
    server: PeerID,
    timeout: float = HANDSHAKE_TIMEOUT_S,
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Open a stream with ``open_stream`` (through a relay), run the handshake, and return the server's replies,
    opened; ``requests`` go sealed. The first request the relay sees is the hello (the stub adds the route to it)."""
    handshake = ClientHandshake(method, caller, server)
    ready: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()

    async def outgoing() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        yield runtime_pb2.ExpertRequest(metadata=handshake.hello())
        channel = await ready
        async for request in requests:
            yield await channel.seal_message(request)

    replies = await open_stream(outgoing())
    try:
        try:
            first = await asyncio.wait_for(anext(replies), timeout)
        except StopAsyncIteration:
            raise ChannelBroken(f"The stream to {server} closed during the end-to-end handshake") from None
        except asyncio.TimeoutError:
            raise ChannelBroken(f"No end-to-end handshake from {server} within {timeout:.0f} s") from None
        if first.tensors:
            raise ChannelBroken(f"{server} did not answer the end-to-end handshake")
        channel = handshake.finish(first.metadata)
    except BaseException:
        ready.cancel()
        await replies.aclose()
        raise
    ready.set_result(channel)

    async def opened() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            async for reply in replies:
                yield await channel.open_message(reply, runtime_pb2.ExpertResponse)
        finally:
            await replies.aclose()

    return opened()


def sealed_handler(
    handler: Callable[..., AsyncIterator[runtime_pb2.ExpertResponse]],
    method: str,
    server: PeerID,
    identity: Callable[[], Optional[RSAPrivateKey]],
    relayed_from: str,
):
    """Wraps a server's stream handler: a call that opens with a hello runs through an end-to-end channel (the
    handler sees the opened requests, the first one with the route's uid); any other call is passed as it is."""

    async def handle(requests: AsyncIterator[runtime_pb2.ExpertRequest], context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        first = await anext(requests, None)
        if first is None or not is_hello(first):
            async for reply in handler(_prepend(first, requests), context):
                yield reply
            return
        key = identity()
        if key is None:
            raise ProtocolError("This server cannot run end-to-end channels (it has no identity key)")
        uid = first.uid
        caller = uid.removeprefix(relayed_from) if uid.startswith(relayed_from) else context.remote_id.to_base58()
        answer, channel = accept(first.metadata, method, caller, server, key)
        yield runtime_pb2.ExpertResponse(metadata=answer)

        async def opened() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            route = uid
            async for sealed in requests:
                request = await channel.open_message(sealed, runtime_pb2.ExpertRequest)
                if route is not None:  # who the call comes from, as the relay said it (see messages.origin)
                    request.uid, route = route, None
                yield request

        async for reply in handler(opened(), context):
            yield await channel.seal_message(reply)

    return handle


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _transcript(method: str, caller: str, server: PeerID, client_public: bytes, server_public: bytes) -> bytes:
    fields = [_LABEL, method.encode(), caller.encode(), server.to_bytes(), client_public, server_public]
    return hashlib.sha256(b"".join(struct.pack(">I", len(f)) + f for f in fields)).digest()


def _keys(ephemeral: X25519PrivateKey, peer_public: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(caller-to-server key, server-to-caller key)."""
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point: no secret would come of it
        raise ChannelBroken("Invalid ephemeral key in the end-to-end handshake") from None
    keys = HKDF(algorithm=hashes.SHA256(), length=2 * _KEY_BYTES, salt=transcript, info=_LABEL + b" keys").derive(shared)
    return keys[:_KEY_BYTES], keys[_KEY_BYTES:]
