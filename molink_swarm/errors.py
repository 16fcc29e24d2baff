"""Errors the user can cause: each message says what to do. The CLI prints them as one line."""

from typing import Optional, Sequence


class UserError(Exception):
    """An error the user caused; the CLI prints str(e) as one line and exits 1. The message says what to do."""


class ModelNotFoundError(UserError):
    pass


class NoPeersReachableError(UserError):
    pass


def peers_unreachable(
    initial_peers: Sequence[str], error: Exception, swarm_key_fingerprint: Optional[str] = None
) -> NoPeersReachableError:
    """``swarm_key_fingerprint``: the key this peer tried to join with (None: none, a public swarm)."""
    if "bootstrap failed" in str(error):  # connected, but no peer answered our DHT requests: another swarm's peers
        if swarm_key_fingerprint is None:
            why = "none of them answered as a peer of this swarm. The swarm may be private: pass --swarm-key PATH"
        else:
            why = (
                f"none of them answered as a peer of the private swarm of key {swarm_key_fingerprint}. "
                "They may use another --swarm-key (or none), or their clocks differ from this one by over a minute"
            )
        return NoPeersReachableError(f"Could not join the swarm through the initial peers ({', '.join(initial_peers)}): {why}.")
    return NoPeersReachableError(
        f"Could not reach any of the initial peers ({', '.join(initial_peers)}): {error}. "
        "Check the addresses printed by `molink-swarm dht` and that the bootstrap peer is running."
    )
