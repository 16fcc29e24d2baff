"""Per-session KV caches on a server, with limits so that no client can exhaust its memory."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Optional

import torch

from molink_swarm.models.family import SpanCache
from molink_swarm.wire import ProtocolError, SessionSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Session:
    spec: SessionSpec
    cache: SpanCache
    peer: str
    position: int = 0
    last_active: float = dataclasses.field(default_factory=time.monotonic)
    # Inputs pushed by the previous server (or the client), by step position; the first push wins.
    inbox: dict[int, asyncio.Future] = dataclasses.field(default_factory=dict)

    def pushed_input(self, position: int) -> asyncio.Future:
        future = self.inbox.get(position)
        if future is None:
            if len(self.inbox) > 64:
                raise ProtocolError("Too many pushed inputs waiting for this session")
            future = self.inbox[position] = asyncio.get_running_loop().create_future()
        return future

    def deliver(self, position: int, hidden: torch.Tensor) -> bool:
        """Hand over the input of step ``position``; False if one was already delivered (the first copy wins)."""
        if position < self.position:
            return False  # a late duplicate of an input already used
        future = self.pushed_input(position)
        if future.done():
            return False
        future.set_result(hidden)
        return True

    @property
    def reserved_tokens(self) -> int:
        return self.spec.max_length * self.spec.batch_size


class SessionTable:
    """Admits sessions while the server has cache tokens and session slots left.

    Capacity is reserved pessimistically (``max_length x batch_size`` tokens at open), so a session that was
    admitted can always run to its max_length: refusing at open is better than failing mid-generation.
    """

    def __init__(self, *, max_sessions: int, cache_tokens: int, max_length: int):
        self.max_sessions = max_sessions
        self.cache_tokens = cache_tokens
        self.max_length = max_length
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def free_cache_tokens(self) -> int:
        return max(0, self.cache_tokens - sum(s.reserved_tokens for s in self._sessions.values()))

    def open(self, spec: SessionSpec, cache: SpanCache, peer: str) -> Session:
        if spec.session_id in self._sessions:
            raise ProtocolError(f"Session {spec.session_id} is already open")
        if spec.max_length > self.max_length:
            raise ProtocolError(f"max_length {spec.max_length} exceeds this server's limit of {self.max_length}")
        if len(self._sessions) >= self.max_sessions:
            raise ProtocolError(f"Server is full ({self.max_sessions} sessions); try another server")
        needed = spec.max_length * spec.batch_size
        if needed > self.free_cache_tokens:
            raise ProtocolError(
                f"Not enough cache: session needs {needed} tokens, {self.free_cache_tokens} free; try another server"
            )
        session = Session(spec, cache, peer)
        self._sessions[spec.session_id] = session
        return session

    def get(self, session_id: str) -> Optional[Session]:
        return self._sessions.get(session_id)

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


class EarlyPushes:
    """Pushes that arrive before their session is open: the previous server can be faster than the stream
    that opens the session here. They wait (bounded in count, bytes and time) until the session opens."""

    def __init__(self, *, max_items: int = 256, max_bytes: int = 64 << 20, ttl: float = 30.0):
        self.max_items, self.max_bytes, self.ttl = max_items, max_bytes, ttl
        self._items: collections.OrderedDict[tuple[str, int], tuple[torch.Tensor, str, float]] = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, session_id: str, position: int, hidden: torch.Tensor, sender: str) -> None:
        self._expire()
        key = (session_id, position)
        if key in self._items:
            return  # the first copy wins
        size = hidden.numel() * hidden.element_size()
        if size > self.max_bytes:
            return
        while self._items and (len(self._items) >= self.max_items or self._bytes + size > self.max_bytes):
            self._drop(next(iter(self._items)))
        self._items[key] = (hidden, sender, time.monotonic() + self.ttl)
        self._bytes += size

    def take(self, session_id: str) -> list[tuple[int, torch.Tensor, str]]:
        """Remove and return ``(position, hidden, sender)`` of every push kept for ``session_id``."""
        self._expire()
        keys = [key for key in self._items if key[0] == session_id]
        taken = [(key[1], *self._items[key][:2]) for key in keys]
        for key in keys:
            self._drop(key)
        return taken

    def _drop(self, key: tuple[str, int]) -> None:
        hidden, _, _ = self._items.pop(key)
        self._bytes -= hidden.numel() * hidden.element_size()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[2] < now:
            self._drop(next(iter(self._items)))
