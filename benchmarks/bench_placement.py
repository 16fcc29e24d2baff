"""P9: bottleneck throughput of block placement on simulated heterogeneous swarms, ours vs Petals' rule.

Each swarm is a few hundred simulated peers with mixed compute (tokens/s through one block), memory (blocks they
can hold) and links (tokens/s). Peers join one at a time, then the swarm churns: every period some leave, some
join, and every server runs its periodic check (ours: routing.placement.should_move with its hysteresis margin;
Petals: the weakest window at join, and a move when the bottleneck would rise by more than 1/0.75). After every
period the bottleneck (the weakest block's tokens/s) is compared with the best possible for the peers online
then: exact search for the small swarm, an upper bound (all capacity spread evenly) for the large ones, so the
large swarms' ratios are lower bounds of the true ones.

Petals' rule is modelled from its documentation and the issue's summary (weakest window, 0.75 balance quality;
its check re-places the other servers once, not until they settle). Both rules see the same swarms and events.

Usage: python benchmarks/bench_placement.py [--periods 12] [--seed 0]
Prints one line per swarm, `PLACE swarm=<name> peers=<n> ours_vs_best=<mean over periods> petals_vs_best=<same>
...`, and `PLACE planning_ms_1000=<time to plan 1,000 peers from scratch>` (SPEC P9: ours_vs_best >= 0.9).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from typing import Callable, Optional

import numpy as np

from molink_swarm.routing.placement import (
    Peer,
    Span,
    best_exact,
    best_span,
    block_capacity,
    bottleneck,
    plan,
    should_move,
    upper_bound,
)

HIDDEN_BITS = 8192 * 16  # a 70B model's activations per token, 16-bit


def mbit(rate: float) -> float:
    return rate * 1e6 / HIDDEN_BITS


@dataclasses.dataclass
class SwarmSpec:
    name: str
    num_blocks: int
    peers: int
    make_peer: Callable[[random.Random, str], Peer]
    initial_share: float = 0.7
    churn: float = 0.05  # of the peers online, per period: this many leave and as many join


def consumer_gpus(rng: random.Random, peer_id: str) -> Peer:
    compute = rng.lognormvariate(np.log(120), 0.7)
    return Peer(peer_id, compute, rng.choice([4, 6, 8, 10, 16, 24]), mbit(rng.choice([20, 50, 100, 300, 1000])))


def mixed_datacenter(rng: random.Random, peer_id: str) -> Peer:
    if rng.random() < 0.1:  # a few big machines that hold much of the model
        return Peer(peer_id, rng.uniform(2000, 5000), rng.choice([40, 60, 80]), mbit(10000))
    return Peer(peer_id, rng.lognormvariate(np.log(80), 0.5), rng.choice([3, 4, 6, 8]), mbit(rng.choice([50, 100, 1000])))


def weak_links(rng: random.Random, peer_id: str) -> Peer:
    # Fast GPUs behind slow home uplinks: the link, not the GPU, limits many of them.
    return Peer(peer_id, rng.lognormvariate(np.log(600), 0.8), rng.choice([8, 12, 20, 30]), mbit(rng.choice([5, 10, 20, 50])))


def small_swarm(rng: random.Random, peer_id: str) -> Peer:
    return Peer(peer_id, rng.uniform(20, 200), rng.choice([1, 2, 3, 4]), mbit(rng.choice([20, 1000])))


SWARMS = [
    SwarmSpec("consumer-gpus", 80, 160, consumer_gpus),
    SwarmSpec("mixed-datacenter", 80, 200, mixed_datacenter),
    SwarmSpec("weak-links", 60, 120, weak_links, churn=0.1),
]


# ---- the two rules


class Ours:
    margin = 0.05  # the default of should_move

    def join(self, peer: Peer, num_blocks: int, online: dict[str, tuple[Peer, Span]]) -> Span:
        return best_span(peer, block_capacity(num_blocks, online.values()))

    def check(self, peer_id: str, num_blocks: int, online: dict[str, tuple[Peer, Span]]) -> Optional[Span]:
        peer, span = online[peer_id]
        others = [entry for other, entry in online.items() if other != peer_id]
        return should_move(peer, span, num_blocks, others, margin=self.margin)


class Petals:
    balance_quality = 0.75
    eps = 1e-3

    @staticmethod
    def _weakest_start(throughputs: np.ndarray, length: int) -> int:
        windows = np.sort(np.lib.stride_tricks.sliding_window_view(throughputs, length), axis=1)
        return int(np.lexsort(windows.T[::-1])[0])  # the window whose sorted throughputs are smallest

    def join(self, peer: Peer, num_blocks: int, online: dict[str, tuple[Peer, Span]]) -> Span:
        length = min(peer.max_blocks, num_blocks)
        start = self._weakest_start(block_capacity(num_blocks, online.values()), length)
        return start, start + length

    def check(self, peer_id: str, num_blocks: int, online: dict[str, tuple[Peer, Span]]) -> Optional[Span]:
        spans = {pid: span for pid, (_, span) in online.items()}
        peers = {pid: peer for pid, (peer, _) in online.items()}
        throughputs = block_capacity(num_blocks, online.values())
        initial = throughputs.min()
        moved_span = self._replace(peer_id, peers, spans, throughputs)
        if moved_span == online[peer_id][1]:
            return None
        for other in rng_order(spans):  # the others re-place once after it
            if other != peer_id:
                self._replace(other, peers, spans, throughputs)
        new = throughputs.min()
        if new < initial or new < self.eps or initial / new >= self.balance_quality - self.eps:
            return None
        return moved_span

    def _replace(self, peer_id, peers, spans, throughputs) -> Span:
        peer, (start, end) = peers[peer_id], spans[peer_id]
        rate = peer.rate(end - start)
        throughputs[start:end] -= rate * (1 + self.eps)  # so that its own place does not look best by itself
        new_start = self._weakest_start(throughputs, end - start)
        throughputs[start:end] += rate * self.eps
        spans[peer_id] = (new_start, new_start + end - start)
        throughputs[new_start : new_start + end - start] += rate
        return spans[peer_id]


_order_rng = random.Random(1)


def rng_order(items) -> list:
    order = list(items)
    _order_rng.shuffle(order)
    return order


# ---- the simulation


def simulate(
    spec: SwarmSpec, rule, periods: int, seed: int, best: Callable[[list[Peer]], float]
) -> tuple[list[float], float]:
    """Bottleneck / best after each period, and moves per online peer per period."""
    rng = random.Random(seed)
    pool = [spec.make_peer(rng, f"{spec.name}-{i}") for i in range(spec.peers)]
    rng.shuffle(pool)
    initial = int(spec.initial_share * len(pool))
    online: dict[str, tuple[Peer, Span]] = {}
    waiting = pool[initial:]
    for peer in pool[:initial]:
        online[peer.peer_id] = (peer, rule.join(peer, spec.num_blocks, online))
    ratios, moves = [], 0
    for _ in range(periods):
        leaving = rng.sample(sorted(online), int(spec.churn * len(online)))
        for peer_id in leaving:
            waiting.append(online.pop(peer_id)[0])
        rng.shuffle(waiting)
        for _ in range(len(leaving)):
            peer = waiting.pop()
            online[peer.peer_id] = (peer, rule.join(peer, spec.num_blocks, online))
        for peer_id in rng.sample(sorted(online), len(online)):  # every server's periodic check, in random order
            target = rule.check(peer_id, spec.num_blocks, online)
            if target is not None:
                online[peer_id] = (online[peer_id][0], target)
                moves += 1
        peers = [peer for peer, _ in online.values()]
        ratios.append(bottleneck(spec.num_blocks, online.values()) / best(peers))
    return ratios, moves / periods / max(len(online), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    small = SwarmSpec("small-exact", 6, 5, small_swarm, initial_share=0.8, churn=0.25)
    cases = [(small, lambda peers: best_exact(small.num_blocks, peers)[0])] + [
        (spec, lambda peers, spec=spec: upper_bound(spec.num_blocks, peers)) for spec in SWARMS
    ]
    for spec, best in cases:
        started = time.perf_counter()
        ours, ours_moves = simulate(spec, Ours(), args.periods, args.seed, best)
        ours_s = time.perf_counter() - started
        petals, petals_moves = simulate(spec, Petals(), args.periods, args.seed, best)
        print(
            f"PLACE swarm={spec.name} peers={spec.peers} blocks={spec.num_blocks} "
            f"ours_vs_best={statistics.mean(ours):.3f} petals_vs_best={statistics.mean(petals):.3f} "
            f"ours_min={min(ours):.3f} petals_min={min(petals):.3f} moves_per_peer_period={ours_moves:.3f}/"
            f"{petals_moves:.3f} periods={args.periods} "
            f"best={'exact' if spec is small else 'upper bound'} sim_s={ours_s:.1f}",
            flush=True,
        )

    rng = random.Random(args.seed)
    peers = [consumer_gpus(rng, f"p{i}") for i in range(1000)]
    started = time.perf_counter()
    placement = plan(80, peers)
    planning_ms = (time.perf_counter() - started) * 1000
    ratio = bottleneck(80, ((p, placement[p.peer_id]) for p in peers)) / upper_bound(80, peers)
    print(f"PLACE planning_ms_1000={planning_ms:.0f} plan_vs_upper_bound={ratio:.3f} blocks=80 (target ours_vs_best >= 0.9)")


if __name__ == "__main__":
    main()
