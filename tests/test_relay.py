"""Relays on loopback: the reachability check, servers reached only through a relay, and what a relay refuses."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.loop import run_sync
from molink_swarm.client.status import swarm_snapshot
from molink_swarm.net.paths import RelayedStub, choose_relay
from molink_swarm.net.ports import free_port
from molink_swarm.net.reachability import check_reachability
from molink_swarm.net.relay import RelayService
from molink_swarm.protocol import messages


@pytest.fixture(scope="module")
def relayed_swarm(module_swarm, tiny_llama_path):
    """Blocks 0:2 direct, 2:4 and 4:6 only through the bootstrap peer's relay."""
    swarm = module_swarm(tiny_llama_path, [])
    swarm.start_server("0:2")
    swarm.start_server("2:4", "--force-relay")
    swarm.start_server("4:6", "--force-relay")
    return swarm


@pytest.fixture(scope="module")
def distributed(relayed_swarm, tiny_llama_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama_path, initial_peers=relayed_swarm.initial_peers, hole_punching=False  # on loopback it would "punch"
    )
    yield model
    model.swarm.shutdown()


def test_servers_say_how_they_are_reached(relayed_swarm):
    lines = [s.wait_for(r"Server \S+ online: .*", 10).group(0) for s in relayed_swarm.servers]
    assert lines[0].endswith("; direct)")
    assert all(f"relayed via {relayed_swarm.initial_peers[0]}" in line for line in lines[1:])


def test_generation_through_relays_is_token_identical(relayed_swarm, distributed, tiny_llama_local):
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    expected = tiny_llama_local.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with distributed.inference_session(max_length=32) as session:
        got = distributed.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        relayed = {hop.start for hop in session.chain if distributed.swarm.links.path(hop.peer_id).startswith("relayed via")}
    assert torch.equal(got, expected)
    assert relayed == {2, 4}
    # The relay said how busy it is; a relayed hop weighs that in.
    assert list(distributed.swarm.links.relay_loads) == relayed_swarm.initial_peers
    assert 0.0 <= distributed.swarm.links.relay_loads[relayed_swarm.initial_peers[0]] < 1.0
    # A full forward (no session) goes through the relay too.
    assert torch.allclose(distributed(ids).logits, tiny_llama_local(ids).logits, atol=1e-4)


def test_status_shows_the_relay(relayed_swarm, distributed):
    swarm = distributed.swarm
    view = run_sync(swarm_snapshot(swarm.dht, swarm.p2p))
    [model] = view.models
    relay_id = relayed_swarm.initial_peers[0].rsplit("/", 1)[1]
    reach = {(s.start, s.reachability, s.relay) for s in model.servers}
    assert reach == {(0, "direct", None), (2, "relayed", relay_id), (4, "relayed", relay_id)}
    # The path from here: on loopback the circuit connection also gives a direct one, so "hole-punched" is fine.
    assert [s.path for s in model.servers][0] == "direct"
    assert all(s.path in ("hole-punched", "relayed") for s in model.servers[1:])
    assert all(s.rtt_ms is not None for s in model.servers)  # pinged through the relay


def test_reachability_check_dials_back(relayed_swarm):
    open_port = free_port("127.0.0.1")
    reach = run_sync(check_reachability(relayed_swarm.initial_peers, "127.0.0.1", open_port))
    assert reach.reachable and reach.observed_ip == "127.0.0.1" and reach.relays == relayed_swarm.initial_peers


def test_a_relay_refuses_what_it_should_not_carry(relayed_swarm, distributed):
    p2p = distributed.swarm.p2p
    relay = PeerID.from_base58(relayed_swarm.initial_peers[0].rsplit("/", 1)[1])
    direct_server = PeerID.from_base58(relayed_swarm.servers[0].peer_id)
    relayed_server = PeerID.from_base58(relayed_swarm.servers[1].peer_id)
    ping = runtime_pb2.ExpertRequest()
    with pytest.raises(P2PHandlerError, match="not registered"):  # not an open proxy
        run_sync(RelayedStub(p2p, relay, direct_server).rpc_ping(ping, timeout=10))
    stub = RelayService.get_stub(p2p, relay)
    for route, message in [
        ("", "must start with its route"),
        ("relay-to:nonsense", "Malformed relay route"),
        (f"relay-to:{relayed_server.to_base58()}:rpc_shutdown", "cannot be relayed"),
    ]:
        with pytest.raises(P2PHandlerError, match=message):
            run_sync(stub.rpc_relay_call(runtime_pb2.ExpertRequest(uid=route), timeout=10))
    with pytest.raises(P2PHandlerError, match="Invalid DialBackRequest"):
        run_sync(stub.rpc_dial_back(runtime_pb2.ExpertRequest(metadata=b'{"ports": [0]}'), timeout=10))
    closed_port = free_port("127.0.0.1")
    reply = run_sync(
        stub.rpc_dial_back(
            runtime_pb2.ExpertRequest(metadata=messages.encode_metadata(messages.DialBackRequest(ports=[closed_port]))), timeout=10
        )
    )
    assert messages.decode_metadata(reply.metadata, messages.DialBackReply).reachable_ports == []
    # The relay still serves.
    assert run_sync(RelayedStub(p2p, relay, relayed_server).rpc_ping(ping, timeout=10)) is not None


def test_a_session_moves_to_the_next_relay_when_its_relay_dies(swarm, tiny_llama_path, tiny_llama_local, caplog):
    local = swarm(tiny_llama_path, [])
    second_relay = local.start_relay()
    behind_nat = local.start_server("0:6", "--force-relay", "--update-period", "1")
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_path, initial_peers=local.initial_peers, hole_punching=False)
    peer = PeerID.from_base58(behind_nat.peer_id)
    try:
        # The server registers with both relays; wait until its record announces both.
        deadline = time.monotonic() + 60
        while not (servers := run_sync(model.swarm.servers(refresh=True))) or len(servers[0].record.relay_addrs) < 2:
            assert time.monotonic() < deadline, f"the server never announced both relays: {servers}"
            time.sleep(0.5)
        first, second = torch.randint(3, 128, (2, 1, 8), generator=torch.Generator().manual_seed(11))
        expected_first = tiny_llama_local.generate(first, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        expected_second = tiny_llama_local.generate(
            torch.cat([expected_first, second], dim=1), max_new_tokens=8, min_new_tokens=8, do_sample=False
        )
        with model.inference_session(max_length=64) as session:
            got_first = model.generate(first, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            used = model.swarm.links.relay_for(peer)
            (local.bootstrap if used == local.initial_peers[0] else second_relay).kill()
            with caplog.at_level(logging.INFO, logger="molink_swarm.client.swarm"):
                got_second = model.generate(second, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert session.failovers >= 1
        assert torch.equal(got_first, expected_first) and torch.equal(got_second, expected_second)
        assert model.swarm.links.relay_for(peer) not in (None, used)
        assert not [r for r in caplog.records if r.getMessage().startswith("Banned")], "banned the server, not its relay"
    finally:
        model.shutdown()


# --- which relay a client goes through (pure logic) -------------------------------------------------------------

RELAYS = [f"/ip4/10.0.0.{i}/tcp/31337/p2p/{PeerID(bytes([0x12, 0x20]) + bytes([i]) * 32).to_base58()}" for i in range(1, 5)]


def test_clients_spread_over_equally_loaded_relays():
    picks = [choose_relay(RELAYS, salt=f"client-{i}") for i in range(200)]

    assert set(picks) == set(RELAYS)
    assert max(picks.count(relay) for relay in RELAYS) < 100  # no relay takes half of 4 relays' clients


def test_a_client_keeps_its_relay_whatever_order_the_server_announces_them_in():
    assert choose_relay(RELAYS, salt="client") == choose_relay(RELAYS[::-1], salt="client")


def test_the_least_loaded_relay_is_chosen():
    loads = {RELAYS[0]: 0.9, RELAYS[1]: 0.5, RELAYS[2]: 0.2, RELAYS[3]: 1.0}

    assert {choose_relay(RELAYS, loads=loads, salt=f"client-{i}") for i in range(50)} == {RELAYS[2]}


def test_loads_within_a_few_percent_count_as_equal():
    loads = {RELAYS[0]: 0.001, RELAYS[1]: 0.002}

    assert {choose_relay(RELAYS[:2], loads=loads, salt=f"client-{i}") for i in range(50)} == set(RELAYS[:2])


def test_failed_relays_are_skipped_until_none_is_left():
    assert choose_relay(RELAYS, failed=RELAYS[1:], salt="client") == RELAYS[0]
    assert choose_relay(RELAYS, failed=RELAYS, salt="client") is None
    assert choose_relay([], salt="client") is None
