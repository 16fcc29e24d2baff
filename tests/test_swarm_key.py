"""The swarm key of a private swarm: its file, and the proofs of it on RPCs and DHT messages (no processes)."""

from __future__ import annotations

import os
import stat

import hivemind.dht.protocol
import pytest
from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2

from molink_swarm.dht.auth import PeerBoundAuthRPCWrapper, SwarmKeyAuthorizer
from molink_swarm.lab import local_swarm
from molink_swarm.protocol.auth import PROOF_BYTES, RpcAuth, SwarmKeyRefused, nonce_of
from molink_swarm.swarm_key import FRESHNESS_S, ReplayGuard, SwarmKey, SwarmKeyError, load_swarm_key

ALICE = PeerID.from_base58("12D3KooWRaGZLmK2yqL1deDTar2Ford2mzoBfGtWHEKFiC5AcMAQ")
BOB = PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
MALLORY = PeerID.from_base58("QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC")
METHOD = "BlockServicer.rpc_info"


# ---- the key file


def keygen(*args: str):
    return local_swarm.run(["keygen", *args], timeout=60)


def test_keygen_writes_a_private_file_in_libp2p_format(tmp_path):
    path = tmp_path / "swarm.key"
    result = keygen(str(path))
    assert result.returncode == 0 and SwarmKey.load(path).fingerprint in result.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and len(lines) == 3
    assert len(bytes.fromhex(lines[2])) == 32
    assert SwarmKey.load(path) == SwarmKey.load(str(path))
    assert load_swarm_key(None) is None


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "swarm.key"
    keygen(str(path))
    first = path.read_bytes()
    result = keygen(str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ") and "exists; pass --force" in result.stderr
    assert path.read_bytes() == first
    assert keygen(str(path), "--force").returncode == 0
    assert path.read_bytes() != first and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["swarm.key"]  # no temporary file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file; create a key with `molink-swarm keygen"),
        ("", "not a swarm key file"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 31 + "\n", "not a swarm key file"),  # 31 bytes
        ("/key/swarm/psk/1.0.0/\n/base64/\n" + "ab" * 32 + "\n", "not a swarm key file"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32 + "\n", "not a swarm key file"),
        ("x" * 10000, "not a swarm key file"),
    ],
)
def test_bad_key_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "swarm.key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SwarmKeyError) as error:
        SwarmKey.load(path)
    assert message in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(
    "command",
    [["dht"], ["join", "--model", "m", "--blocks", "0:1"], ["status"], ["chat"], ["web"]],
    ids=lambda command: command[0],
)
def test_every_command_takes_a_swarm_key_and_says_when_it_is_missing(tmp_path, command):
    missing = tmp_path / "nope.key"
    result = local_swarm.run([*command, "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--swarm-key", str(missing)], timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: --swarm-key") and f"molink-swarm keygen {missing}" in last


def test_a_directory_is_not_a_key_file(tmp_path):
    with pytest.raises(SwarmKeyError, match="is a directory"):
        SwarmKey.load(tmp_path)


def test_a_key_file_readable_by_others_is_used_with_a_warning(tmp_path, caplog):
    path = tmp_path / "swarm.key"
    SwarmKey.generate().write(path)
    os.chmod(path, 0o644)
    assert SwarmKey.load(path) is not None
    assert "chmod 600" in caplog.text


def test_the_key_never_shows_in_its_repr(tmp_path):
    key = SwarmKey.generate()
    key.write(tmp_path / "k")
    secret = (tmp_path / "k").read_text().splitlines()[2]
    assert secret not in repr(key) and key.fingerprint in repr(key)
    assert key.derive("rpc") != key.derive("dht")


# ---- proofs on our RPCs


def test_a_proof_is_accepted_once():
    auth = RpcAuth(SwarmKey.generate())
    proof = auth.request_proof(METHOD, ALICE, BOB)
    assert len(proof) == PROOF_BYTES and proof[0] == 0  # never a valid protobuf: keyless peers fail to parse it
    assert auth.check_request(proof, METHOD, ALICE, BOB) == nonce_of(proof)
    with pytest.raises(SwarmKeyRefused, match="replays an earlier request"):
        auth.check_request(proof, METHOD, ALICE, BOB)


def test_a_proof_under_another_key_is_refused():
    proof = RpcAuth(SwarmKey.generate()).request_proof(METHOD, ALICE, BOB)
    with pytest.raises(SwarmKeyRefused, match="does not match its swarm key"):
        RpcAuth(SwarmKey.generate()).check_request(proof, METHOD, ALICE, BOB)


def test_no_proof_says_to_pass_the_swarm_key():
    with pytest.raises(SwarmKeyRefused, match="private swarm: pass --swarm-key"):
        RpcAuth(SwarmKey.generate()).check_request(b"\x0a\x03abc", METHOD, ALICE, BOB)


@pytest.mark.parametrize(
    "caller, receiver, method",
    [
        (MALLORY, BOB, METHOD),  # someone else presents Alice's proof
        (ALICE, MALLORY, METHOD),  # Alice's proof for Bob, replayed to another peer by... anyone who saw it
        (BOB, ALICE, METHOD),  # the roles swapped
        (ALICE, BOB, "BlockServicer.rpc_inference"),  # another method
    ],
)
def test_a_proof_holds_only_between_its_two_peers_for_its_method(caller, receiver, method):
    auth = RpcAuth(SwarmKey.generate())
    proof = auth.request_proof(METHOD, ALICE, BOB)
    with pytest.raises(SwarmKeyRefused, match="does not match"):
        auth.check_request(proof, method, caller, receiver)


@pytest.mark.parametrize("flip", [len(b"\x00msk1"), len(b"\x00msk1") + 8, PROOF_BYTES - 1])
def test_a_tampered_proof_is_refused(flip):
    auth = RpcAuth(SwarmKey.generate())
    proof = bytearray(auth.request_proof(METHOD, ALICE, BOB))
    proof[flip] ^= 1  # the timestamp, the nonce, the MAC
    with pytest.raises(SwarmKeyRefused, match="does not match"):
        auth.check_request(bytes(proof), METHOD, ALICE, BOB)


@pytest.mark.parametrize("skew", [FRESHNESS_S + 1, -(FRESHNESS_S + 1)])
def test_a_proof_from_too_far_in_the_past_or_future_is_refused(skew):
    import time

    auth = RpcAuth(SwarmKey.generate())
    proof = auth.request_proof(METHOD, ALICE, BOB)
    with pytest.raises(SwarmKeyRefused, match="off this peer's clock"):
        auth.check_request(proof, METHOD, ALICE, BOB, now=time.time() + skew)


def test_a_reply_proof_answers_one_request():
    key = SwarmKey.generate()
    client, server = RpcAuth(key), RpcAuth(key)
    request = client.request_proof(METHOD, ALICE, BOB)
    nonce = server.check_request(request, METHOD, ALICE, BOB)
    reply = server.reply_proof(METHOD, ALICE, BOB, nonce)
    client.check_reply(reply, METHOD, ALICE, BOB, nonce_of(request))
    other_request = client.request_proof(METHOD, ALICE, BOB)
    with pytest.raises(SwarmKeyRefused, match="did not prove that it holds this swarm's key"):
        client.check_reply(reply, METHOD, ALICE, BOB, nonce_of(other_request))  # an old answer to a new request
    with pytest.raises(SwarmKeyRefused, match="did not prove"):
        client.check_reply(request, METHOD, ALICE, BOB, nonce_of(request))  # our own request echoed back
    with pytest.raises(SwarmKeyRefused, match="did not prove"):
        client.check_reply(b"", METHOD, ALICE, BOB, nonce_of(request))  # a peer without the key


def test_the_replay_guard_forgets_nonces_once_their_time_is_past():
    guard = ReplayGuard(window_s=10.0)
    assert guard.admit(100.0, b"n" * 16, now=100.0) is None
    assert guard.admit(100.0, b"n" * 16, now=105.0) == "it replays an earlier request"
    assert guard.admit(100.0, b"n" * 16, now=111.0).startswith("its timestamp is")  # out of the window anyway
    assert guard.admit(125.0, b"m" * 16, now=125.0) is None
    assert len(guard) == 1  # "n" was forgotten when "m" came
    assert guard.admit(float("nan"), b"o" * 16).startswith("its timestamp")
    full = ReplayGuard(window_s=10.0, max_entries=1)
    assert full.admit(0.0, b"a" * 16, now=0.0) is None
    assert "try again later" in full.admit(0.0, b"b" * 16, now=0.0)


# ---- proofs on DHT messages


def find_request() -> dht_pb2.FindRequest:
    return dht_pb2.FindRequest(keys=[b"k" * 20], peer=dht_pb2.NodeInfo(node_id=b"n" * 20))


def test_the_dht_uses_our_peer_bound_wrapper():
    assert hivemind.dht.protocol.AuthRPCWrapper is PeerBoundAuthRPCWrapper


def test_a_dht_request_is_accepted_once_between_its_peers():
    key = SwarmKey.generate()
    alice, bob = SwarmKeyAuthorizer(key), SwarmKeyAuthorizer(key)
    request = find_request()
    alice.sign_request_between(request, "rpc_find", ALICE, BOB)
    received = dht_pb2.FindRequest.FromString(request.SerializeToString())
    assert bob.check_request_between(received, "rpc_find", ALICE, BOB) is None
    assert bob.check_request_between(received, "rpc_find", ALICE, BOB) == "it replays an earlier request"


@pytest.mark.parametrize("caller, receiver, method", [(MALLORY, BOB, "rpc_find"), (ALICE, MALLORY, "rpc_find"), (ALICE, BOB, "rpc_store")])
def test_a_dht_proof_holds_only_between_its_peers(caller, receiver, method):
    key = SwarmKey.generate()
    request = find_request()
    SwarmKeyAuthorizer(key).sign_request_between(request, "rpc_find", ALICE, BOB)
    assert "does not match" in SwarmKeyAuthorizer(key).check_request_between(request, method, caller, receiver)


def test_a_tampered_or_foreign_dht_request_is_refused():
    key = SwarmKey.generate()
    request = find_request()
    SwarmKeyAuthorizer(key).sign_request_between(request, "rpc_find", ALICE, BOB)
    tampered = dht_pb2.FindRequest()
    tampered.CopyFrom(request)
    tampered.keys[0] = b"x" * 20
    assert "does not match" in SwarmKeyAuthorizer(key).check_request_between(tampered, "rpc_find", ALICE, BOB)
    assert "does not match" in SwarmKeyAuthorizer(SwarmKey.generate()).check_request_between(request, "rpc_find", ALICE, BOB)
    unsigned = find_request()
    assert "pass --swarm-key" in SwarmKeyAuthorizer(key).check_request_between(unsigned, "rpc_find", ALICE, BOB)


def test_a_stale_dht_request_is_refused():
    import time

    key = SwarmKey.generate()
    request = find_request()
    SwarmKeyAuthorizer(key).sign_request_between(request, "rpc_find", ALICE, BOB)
    reason = SwarmKeyAuthorizer(key).check_request_between(request, "rpc_find", ALICE, BOB, now=time.time() + 2 * FRESHNESS_S)
    assert "off this peer's clock" in reason


def test_a_dht_answer_must_come_from_a_key_holder_and_answer_our_request():
    key = SwarmKey.generate()
    client, server = SwarmKeyAuthorizer(key), SwarmKeyAuthorizer(key)
    request = find_request()
    client.sign_request_between(request, "rpc_find", ALICE, BOB)
    response = dht_pb2.FindResponse(peer=dht_pb2.NodeInfo(node_id=b"m" * 20))
    server.sign_response_between(response, request, "rpc_find", ALICE, BOB)
    assert client.check_response_between(response, request, "rpc_find", ALICE, BOB)
    assert not client.check_response_between(response, request, "rpc_find", ALICE, MALLORY)
    assert not client.check_response_between(None, request, "rpc_find", ALICE, BOB)
    assert not client.check_response_between(dht_pb2.FindResponse(), request, "rpc_find", ALICE, BOB)  # keyless
    other = find_request()
    client.sign_request_between(other, "rpc_find", ALICE, BOB)
    assert not client.check_response_between(response, other, "rpc_find", ALICE, BOB)
    foreign = dht_pb2.FindResponse(peer=dht_pb2.NodeInfo(node_id=b"m" * 20))
    SwarmKeyAuthorizer(SwarmKey.generate()).sign_response_between(foreign, request, "rpc_find", ALICE, BOB)
    assert not client.check_response_between(foreign, request, "rpc_find", ALICE, BOB)
