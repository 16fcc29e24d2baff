"""The end-to-end channel through relays (protocol/e2e.py), without a network: the handshake, its binding to the
server's peer identity, and what happens to a message a relay alters, replays, reorders or drops."""

from __future__ import annotations

import asyncio
import functools

import pytest
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from molink_swarm.dht.identity import peer_id_of_owner_key
from molink_swarm.protocol import e2e
from molink_swarm.protocol.errors import ProtocolError
from molink_swarm.protocol.messages import RELAYED_FROM

METHOD = "rpc_inference"
PAYLOAD = bytes(range(256)) * 8  # stands for a tensor's bytes


@functools.cache
def server_key() -> RSAPrivateKey:
    return RSAPrivateKey()


@functools.cache
def relay_key() -> RSAPrivateKey:
    return RSAPrivateKey()


def peer_of(key: RSAPrivateKey) -> PeerID:
    return peer_id_of_owner_key(key.get_public_key().to_bytes())


CALLER = PeerID(bytes([0x12, 0x20]) + bytes([7]) * 32)


def handshake(*, method=METHOD, caller=CALLER, told_caller=None, key=None, told_method=None):
    """(client channel, server channel) after a handshake in which the server was told ``told_caller`` and
    ``told_method`` (a lying relay) and answered with ``key``."""
    client = e2e.ClientHandshake(method, caller, peer_of(server_key()))
    answer, server = e2e.accept(
        client.hello(), told_method or method, (told_caller or caller).to_base58(), peer_of(server_key()), key or server_key()
    )
    return client.finish(answer), server


def test_the_handshake_gives_both_ends_one_channel_per_direction():
    client, server = handshake()
    sealed = client.seal(PAYLOAD)
    assert PAYLOAD[:64] not in sealed and len(sealed) == len(PAYLOAD) + 16
    assert server.open(sealed) == PAYLOAD
    assert client.open(server.seal(b"reply")) == b"reply"
    with pytest.raises(e2e.ChannelBroken):  # a message reflected back to its sender does not open
        client.open(client.seal(b"reflected"))


def test_a_relay_cannot_answer_the_handshake_in_the_servers_place():
    client = e2e.ClientHandshake(METHOD, CALLER, peer_of(server_key()))
    # With its own key: that key is not the server's peer id.
    answer, _ = e2e.accept(client.hello(), METHOD, CALLER.to_base58(), peer_of(server_key()), relay_key())
    with pytest.raises(e2e.ChannelBroken, match="not .*'s"):
        client.finish(answer)
    # With the server's public key but its own signature.
    forged_identity = server_key().get_public_key().to_bytes()
    own_public = relay_key().get_public_key().to_bytes()
    forged = answer.replace(own_public, forged_identity)
    forged = forged[: len(forged) - len(relay_key().sign(b"x"))] + relay_key().sign(b"anything")
    with pytest.raises(e2e.ChannelBroken, match="not signed"):
        client.finish(forged)
    # With a genuine answer of the server to another hello (a man in the middle running two handshakes).
    other = e2e.ClientHandshake(METHOD, CALLER, peer_of(server_key()))
    genuine, _ = e2e.accept(other.hello(), METHOD, CALLER.to_base58(), peer_of(server_key()), server_key())
    with pytest.raises(e2e.ChannelBroken, match="not signed"):
        client.finish(genuine)
    with pytest.raises(e2e.ChannelBroken, match="did not answer"):
        client.finish(b'{"position": 0}')


def test_a_relay_that_lies_about_the_caller_or_the_method_breaks_the_handshake():
    with pytest.raises(e2e.ChannelBroken, match="not signed"):
        handshake(told_caller=PeerID(bytes([0x12, 0x20]) + bytes([9]) * 32))
    with pytest.raises(e2e.ChannelBroken, match="not signed"):
        handshake(told_method="rpc_forward")


def test_altered_replayed_reordered_or_dropped_messages_do_not_open():
    client, server = handshake()
    first, second, third = (client.seal(bytes([i]) * 100) for i in range(3))
    flipped = bytearray(first)
    flipped[10] ^= 0x01
    with pytest.raises(e2e.ChannelBroken, match="altered, replayed"):
        server.open(bytes(flipped))
    assert server.open(first) == bytes([0]) * 100
    with pytest.raises(e2e.ChannelBroken):  # replayed
        server.open(first)
    with pytest.raises(e2e.ChannelBroken):  # reordered (third before second), or second dropped
        server.open(third)
    assert server.open(second) == bytes([1]) * 100 and server.open(third) == bytes([2]) * 100


# ---- streams: a caller and a server handler with an in-memory relay between them


async def echo(requests, context):
    """A server handler: echoes each request, saying the uid it saw."""
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=request.uid.encode() + b"|" + request.metadata, tensors=request.tensors)


def through_relay(handler, *, identity=server_key, alter_request=None, alter_reply=None, carried=None):
    """``open_stream`` for e2e.call_sealed: a relay that names the caller in the first message (as RelayService
    does), keeps the bytes it carries in ``carried``, and lets a test alter message number i each way."""
    server_id = peer_of(server_key())
    handle = e2e.sealed_handler(handler, METHOD, server_id, identity, RELAYED_FROM)
    context = P2PContext(handle_name=METHOD, local_id=server_id, remote_id=peer_of(relay_key()))

    async def open_stream(sent):
        async def forwarded():
            index = 0
            async for request in sent:
                if index == 0:
                    request.uid = RELAYED_FROM + CALLER.to_base58()
                request = alter_request(index, request) if alter_request else request
                if carried is not None:
                    carried.append(request.SerializeToString())
                index += 1
                yield request

        async def replies():
            index = 0
            async for reply in handle(forwarded(), context):
                reply = alter_reply(index, reply) if alter_reply else reply
                if carried is not None:
                    carried.append(reply.SerializeToString())
                index += 1
                yield reply

        return replies()

    return open_stream


def flip_bit(message, at: int = 20):
    data = bytearray(message.metadata)
    data[min(at, len(data) - 1)] ^= 0x04
    return type(message)(metadata=bytes(data))


async def round_trips(open_stream, count: int = 3) -> list[runtime_pb2.ExpertResponse]:
    queue: asyncio.Queue = asyncio.Queue()
    replies = await e2e.call_sealed(open_stream, _queued(queue), method=METHOD, caller=CALLER, server=peer_of(server_key()))
    got = []
    for i in range(count):
        queue.put_nowait(runtime_pb2.ExpertRequest(metadata=b"step %d" % i, tensors=[runtime_pb2.Tensor(buffer=PAYLOAD)]))
        got.append(await anext(replies))
    queue.put_nowait(None)
    return got


async def _queued(queue):
    while (item := await queue.get()) is not None:
        yield item


def test_a_sealed_stream_carries_whole_messages_and_the_relay_sees_no_payload():
    carried: list[bytes] = []
    got = asyncio.run(round_trips(through_relay(echo, carried=carried)))
    caller = (RELAYED_FROM + CALLER.to_base58()).encode()
    assert [r.metadata for r in got] == [caller + b"|step 0", b"|step 1", b"|step 2"]  # the route's uid, first only
    assert all(r.tensors[0].buffer == PAYLOAD for r in got)
    assert len(carried) == 2 + 2 * 3  # the handshake, then each step each way
    assert not any(PAYLOAD[:32] in data or b"step" in data for data in carried)


@pytest.mark.parametrize("direction", ["request", "reply"])
def test_a_bit_flipped_on_the_way_breaks_the_stream(direction):
    alter = dict(alter_request=lambda i, m: flip_bit(m) if i == 2 else m) if direction == "request" else dict(
        alter_reply=lambda i, m: flip_bit(m) if i == 2 else m
    )
    with pytest.raises(e2e.ChannelBroken, match="End-to-end check failed"):
        asyncio.run(round_trips(through_relay(echo, **alter)))


def test_a_replayed_message_breaks_the_stream():
    kept = {}

    def replay(index, message):
        kept[index] = message
        return kept[1] if index == 2 else message  # step 1's request again instead of step 2's

    with pytest.raises(e2e.ChannelBroken):
        asyncio.run(round_trips(through_relay(echo, alter_request=replay)))


def test_a_forged_handshake_answer_is_refused():
    def impostor(index, reply):
        if index:
            return reply
        hello = e2e.ClientHandshake(METHOD, CALLER, peer_of(server_key())).hello()
        answer, _ = e2e.accept(hello, METHOD, CALLER.to_base58(), peer_of(server_key()), relay_key())
        return runtime_pb2.ExpertResponse(metadata=answer)

    with pytest.raises(e2e.ChannelBroken):
        asyncio.run(round_trips(through_relay(echo, alter_reply=impostor)))


def test_a_server_without_its_identity_key_refuses_sealed_calls_and_plain_calls_pass():
    with pytest.raises(ProtocolError, match="no identity key"):
        asyncio.run(round_trips(through_relay(echo, identity=lambda: None)))

    async def plain():
        handle = e2e.sealed_handler(echo, METHOD, peer_of(server_key()), server_key, RELAYED_FROM)
        context = P2PContext(handle_name=METHOD, local_id=peer_of(server_key()), remote_id=CALLER)

        async def requests():
            yield runtime_pb2.ExpertRequest(uid="u", metadata=b"hi")

        return [r.metadata async for r in handle(requests(), context)]

    assert asyncio.run(plain()) == [b"u|hi"]
