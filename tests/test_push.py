"""Push channels never block, never grow without bound, and come back after the receiver failed."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2P, PeerID

from molink_swarm.net.push import MAX_QUEUED, PushChannel
from molink_swarm.protocol.tensors import serialize_tensor


@pytest.fixture
async def p2p():
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield p2p
    await p2p.shutdown()


async def test_a_channel_to_a_dead_peer_holds_little_and_retries_later(p2p):
    nobody = PeerID.from_base58("QmQGqBmKTewr82mRxoiWoKQUXSnBLdeK543cMGnzE3L4zz")  # no such peer is reachable
    channel = PushChannel(p2p, nobody, "session-0001")
    hidden = serialize_tensor(torch.zeros(1, 1, 8))
    for position in range(3 * MAX_QUEUED):
        channel.push(position, hidden)  # never blocks, never raises
        assert channel._queue.qsize() <= MAX_QUEUED
    await asyncio.wait_for(channel._task, 30)  # the stream could not be opened
    first_task = channel._task
    channel.push(100, hidden)  # within the pause after a failure: dropped, the client's copy carries the step
    assert channel._task is first_task and channel.dropped > 0
    channel._retry_at = 0.0  # the pause is over
    channel.push(101, hidden)
    assert channel._task is not first_task  # a new attempt
    await channel.aclose()
