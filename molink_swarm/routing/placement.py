"""Which blocks a new server should serve (pure logic, no I/O)."""

from __future__ import annotations

from typing import Iterable


def block_coverage(num_blocks: int, spans: Iterable[tuple[int, int]]) -> list[int]:
    """How many servers hold each block."""
    coverage = [0] * num_blocks
    for start, end in spans:
        for index in range(max(start, 0), min(end, num_blocks)):
            coverage[index] += 1
    return coverage


def choose_blocks(num_blocks: int, count: int, spans: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The ``count``-block window that helps the swarm most.

    First priority: cover blocks nobody serves (most uncovered blocks in the window); then raise the weakest
    block's coverage; ties go to the leftmost window, so that servers started together fill the model in order.
    """
    count = max(1, min(count, num_blocks))
    coverage = block_coverage(num_blocks, spans)

    def score(start: int) -> tuple[int, int, int]:
        window = coverage[start : start + count]
        return (-sum(1 for c in window if c == 0), min(window), sum(window))

    best = min(range(num_blocks - count + 1), key=lambda start: (score(start), start))
    return best, best + count
