"""End-to-end protection through relays, with real processes on loopback: a server reachable only through two
relays that log what they carry, or flip a bit or replay a message when told to (their testing-only hooks).
The relay sees no plaintext activation; a session whose relay tampers detects it, moves to the other relay and
finishes token-identical."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.batched import BatchedDecoder
from molink_swarm.client.loop import run_sync
from molink_swarm.lab import LocalSwarm
from molink_swarm.net import paths
from molink_swarm.net.push import PushChannel
from molink_swarm.net.relay import TESTING_FAULTS_ENV, RelayService
from molink_swarm.protocol import messages
from molink_swarm.protocol.tensors import serialize_tensor


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("relay-faults")


@pytest.fixture(scope="module")
def relayed(tiny_llama_path, faults, tmp_path_factory):
    """Blocks 0:6 on one server, reachable only through the bootstrap peer's relay or a second relay."""
    swarm = LocalSwarm(str(tiny_llama_path), log_dir=tmp_path_factory.mktemp("swarm-logs"), env={TESTING_FAULTS_ENV: str(faults)})
    try:
        swarm.start_bootstrap()
        swarm.start_relay()
        swarm.start_server("0:6", "--force-relay", "--update-period", "1")
        yield swarm
    finally:
        swarm.stop(graceful=False)


def client_for(swarm: LocalSwarm, tiny_llama_path):
    """A client that sees the server announce both relays (it registers with them one after the other)."""
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_path, initial_peers=swarm.initial_peers, hole_punching=False)
    deadline = time.monotonic() + 60
    while not (servers := run_sync(model.swarm.servers(refresh=True))) or len(servers[0].record.relay_addrs) < 2:
        assert time.monotonic() < deadline, f"the server never announced both relays: {servers}"
        time.sleep(0.5)
    return model, servers[0].peer_id


def relay_id(maddr: str) -> str:
    return maddr.rsplit("/", 1)[1]


def generate(model, ids, tokens=6):
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def test_a_logging_relay_carries_no_plaintext_activations(relayed, tiny_llama_path, tiny_llama_local, faults):
    for relay in relayed.initial_peers:
        (faults / f"{relay_id(relay)}.log").touch()
    model, server = client_for(relayed, tiny_llama_path)
    try:
        ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
        expected = generate(tiny_llama_local, ids)
        with model.inference_session(max_length=32) as session:
            got = generate(model, ids)
            assert session.failovers == 0
        used = relay_id(model.swarm.links.relay_for(server))
        canary = b"canary-" + bytes(range(32))  # a ping's metadata travels as it is: the log shows what it carries
        run_sync(model.swarm.links.stub(server).rpc_ping(runtime_pb2.ExpertRequest(metadata=canary), timeout=10))
        carried = (faults / f"{used}.carried").read_bytes()

        # The client sent the embeddings of every token in float32 (exact): none of them went in clear.
        with torch.no_grad():
            rows = tiny_llama_local.model.embed_tokens(expected[0, :-1]).numpy()
        assert torch.equal(got, expected)
        assert canary in carried and len(carried) > rows.nbytes
        assert not [i for i, row in enumerate(rows) if row.tobytes()[:64] in carried]

        # A push (server to server, or the client's fallback copy) through the relay is sealed too.
        pushed = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(4))

        async def push() -> PushChannel:
            channel = PushChannel(model.swarm.p2p, server, "some-session-id", model.swarm.links.relay_for(server))
            channel.push(0, serialize_tensor(pushed, "float32"))
            channel.close()  # the stream ends once the push went
            await asyncio.wait_for(channel._task, 30)
            return channel

        channel = run_sync(push())
        after_push = (faults / f"{used}.carried").read_bytes()[len(carried) :]
        assert channel._failures == 0 and len(after_push) > pushed.numel() * 4  # the handshake and the push went
        assert pushed.numpy().tobytes()[:64] not in after_push
        carried += after_push

        # The control: the same session without the end-to-end channel puts them in the relay's log.
        paths.END_TO_END = False
        try:
            with model.inference_session(max_length=32):
                generate(model, ids, tokens=2)
        finally:
            paths.END_TO_END = True
        clear = (faults / f"{used}.carried").read_bytes()[len(carried) :]
        assert all(row.tobytes() in clear for row in rows[: ids.shape[1]])

        # Unary calls cannot be sealed: the relay pipes only those without activations.
        stub = RelayService.get_stub(model.swarm.p2p, messages.relay_peer_id(relayed.initial_peers[0]))
        with pytest.raises(P2PHandlerError, match="cannot be relayed"):
            run_sync(stub.rpc_relay_call(runtime_pb2.ExpertRequest(uid=f"relay-to:{server.to_base58()}:rpc_push"), timeout=10))
    finally:
        for relay in relayed.initial_peers:
            (faults / f"{relay_id(relay)}.log").unlink()
        model.shutdown()


@pytest.mark.parametrize("fault", ["flip", "replay"])
def test_a_tampering_relay_is_detected_and_left_for_the_other(relayed, tiny_llama_path, tiny_llama_local, faults, fault, caplog):
    model, server = client_for(relayed, tiny_llama_path)
    try:
        first, second = torch.randint(3, 128, (2, 1, 8), generator=torch.Generator().manual_seed(11))
        expected_first = generate(tiny_llama_local, first)
        expected_second = generate(tiny_llama_local, torch.cat([expected_first, second], dim=1))
        with model.inference_session(max_length=64) as session:
            got_first = generate(model, first)
            assert session.failovers == 0
            used = model.swarm.links.relay_for(server)
            (faults / f"{relay_id(used)}.fault").write_text(fault)
            with caplog.at_level(logging.INFO):
                got_second = generate(model, second)
            assert session.failovers >= 1
        assert (faults / f"{relay_id(used)}.fired").read_text() == fault  # the relay did tamper
        assert torch.equal(got_first, expected_first) and torch.equal(got_second, expected_second)
        assert model.swarm.links.relay_for(server) not in (None, used)  # moved to the other relay
        assert not [r for r in caplog.records if r.getMessage().startswith("Banned")], "banned the server, not its relay"
        assert any("End-to-end check failed" in r.getMessage() for r in caplog.records), "failed over for another reason"
    finally:
        (faults / f"{relay_id(used)}.fired").unlink(missing_ok=True)
        model.shutdown()


def test_group_steps_through_a_relay_are_sealed_too(relayed, tiny_llama_path, tiny_llama_local, faults):
    """The engine's generations step together (one group step per hop) through the relay: none of their inputs in
    clear, every answer what local transformers gives, no step given up."""
    for relay in relayed.initial_peers:
        (faults / f"{relay_id(relay)}.log").touch()
    model, server = client_for(relayed, tiny_llama_path)
    try:
        decoder = BatchedDecoder(model, max_groups=1)
        prompts = [torch.randint(3, 128, (5 + i,), generator=torch.Generator().manual_seed(20 + i)).tolist() for i in range(3)]

        async def generate_all():
            async def one(ids):
                return [token async for token in decoder.generate(ids, 6)]

            return await asyncio.gather(*(one(ids) for ids in prompts))

        answers = run_sync(generate_all())
        used = relay_id(model.swarm.links.relay_for(server))
        carried = (faults / f"{used}.carried").read_bytes()
        for ids, answer in zip(prompts, answers):
            expected = tiny_llama_local.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
            assert answer == expected.tolist()
        assert model.swarm.group_channels.steps > 0 and model.swarm.group_channels.failed == 0
        assert decoder.failovers == 0
        with torch.no_grad():  # the decode steps' inputs: the generated tokens' embeddings, in float32
            rows = tiny_llama_local.model.embed_tokens(torch.tensor([t for answer in answers for t in answer[:-1]])).numpy()
        assert not [i for i, row in enumerate(rows) if row.tobytes()[:64] in carried]
    finally:
        for relay in relayed.initial_peers:
            (faults / f"{relay_id(relay)}.log").unlink()
        model.shutdown()
