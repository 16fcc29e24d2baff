"""Starting a DHT peer with our validators, announcing servers and reading them back."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Optional, Sequence

import hivemind
from hivemind.p2p import PeerID
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from molink_swarm.dht.records import MODELS_KEY, ModelRecord, ServerRecord, block_key, parse_record
from molink_swarm.dht.identity import load_or_create_identity
from molink_swarm.dht.validation import make_validators, peer_id_from_subkey
from molink_swarm.errors import UserError

logger = logging.getLogger(__name__)

def _patch_hivemind_multiaddr() -> None:
    """hivemind's bundled multiaddr encodes ``/p2p/<id>`` as a CIDv1 that its own daemon rejects on connect
    ("length greater than remaining number of bytes in buffer"); keeping the CIDv0 bytes fixes it."""
    from hivemind.utils.multiaddr.codecs import cid

    cid.PROTO_NAME_TO_CIDv1_CODEC.pop("p2p", None)


_patch_hivemind_multiaddr()


class NoPeersReachableError(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """A server as seen in the DHT."""

    peer_id: PeerID
    record: ServerRecord
    expiration_time: float


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    client_mode: bool = False,
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
    announce_maddrs: Optional[Sequence[str]] = None,
    identity_path: Optional[str] = None,
    announcing: bool = False,
    **kwargs,
) -> tuple[hivemind.DHT, RSASignatureValidator]:
    """Start a hivemind DHT peer (in its own process) that validates records like every other swarm peer.

    A peer that announces records (``announcing=True``) gets an RSA identity whose key also signs its records
    (see identity.py). Returns the DHT and the signature validator that marks the records this peer owns.
    """
    private_key = None
    if announcing or identity_path is not None:
        identity_path, private_key = load_or_create_identity(identity_path)
    signature_validator, schema_validator = make_validators(private_key)
    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            start=True,
            client_mode=client_mode,
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            identity_path=identity_path,
            record_validators=[signature_validator, schema_validator],
            **kwargs,
        )
    except Exception as e:
        if initial_peers:
            raise peers_unreachable(initial_peers, e) from e
        raise
    return dht, signature_validator


def peers_unreachable(initial_peers: Sequence[str], error: Exception) -> NoPeersReachableError:
    return NoPeersReachableError(
        f"Could not reach any of the initial peers ({', '.join(initial_peers)}): {error}. "
        "Check the addresses printed by `molink-swarm dht` and that the bootstrap peer is running."
    )


def owner_subkey(peer_id: PeerID, validator: RSASignatureValidator) -> bytes:
    """The subkey under which a peer stores its records: its peer id plus its public key (so only it can sign)."""
    return peer_id.to_base58().encode() + validator.local_public_key


async def _store_many(_dht: hivemind.DHT, node: DHTNode, keys, values, expiration_time, subkey) -> dict:
    return await node.store_many(keys, values, expiration_time, subkeys=[subkey] * len(keys), num_workers=8)


def declare_server(
    dht: hivemind.DHT,
    validator: RSASignatureValidator,
    model: ModelRecord,
    record: ServerRecord,
    ttl: float,
) -> bool:
    """Announce ``record`` under every block key it covers (and the model under the models key)."""
    subkey = owner_subkey(dht.peer_id, validator)
    keys = [block_key(model.model_id, i) for i in range(record.start, record.end)] + [MODELS_KEY]
    values = [record.to_wire()] * (record.end - record.start) + [model.to_wire()]
    expiration = get_dht_time() + ttl
    results = dht.run_coroutine(partial(_store_many, keys=keys, values=values, expiration_time=expiration, subkey=subkey))
    ok = all(results.values())
    if not ok:
        logger.debug("Some DHT stores failed: %s", {k: v for k, v in results.items() if not v})
    return ok


async def _get_many(_dht: hivemind.DHT, node: DHTNode, keys, latest: bool) -> dict:
    return await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None, num_workers=8)


def fetch_servers(dht: hivemind.DHT, model_id: str, num_blocks: int, latest: bool = True) -> list[ServerInfo]:
    """All servers announced for ``model_id``, one entry per server (not per block), malformed records skipped."""
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    found = dht.run_coroutine(partial(_get_many, keys=keys, latest=latest))
    servers: dict[PeerID, ServerInfo] = {}
    for key in keys:
        entry = found.get(key)
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, (value, expiration_time) in entry.value.items():
            peer_id = peer_id_from_subkey(subkey)
            record = parse_record(value)
            if peer_id is None or not isinstance(record, ServerRecord):
                continue
            known = servers.get(peer_id)
            if known is None or known.expiration_time < expiration_time:
                servers[peer_id] = ServerInfo(peer_id, record, expiration_time)
    return sorted(servers.values(), key=lambda info: (info.record.start, info.record.end, str(info.peer_id)))


def fetch_models(dht: hivemind.DHT) -> dict[str, ModelRecord]:
    """model id -> model record, for every model announced in the swarm."""
    found = dht.run_coroutine(partial(_get_many, keys=[MODELS_KEY], latest=True)).get(MODELS_KEY)
    models: dict[str, ModelRecord] = {}
    if found is None or not isinstance(found.value, dict):
        return models
    for _subkey, (value, _expiration) in found.value.items():
        record = parse_record(value)
        if isinstance(record, ModelRecord):
            models[record.model_id] = record
    return models
