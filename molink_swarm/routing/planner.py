"""Choosing the chain of servers for a session (pure logic, no I/O).

The model's blocks are positions ``0..N``; a server holding blocks ``start..end-1`` can take a session from any
position ``b`` in its span to ``end``. Each such hop costs the round trip to the server plus the compute time
of the blocks it runs, plus a penalty when the server is busy. Positions only move forward, so the cheapest
chain is a shortest path in a DAG, found by one pass of dynamic programming over the positions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Iterable, Optional, Sequence

DEFAULT_RTT_S = 0.1  # assumed for a server we have not pinged yet: pessimistic, so measured servers win


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A server the planner may use."""

    peer_id: Hashable
    start: int
    end: int
    throughput: float  # tokens/s through one block
    rtt_s: Optional[float] = None  # client <-> server round trip; None if not measured
    load: float = 0.0  # fraction of session slots in use, 0..1
    free_cache_tokens: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Hop:
    peer_id: Hashable
    start: int
    end: int


class MissingBlocksError(Exception):
    def __init__(self, missing: Sequence[int]):
        self.missing = list(missing)
        super().__init__(f"No server holds blocks {format_blocks(self.missing)}")


def format_blocks(blocks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0:3, 5:6" (half-open ranges, like --blocks)."""
    ranges, start, prev = [], None, None
    for block in sorted(blocks):
        if start is None:
            start = prev = block
        elif block == prev + 1:
            prev = block
        else:
            ranges.append(f"{start}:{prev + 1}")
            start = prev = block
    if start is not None:
        ranges.append(f"{start}:{prev + 1}")
    return ", ".join(ranges)


def hop_cost(candidate: Candidate, num_blocks: int, tokens: int = 1) -> float:
    rtt = DEFAULT_RTT_S if candidate.rtt_s is None else candidate.rtt_s
    compute = tokens * num_blocks / max(candidate.throughput, 1e-3)
    # A busy server will make us wait behind other sessions: inflate its compute time as its slots fill.
    return rtt + compute * (1.0 + 2.0 * min(max(candidate.load, 0.0), 1.0))


def plan_chain(
    num_blocks: int,
    candidates: Iterable[Candidate],
    *,
    start: int = 0,
    end: Optional[int] = None,
    banned: Iterable[Hashable] = (),
    min_cache_tokens: int = 0,
) -> list[Hop]:
    """The lowest-latency chain covering blocks ``start..end-1``; raises MissingBlocksError if impossible."""
    end = num_blocks if end is None else end
    banned = set(banned)
    covering: list[list[Candidate]] = [[] for _ in range(num_blocks)]
    for c in candidates:
        if c.peer_id in banned or c.end <= c.start:
            continue
        if c.free_cache_tokens is not None and c.free_cache_tokens < min_cache_tokens:
            continue
        for block in range(max(c.start, start), min(c.end, end)):
            covering[block].append(c)

    best = [math.inf] * (end + 1)
    via: list[Optional[tuple[int, Candidate]]] = [None] * (end + 1)
    best[start] = 0.0
    for position in range(start, end):
        if best[position] == math.inf:
            continue
        for c in covering[position]:
            stop = min(c.end, end)
            cost = best[position] + hop_cost(c, stop - position)
            if cost < best[stop]:
                best[stop], via[stop] = cost, (position, c)

    if best[end] == math.inf:
        reachable = max(p for p in range(start, end + 1) if best[p] < math.inf)
        missing = [b for b in range(reachable, end) if not covering[b]] or [reachable]
        raise MissingBlocksError(missing)

    hops: list[Hop] = []
    position = end
    while position != start:
        previous, c = via[position]
        hops.append(Hop(c.peer_id, previous, position))
        position = previous
    return hops[::-1]
