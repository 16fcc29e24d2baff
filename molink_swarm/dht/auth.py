"""The swarm key on DHT requests and answers (private swarms; molink_swarm/swarm_key.py has the whole design).

hivemind's DHT protocol takes an ``authorizer`` (hivemind.utils.auth): its RPC wrapper has it sign every request
the node sends and check every answer, and check every request the node serves and sign the answer. We give it
:class:`SwarmKeyAuthorizer`, whose signature is an HMAC of the swarm key. hivemind's wrapper hands the authorizer
the message alone, though, so a proof could not name the two peers it passes between, and a peer without the
key that received one of our requests (one we dialled) could replay it to another peer within the freshness
window. :class:`PeerBoundAuthRPCWrapper` also hands it the caller's and the receiver's peer ids (which libp2p
authenticated), so that each proof holds between those two peers only. It takes the place of hivemind's wrapper
in hivemind.dht.protocol, and behaves exactly like it with any other authorizer, or none (a public swarm).

A request without a valid proof is refused before the DHT looks at it (no routing-table update, no lookup,
nothing stored), with an error naming ``--swarm-key``; an answer without one counts as no answer.
"""

from __future__ import annotations

import functools
import hmac
import logging
import secrets
import time
from typing import Any, Optional

import hivemind.dht.protocol
from hivemind.p2p import P2PContext, PeerID
from hivemind.utils.auth import AuthorizerBase, AuthRole, AuthRPCWrapper

from molink_swarm.swarm_key import FRESHNESS_S, ReplayGuard, SwarmKey, mac

logger = logging.getLogger(__name__)

NONCE_BYTES = 16


class SwarmKeyRefused(PermissionError):
    """A DHT request without a valid proof of the swarm key (its text reaches the caller)."""


class SwarmKeyAuthorizer(AuthorizerBase):
    """Signs and checks DHT messages with an HMAC of the swarm key, bound to the peers at both ends.

    The proof sits in the messages' own ``auth`` field (hivemind's ``RequestAuthInfo``/``ResponseAuthInfo``):
    ``time`` and ``nonce`` as hivemind's token authorizer uses them, and ``signature`` = HMAC over the direction,
    the method, both peer ids and the whole message (time and nonce included) with an empty signature.
    """

    def __init__(self, key: SwarmKey, window_s: float = FRESHNESS_S):
        self.fingerprint = key.fingerprint
        self._key = key.derive("dht")
        self.replays = ReplayGuard(window_s)

    # hivemind's own interface gives no peer ids: only PeerBoundAuthRPCWrapper may use this authorizer, and should
    # a hivemind version bypass it, every call fails (a closed door) rather than going out unbound.
    async def sign_request(self, request: Any, service_public_key: Any) -> None:
        raise RuntimeError("SwarmKeyAuthorizer needs the peer ids (molink_swarm.dht.auth.PeerBoundAuthRPCWrapper)")

    async def validate_request(self, request: Any) -> bool:
        return False

    async def sign_response(self, response: Any, request: Any) -> None:
        raise RuntimeError("SwarmKeyAuthorizer needs the peer ids (molink_swarm.dht.auth.PeerBoundAuthRPCWrapper)")

    async def validate_response(self, response: Any, request: Any) -> bool:
        return False

    # ---- with the peers at both ends

    def sign_request_between(self, request: Any, method: str, caller: PeerID, receiver: PeerID) -> None:
        request.ClearField("auth")
        request.auth.time = time.time()
        request.auth.nonce = secrets.token_bytes(NONCE_BYTES)
        request.auth.signature = self._mac(b"request", method, caller, receiver, request)

    def check_request_between(
        self, request: Any, method: str, caller: PeerID, receiver: PeerID, now: Optional[float] = None
    ) -> Optional[str]:
        """None if ``caller`` proved the key for this very request to us, else why not."""
        if not request.HasField("auth") or not request.auth.signature:
            return "this DHT belongs to a private swarm: pass --swarm-key PATH (the swarm's key file) to join it"
        if not self._signed(request, self._mac(b"request", method, caller, receiver, request)):
            return "the request's proof does not match this private swarm's key (another --swarm-key?)"
        return self.replays.admit(request.auth.time, request.auth.nonce, now)

    def sign_response_between(self, response: Any, request: Any, method: str, caller: PeerID, receiver: PeerID) -> None:
        response.ClearField("auth")
        response.auth.nonce = request.auth.nonce  # the answer to this request, and to no other
        response.auth.signature = self._mac(b"response", method, caller, receiver, response)

    def check_response_between(self, response: Any, request: Any, method: str, caller: PeerID, receiver: PeerID) -> bool:
        if response is None or not response.HasField("auth") or response.auth.nonce != request.auth.nonce:
            return False
        return self._signed(response, self._mac(b"response", method, caller, receiver, response))

    def _mac(self, direction: bytes, method: str, caller: PeerID, receiver: PeerID, message: Any) -> bytes:
        signature = message.auth.signature
        message.auth.signature = b""
        try:
            body = message.SerializeToString(deterministic=True)
        finally:
            message.auth.signature = signature
        return mac(self._key, direction, method.encode(), caller.to_bytes(), receiver.to_bytes(), body)

    @staticmethod
    def _signed(message: Any, expected: bytes) -> bool:
        return hmac.compare_digest(expected, message.auth.signature)


class PeerBoundAuthRPCWrapper(AuthRPCWrapper):
    """hivemind's AuthRPCWrapper, which also tells a :class:`SwarmKeyAuthorizer` the peers at both ends."""

    def __getattribute__(self, name: str):
        if not name.startswith("rpc_"):
            return object.__getattribute__(self, name)
        authorizer = object.__getattribute__(self, "_authorizer")
        if not isinstance(authorizer, SwarmKeyAuthorizer):
            return super().__getattribute__(name)
        stub = object.__getattribute__(self, "_stub")
        method = getattr(stub, name)
        if object.__getattribute__(self, "_role") == AuthRole.CLIENT:
            caller, receiver = stub._p2p.peer_id, stub._peer

            @functools.wraps(method)
            async def call(request: Any, *args, **kwargs):
                authorizer.sign_request_between(request, name, caller, receiver)
                response = await method(request, *args, **kwargs)
                if not authorizer.check_response_between(response, request, name, caller, receiver):
                    logger.debug("%s from %s did not prove the swarm key: ignored", name, receiver)
                    return None  # as hivemind's wrapper does: no valid answer
                return response

            return call

        @functools.wraps(method)
        async def serve(request: Any, context: P2PContext, *args, **kwargs):
            reason = authorizer.check_request_between(request, name, context.remote_id, context.local_id)
            if reason is not None:
                logger.debug("Refused DHT %s from %s: %s", name, context.remote_id, reason)
                raise SwarmKeyRefused(f"Refused by a private swarm peer: {reason}")
            response = await method(request, context, *args, **kwargs)
            authorizer.sign_response_between(response, request, name, context.remote_id, context.local_id)
            return response

        return serve


def _install() -> None:
    """hivemind's DHT protocol builds its wrappers with the name ``AuthRPCWrapper`` of its module: ours then."""
    if hivemind.dht.protocol.AuthRPCWrapper is AuthRPCWrapper:
        hivemind.dht.protocol.AuthRPCWrapper = PeerBoundAuthRPCWrapper


_install()
