"""The error a peer's invalid request gets back."""


class ProtocolError(Exception):
    """The peer sent something invalid; the message is sent back to it verbatim."""
