"""Proofs of the swarm key on our RPCs (private swarms; see molink_swarm/swarm_key.py for the whole design).

In a private swarm every call of a :class:`~molink_swarm.protocol.streams.GuardedServicer` RPC starts with a
proof from the caller, and every answer with one from the server:

- a unary call's request and reply bytes are ``proof + protobuf``;
- a stream's first frame, each way, is a proof frame (marker 2), before any message.

A proof is :data:`PROOF_BYTES` bytes: a magic prefix, a timestamp, a random nonce and an HMAC over them, the
method, and the caller's and receiver's peer ids (a reply's also over its request's nonce). The prefix begins
with a zero byte, which no protobuf message can begin with: a peer without the key fails to parse a keyed
request instead of misreading it.
"""

from __future__ import annotations

import hmac
import secrets
import struct
import time
from typing import Optional

from hivemind.p2p import P2P, PeerID

from molink_swarm.protocol.errors import ProtocolError
from molink_swarm.swarm_key import FRESHNESS_S, ReplayGuard, SwarmKey, key_of_daemon, mac, timestamp_bytes

MAGIC = b"\x00msk1"
NONCE_BYTES = 16
PROOF_BYTES = len(MAGIC) + 8 + NONCE_BYTES + 32

PRIVATE_SWARM_HINT = "This peer belongs to a private swarm: pass --swarm-key PATH (the swarm's key file) to use it"


class SwarmKeyRefused(ProtocolError):
    """A request without a valid proof of the swarm key; its message goes back to the caller."""


class RpcAuth:
    """Makes and checks the proofs of one swarm key (one per key and process: its replay guard is shared)."""

    def __init__(self, key: SwarmKey, window_s: float = FRESHNESS_S):
        self.fingerprint = key.fingerprint
        self._key = key.derive("rpc")
        self.replays = ReplayGuard(window_s)

    def request_proof(self, method: str, caller: PeerID, receiver: PeerID) -> bytes:
        return self._proof(b"request", method, caller, receiver, b"")

    def check_request(self, proof: bytes, method: str, caller: PeerID, receiver: PeerID, now: Optional[float] = None) -> bytes:
        """The request's nonce (to bind the reply to), or :class:`SwarmKeyRefused` saying why not."""
        timestamp, nonce = self._verify(proof, b"request", method, caller, receiver, b"")
        reason = self.replays.admit(timestamp, nonce, now)
        if reason is not None:
            raise SwarmKeyRefused(f"Refused by a private swarm peer: {reason}")
        return nonce

    def reply_proof(self, method: str, caller: PeerID, receiver: PeerID, request_nonce: bytes) -> bytes:
        return self._proof(b"reply", method, caller, receiver, request_nonce)

    def check_reply(self, proof: bytes, method: str, caller: PeerID, receiver: PeerID, request_nonce: bytes) -> None:
        """Raises :class:`SwarmKeyRefused` unless ``receiver`` answered our request ``request_nonce`` with the key.

        No freshness check: the proof names our own request's nonce, which is fresh and ours alone."""
        try:
            self._verify(proof, b"reply", method, caller, receiver, request_nonce)
        except SwarmKeyRefused:
            raise SwarmKeyRefused(
                f"{receiver} did not prove that it holds this swarm's key (key {self.fingerprint}): "
                "it is not a peer of this private swarm"
            ) from None

    def _proof(self, direction: bytes, method: str, caller: PeerID, receiver: PeerID, request_nonce: bytes) -> bytes:
        stamp, nonce = timestamp_bytes(time.time()), secrets.token_bytes(NONCE_BYTES)
        digest = mac(self._key, direction, method.encode(), caller.to_bytes(), receiver.to_bytes(), request_nonce, stamp, nonce)
        return MAGIC + stamp + nonce + digest

    def _verify(
        self, proof: bytes, direction: bytes, method: str, caller: PeerID, receiver: PeerID, request_nonce: bytes
    ) -> tuple[float, bytes]:
        if len(proof) != PROOF_BYTES or not proof.startswith(MAGIC):
            raise SwarmKeyRefused(PRIVATE_SWARM_HINT)
        stamp = proof[len(MAGIC) : len(MAGIC) + 8]
        nonce = proof[len(MAGIC) + 8 : len(MAGIC) + 8 + NONCE_BYTES]
        expected = mac(self._key, direction, method.encode(), caller.to_bytes(), receiver.to_bytes(), request_nonce, stamp, nonce)
        if not hmac.compare_digest(expected, proof[-32:]):
            raise SwarmKeyRefused(
                "Refused by a private swarm peer: the proof does not match its swarm key (another --swarm-key?)"
            )
        return struct.unpack(">d", stamp)[0], nonce


_auths: dict[SwarmKey, RpcAuth] = {}


def auth_of(p2p: P2P) -> Optional[RpcAuth]:
    """How calls over ``p2p`` are signed and checked: None in a public swarm (no key for its daemon)."""
    key = key_of_daemon(p2p.daemon_listen_maddr)
    if key is None:
        return None
    if key not in _auths:
        _auths[key] = RpcAuth(key)
    return _auths[key]


def nonce_of(proof: bytes) -> bytes:
    start = len(MAGIC) + 8
    return proof[start : start + NONCE_BYTES]


def split_proof(data: bytes) -> tuple[bytes, bytes]:
    """``(proof, rest)`` of a unary message's bytes."""
    return data[:PROOF_BYTES], data[PROOF_BYTES:]
