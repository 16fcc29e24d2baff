"""Per-session KV caches on a server, with limits so that no client can exhaust its memory."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from typing import AsyncIterator, Optional

import torch

from molink_swarm.models.cache import SpanCache
from molink_swarm.protocol.errors import ServerBusy
from molink_swarm.protocol.messages import ProtocolError, SessionSpec

logger = logging.getLogger(__name__)

MAX_WAITING_INPUTS = 4  # pushed inputs a session holds ahead of its steps (forwarding needs one or two)
MAX_UPSTREAMS = 4  # upstream servers a session accepts pushes from (the current one and a few replaced ones)
STEP_WAIT_S = 5.0  # how long a step waits for the session's previous one to end before it is refused


@dataclasses.dataclass
class Session:
    """One client's session on this server's blocks.

    Inputs may arrive by push (server-to-server forwarding) instead of with the step. Only the session's owner
    (the peer that opened it) and the upstream servers the owner named in its steps may push: a session id
    seen by others (every upstream server and relay learns one) gives them nothing.
    """

    spec: SessionSpec
    cache: SpanCache
    owner: str
    position: int = 0
    last_active: float = dataclasses.field(default_factory=time.monotonic)
    upstreams: list[str] = dataclasses.field(default_factory=list)
    inbox: dict[int, asyncio.Future] = dataclasses.field(default_factory=dict)  # step position -> its input
    _stepping: Optional[asyncio.Lock] = None  # held while a step is under way (see stepping)

    @contextlib.asynccontextmanager
    async def stepping(self, wait_s: float = STEP_WAIT_S) -> AsyncIterator[None]:
        """While one step of the session runs (from its own stream or a group step), so that no two passes ever
        touch its cache at once: a second step waits up to ``wait_s`` for the first to end (a group step the client
        gave up on ends when its stream closes, see handler.py), then is refused."""
        if self._stepping is None:
            self._stepping = asyncio.Lock()
        try:
            await asyncio.wait_for(self._stepping.acquire(), wait_s)
        except asyncio.TimeoutError:
            raise ProtocolError(f"A step of session {self.spec.session_id} is already under way") from None
        try:
            yield
        finally:
            self._stepping.release()

    def may_push(self, sender: str) -> bool:
        return sender == self.owner or sender in self.upstreams

    def allow_upstream(self, peer: str) -> None:
        if peer not in self.upstreams:
            self.upstreams = [*self.upstreams, peer][-MAX_UPSTREAMS:]

    def expect(self, position: int) -> asyncio.Future:
        """The input of the step at ``position``, whenever its push arrives (possibly already)."""
        future = self.inbox.get(position)
        if future is None:
            future = self.inbox[position] = asyncio.get_running_loop().create_future()
        return future

    def deliver(self, position: int, hidden: torch.Tensor) -> bool:
        """Hand over the input of step ``position`` (from an allowed sender); False if it is not needed: a copy
        was delivered already (the first copy wins), or the step has run. A step at an earlier position (a
        rollback) waits for its input first, so its push is taken too."""
        future = self.inbox.get(position)
        if future is None:
            if position < self.position:
                return False  # a late copy of an input already used
            if position >= self.spec.max_length:
                raise ProtocolError(f"Pushed position {position} is past the session's max_length")
            if len(self.inbox) >= MAX_WAITING_INPUTS:
                raise ProtocolError(f"Session already holds {MAX_WAITING_INPUTS} pushed inputs ahead of its steps")
            future = self.expect(position)
        if future.done():
            return False
        future.set_result(hidden)
        return True

    def stepped(self, position: int, tokens: int) -> None:
        """The step at ``position`` has run: its input and any older one are no longer needed."""
        self.position = position + tokens
        self.last_active = time.monotonic()
        for waiting in [p for p in self.inbox if p <= position or p < self.position]:
            del self.inbox[waiting]

    @property
    def reserved_tokens(self) -> int:
        return self.spec.max_length * self.spec.batch_size


class SessionTable:
    """Admits sessions while the server has cache tokens and session slots left.

    Capacity is reserved pessimistically (``max_length x batch_size`` tokens at open), so a session that was
    admitted can always run to its max_length: refusing at open is better than failing mid-generation. One peer
    may hold at most ``peer_share`` of the slots and of the cache, so that some always stay for others.
    """

    def __init__(self, *, max_sessions: int, cache_tokens: int, max_length: int, peer_share: float = 0.75):
        self.max_sessions = max_sessions
        self.cache_tokens = cache_tokens
        self.max_length = max_length
        self.peer_sessions = max(1, int(max_sessions * peer_share))
        self.peer_cache_tokens = max(1, int(cache_tokens * peer_share))
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def free_cache_tokens(self) -> int:
        return max(0, self.cache_tokens - sum(s.reserved_tokens for s in self._sessions.values()))

    def open(self, spec: SessionSpec, cache: SpanCache, owner: str) -> Session:
        if spec.session_id in self._sessions:
            raise ProtocolError(f"Session {spec.session_id} is already open")
        if spec.max_length > self.max_length:
            raise ProtocolError(f"max_length {spec.max_length} exceeds this server's limit of {self.max_length}")
        if len(self._sessions) >= self.max_sessions:
            raise ServerBusy(f"full ({self.max_sessions} sessions); try another server")
        needed = spec.max_length * spec.batch_size
        if needed > self.free_cache_tokens:
            raise ServerBusy(
                f"not enough cache: session needs {needed} tokens, {self.free_cache_tokens} free; try another server"
            )
        own = [s for s in self._sessions.values() if s.owner == owner]
        if len(own) >= self.peer_sessions:
            raise ServerBusy(f"your peer holds {len(own)} sessions here, the most one peer may; close some first")
        held = sum(s.reserved_tokens for s in own)
        if held + needed > self.peer_cache_tokens:
            raise ServerBusy(
                f"your peer would hold {held + needed} cache tokens here, over the {self.peer_cache_tokens} one peer "
                "may; close sessions or ask for a smaller max_length"
            )
        session = Session(spec, cache, owner)
        self._sessions[spec.session_id] = session
        return session

    def get(self, session_id: str) -> Optional[Session]:
        return self._sessions.get(session_id)

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


class EarlyPushes:
    """Pushes that cannot be delivered yet: their session is not open here yet (the previous server can be
    faster than the stream that opens it), or their sender is not yet named by the session's owner. They wait,
    bounded in count, bytes and time and per sender, until a step of the session claims them."""

    def __init__(self, *, max_items: int = 256, max_bytes: int = 64 << 20, ttl: float = 30.0, sender_share: float = 0.25):
        self.max_items, self.max_bytes, self.ttl = max_items, max_bytes, ttl
        self.sender_items, self.sender_bytes = max(1, int(max_items * sender_share)), int(max_bytes * sender_share)
        # (session id, position, sender) -> (input, expiry)
        self._items: collections.OrderedDict[tuple[str, int, str], tuple[torch.Tensor, float]] = collections.OrderedDict()
        self._bytes = 0
        self._by_sender: collections.Counter[str] = collections.Counter()
        self._bytes_by_sender: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._items)

    def keep(self, session_id: str, position: int, hidden: torch.Tensor, sender: str) -> None:
        self._expire()
        key = (session_id, position, sender)
        if key in self._items:
            return  # the first copy wins
        size = hidden.numel() * hidden.element_size()
        if self._by_sender[sender] >= self.sender_items or self._bytes_by_sender[sender] + size > self.sender_bytes:
            raise ProtocolError("Too many pushes from your peer wait for sessions that are not open; slow down")
        while self._items and (len(self._items) >= self.max_items or self._bytes + size > self.max_bytes):
            self._drop(next(iter(self._items)))
        self._items[key] = (hidden, time.monotonic() + self.ttl)
        self._bytes += size
        self._by_sender[sender] += 1
        self._bytes_by_sender[sender] += size

    def take(self, session_id: str, senders: set[str] | list[str]) -> list[tuple[int, torch.Tensor]]:
        """Remove and return ``(position, input)`` of the pushes kept for ``session_id`` from ``senders``."""
        self._expire()
        keys = [key for key in self._items if key[0] == session_id and key[2] in senders]
        taken = [(key[1], self._items[key][0]) for key in keys]
        for key in keys:
            self._drop(key)
        return taken

    def _drop(self, key: tuple[str, int, str]) -> None:
        hidden, _ = self._items.pop(key)
        size = hidden.numel() * hidden.element_size()
        self._bytes -= size
        sender = key[2]
        self._by_sender[sender] -= 1
        self._bytes_by_sender[sender] -= size
        if not self._by_sender[sender]:
            del self._by_sender[sender], self._bytes_by_sender[sender]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[1] < now:
            self._drop(next(iter(self._items)))
