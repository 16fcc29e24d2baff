"""Server and model records: their schema, and how real DHT peers keep other peers from forging them."""

from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from molink_swarm.dht.records import (
    MODELS_KEY,
    ModelRecord,
    Reachability,
    ServerRecord,
    ServerState,
    block_key,
    parse_record,
)
from molink_swarm.dht.swarm_dht import declare_server, fetch_models, fetch_servers, owner_subkey, start_dht


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
        model_id="tiny-llama",
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
        relay_addrs=("/ip4/10.0.0.1/tcp/31337",),
        public_name="alice",
        next_rtts={"12D3KooWnext": 0.012},
    )

    assert parse_record(record.to_wire()) == record


def test_a_model_record_round_trips_through_the_wire_format():
    record = model_record()

    assert parse_record(record.to_wire()) == record


def test_the_wire_format_is_plain_data():
    wire = server_record().to_wire()

    assert wire["kind"] == "molink.server"
    assert wire["state"] == "online"
    assert wire["reachability"] == "direct"


def test_unknown_fields_from_a_newer_version_are_ignored():
    wire = {**server_record().to_wire(), "version": 2, "gpu": "H100", "supports_speculation": True}

    record = parse_record(wire)

    assert isinstance(record, ServerRecord)
    assert record.start == 0 and record.end == 4
    assert record.version == 2


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
        {"addrs": [f"/ip4/10.0.0.{i}/tcp/1" for i in range(17)]},
        {"relay_addrs": [f"/ip4/10.0.0.{i}/tcp/1" for i in range(17)]},
        {"next_rtts": {f"peer-{i}": 0.01 for i in range(65)}},
        {"software_version": "x" * 33},
    ],
    ids=lambda overrides: ",".join(overrides),
)
def test_an_invalid_server_record_is_dropped(overrides):
    assert parse_record({**server_record().to_wire(), **overrides}) is None


def test_a_server_record_without_a_required_field_is_dropped():
    wire = server_record().to_wire()
    del wire["throughput"]

    assert parse_record(wire) is None


@pytest.mark.parametrize(
    "overrides",
    [{"model_id": "tiny.llama"}, {"model_id": "Tiny-Llama"}, {"model_id": ""}, {"num_blocks": 0}],
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


_model_ids = (f"forge-test-{i}" for i in itertools.count())


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
    forged = server_record(start=0, end=4, throughput=1e9, public_name="definitely-alice")
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
    forged = server_record(start=0, end=4, throughput=1e9)
    fake_subkey = peers.a.peer_id.to_base58().encode() + b"[owner:"

    peers.b.store(key, forged.to_wire(), get_dht_time() + TTL_S + 60, subkey=fake_subkey)

    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)
    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]


def test_a_peer_cannot_impersonate_another_peer_with_its_own_key(peers: Peers, announced: Announced):
    key = block_key(announced.model.model_id, 0)
    forged = server_record(start=0, end=4, throughput=1e9)
    fake_subkey = peers.a.peer_id.to_base58().encode() + peers.b_validator.local_public_key

    peers.b.store(key, forged.to_wire(), get_dht_time() + TTL_S + 60, subkey=fake_subkey)

    servers = fetch_servers(peers.b, announced.model.model_id, announced.model.num_blocks)
    assert [(info.peer_id, info.record) for info in servers] == [(peers.a.peer_id, announced.record)]
