"""Server-side session bookkeeping: pushes that arrive before their session opens."""

from __future__ import annotations

import time

import torch

from molink_swarm.server.sessions import EarlyPushes


def test_early_pushes_are_bounded_and_taken_once():
    pushes = EarlyPushes(max_items=3, max_bytes=10_000, ttl=30.0)
    small = torch.zeros(1, 2, 4)  # 32 bytes
    for position in range(4):
        pushes.keep("session-a", position, small, "peer")
    assert len(pushes) == 3  # the oldest went
    pushes.keep("session-a", 3, torch.ones(1, 2, 4), "other")  # a second copy: the first wins
    taken = pushes.take("session-a")
    assert [p for p, _, _ in taken] == [1, 2, 3] and taken[-1][2] == "peer"
    assert pushes.take("session-a") == [] and len(pushes) == 0
    pushes.keep("session-b", 0, torch.zeros(1, 1, 4000), "peer")  # 16 kB, over the byte budget
    assert len(pushes) == 0


def test_early_pushes_expire():
    pushes = EarlyPushes(ttl=0.0)
    pushes.keep("session-a", 0, torch.zeros(1, 1, 4), "peer")
    time.sleep(0.01)
    assert pushes.take("session-a") == []
