"""Server and model records: their schema, and how real DHT peers keep other peers from forging them."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import logging
from typing import Iterator, NamedTuple

import hivemind
import multihash
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from molink_swarm.dht import swarm_dht
from molink_swarm.dht.records import (
    MAX_THROUGHPUT,
    MODELS_KEY,
    RECORD_VERSION,
    InvalidRecordError,
    ModelRecord,
    Reachability,
    ServerRecord,
    ServerState,
    block_key,
    parse_record,
    validate_record,
)
from molink_swarm.dht.swarm_dht import declare_server, fetch_models, fetch_servers, owner_subkey, start_dht
from molink_swarm.dht.validation import owner_subkey_bytes
from molink_swarm.peer_keys import peer_id_of_owner_key

ED25519_PEER = "12D3KooWF1kLNYQEAjgEPfH8vr35o7tQNXBdAnvHeqwkdP6gh7Nk"  # how a `molink-swarm dht` peer looks
RSA_PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # how a server (RSA identity) looks


def peer_id(i: int) -> str:
    return PeerID(multihash.encode(hashlib.sha256(str(i).encode()).digest(), "sha2-256")).to_base58()


def server_record(**overrides) -> ServerRecord:
    fields = dict(
        state=ServerState.ONLINE,
        start=0,
        end=4,
        model_fingerprint="0123456789abcdef",
        throughput=250.0,
        free_cache_tokens=8192,
        max_sessions=16,
        software_version="0.1.0",
    )
    return ServerRecord(**{**fields, **overrides})


def model_record(**overrides) -> ModelRecord:
    fields = dict(
        model_id="tiny-llama-01234567",  # "<slug>-<fingerprint[:8]>", like ModelSource.model_id
        name="Tiny Llama",
        num_blocks=6,
        fingerprint="0123456789abcdef",
        model_type="llama",
    )
    return ModelRecord(**{**fields, **overrides})


# --- schema --------------------------------------------------------------------------------------------------


def test_a_server_record_round_trips_through_the_wire_format():
    record = server_record(
        reachability=Reachability.RELAYED,
        relay_addrs=(f"/ip4/10.0.0.1/tcp/31337/p2p/{ED25519_PEER}",),
        addrs=(f"/ip4/10.0.0.2/tcp/4000/p2p/{RSA_PEER}", f"/ip4/10.0.0.1/tcp/31337/p2p/{ED25519_PEER}/p2p-circuit/p2p/{RSA_PEER}"),
        public_name="alice",
        next_rtts={ED25519_PEER: 0.012, RSA_PEER: 0.0},
        block_digests=("0123456789abcdef", "fedcba9876543210", "0000000000000000", "ffffffffffffffff"),
    )

    assert parse_record(record.to_wire()) == record
    assert record.digest_of(1) == "fedcba9876543210" and record.digest_of(4) is None


def test_a_model_record_round_trips_through_the_wire_format():
    record = model_record()

    assert parse_record(record.to_wire()) == record


def test_the_wire_format_is_plain_data():
    wire = server_record().to_wire()

    assert wire["kind"] == "molink.server"
    assert wire["state"] == "online"
    assert wire["reachability"] == "direct"


def test_unknown_fields_from_a_newer_version_are_ignored():
    wire = {**server_record().to_wire(), "version": RECORD_VERSION + 1, "gpu": "H100", "supports_speculation": True}

    record = parse_record(wire)

    assert isinstance(record, ServerRecord)
    assert record.start == 0 and record.end == 4
    assert record.version == RECORD_VERSION + 1


def test_a_record_of_an_older_version_without_block_digests_decodes():
    wire = server_record().to_wire()
    del wire["block_digests"]

    record = parse_record({**wire, "version": 1})

    assert isinstance(record, ServerRecord) and record.block_digests is None and record.digest_of(0) is None


def test_a_record_from_before_quantization_decodes_as_not_quantized():
    wire = server_record().to_wire()
    del wire["quant"]

    record = parse_record({**wire, "version": 2})

    assert isinstance(record, ServerRecord) and record.quant is None and record.quant_mode == "none"
    assert parse_record({**wire, "quant": "int8"}).quant_mode == "int8"
    with pytest.raises(InvalidRecordError, match="quant"):
        validate_record({**wire, "quant": "<script>"})


@pytest.mark.parametrize(
    "overrides",
    [
        {"start": 4, "end": 4},
        {"start": 5, "end": 2},
        {"start": -1},
        {"throughput": -1.0},
        {"free_cache_tokens": -5},
        {"state": "nonsense"},
        {"reachability": "teleported"},
        {"model_fingerprint": "short"},
        {"addrs": [f"/ip4/10.0.0.{i}/tcp/1/p2p/{RSA_PEER}" for i in range(17)]},
        {"relay_addrs": [f"/ip4/10.0.0.{i}/tcp/1/p2p/{RSA_PEER}" for i in range(17)]},
        {"next_rtts": {peer_id(i): 0.01 for i in range(65)}},
        {"software_version": "x" * 33},
        {"block_digests": ["0123456789abcdef"] * 3},  # 4 blocks
        {"block_digests": ["0123456789ABCDEF"] * 4},
        {"block_digests": ["0123456789abcdef0"] * 4},
        {"block_digests": [1, 2, 3, 4]},
    ],
    ids=lambda overrides: ",".join(overrides),
)
def test_an_invalid_server_record_is_dropped(overrides):
    assert parse_record({**server_record().to_wire(), **overrides}) is None


@pytest.mark.parametrize(
    "overrides",
    [
        # Readers dial these and take the relay's peer id from them: each must end in /p2p/<a real peer id>.
        {"relay_addrs": ["not a multiaddr"]},
        {"relay_addrs": ["/ip4/10.0.0.1/tcp/31337"]},
        {"relay_addrs": [f"/ip4/10.0.0.1/tcp/31337/p2p/{ED25519_PEER}", "/ip4/10.0.0.1/tcp/1/p2p/"]},
        {"relay_addrs": ["/ip4/10.0.0.1/tcp/31337/p2p/12D3KooWnext"]},
        {"relay_addrs": ["/ip4/999.0.0.1/tcp/31337/p2p/" + ED25519_PEER]},
        {"relay_addrs": [f"/ip4/10.0.0.1/tcp/1/p2p/{ED25519_PEER}/p2p-circuit/p2p/{RSA_PEER}"]},
        {"relay_addrs": ["/ip4/10.0.0.1/tcp/1/p2p/" + ED25519_PEER + "/" + "x" * 300]},
        {"relay_addrs": [42]},
        {"addrs": ["/ip4/10.0.0.1/tcp/4000"]},
        {"addrs": ["junk"]},
        # Figures go into route costs: an attacker must not make itself look infinitely fast or close.
        {"throughput": float("inf")},
        {"throughput": float("nan")},
        {"throughput": 1e30},
        {"next_rtts": {RSA_PEER: float("nan")}},
        {"next_rtts": {RSA_PEER: -0.01}},
        {"next_rtts": {RSA_PEER: float("inf")}},
        {"next_rtts": {"not-a-peer-id": 0.01}},
        {"next_rtts": {"12D3KooWnext": 0.01}},
        {"free_cache_tokens": 2**70},
        {"max_sessions": 2**70},
        {"active_sessions": -1},
        {"end": 10**9},
        {"torch_dtype": "float16; drop table"},
        {"wire_dtype": "int8; drop table"},
        {"wire_bytes_per_token": -1.0},
        {"wire_bytes_per_token": float("nan")},
        {"wire_bytes_per_token": float("inf")},
        {"wire_bytes_per_token": 1e30},
    ],
    ids=lambda overrides: f"{next(iter(overrides))}={str(next(iter(overrides.values())))[:40]}",
)
def test_a_server_record_with_a_bad_field_is_dropped(overrides):
    assert parse_record({**server_record().to_wire(), **overrides}) is None


def test_a_record_from_before_wire_dtypes_still_decodes():
    wire = server_record(wire_dtype="int8", wire_bytes_per_token=578.0).to_wire()
    assert parse_record(wire).wire_dtype == "int8" and parse_record(wire).wire_bytes_per_token == 578.0
    del wire["wire_dtype"], wire["wire_bytes_per_token"]

    record = parse_record(wire)

    assert record is not None and record.wire_dtype is None and record.wire_bytes_per_token is None


def test_the_reason_a_record_is_invalid_is_one_short_line():
    with pytest.raises(InvalidRecordError) as error:
        validate_record({**server_record().to_wire(), "relay_addrs": ["junk"]})

    assert "relay_addrs" in str(error.value) and "\n" not in str(error.value) and len(str(error.value)) <= 200


def test_a_server_record_without_a_required_field_is_dropped():
    wire = server_record().to_wire()
    del wire["throughput"]

    assert parse_record(wire) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_id": "tiny.llama"},
        {"model_id": "Tiny-Llama"},
        {"model_id": ""},
        {"num_blocks": 0},
        {"num_blocks": 10**6},  # readers fetch one DHT key per block
        {"model_id": "tiny-llama-89abcdef"},  # an id that belongs to other weights
    ],
    ids=lambda overrides: f"{next(iter(overrides))}={next(iter(overrides.values()))!r}",
)
def test_an_invalid_model_record_is_dropped(overrides):
    assert parse_record({**model_record().to_wire(), **overrides}) is None


@pytest.mark.parametrize("value", [None, 42, "molink.server", b"molink.server", ["molink.server"], ("a", "b")])
def test_a_value_that_is_not_a_dict_is_dropped(value):
    assert parse_record(value) is None


def test_a_dict_of_another_kind_is_dropped():
    assert parse_record({**server_record().to_wire(), "kind": "someone.else"}) is None
    assert parse_record({"no": "kind"}) is None


def test_a_dict_with_an_unhashable_kind_is_dropped():
    assert parse_record({"kind": ["molink.server"]}) is None


# --- readers skip what validators let through --------------------------------------------------------------
# Honest peers reject invalid records when they are stored, but a reader cannot rely on that: older or hostile
# peers answer reads too. fetch_servers / fetch_models check every value themselves.


class Owner(NamedTuple):
    peer_id: PeerID
    subkey: bytes


@pytest.fixture(scope="module")
def owners() -> list[Owner]:
    """Five peers with RSA identities: the subkeys their signed records sit under."""
    found = []
    for _ in range(5):
        public = RSAPrivateKey().get_public_key().to_bytes()
        peer = peer_id_of_owner_key(public)
        found.append(Owner(peer, owner_subkey_bytes(peer, public)))
    return found


class ReadOnlyDHT:
    """Answers every read with fixed DHT entries (key -> {subkey: value}), as hivemind returns them."""

    def __init__(self, entries: dict[str, dict]):
        self.entries = entries

    def run_coroutine(self, _coroutine, return_future: bool = False):
        expiration = get_dht_time() + 60
        found = {
            key: ValueWithExpiration({sub: ValueWithExpiration(v, expiration) for sub, v in values.items()}, expiration)
            for key, values in self.entries.items()
        }
        if not return_future:
            return found
        future = concurrent.futures.Future()
        future.set_result(found)
        return future

    def is_alive(self) -> bool:
        return True


@pytest.fixture
def fresh_skip_log(monkeypatch):
    monkeypatch.setattr(swarm_dht, "_skipped_logged", collections.OrderedDict())


def test_readers_skip_invalid_server_records_with_one_log_line_each(owners, caplog, fresh_skip_log):
    honest, bad_relay, infinite, wrong_kind, _ = owners
    good = server_record(start=0, end=4)
    on_every_block = {
        honest.subkey: good.to_wire(),
        bad_relay.subkey: {**good.to_wire(), "reachability": "relayed", "relay_addrs": ["junk"]},
        infinite.subkey: {**good.to_wire(), "throughput": float("inf")},
        wrong_kind.subkey: model_record().to_wire(),
        b"unsigned": {"anything": 42},
    }
    dht = ReadOnlyDHT({block_key("m-01234567", i): dict(on_every_block) for i in range(4)})

    with caplog.at_level(logging.WARNING, logger=swarm_dht.__name__):
        servers = fetch_servers(dht, "m-01234567", 4)
        again = fetch_servers(dht, "m-01234567", 4)

    assert [(info.peer_id, info.record) for info in servers] == [(honest.peer_id, good)]
    assert [info.record for info in again] == [good]
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 4, skipped  # one line per bad record, though each sits under 4 keys and was read twice
    assert any(str(bad_relay.peer_id) in line and "relay_addrs" in line for line in skipped)
    assert any(str(infinite.peer_id) in line and "throughput" in line for line in skipped)
    assert all("\n" not in line for line in skipped)


def test_readers_skip_junk_that_is_not_a_record(owners, caplog, fresh_skip_log):
    honest = owners[0]
    good = server_record(start=0, end=2)
    dht = ReadOnlyDHT({block_key("m-01234567", 0): {honest.subkey: good.to_wire(), owners[1].subkey: b"\x00junk", owners[2].subkey: [1, 2]}})

    with caplog.at_level(logging.WARNING, logger=swarm_dht.__name__):
        servers = fetch_servers(dht, "m-01234567", 2)

    assert [info.peer_id for info in servers] == [honest.peer_id]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_a_model_record_forged_by_one_peer_loses_to_the_one_the_servers_announce(owners, fresh_skip_log):
    real = model_record(num_blocks=6)
    inflated = model_record(num_blocks=4096, name="evil")
    dht = ReadOnlyDHT(
        {MODELS_KEY: {owners[0].subkey: real.to_wire(), owners[1].subkey: real.to_wire(), owners[2].subkey: inflated.to_wire(), owners[3].subkey: "junk"}}
    )

    assert fetch_models(dht) == {real.model_id: real}


def test_on_a_tie_the_model_record_with_fewer_blocks_wins(owners, fresh_skip_log):
    real = model_record(num_blocks=6)
    inflated = model_record(num_blocks=4096)
    dht = ReadOnlyDHT({MODELS_KEY: {owners[0].subkey: inflated.to_wire(), owners[1].subkey: real.to_wire()}})

    assert fetch_models(dht)[real.model_id].num_blocks == 6


# --- real DHT peers ------------------------------------------------------------------------------------------

TTL_S = 120.0
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Peers(NamedTuple):
    a: hivemind.DHT  # the honest server
    a_validator: RSASignatureValidator
    b: hivemind.DHT  # another peer, who tries to forge A's records
    b_validator: RSASignatureValidator


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    started: list[hivemind.DHT] = []
    try:
        # Announcing peers get their own identity key, which also signs their records.
        a, a_validator = start_dht(host_maddrs=LOOPBACK, announcing=True)
        started.append(a)
        b, b_validator = start_dht([str(m) for m in a.get_visible_maddrs()], host_maddrs=LOOPBACK, announcing=True)
        started.append(b)
        assert a_validator.local_public_key != b_validator.local_public_key
        yield Peers(a, a_validator, b, b_validator)
    finally:
        for dht in started:
            dht.shutdown()


_model_ids = (f"forge-test-{i}-01234567" for i in itertools.count())


class Announced(NamedTuple):
    model: ModelRecord
    record: ServerRecord


@pytest.fixture
def announced(peers: Peers) -> Announced:
    """Peer A serving blocks 0..3 of a fresh model (a new model id per test keeps the tests independent)."""
    model = model_record(model_id=next(_model_ids))
    record = server_record(start=0, end=4)
    assert declare_server(peers.a, peers.a_validator, model, record, ttl=TTL_S)
    return Announced(model, record)


def test_a_peer_sees_the_server_another_peer_announced(peers: Peers, announced: Announced):
    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)

    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]


def test_a_peer_sees_the_model_another_peer_announced(peers: Peers, announced: Announced):
    models = fetch_models(peers.b)

    assert models[announced.model.model_id] == announced.model


def test_a_peer_cannot_overwrite_another_peers_record(peers: Peers, announced: Announced):
    key = block_key(announced.model.model_id, 0)
    forged = server_record(start=0, end=4, throughput=MAX_THROUGHPUT, public_name="definitely-alice")
    a_subkey = owner_subkey(peers.a.peer_id, peers.a_validator)

    stored = peers.b.store(key, forged.to_wire(), get_dht_time() + TTL_S + 60, subkey=a_subkey)

    assert not stored
    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)
    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]


def test_junk_claiming_to_be_a_server_record_is_rejected_even_from_its_owner(peers: Peers, announced: Announced):
    key = block_key(announced.model.model_id, 1)
    b_subkey = owner_subkey(peers.b.peer_id, peers.b_validator)

    stored = peers.b.store(
        key, {"kind": "molink.server", "state": "nonsense"}, get_dht_time() + TTL_S, subkey=b_subkey
    )

    assert not stored
    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)
    assert [info.peer_id for info in servers] == [peers.a.peer_id]


def test_junk_under_the_models_key_is_rejected(peers: Peers, announced: Announced):
    b_subkey = owner_subkey(peers.b.peer_id, peers.b_validator)
    junk = {**announced.model.to_wire(), "model_id": "has.a.dot"}

    assert not peers.b.store(MODELS_KEY, junk, get_dht_time() + TTL_S, subkey=b_subkey)
    assert "has.a.dot" not in fetch_models(peers.a)


def test_a_valid_record_under_a_subkey_without_an_owner_key_is_rejected(peers: Peers, announced: Announced):
    key = block_key(announced.model.model_id, 2)

    stored = peers.b.store(key, server_record(start=2, end=4).to_wire(), get_dht_time() + TTL_S, subkey=b"12D3fake")

    assert not stored
    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)
    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]


def test_a_record_under_an_unterminated_owner_marker_cannot_impersonate_a_peer(peers: Peers, announced: Announced):
    key = block_key(announced.model.model_id, 0)
    forged = server_record(start=0, end=4, throughput=MAX_THROUGHPUT)
    fake_subkey = peers.a.peer_id.to_base58().encode() + b"[owner:"

    peers.b.store(key, forged.to_wire(), get_dht_time() + TTL_S + 60, subkey=fake_subkey)

    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)
    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]


def test_a_peer_cannot_impersonate_another_peer_with_its_own_key(peers: Peers, announced: Announced):
    key = block_key(announced.model.model_id, 0)
    forged = server_record(start=0, end=4, throughput=MAX_THROUGHPUT)
    fake_subkey = peers.a.peer_id.to_base58().encode() + peers.b_validator.local_public_key

    peers.b.store(key, forged.to_wire(), get_dht_time() + TTL_S + 60, subkey=fake_subkey)

    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)
    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]


def test_a_plain_value_cannot_displace_the_records_under_a_key(peers: Peers, announced: Announced):
    # In hivemind's storage a plain (subkey-less) value with a later expiration replaces the whole dictionary
    # of records under its key, and wins over it in every read: one store would hide every server of a block.
    model_id = announced.model.model_id
    far_future = get_dht_time() + 10**6

    stored = [peers.b.store(block_key(model_id, i), "junk", far_future) for i in range(4)]

    assert not any(stored)
    servers = fetch_servers(peers.a, model_id, announced.model.num_blocks)
    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]


@pytest.mark.parametrize("junk", [42, "junk", b"\x00\xff", {"kind": "molink.something"}, [1, 2, 3]], ids=repr)
def test_signed_junk_that_is_not_a_record_is_rejected(peers: Peers, announced: Announced, junk):
    b_subkey = owner_subkey(peers.b.peer_id, peers.b_validator)

    assert not peers.b.store(block_key(announced.model.model_id, 1), junk, get_dht_time() + TTL_S, subkey=b_subkey)
    assert not peers.b.store(MODELS_KEY, junk, get_dht_time() + TTL_S, subkey=b_subkey)


def test_unsigned_junk_under_a_key_is_rejected(peers: Peers, announced: Announced):
    assert not peers.b.store(block_key(announced.model.model_id, 1), {"any": "thing"}, get_dht_time() + TTL_S, subkey="someone")
