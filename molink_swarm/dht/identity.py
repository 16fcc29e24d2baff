"""One RSA key per server for both its libp2p identity and its DHT record signatures.

libp2p derives an RSA peer's id from its public key, and hivemind's signature validator puts the signing
public key in the record's subkey. Using the same key for both lets every peer check that the peer id a
record claims really belongs to the key that signed it: no peer can announce records in another's name.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Optional

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from molink_swarm.errors import UserError
from molink_swarm.peer_keys import peer_id_of_owner_key


class BadIdentityError(UserError):
    pass


def load_or_create_identity(path: Optional[str]) -> tuple[str, RSAPrivateKey]:
    """The identity file to give the p2p daemon, and its RSA key. Without ``path``, a fresh key for this run."""
    if path is None:
        folder = tempfile.mkdtemp(prefix="molink-identity-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = os.path.join(folder, "identity.key")
    if not os.path.exists(path):
        P2P.generate_identity(path)  # an RSA key, as a libp2p PrivateKey protobuf
    try:
        with open(path, "rb") as f:
            proto = crypto_pb2.PrivateKey.FromString(f.read())
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": proto.data})
    except Exception as e:  # unreadable or foreign key file: tell the user what to do
        raise BadIdentityError(
            f"--identity {path}: cannot use this key file ({e}); delete it to let molink-swarm create a new one"
        ) from None
    return path, key


def identity_key_of(validator: RSASignatureValidator, peer_id: PeerID) -> Optional[RSAPrivateKey]:
    """The RSA key that signs our records, if it is also the key of our peer id (as load_or_create_identity makes
    it): servers sign their end-to-end handshakes with it (protocol/e2e.py). hivemind offers no accessor."""
    key = validator._private_key
    return key if peer_id_of_owner_key(key.get_public_key().to_bytes()) == peer_id else None


def owner_key_in(subkey: bytes) -> Optional[bytes]:
    match = RSASignatureValidator._PUBLIC_KEY_RE.search(subkey)
    return match.group(1) if match else None
