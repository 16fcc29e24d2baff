"""Starting a DHT peer with our validators, announcing servers and reading them back."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import time
from functools import partial
from typing import Any, Iterator, Optional, Sequence, TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from molink_swarm.dht.auth import SwarmKeyAuthorizer
from molink_swarm.dht.identity import load_or_create_identity
from molink_swarm.dht.records import (
    MODELS_KEY,
    InvalidRecordError,
    ModelRecord,
    ServerRecord,
    block_key,
    validate_record,
)
from molink_swarm.dht.validation import make_validators, peer_id_from_subkey
from molink_swarm.errors import peers_unreachable
from molink_swarm.swarm_key import SwarmKey, bind_daemon

logger = logging.getLogger(__name__)

def _patch_hivemind_multiaddr() -> None:
    """hivemind's bundled multiaddr encodes ``/p2p/<id>`` as a CIDv1 that its own daemon rejects on connect
    ("length greater than remaining number of bytes in buffer"); keeping the CIDv0 bytes fixes it."""
    from hivemind.utils.multiaddr.codecs import cid

    cid.PROTO_NAME_TO_CIDv1_CODEC.pop("p2p", None)


_patch_hivemind_multiaddr()


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
    swarm_key: Optional[SwarmKey] = None,
    **kwargs,
) -> tuple[hivemind.DHT, RSASignatureValidator]:
    """Start a hivemind DHT peer (in its own process) that validates records like every other swarm peer.

    A peer that announces records (``announcing=True``) gets an RSA identity whose key also signs its records
    (see identity.py). With a ``swarm_key`` the peer belongs to that private swarm: its DHT requests and answers
    carry proofs of the key (dht/auth.py), and so do the RPCs made and served over its p2p daemon
    (protocol/auth.py). Returns the DHT and the signature validator that marks the records this peer owns.
    """
    private_key = None
    if announcing or identity_path is not None:
        identity_path, private_key = load_or_create_identity(identity_path)
    signature_validator, schema_validator = make_validators(private_key)
    if swarm_key is not None:
        kwargs["authorizer"] = SwarmKeyAuthorizer(swarm_key)
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
            raise peers_unreachable(initial_peers, e, swarm_key.fingerprint if swarm_key else None) from e
        raise
    if swarm_key is not None:
        bind_daemon(_run(dht, hivemind.DHT._get_p2p_daemon_listen_maddr, timeout=30.0), swarm_key)
        logger.info("Private swarm (key %s)", swarm_key.fingerprint)
    return dht, signature_validator


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
    results = _run(dht, partial(_store_many, keys=keys, values=values, expiration_time=expiration, subkey=subkey))
    ok = all(results.values())
    if not ok:
        logger.debug("Some DHT stores failed: %s", {k: v for k, v in results.items() if not v})
    return ok


def _run(dht: hivemind.DHT, coroutine, timeout: float = 120.0):
    """``dht.run_coroutine`` that gives up when the DHT process is gone: a call pending when the DHT shuts down is
    never answered, and the thread waiting for it would keep the interpreter from exiting."""
    future = dht.run_coroutine(coroutine, return_future=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return future.result(timeout=1.0)
        except concurrent.futures.TimeoutError:
            if not dht.is_alive():
                raise RuntimeError("The DHT was shut down") from None
            if time.monotonic() > deadline:
                raise


async def _get_many(_dht: hivemind.DHT, node: DHTNode, keys, latest: bool) -> dict:
    return await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None, num_workers=8)


def fetch_servers(dht: hivemind.DHT, model_id: str, num_blocks: int, latest: bool = True) -> list[ServerInfo]:
    """All servers announced for ``model_id``, one entry per server (not per block), invalid records skipped."""
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    found = _run(dht, partial(_get_many, keys=keys, latest=latest))
    servers: dict[PeerID, ServerInfo] = {}
    for key in keys:
        for peer_id, record, expiration_time in owned_records(key, found.get(key), ServerRecord):
            known = servers.get(peer_id)
            if known is None or known.expiration_time < expiration_time:
                servers[peer_id] = ServerInfo(peer_id, record, expiration_time)
    return sorted(servers.values(), key=lambda info: (info.record.start, info.record.end, str(info.peer_id)))


def fetch_models(dht: hivemind.DHT) -> dict[str, ModelRecord]:
    """model id -> model record, for every model announced in the swarm.

    Every server of a model announces the same record; if peers disagree about a model id, the record most
    peers announce wins, and on a tie the one with fewer blocks (what a reader fetches per model is bounded
    by the honest record, not inflated by a forged one)."""
    entry = _run(dht, partial(_get_many, keys=[MODELS_KEY], latest=True)).get(MODELS_KEY)
    votes: dict[str, collections.Counter[ModelRecord]] = collections.defaultdict(collections.Counter)
    for _peer_id, record, _expiration in owned_records(MODELS_KEY, entry, ModelRecord):
        votes[record.model_id][record] += 1
    return {
        model_id: max(counts.items(), key=lambda item: (item[1], -item[0].num_blocks))[0]
        for model_id, counts in votes.items()
    }


R = TypeVar("R", ModelRecord, ServerRecord)


def owned_records(key: str, entry: Any, schema: type[R]) -> Iterator[tuple[PeerID, R, float]]:
    """The valid ``schema`` records under one DHT key, with their owners' peer ids: the one place where values
    read from the DHT are checked. Anything else (junk, records of another kind, unsigned entries) is skipped
    with one log line, so a bad peer's record never reaches the code that dials addresses or costs routes."""
    if entry is None:
        return
    if not isinstance(entry.value, dict):
        _log_skipped(key, "?", "the key holds a plain value, not one entry per peer")
        return
    for subkey, item in entry.value.items():
        peer_id = peer_id_from_subkey(subkey)
        try:
            value, expiration_time = item
            if peer_id is None:
                raise InvalidRecordError("not stored under <peer id>[owner:<key>] (unsigned or forged)")
            record = validate_record(value)
            if not isinstance(record, schema):
                raise InvalidRecordError(f"a {record.kind} record where a {schema.__name__} belongs")
        except (InvalidRecordError, TypeError, ValueError) as e:
            _log_skipped(key, str(peer_id) if peer_id is not None else repr(subkey)[:48], str(e))
            continue
        yield peer_id, record, expiration_time


_skipped_logged: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()


def _log_skipped(key: str, owner: str, reason: str) -> None:
    """One WARNING per bad record, not per read and block key: readers poll every block key every few seconds."""
    if (owner, reason) in _skipped_logged:
        logger.debug("Skipped an invalid DHT record under %s from %s: %s", key, owner, reason)
        return
    _skipped_logged[(owner, reason)] = None
    if len(_skipped_logged) > 4096:
        _skipped_logged.popitem(last=False)
    logger.warning("Skipped an invalid DHT record under %s from %s: %s", key, owner, reason)
