"""Which blocks each server should hold (pure logic, no I/O): placement at join time and rebalancing.

The model of a swarm: a server holding ``k`` blocks passes ``min(compute / k, network)`` tokens/s through each of
them, where ``compute`` is its measured throughput through one block (block-tokens/s) and ``network`` what its link
carries (tokens/s). A block's capacity is the sum of those rates over the servers holding it, and the swarm's
*bottleneck* is the weakest block's capacity: no chain can serve more tokens/s in total than that. Placement aims
to raise the bottleneck (uncovered blocks first: their capacity is 0).

- :func:`best_span` places one server given everyone else: every span length its memory allows and every start,
  scored by the bottleneck they leave, then by how much capacity lands below the *water level* (the capacity every
  block would have if all of it were spread evenly): water-filling, so that servers fill the deepest holes.
- :func:`plan` places a whole swarm: each server in turn (strongest first), then rounds of :func:`rebalance`.
- :func:`should_move` is what a running server checks each period: the span it would pick now, if that raises
  the bottleneck by more than a hysteresis margin and is not the span it holds (Petals' servers were seen
  "moving" onto their own blocks when the comparison counted themselves twice).
- :func:`upper_bound` is what no placement can beat (all capacity spread evenly), :func:`best_exact` the true
  optimum by search, for small swarms.

RTTs do not enter: they decide which chain a client takes (planner.py), not how many tokens/s the swarm serves.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Optional, Sequence

import numpy as np

Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Peer:
    peer_id: str
    compute: float  # block-tokens/s: tokens/s through one block
    max_blocks: int  # what its memory holds
    network: float = math.inf  # tokens/s its link carries

    def rate(self, blocks: int) -> float:
        """Tokens/s through each block of a span of ``blocks``."""
        return min(self.compute / max(blocks, 1), self.network)


def block_coverage(num_blocks: int, spans: Iterable[Span]) -> list[int]:
    """How many servers hold each block."""
    coverage = [0] * num_blocks
    for start, end in spans:
        for index in range(max(start, 0), min(end, num_blocks)):
            coverage[index] += 1
    return coverage


def block_capacity(num_blocks: int, placed: Iterable[tuple[Peer, Span]]) -> np.ndarray:
    """Tokens/s each block can serve: the sum of the rates of the servers holding it."""
    capacity = np.zeros(num_blocks)
    for peer, (start, end) in placed:
        capacity[max(start, 0) : min(end, num_blocks)] += peer.rate(end - start)
    return capacity


def bottleneck(num_blocks: int, placed: Iterable[tuple[Peer, Span]]) -> float:
    return float(block_capacity(num_blocks, placed).min()) if num_blocks else 0.0


def _water_level(capacity: np.ndarray, peer: Peer) -> float:
    return (capacity.sum() + peer.compute) / len(capacity)


def best_span(peer: Peer, capacity: np.ndarray, *, lengths: Optional[Sequence[int]] = None) -> Span:
    """The span for ``peer`` on blocks whose capacity without it is ``capacity``: the highest bottleneck, then the
    most capacity added below the water level, then the shortest span (fewer hops), then the leftmost.

    Every (length, start) is scored at once, as [lengths, starts] arrays."""
    num_blocks = len(capacity)
    lengths = np.asarray(lengths or range(1, min(peer.max_blocks, num_blocks) + 1))
    rates = np.minimum(peer.compute / lengths, peer.network)[:, None]
    starts = np.arange(num_blocks)[None, :]
    ends = starts + lengths[:, None]
    valid = ends <= num_blocks
    ends = np.minimum(ends, num_blocks)
    # Bottleneck with the span at each place: the weakest block outside it, or inside it plus the peer's rate.
    inf = np.array([np.inf])
    before = np.concatenate((inf, np.minimum.accumulate(capacity)))  # before[i]: weakest of blocks < i
    after = np.concatenate((np.minimum.accumulate(capacity[::-1])[::-1], inf))  # after[i]: weakest of blocks >= i
    inside = _range_min(capacity, starts, ends) + rates
    bottlenecks = np.where(valid, np.minimum(np.minimum(before[starts], after[ends]), inside), -np.inf)
    # Capacity it adds below the water level, summed over the span.
    level = _water_level(capacity, peer)
    added = np.minimum(capacity[None, :] + rates, level) - np.minimum(capacity, level)[None, :]
    sums = np.concatenate((np.zeros((len(lengths), 1)), np.cumsum(added, axis=1)), axis=1)
    gains = np.take_along_axis(sums, ends, axis=1) - np.take_along_axis(sums, np.broadcast_to(starts, ends.shape), axis=1)
    # Rounding must not decide between equals: ties within a relative 1e-9, then the first (shortest, leftmost).
    top = bottlenecks.max()
    ties = bottlenecks >= top - (abs(top) * 1e-9 + 1e-12)
    gains = np.where(ties, gains, -np.inf)
    most = gains.max()
    best = np.flatnonzero((gains >= most - (abs(most) * 1e-9 + 1e-12)).ravel())[0]
    length_index, start = divmod(int(best), num_blocks)
    return start, start + int(lengths[length_index])


def _range_min(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """min(values[s:e]) for arrays of ``starts`` and ``ends`` (e > s), from a sparse table of powers of two."""
    table = [values]
    while (1 << len(table)) <= len(values):
        half = 1 << (len(table) - 1)
        last = table[-1]
        table.append(np.minimum(last, np.concatenate((last[half:], np.full(half, np.inf)))))
    table = np.stack(table)
    spans = np.maximum(ends - starts, 1)
    level = np.floor(np.log2(spans)).astype(int)
    width = 1 << level
    last_start = np.clip(ends - width, 0, len(values) - 1)
    return np.minimum(table[level, np.clip(starts, 0, len(values) - 1)], table[level, last_start])


def plan(num_blocks: int, peers: Sequence[Peer], *, rounds: int = 3) -> dict[str, Span]:
    """A placement of a whole swarm: each peer in turn, strongest first, then rounds of :func:`rebalance`."""
    placement: dict[str, Span] = {}
    capacity = np.zeros(num_blocks)
    for peer in sorted(peers, key=lambda p: -p.compute):
        span = best_span(peer, capacity)
        placement[peer.peer_id] = span
        capacity[span[0] : span[1]] += peer.rate(span[1] - span[0])
    for _ in range(rounds):
        if not rebalance(num_blocks, peers, placement):
            break
    return placement


def rebalance(num_blocks: int, peers: Sequence[Peer], placement: dict[str, Span], *, margin: float = 0.0) -> int:
    """One round: each peer in turn (weakest capacity first) moves if :func:`should_move` says so. Returns the
    number of moves; ``placement`` is updated in place."""
    by_id = {peer.peer_id: peer for peer in peers}
    capacity = block_capacity(num_blocks, ((by_id[p], s) for p, s in placement.items()))
    moves = 0
    for peer in sorted(peers, key=lambda p: p.compute):
        current = placement.get(peer.peer_id)
        if current is None:
            continue
        target = _move_target(peer, current, capacity, margin)
        if target is not None:
            capacity[current[0] : current[1]] -= peer.rate(current[1] - current[0])
            capacity[target[0] : target[1]] += peer.rate(target[1] - target[0])
            placement[peer.peer_id] = target
            moves += 1
    return moves


def should_move(
    peer: Peer, current: Span, num_blocks: int, others: Iterable[tuple[Peer, Span]], *, margin: float = 0.05
) -> Optional[Span]:
    """The span a running server should move to, or None to stay: only if the move raises the swarm's bottleneck
    by more than ``margin`` (relative; hysteresis, so that servers do not chase noise in each other's figures)."""
    capacity = block_capacity(num_blocks, [*others, (peer, current)])
    return _move_target(peer, current, capacity, margin)


def _move_target(peer: Peer, current: Span, capacity: np.ndarray, margin: float) -> Optional[Span]:
    """Where ``peer`` should go, given ``capacity`` with it at ``current`` (None: stay).

    It moves where it is needed more: the weakest block of the span it would pick must be weaker, by more than
    ``margin``, than the weakest of its current blocks once it has left them, and the swarm's bottleneck must not
    fall. One server's move seldom raises the bottleneck of a large swarm by itself; many such moves do, so each
    is judged on the blocks it leaves and joins (a global test with a margin would freeze a large swarm)."""
    without = capacity.copy()
    without[current[0] : current[1]] -= peer.rate(current[1] - current[0])
    np.maximum(without, 0.0, out=without)  # rounding must not make a block look worse than empty
    target = best_span(peer, without)
    if target == current:
        return None  # its best place is where it is: never "move" onto the blocks it holds
    moved = without.copy()
    moved[target[0] : target[1]] += peer.rate(target[1] - target[0])
    if moved.min() < capacity.min() * (1 - 1e-9):
        return None
    left_behind = float(without[current[0] : current[1]].min())
    needed_there = float(without[target[0] : target[1]].min())
    if needed_there * (1 + margin) < left_behind - 1e-12:
        return target
    if moved.min() > capacity.min() * (1 + max(margin, 1e-9)) + 1e-12:
        return target  # a longer or shorter span may help even where its weakest blocks are alike
    return None


def upper_bound(num_blocks: int, peers: Iterable[Peer]) -> float:
    """No placement beats this: every peer's capacity (at most its compute, and at most its link times the blocks
    it can hold) spread evenly over all blocks."""
    total = sum(min(p.compute, p.network * min(p.max_blocks, num_blocks)) for p in peers)
    return total / max(num_blocks, 1)


def best_exact(num_blocks: int, peers: Sequence[Peer]) -> tuple[float, dict[str, Span]]:
    """The highest bottleneck any placement reaches, by exhaustive search (small swarms only)."""
    options = [
        [(s, s + k) for k in range(1, min(p.max_blocks, num_blocks) + 1) for s in range(num_blocks - k + 1)]
        for p in peers
    ]
    best_value, best = -1.0, {}
    for spans in itertools.product(*options):
        value = bottleneck(num_blocks, zip(peers, spans))
        if value > best_value:
            best_value, best = value, {p.peer_id: s for p, s in zip(peers, spans)}
    return best_value, best
