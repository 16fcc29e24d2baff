"""Decode steps first on each link: the client's gate in front of every server it sends prompt chunks to.

Why: one client process often runs many sessions over the same connections (the web app runs every chat in one
process). Bytes written to a connection leave in order, so a prompt chunk written just before a decode step
delays that step by the chunk's transmission time. Prompts therefore go in chunks that each cross the link in
about ``ChunkPolicy.target_s`` (chunking.py), and the gate lets a chunk onto a link only once the chunks before it
have crossed it (their bytes over the link's measured throughput): a decode step, which never waits, finds at
most one chunk ahead of it, however many prompts are under way (MoLink's chunked prefill transmission with decode
priority).

A chunk holds the link for its transmission only, not while its server computes it: the chunks of prompts that
start together reach a server together, and it computes them in one pass.

Until a link's throughput has been measured (from the answers to chunks, see chunking.py), a chunk holds it until
its answer comes back, so the next one goes on a measured link.

No I/O here: callers say how long their chunk occupies the link and send it when the gate says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Hashable, Optional


class LinkGate:
    def __init__(self):
        self._free_at: dict[Hashable, float] = {}  # when the chunks let onto each link have crossed it
        self._turns: dict[Hashable, asyncio.Lock] = {}  # chunks to a server take their turns first come first
        self.waited_s = 0.0  # time chunks spent waiting for a link (for benchmarks)

    @contextlib.asynccontextmanager
    async def prefill(self, peer: Hashable, link_s: Optional[float]) -> AsyncIterator[None]:
        """Wait until the link to ``peer`` has carried the chunks let onto it before this one; the block sends this
        chunk and waits for its answer. The chunk holds the link for ``link_s`` (its transmission time), or, with
        ``link_s`` None (a link not measured yet), until the block ends: the next chunk then goes on a measured link."""
        turn = self._turns.setdefault(peer, asyncio.Lock())
        await turn.acquire()
        held = True
        try:
            wait_s = self._free_at.get(peer, 0.0) - time.monotonic()
            if wait_s > 0:
                self.waited_s += wait_s
                await asyncio.sleep(wait_s)
            if link_s is not None:
                self._free_at[peer] = time.monotonic() + link_s
                turn.release()
                held = False
            yield
        finally:
            if held:
                turn.release()

    def busy_s(self, peer: Hashable) -> float:
        """How long the link to ``peer`` stays busy with the chunks let onto it."""
        return max(0.0, self._free_at.get(peer, 0.0) - time.monotonic())
