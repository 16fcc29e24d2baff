"""A server answers bad requests with a clear error and keeps serving everyone else."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2

from molink_swarm import wire
from molink_swarm.client.loop import run_sync
from molink_swarm.client.session import call_forward
from molink_swarm.client.swarm import SwarmClient
from molink_swarm.models import load_config, resolve_model

HIDDEN = 64


@pytest.fixture(scope="module")
def client(module_swarm, tiny_llama_path):
    local = module_swarm(tiny_llama_path, ["0:6"], "--cache-tokens", "4096", "--max-sessions", "4")
    source = resolve_model(tiny_llama_path)
    swarm = SwarmClient(local.initial_peers, source.model_id, source.fingerprint, load_config(source).num_hidden_layers)
    yield swarm
    swarm.shutdown()


def server_of(client):
    [server] = run_sync(client.servers(refresh=True))
    return server.peer_id


def spec(**overrides) -> wire.SessionSpec:
    fields = dict(session_id="test-session-0001", start=0, end=6, max_length=64, batch_size=1)
    return wire.SessionSpec(**{**fields, **overrides})


def inference(client, *requests: runtime_pb2.ExpertRequest) -> list[runtime_pb2.ExpertResponse]:
    """Send the requests on one inference stream and collect the replies (raises the server's error)."""

    stub = client.stub(server_of(client))

    async def run():
        done = asyncio.Event()

        async def it():  # like a real client: the stream stays open until the replies are in
            for r in requests:
                yield r
            await done.wait()

        replies = []
        try:
            async for reply in await stub.rpc_inference(it()):
                replies.append(reply)
                if len(replies) == len(requests):
                    break
        finally:
            done.set()
        return replies

    return run_sync(asyncio.wait_for(run(), 60))


def step(position: int, hidden: torch.Tensor, open_spec=None) -> runtime_pb2.ExpertRequest:
    return wire.request(wire.InferenceStep(open=open_spec, position=position), hidden)


BAD_STEPS = {
    "wrong hidden size": ([step(0, torch.randn(1, 3, HIDDEN + 1), spec())], "Hidden states must be"),
    "NaN values": ([step(0, torch.full((1, 2, HIDDEN), float("nan")), spec())], "NaN"),
    "blocks not held": ([step(0, torch.randn(1, 2, HIDDEN), spec(end=9))], "this server holds 0:6"),
    "max_length over the limit": ([step(0, torch.randn(1, 2, HIDDEN), spec(max_length=10**6))], "max_length"),
    "cache budget exceeded": ([step(0, torch.randn(16, 2, HIDDEN), spec(batch_size=16, max_length=500))], "Not enough cache"),
    "no session opened": ([step(0, torch.randn(1, 2, HIDDEN))], "must open a session"),
    "step skips ahead": (
        [step(0, torch.randn(1, 2, HIDDEN), spec()), step(5, torch.randn(1, 1, HIDDEN))],
        "holds 2 tokens",
    ),
    "batch size changes": (
        [step(0, torch.randn(1, 2, HIDDEN), spec()), step(2, torch.randn(2, 1, HIDDEN))],
        "Batch size",
    ),
    "past max_length": ([step(0, torch.randn(1, 70, HIDDEN), spec())], "max_length"),
    "pushed step carrying a tensor": (
        [wire.request(wire.InferenceStep(open=spec(), position=0, expect_push=True), torch.randn(1, 2, HIDDEN))],
        "must not carry a tensor",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_inference_steps_get_clear_errors(client, case):
    requests, message = BAD_STEPS[case]
    with pytest.raises(P2PHandlerError, match=message):
        inference(client, *requests)
    assert_still_serving(client)


def test_junk_metadata_and_tensors_are_refused(client):
    junk_metadata = runtime_pb2.ExpertRequest(metadata=b"\x00not json", tensors=[wire.serialize_tensor(torch.randn(1, 1, HIDDEN))])
    with pytest.raises(P2PHandlerError, match="Invalid InferenceStep"):
        inference(client, junk_metadata)
    bad_buffer = runtime_pb2.ExpertRequest(
        metadata=wire.encode_metadata(wire.InferenceStep(open=spec(), position=0)),
        tensors=[runtime_pb2.Tensor(buffer=b"\x01" * 7, size=[1, 1, HIDDEN], dtype="float32")],
    )
    with pytest.raises(P2PHandlerError, match="buffer"):
        inference(client, bad_buffer)
    pickle_dtype = runtime_pb2.ExpertRequest(
        metadata=wire.encode_metadata(wire.InferenceStep(open=spec(), position=0)),
        tensors=[runtime_pb2.Tensor(buffer=b"cos\nsystem\n", size=[1], dtype="object")],
    )
    with pytest.raises(P2PHandlerError, match="Unsupported tensor dtype"):
        inference(client, pickle_dtype)
    assert_still_serving(client)


def test_bad_forward_requests_get_clear_errors(client):
    peer = server_of(client)
    request = wire.request(wire.ForwardRequest(start=2, end=1), torch.randn(1, 2, HIDDEN))
    with pytest.raises(P2PHandlerError, match="this server holds"):
        run_sync(call_forward(client, peer, request))
    huge = wire.request(wire.ForwardRequest(start=0, end=6), torch.randn(64, 512, HIDDEN))
    with pytest.raises(P2PHandlerError, match="too large"):
        run_sync(call_forward(client, peer, huge))
    assert_still_serving(client)


def test_a_push_that_arrives_before_its_session_opens_is_used(client):
    """The previous server of a chain can outrun the stream that opens the session here."""
    stub = client.stub(server_of(client))
    hidden = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    push = runtime_pb2.ExpertRequest(
        metadata=wire.encode_metadata(wire.PushStep(session_id="early-push-session", position=0)),
        tensors=[wire.serialize_tensor(hidden)],
    )
    run_sync(stub.rpc_push(push, timeout=30))
    expecting = wire.InferenceStep(open=spec(session_id="early-push-session"), position=0, expect_push=True)
    [pushed] = inference(client, wire.request(expecting))
    [direct] = inference(client, step(0, hidden, spec(session_id="direct-session")))
    assert torch.equal(wire.deserialize_tensor(pushed.tensors[0]), wire.deserialize_tensor(direct.tensors[0]))


def test_junk_pushes_are_refused(client):
    stub = client.stub(server_of(client))
    wrong_size = runtime_pb2.ExpertRequest(
        metadata=wire.encode_metadata(wire.PushStep(session_id="no-such-session", position=0)),
        tensors=[wire.serialize_tensor(torch.randn(1, 1, HIDDEN + 3))],
    )
    with pytest.raises(P2PHandlerError, match="Hidden states must be"):
        run_sync(stub.rpc_push(wrong_size, timeout=30))
    with pytest.raises(P2PHandlerError, match="Invalid PushStep"):
        run_sync(stub.rpc_push(runtime_pb2.ExpertRequest(metadata=b"{}"), timeout=30))
    assert_still_serving(client)


def test_rollback_to_an_earlier_position_recomputes_identically(client):
    hidden = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(0))
    first, again = inference(
        client, step(0, hidden, spec(session_id="rollback-session")), step(2, hidden[:, 2:])
    )
    a = wire.deserialize_tensor(first.tensors[0])
    b = wire.deserialize_tensor(again.tensors[0])
    assert torch.allclose(a[:, 2:], b, atol=1e-5)


def assert_still_serving(client):
    hidden = torch.randn(1, 3, HIDDEN)
    [reply] = inference(client, step(0, hidden, spec(session_id="healthy-session")))
    assert wire.decode_metadata(reply.metadata, wire.StepResult).position == 3
