"""DHT record validation: signatures (hivemind's RSA validator) plus our schema.

Every peer (bootstrap, servers, clients) runs the same validators, so a record is checked wherever it is
stored and again when a read returns it. The swarm's DHT holds nothing but our records, so every value must be
one: stored under a subkey that carries its owner's public key (which hivemind's
:class:`RSASignatureValidator` uses to check the signature), and parsing against the schema. A peer can
therefore neither overwrite another's record nor plant junk. Plain (subkey-less) values are refused outright:
in hivemind's storage one with a later expiration would replace the whole dictionary of records under its key.
"""

from __future__ import annotations

import logging
from typing import Optional

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from molink_swarm.dht.identity import owner_key_in
from molink_swarm.dht.records import parse_record
from molink_swarm.peer_keys import peer_id_of_owner_key

logger = logging.getLogger(__name__)


class SwarmSchemaValidator(RecordValidatorBase):
    """Accepts only owner-signed records of ours that match the schema (see the module's docstring)."""

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            logger.debug("Rejected a plain DHT value (every record of the swarm sits under its owner's subkey)")
            return False
        try:
            value = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # malformed msgpack from the network: reject, don't crash the DHT
            logger.debug("Rejected an undecodable DHT record")
            return False
        if peer_id_from_subkey(subkey) is None:
            logger.debug("Rejected a DHT record whose subkey is not <peer id of the owner key>[owner:<key>]")
            return False
        if parse_record(value) is None:
            logger.debug("Rejected a DHT record that does not match the schema")
            return False
        return True

    @property
    def priority(self) -> int:
        return 0  # runs after the signature validator has stripped the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmSchemaValidator)


def peer_id_from_subkey(subkey: object) -> Optional[PeerID]:
    """The peer id of a record's owner: the subkey must be exactly ``<peer id>[owner:<key>]``, where the peer id
    is the one libp2p derives from that key (the signature validator has checked the record is signed by it)."""
    if not isinstance(subkey, bytes):
        return None
    owner_key = owner_key_in(subkey)
    if owner_key is None:
        return None
    peer_id = peer_id_of_owner_key(owner_key)
    if peer_id is None or subkey != owner_subkey_bytes(peer_id, owner_key):
        return None
    return peer_id


def owner_subkey_bytes(peer_id: PeerID, owner_key: bytes) -> bytes:
    return peer_id.to_base58().encode() + RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", owner_key)


def make_validators(private_key: Optional[RSAPrivateKey] = None) -> tuple[RSASignatureValidator, SwarmSchemaValidator]:
    return RSASignatureValidator(private_key), SwarmSchemaValidator()
