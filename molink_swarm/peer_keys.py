"""Peer ids of RSA keys, shared by the DHT (records are signed by the peer that owns them) and the wire protocol
(servers sign the end-to-end handshakes of relayed streams with the same key)."""

from __future__ import annotations

import functools
import hashlib
from typing import Optional

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPublicKey


@functools.lru_cache(maxsize=4096)
def peer_id_of_owner_key(owner_key: bytes) -> Optional[PeerID]:
    """The libp2p peer id of an RSA public key in OpenSSH form (as found in "[owner:...]"), or None if invalid."""
    try:
        public = RSAPublicKey.from_bytes(owner_key)._public_key
    except Exception:  # junk from the network
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))
