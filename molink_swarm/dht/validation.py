"""DHT record validation: signatures (hivemind's RSA validator) plus our schema.

Every peer (bootstrap, servers, clients) runs the same validators, so a record is checked wherever it is
stored: values that claim to be ours must parse against the schema and must sit under a subkey that carries the
owner's public key, which hivemind's :class:`RSASignatureValidator` then uses to check the signature. A peer
can therefore neither overwrite another's record nor plant junk under our kind names.
"""

from __future__ import annotations

import logging

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from molink_swarm.dht.records import MODEL_RECORD_KIND, SERVER_RECORD_KIND, parse_record

logger = logging.getLogger(__name__)

_OUR_KINDS = {SERVER_RECORD_KIND.encode(), MODEL_RECORD_KIND.encode()}


class SwarmSchemaValidator(RecordValidatorBase):
    """Rejects records that claim one of our kinds but do not match the schema or are not owner-signed."""

    def validate(self, record: DHTRecord) -> bool:
        if not any(kind in record.value for kind in _OUR_KINDS):
            return True  # not ours (e.g. hivemind's own records): nothing to check
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception:  # malformed msgpack from the network: reject, don't crash the DHT
            logger.debug("Rejected an undecodable DHT record")
            return False
        if parse_record(value) is None:
            logger.debug("Rejected a DHT record that does not match the schema")
            return False
        # A complete "[owner:<key>]" marker: only then does the signature validator demand the owner's signature.
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS or not RSASignatureValidator._PUBLIC_KEY_RE.search(record.subkey):
            logger.debug("Rejected a DHT record without an owner key in its subkey")
            return False
        return True

    @property
    def priority(self) -> int:
        return 0  # runs after the signature validator has stripped the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmSchemaValidator)


def make_validators() -> tuple[RSASignatureValidator, SwarmSchemaValidator]:
    return RSASignatureValidator(), SwarmSchemaValidator()
