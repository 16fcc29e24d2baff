"""A hostile DHT peer stores junk, forged and extreme records under a model's keys: generation, `status`, the
status page and `/api/v1/swarm` keep working and never route to it.

The swarm is real (bootstrap, server processes, `molink-swarm web`); the hostile peer is a real hivemind DHT
peer in this process. It stores what a modified peer could: records that look valid but lie (blocks it does not
serve, a relay that does not exist, other weights) are stored by honest peers; records that break the schema
(junk relay addresses, infinite or negative figures) and raw junk are refused by honest peers, so the hostile
peer also keeps them in its own storage, bypassing validation, and serves them to every reader that asks it.
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from rich.console import Console

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.cli.status import print_status
from molink_swarm.client.loop import run_sync
from molink_swarm.client.session import SwarmError
from molink_swarm.dht import ModelRecord, Reachability, ServerRecord, ServerState, block_key, fetch_servers, start_dht
from molink_swarm.dht.records import MAX_THROUGHPUT, MODELS_KEY
from molink_swarm.dht.validation import owner_subkey_bytes
from molink_swarm.models import resolve_model
from molink_swarm.net.ports import free_port
from molink_swarm.peer_keys import peer_id_of_owner_key
from molink_swarm.routing.planner import UNREACHABLE_RTT_S
from tests.conftest import with_word_tokenizer

NUM_BLOCKS = 6
TTL_S = 600.0


@pytest.fixture(scope="module")
def model_dir(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama plus a word-level tokenizer (t0..t127), so that `molink-swarm web` can serve it."""
    return with_word_tokenizer(tiny_llama_path, tmp_path_factory.mktemp("models") / "tiny-llama-chat")


@pytest.fixture(scope="module")
def honest(module_swarm, model_dir):
    """Blocks 0:3 and 3:6 in float32, and 3:6 once more in float16."""
    swarm = module_swarm(model_dir, ["0:3", "3:6"])
    swarm.start_server("3:6", "--dtype", "float16")
    return swarm


# --- the hostile peer -------------------------------------------------------------------------------------------


class Identity(NamedTuple):
    peer_id: PeerID
    subkey: bytes
    validator: RSASignatureValidator


def identity(validator: RSASignatureValidator) -> Identity:
    public = validator.local_public_key.removeprefix(b"[owner:").removesuffix(b"]")
    peer_id = peer_id_of_owner_key(public)
    return Identity(peer_id, owner_subkey_bytes(peer_id, public), validator)


async def _store_at_nearest(_dht, node: DHTNode, key: str, subkey, value: bytes, expiration: float) -> list[bool]:
    """Ask the peers nearest to ``key`` to store an already signed value, as a modified peer would."""
    key_id = DHTID.generate(source=key)
    nearest = (await node.find_nearest_nodes([key_id], exclude_self=True))[key_id]
    replies = await asyncio.gather(
        *(node.protocol.call_store(peer, [key_id], [value], [expiration], subkeys=[subkey]) for peer in nearest.values())
    )
    return [bool(reply and reply[0]) for reply in replies]


async def _keep_locally(_dht, node: DHTNode, key: str, subkey, value: bytes, expiration: float) -> bool:
    """Put a value in this peer's own storage without validating it: it serves it to whoever reads the key."""
    key_id = DHTID.generate(source=key)
    if subkey is None:
        return node.protocol.storage.store(key_id, value, expiration)
    return node.protocol.storage.store_subkey(key_id, subkey, value, expiration)


class HostilePeer:
    """A DHT peer of the swarm, plus more RSA identities it signs records with."""

    def __init__(self, initial_peers: list[str]):
        self.dht, own_validator = start_dht(initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], announcing=True)
        self.own = identity(own_validator)
        assert self.own.peer_id == self.dht.peer_id
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]

    @staticmethod
    def new_identity() -> Identity:
        return identity(RSASignatureValidator(RSAPrivateKey()))

    def _signed(self, who: Identity, key: str, value, expiration: float) -> bytes:
        subkey = MSGPackSerializer.dumps(who.subkey)
        record = DHTRecord(DHTID.generate(source=key).to_bytes(), subkey, MSGPackSerializer.dumps(value), expiration)
        return who.validator.sign_value(record)

    def store(self, who: Identity, key: str, value) -> list[bool]:
        expiration = get_dht_time() + TTL_S
        signed = self._signed(who, key, value, expiration)
        return self.dht.run_coroutine(partial(_store_at_nearest, key=key, subkey=who.subkey, value=signed, expiration=expiration))

    def store_unsigned(self, key: str, subkey, value, expiration: float) -> list[bool]:
        raw = MSGPackSerializer.dumps(value)
        return self.dht.run_coroutine(partial(_store_at_nearest, key=key, subkey=subkey, value=raw, expiration=expiration))

    def keep(self, who: Identity, key: str, value) -> bool:
        expiration = get_dht_time() + TTL_S
        signed = self._signed(who, key, value, expiration)
        return self.dht.run_coroutine(partial(_keep_locally, key=key, subkey=who.subkey, value=signed, expiration=expiration))

    def keep_plain(self, key: str, value, expiration: float) -> bool:
        raw = MSGPackSerializer.dumps(value)
        return self.dht.run_coroutine(partial(_keep_locally, key=key, subkey=None, value=raw, expiration=expiration))

    def shutdown(self) -> None:
        self.dht.shutdown()


class Attack(NamedTuple):
    peer: HostilePeer
    liar_ids: set[PeerID]  # every identity whose records claim to serve this model
    accepted: dict[str, list[bool]]  # what honest peers answered to each kind of store
    rejected: dict[str, list[bool]]


def forged_server(fingerprint: str, digests: tuple[str, ...] = ("0" * 16,) * NUM_BLOCKS, **overrides) -> dict:
    """A server record as the DHT carries it; ``overrides`` go in unchecked (they may break the schema)."""
    record = ServerRecord(
        state=ServerState.ONLINE,
        start=0,
        end=NUM_BLOCKS,
        model_fingerprint=fingerprint,
        block_digests=digests,
        throughput=MAX_THROUGHPUT,  # as fast as a record may claim: the planner would love it
        free_cache_tokens=10**9,
        max_sessions=10**6,
        software_version="9.9.9",
    )
    return {**record.to_wire(), **overrides}


@pytest.fixture(scope="module")
def attack(honest, model_dir) -> Iterator[Attack]:
    source = resolve_model(str(model_dir))
    model_id, fingerprint = source.model_id, source.fingerprint
    peer = HostilePeer(honest.initial_peers)
    blocks = [block_key(model_id, i) for i in range(NUM_BLOCKS)]
    nowhere = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{HostilePeer.new_identity().peer_id.to_base58()}"
    accepted: dict[str, list[bool]] = {}
    rejected: dict[str, list[bool]] = {}
    try:
        # The digests honest servers announce for their blocks: anyone can read and repeat them.
        announced = {b: s.record.digest_of(b) for s in fetch_servers(peer.dht, model_id, NUM_BLOCKS) for b in range(s.record.start, s.record.end)}
        digests = tuple(announced[b] for b in range(NUM_BLOCKS))
        # Records that pass the schema but lie; each identity's record sits under every block key.
        fake_server, behind_fake_relay = peer.own, peer.new_identity()
        other_config, other_weights = peer.new_identity(), peer.new_identity()
        lies = {
            "claims blocks it does not serve": (
                fake_server,
                forged_server(fingerprint, digests, addrs=peer.maddrs[:1], public_name="[/bold]evil[link=x]"),  # rich markup
            ),
            "relayed through a relay that does not exist": (
                behind_fake_relay,
                forged_server(fingerprint, digests, reachability=Reachability.RELAYED.value, relay_addrs=[nowhere]),
            ),
            "an altered copy (other fingerprint)": (other_config, forged_server("ffffffffffffffff", digests)),
            "an altered copy (other block digests)": (other_weights, forged_server(fingerprint)),
        }
        for name, (who, record) in lies.items():
            accepted[name] = [ok for key in blocks for ok in peer.store(who, key, record)]
        inflated = ModelRecord(model_id=model_id, name="inflated", num_blocks=4096, fingerprint=fingerprint, model_type="llama")
        accepted["a forged model record"] = peer.store(peer.new_identity(), MODELS_KEY, inflated.to_wire())
        markup = ModelRecord(model_id="evil-ffffffff", name="[/evil]", num_blocks=2, fingerprint="f" * 16, model_type="[red]")
        accepted["a model named in rich markup"] = peer.store(peer.new_identity(), MODELS_KEY, markup.to_wire())

        # Records honest peers refuse: the hostile peer keeps them itself and serves them to readers.
        honest_ids = [s.peer_id for s in honest.servers]
        invalid = {
            "junk relay addresses": forged_server(fingerprint, reachability="relayed", relay_addrs=["junk", "/ip4/1.2.3.4/tcp/1"]),
            "infinite throughput": forged_server(fingerprint, throughput=float("inf")),
            "throughput 1e30": forged_server(fingerprint, throughput=1e30),
            "NaN and negative next RTTs": forged_server(fingerprint, next_rtts={honest_ids[0]: float("nan"), honest_ids[1]: -1.0}),
            "junk block digests": forged_server(fingerprint, block_digests=["not a digest"] * NUM_BLOCKS),
            "raw junk": {"not": "a record"},
        }
        breakers = []
        for name, value in invalid.items():
            breakers.append(peer.new_identity())
            rejected[name] = [ok for key in blocks for ok in peer.store(breakers[-1], key, value)]
            assert peer.keep(breakers[-1], blocks[0], value)
        rejected["unsigned junk"] = peer.store_unsigned(blocks[0], b"junk", {"kind": "molink.server"}, get_dht_time() + TTL_S)
        far_future = get_dht_time() + 10**6
        rejected["a plain value that would replace every record"] = [
            ok for key in blocks for ok in peer.store_unsigned(key, None, "junk", far_future)
        ]
        for key in blocks[1:]:  # block 0 keeps the signed invalid records above
            assert peer.keep_plain(key, "junk", far_future)
        liars = {who.peer_id for who, _ in lies.values()} | {who.peer_id for who in breakers}
        yield Attack(peer, liars, accepted, rejected)
    finally:
        peer.shutdown()


def test_honest_peers_store_the_lies_and_refuse_the_junk(attack):
    # Not vacuous: the lies really sit in the DHT for readers to find, and the junk was really sent.
    for name, answers in attack.accepted.items():
        assert answers and any(answers), f"honest peers refused {name}"
    for name, answers in attack.rejected.items():
        assert answers and not any(answers), f"honest peers stored {name}"


# --- what users see ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distributed(honest, attack, model_dir):
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=honest.initial_peers)
    yield model
    model.shutdown()


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def test_generation_equals_local_and_never_routes_to_the_hostile_peer(distributed, attack, honest, tiny_llama_local):
    float16_server = PeerID.from_base58(honest.servers[2].peer_id)
    for forwarding in (True, False):
        ids = prompt(10, seed=int(forwarding))
        expected = tiny_llama_local.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        with distributed.inference_session(max_length=64, forwarding=forwarding) as session:
            got = distributed.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            chain = {hop.peer_id for hop in session.chain}
            failovers = session.failovers
        assert torch.equal(got, expected)
        assert not chain & (attack.liar_ids | {float16_server}), chain
        assert failovers == 0
    # The client saw the lying records that pass the schema (its own dtype and fingerprint) and routed around
    # them: their pings failed, and it counts them as far rather than pinging them on every plan.
    candidates = {c.peer_id: c for c in run_sync(distributed.swarm.candidates())}
    liars_seen = set(candidates) & attack.liar_ids
    assert len(liars_seen) == 2, candidates
    assert all(candidates[liar].rtt_s == UNREACHABLE_RTT_S for liar in liars_seen)


def test_a_forward_pass_without_a_session_never_routes_to_the_hostile_peer(distributed, tiny_llama_local):
    ids = prompt(12, seed=3)
    with torch.no_grad():
        assert torch.allclose(distributed(ids).logits, tiny_llama_local(ids).logits, atol=1e-4)


def test_status_prints_the_swarm(honest, attack, model_dir):
    out = io.StringIO()

    print_status(honest.initial_peers, console=Console(file=out, width=250, color_system=None))

    text = out.getvalue()
    name = resolve_model(str(model_dir)).name
    assert f"{resolve_model(str(model_dir)).model_id}, {NUM_BLOCKS} blocks" in text  # not the forged 4096
    assert name in text and "inflated" not in text
    # Names from peers' records are shown as they are, never taken for rich markup (which could not be parsed).
    assert "[/bold]evil[link=x]" in text and "[/evil]" in text
    for server in honest.servers:
        assert server.peer_id[-10:] in text
    assert f"All {NUM_BLOCKS} blocks are served." in text


def test_the_status_page_and_swarm_api_answer(honest, attack, model_dir):
    _web, url = honest.start_web("--wait-for-blocks", "10")
    with urllib.request.urlopen(url + "status", timeout=60) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(url + "api/v1/swarm", timeout=120) as reply:
        assert reply.status == 200
        swarm = json.loads(reply.read())
    [model] = [m for m in swarm["models"] if m["model_id"] == resolve_model(str(model_dir)).model_id]
    assert model["num_blocks"] == NUM_BLOCKS and model["missing"] == ""
    listed = {s["peer_id"] for s in model["servers"]}
    assert {s.peer_id for s in honest.servers} <= listed


def test_a_client_in_another_dtype_is_told_which_dtype_the_servers_run(honest, model_dir):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=honest.initial_peers, dtype=torch.float16, wait_for_blocks_s=0
    )
    try:
        with pytest.raises(SwarmError) as error:
            model.generate(prompt(6, seed=4), max_new_tokens=2)
    finally:
        model.shutdown()
    message = str(error.value)
    assert "No server in the swarm holds blocks 0:3" in message
    assert "servers of blocks 0:3 run float32; pass dtype=torch.float32" in message
    assert "\n" not in message

