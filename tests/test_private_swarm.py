"""A private swarm (`--swarm-key`): its peers work together as in a public one; a peer without the key, or with
another key, can neither join it, nor see it, nor use its servers and relays."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.loop import run_sync
from molink_swarm.dht import ModelRecord, ServerRecord, ServerState, declare_server, fetch_servers, start_dht
from molink_swarm.errors import NoPeersReachableError
from molink_swarm.lab import local_swarm
from molink_swarm.models import resolve_model
from molink_swarm.net.paths import connect
from molink_swarm.net.relay import RelayService
from molink_swarm.protocol import messages
from molink_swarm.protocol.rpc import block_stub
from molink_swarm.swarm_key import SwarmKey, bind_daemon
from tests.conftest import with_word_tokenizer


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "swarm.key"
    SwarmKey.generate().write(path)
    return path


@pytest.fixture(scope="module")
def wrong_key_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "other.key"
    SwarmKey.generate().write(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_llama_path, tmp_path_factory):
    """The tiny Llama plus a word-level tokenizer (t0..t127), so that `molink-swarm web` can serve it too."""
    return with_word_tokenizer(tiny_llama_path, tmp_path_factory.mktemp("models") / "tiny-llama-words")


@pytest.fixture(scope="module")
def private_swarm(module_swarm, model_dir, key_path):
    """Blocks 0:3 served directly, 3:6 only through the bootstrap peer's relay: every kind of RPC is keyed."""
    swarm = module_swarm(model_dir, ["0:3"], swarm_key=key_path)
    swarm.start_server("3:6", "--force-relay")
    return swarm


@pytest.fixture(scope="module")
def distributed(private_swarm, model_dir, key_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=private_swarm.initial_peers, swarm_key=key_path, hole_punching=False
    )
    yield model
    model.shutdown()


def server_peer(swarm, index: int) -> PeerID:
    return PeerID.from_base58(swarm.servers[index].peer_id)


def test_with_the_key_generation_is_token_identical(private_swarm, distributed, tiny_llama_local):
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(7))
    expected = tiny_llama_local.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with distributed.inference_session(max_length=32) as session:
        got = distributed.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        paths = {hop.start: distributed.swarm.links.path(hop.peer_id) for hop in session.chain}
    assert torch.equal(got, expected)
    assert paths[0] == "direct" and paths[3].startswith("relayed via")
    assert torch.allclose(distributed(ids).logits, tiny_llama_local(ids).logits, atol=1e-4)  # forward, relayed too


def test_a_client_without_the_key_or_with_another_cannot_connect(private_swarm, model_dir, wrong_key_path):
    with pytest.raises(NoPeersReachableError, match="The swarm may be private: pass --swarm-key"):
        AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=private_swarm.initial_peers)
    with pytest.raises(NoPeersReachableError, match="They may use another --swarm-key"):
        AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=private_swarm.initial_peers, swarm_key=wrong_key_path
        )


def one_line_error(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.stderr
    return lines[-1]


def test_status_sees_the_swarm_only_with_the_key(private_swarm, distributed, key_path):
    with_key = local_swarm.run(["status", "--initial-peers", *private_swarm.initial_peers, "--swarm-key", str(key_path)], timeout=120)
    assert with_key.returncode == 0, with_key.stderr
    assert "All 6 blocks are served" in with_key.stdout

    without = local_swarm.run(["status", "--initial-peers", *private_swarm.initial_peers], timeout=120)
    assert "pass --swarm-key" in one_line_error(without)
    assert "blocks" not in without.stdout


def test_a_server_without_the_key_or_with_another_cannot_join(private_swarm, distributed, model_dir, wrong_key_path):
    join = ["join", "--model", str(model_dir), "--blocks", "0:6", "--host", "127.0.0.1", "--initial-peers", *private_swarm.initial_peers]
    without = local_swarm.run(join, timeout=180)
    assert "pass --swarm-key" in one_line_error(without)
    assert "online" not in without.stdout
    wrong = local_swarm.run([*join, "--swarm-key", str(wrong_key_path)], timeout=180)
    assert "another --swarm-key" in one_line_error(wrong)
    servers = run_sync(distributed.swarm.servers(refresh=True))
    assert {str(s.peer_id) for s in servers} == {s.peer_id for s in private_swarm.servers}


def test_records_of_a_peer_without_the_key_are_not_stored(private_swarm, distributed, model_dir):
    """Even a DHT peer that starts anyway (ignoring the failed bootstrap) and announces itself is not seen."""
    source = resolve_model(model_dir)
    dht, validator = start_dht(
        private_swarm.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], announcing=True, ensure_bootstrap_success=False
    )
    try:
        model = ModelRecord(model_id=source.model_id, name=source.name, num_blocks=6, fingerprint=source.fingerprint, model_type="llama")
        record = ServerRecord(
            state=ServerState.ONLINE, start=0, end=6, model_fingerprint=source.fingerprint, throughput=1e6,
            free_cache_tokens=10**6, max_sessions=100, software_version="0.1.0",
        )
        declare_server(dht, validator, model, record, ttl=60)  # no swarm peer stores it: it keeps it to itself
        # Its requests get no answers: it finds nothing of the swarm's servers, only its own record.
        assert [s.peer_id for s in fetch_servers(dht, source.model_id, 6)] == [dht.peer_id]
        seen = {s.peer_id for s in run_sync(distributed.swarm.servers(refresh=True))}
        assert dht.peer_id not in seen and len(seen) == 2
    finally:
        dht.shutdown()


def test_the_web_app_serves_a_private_swarm(private_swarm, distributed):
    _web, url = private_swarm.start_web("--wait-for-blocks", "10")  # with the swarm's --swarm-key
    with urllib.request.urlopen(url + "api/v1/swarm", timeout=120) as reply:
        swarm = json.loads(reply.read())
    [model] = swarm["models"]
    assert swarm["join_args"] == f"--initial-peers {private_swarm.initial_peers[0]} --swarm-key SWARM_KEY_FILE"
    assert model["missing"] == "" and {s["peer_id"] for s in model["servers"]} == {s.peer_id for s in private_swarm.servers}
    body = json.dumps({"model": model["name"], "prompt": "t5 t6 t7", "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(url + "v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert json.loads(reply.read())["usage"]["completion_tokens"] >= 1


@pytest.fixture
def outsider(private_swarm, distributed):
    """A bare libp2p peer connected to the bootstrap peer and to the servers (at the addresses they announce, as
    read with the key): it can reach every port of the swarm."""
    p2p = run_sync(P2P.create(initial_peers=private_swarm.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    for server in run_sync(distributed.swarm.servers(refresh=True)):
        for maddr in server.record.addrs[:1]:
            run_sync(connect(p2p, maddr), timeout=30)
    yield p2p
    run_sync(p2p.shutdown(), timeout=30)


def call(p2p: P2P, method: str, peer: PeerID, request=None):
    """A unary call, or a one-message stream call (its replies read), of a server or relay RPC."""

    async def go():
        if method in ("rpc_info", "rpc_ping"):
            return await getattr(block_stub(p2p, peer), method)(runtime_pb2.ExpertRequest(), timeout=20)
        if method == "rpc_relay_load":
            return await RelayService.get_stub(p2p, peer).rpc_relay_load(runtime_pb2.ExpertRequest(), timeout=20)

        async def one():
            yield request or runtime_pb2.ExpertRequest()

        stub = RelayService.get_stub(p2p, peer) if method.startswith("rpc_relay") else block_stub(p2p, peer)
        replies = await getattr(stub, method)(one())
        return [reply async for reply in replies]

    return run_sync(go(), timeout=60)


@pytest.mark.parametrize("method", ["rpc_info", "rpc_ping", "rpc_inference", "rpc_forward", "rpc_push_stream"])
def test_server_rpcs_without_the_key_are_refused(private_swarm, outsider, method):
    with pytest.raises(P2PHandlerError, match="private swarm: pass --swarm-key"):
        call(outsider, method, server_peer(private_swarm, 0))


@pytest.mark.parametrize("method", ["rpc_relay_load", "rpc_relay_stream"])
def test_relay_rpcs_without_the_key_are_refused(private_swarm, outsider, method):
    relay = messages.relay_peer_id(private_swarm.initial_peers[0])
    route = runtime_pb2.ExpertRequest(uid=f"relay-to:{server_peer(private_swarm, 1).to_base58()}:rpc_inference")
    with pytest.raises(P2PHandlerError, match="private swarm: pass --swarm-key"):
        call(outsider, method, relay, route)


def test_rpcs_with_another_key_are_refused_and_with_the_key_answered(private_swarm, outsider, key_path, wrong_key_path):
    bind_daemon(outsider.daemon_listen_maddr, SwarmKey.load(wrong_key_path))
    for method in ("rpc_info", "rpc_inference"):
        with pytest.raises(P2PHandlerError, match="does not match its swarm key"):
            call(outsider, method, server_peer(private_swarm, 0))
    bind_daemon(outsider.daemon_listen_maddr, SwarmKey.load(key_path))
    status = messages.decode_metadata(call(outsider, "rpc_info", server_peer(private_swarm, 0)).metadata, messages.ServerStatus)
    assert status is not None


def test_a_keyed_peer_refuses_a_public_one():
    """The other way round: a peer outside the private swarm cannot answer a keyed call with a proof of the key, so
    its answers count for nothing (and it refuses the keyed call anyway)."""

    async def go():
        public = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        keyed = None
        try:
            await RelayService(public).add_p2p_handlers(public)
            maddrs = [f"{m}/p2p/{public.peer_id}" for m in await public.get_visible_maddrs()]
            keyed = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            bind_daemon(keyed.daemon_listen_maddr, SwarmKey.generate())
            stub = RelayService.get_stub(keyed, public.peer_id)
            errors = []
            for call in (
                stub.rpc_relay_load(runtime_pb2.ExpertRequest(), timeout=20),
                anext(await stub.rpc_relay_stream(_one(runtime_pb2.ExpertRequest(uid="relay-to:x:rpc_inference")))),
            ):
                try:
                    await call
                except Exception as e:
                    errors.append(str(e))
            return errors
        finally:
            for p2p in (keyed, public):
                if p2p is not None:
                    await p2p.shutdown()

    errors = run_sync(go(), timeout=120)
    assert "Wire format was corrupt" in errors[0]  # a public peer cannot even parse a keyed request
    assert "does not belong to a private swarm: call it without --swarm-key" in errors[1]


async def _one(item):
    yield item
