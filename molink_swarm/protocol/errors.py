"""The error a peer's invalid request gets back."""


class ProtocolError(Exception):
    """The peer sent something invalid; the message is sent back to it verbatim."""


BUSY = "Server busy: "


class ServerBusy(ProtocolError):
    """The request was fine but the server has no room for it now (sessions, cache, its share for one peer): a
    client tries another server or waits, and does not count it as a failure."""

    def __init__(self, reason: str):
        super().__init__(BUSY + reason)


def is_busy(error: BaseException) -> bool:
    """Whether ``error`` (raised here or received from a peer, where only its text travels) is a ServerBusy."""
    return BUSY in str(error)
