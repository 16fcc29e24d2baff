"""Choosing the chain of servers for a session (pure logic, no I/O).

The model's blocks are positions ``0..N``; a server holding blocks ``start..end-1`` can take a session from any
position ``b`` in its span to ``end``. A chain's latency per step is the compute time of its blocks plus the
network: in *forwarding* mode one one-way trip client -> first server, one per server -> next server (RTTs the
servers measure and announce), and one from the last server back; in *relayed* mode (the client talks to each
server in turn) a full client round trip per hop. Links nobody measured are estimated from the client's RTTs.

Positions only move forward, so the cheapest chain is a shortest path in a DAG: one pass over the positions in
order. The state is "arrived at position p having left server s"; for each position the best arrival over
unmeasured links is shared by every next server (the estimate separates into a part per side), so a step costs
O(servers covering p + announced links), which keeps 1,000 servers well under 50 ms.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Hashable, Iterable, Literal, Mapping, Optional, Sequence

DEFAULT_RTT_S = 0.1  # assumed for a server we have not pinged yet: pessimistic, so measured servers win
UNREACHABLE_RTT_S = 10.0  # for a server whose ping failed: chained only where no other server holds its blocks
Mode = Literal["forwarding", "relayed", "throughput"]


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
    next_rtts: Mapping[Hashable, float] = dataclasses.field(default_factory=dict)  # announced: next peer -> RTT


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


def _sane(candidate: Candidate) -> bool:
    """Figures a real server can have. Records are checked when read, but the planner does not rely on it: a
    NaN or infinite figure would otherwise make the candidate look free, or break every comparison."""
    figures = [candidate.throughput, candidate.load] + ([] if candidate.rtt_s is None else [candidate.rtt_s])
    return all(math.isfinite(x) and x >= 0 for x in figures) and (
        candidate.free_cache_tokens is None or candidate.free_cache_tokens >= 0
    )


def _sane_link(rtt: float) -> bool:
    return math.isfinite(rtt) and rtt >= 0


def _rtt(candidate: Candidate) -> float:
    return DEFAULT_RTT_S if candidate.rtt_s is None else candidate.rtt_s


def compute_cost(candidate: Candidate, num_blocks: int, tokens: int = 1) -> float:
    """Seconds of compute for ``num_blocks`` of this server, inflated as its session slots fill up."""
    compute = tokens * num_blocks / max(candidate.throughput, 1e-3)
    return compute * (1.0 + 2.0 * min(max(candidate.load, 0.0), 1.0))


def plan_chain(
    num_blocks: int,
    candidates: Iterable[Candidate],
    *,
    start: int = 0,
    end: Optional[int] = None,
    banned: Iterable[Hashable] = (),
    allowed: Optional[Iterable[Hashable]] = None,
    min_cache_tokens: int = 0,
    mode: Mode = "relayed",
    tokens: int = 1,
    rng: Optional[random.Random] = None,
) -> list[Hop]:
    """The cheapest chain covering blocks ``start..end-1``; raises MissingBlocksError if impossible.

    ``mode="throughput"`` (for forward passes) weighs compute and load over latency and adds a little jitter so
    that concurrent requests spread over replicas instead of piling on one.
    """
    end = num_blocks if end is None else end
    banned = set(banned)
    allowed = None if allowed is None else set(allowed)
    rng = rng or random.Random()
    # Per candidate, computed once: (candidate, half of its client RTT, compute seconds per block).
    covering: list[list[tuple[Candidate, float, float]]] = [[] for _ in range(num_blocks)]
    for c in candidates:
        if c.peer_id in banned or (allowed is not None and c.peer_id not in allowed) or c.end <= c.start:
            continue
        if not _sane(c):
            continue
        if c.free_cache_tokens is not None and c.free_cache_tokens < min_cache_tokens:
            continue
        per_block = compute_cost(c, 1, tokens)
        if mode == "throughput":
            per_block *= 1.0 + 2.0 * c.load
        entry = (c, _rtt(c) / 2, per_block)
        for block in range(max(c.start, start), min(c.end, end)):
            covering[block].append(entry)

    def half(c: Candidate) -> float:
        return _rtt(c) / 2

    # arrivals[p]: for each server whose span ends at p, the best cost of a chain leaving it there.
    arrivals: list[dict[Hashable, tuple[float, Candidate]]] = [{} for _ in range(end + 1)]
    back: dict[tuple[Hashable, int], tuple[Optional[tuple[Hashable, int]], int]] = {}
    for position in range(start, end):
        announced_in: dict[Hashable, tuple[float, Hashable]] = {}
        if position == start:
            default_in, default_via = 0.0, None
        else:
            if not arrivals[position]:
                continue
            # Entering the next server over an unmeasured link: relayed through the client, or estimated so.
            cost, prev = min(arrivals[position].values(), key=lambda item: item[0] + half(item[1]))
            default_in, default_via = cost + half(prev), prev.peer_id
            if mode == "forwarding":
                for cost, prev in arrivals[position].values():
                    for peer, rtt in prev.next_rtts.items():
                        if not _sane_link(rtt):
                            continue
                        entry = cost + rtt / 2
                        if entry < announced_in.get(peer, (math.inf, None))[0]:
                            announced_in[peer] = (entry, prev.peer_id)
        for c, half_c, per_block in covering[position]:
            stop = c.end if c.end < end else end
            into, via = default_in + half_c, default_via
            announced = announced_in.get(c.peer_id)
            if announced is not None and announced[0] < into:
                into, via = announced
            compute = per_block * (stop - position)
            if mode == "throughput":
                total = 0.1 * into + compute * rng.uniform(1.0, 1.25)
            else:
                total = into + compute
            best = arrivals[stop].get(c.peer_id)
            if best is None or total < best[0]:
                arrivals[stop][c.peer_id] = (total, c)
                back[(c.peer_id, stop)] = (None if via is None else (via, position), position)

    finals = [(cost + (0.1 if mode == "throughput" else 1.0) * half(c), c) for cost, c in arrivals[end].values()]
    if not finals:
        reached = [p for p in range(start, end + 1) if p == start or arrivals[p]]
        frontier = max(reached)
        missing = [b for b in range(frontier, end) if not covering[b]] or [frontier]
        raise MissingBlocksError(missing)

    _, last = min(finals, key=lambda item: item[0])
    hops: list[Hop] = []
    key: Optional[tuple[Hashable, int]] = (last.peer_id, end)
    while key is not None:
        previous, entry = back[key]
        hops.append(Hop(key[0], entry, key[1]))
        key = previous
    return hops[::-1]
