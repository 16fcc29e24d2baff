"""Decode steps first on each link: the client's gate in front of every server it sends prompt chunks to.

Why: one client process often runs many sessions over the same connections (the web app runs every chat in one
process). Bytes written to a connection leave in order, so a prompt chunk written just before a decode step
delays that step by the chunk's transmission time. The gate holds a chunk back while a decode step to that
server is under way (about to be sent, or sent and not answered by that server yet), and lets it go once none
is: then every session decoding through that server waits for the rest of its chain, so the link stays quiet
for a while. So that a steady stream of decode steps cannot starve a prompt, a chunk that has waited ``slack_s``
goes anyway. Decode steps never wait. Chunks to one server go one at a time, in the order they came: with two
prompts at once, a decode step still finds at most one chunk ahead of it.

No I/O here: callers say when decode steps start and end, and ask for a prefill turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator, Callable, Hashable, Iterable, Iterator


class LinkGate:
    def __init__(self, slack_s: float = 0.05):
        self.slack_s = slack_s
        self.forced = 0  # chunks that went after waiting slack_s, a decode step still under way (starvation bound)
        self._decoding: collections.Counter[Hashable] = collections.Counter()
        self._quiet: dict[Hashable, asyncio.Event] = {}  # set when the last decode step to a peer ends
        self._turns: dict[Hashable, asyncio.Lock] = {}  # one prefill chunk per peer at a time, first come first

    def decoding_to(self, peer: Hashable) -> int:
        return self._decoding[peer]

    @contextlib.contextmanager
    def decode(self, peers: Iterable[Hashable]) -> Iterator[Callable[[Hashable], None]]:
        """A decode step to ``peers`` is under way until the block ends, or until the block calls the function it
        gets with a peer (that peer has answered)."""
        pending = collections.Counter(peers)
        self._decoding.update(pending)

        def answered(peer: Hashable) -> None:
            if pending[peer] > 0:
                pending[peer] -= 1
                self._end([peer])

        try:
            yield answered
        finally:
            self._end(list(pending.elements()))

    def _end(self, peers: list[Hashable]) -> None:
        self._decoding.subtract(peers)
        for peer in set(peers):
            if self._decoding[peer] <= 0:
                self._decoding.pop(peer, None)
                quiet = self._quiet.pop(peer, None)
                if quiet is not None:
                    quiet.set()

    @contextlib.asynccontextmanager
    async def prefill(self, peer: Hashable) -> AsyncIterator[None]:
        """Wait for this chunk's turn to ``peer``; the block sends it and waits for its answer."""
        turn = self._turns.setdefault(peer, asyncio.Lock())
        async with turn:
            await self._wait_quiet(peer)
            yield

    async def _wait_quiet(self, peer: Hashable) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.slack_s
        while self._decoding[peer] > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.forced += 1
                return
            quiet = self._quiet.setdefault(peer, asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(quiet.wait(), remaining)
