"""What a failing server looks like from the client; anything else is a bug and propagates."""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2PDaemonError, P2PHandlerError

from molink_swarm.protocol.errors import ProtocolError

SERVER_FAILURES = (
    P2PHandlerError,
    P2PDaemonError,
    ConnectionError,
    OSError,
    EOFError,
    asyncio.TimeoutError,
    asyncio.IncompleteReadError,
    ProtocolError,
)
