"""Errors the user can cause: each message says what to do. The CLI prints them as one line."""

from typing import Sequence


class UserError(Exception):
    """An error the user caused; the CLI prints str(e) as one line and exits 1. The message says what to do."""


class ModelNotFoundError(UserError):
    pass


class NoPeersReachableError(UserError):
    pass


def peers_unreachable(initial_peers: Sequence[str], error: Exception) -> NoPeersReachableError:
    return NoPeersReachableError(
        f"Could not reach any of the initial peers ({', '.join(initial_peers)}): {error}. "
        "Check the addresses printed by `molink-swarm dht` and that the bootstrap peer is running."
    )
