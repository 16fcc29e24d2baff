"""Server-side session bookkeeping: pushed inputs, who may push them, and per-peer budgets."""

from __future__ import annotations

import time

import pytest
import torch

from molink_swarm.protocol.messages import ProtocolError, SessionSpec
from molink_swarm.server.sessions import MAX_WAITING_INPUTS, EarlyPushes, Session, SessionTable


def spec(session_id: str = "session-0001", max_length: int = 64, batch_size: int = 1) -> SessionSpec:
    return SessionSpec(session_id=session_id, start=0, end=2, max_length=max_length, batch_size=batch_size)


def session(max_length: int = 512) -> Session:
    return Session(spec(max_length=max_length), cache=None, owner="client")


async def test_duplicate_inputs_of_a_running_step_do_not_pile_up():
    """The client's copy and the previous server's push both arrive for every step: one is used, and the other,
    arriving while the step computes or after it, leaves nothing behind (it used to fill the inbox in ~65 steps)."""
    s = session()
    for position in range(300):
        assert s.deliver(position, torch.zeros(1, 1, 4))  # the first copy, before the step asks for it
        assert s.expect(position).done()
        assert not s.deliver(position, torch.ones(1, 1, 4))  # the second copy, while the step computes
        s.stepped(position, 1)
        assert not s.deliver(position, torch.ones(1, 1, 4))  # a late copy
        assert not s.inbox
    assert s.position == 300


async def test_pushes_far_ahead_or_past_max_length_are_refused_without_harming_the_session():
    s = session(max_length=64)
    with pytest.raises(ProtocolError, match="max_length"):
        s.deliver(10**6, torch.zeros(1, 1, 4))
    for position in range(MAX_WAITING_INPUTS):
        s.deliver(position, torch.zeros(1, 1, 4))
    with pytest.raises(ProtocolError, match="pushed inputs ahead"):
        s.deliver(MAX_WAITING_INPUTS, torch.zeros(1, 1, 4))
    assert s.expect(0).done()  # what was delivered is still there


async def test_a_rolled_back_step_takes_its_push():
    s = session()
    s.stepped(0, 10)
    waiting = s.expect(4)  # a step that regenerates from position 4 asks first
    assert s.deliver(4, torch.zeros(1, 1, 4))
    assert waiting.done()


def test_only_the_owner_and_named_upstream_servers_may_push():
    s = session()
    assert s.may_push("client") and not s.may_push("stranger")
    s.allow_upstream("server-a")
    assert s.may_push("server-a")
    for i in range(10):
        s.allow_upstream(f"server-{i}")
    assert len(s.upstreams) <= 4 and not s.may_push("server-a")  # only the last few upstreams count


def test_one_peer_cannot_take_every_slot_or_the_whole_cache():
    table = SessionTable(max_sessions=8, cache_tokens=1024, max_length=512)
    for i in range(6):
        table.open(spec(f"greedy-{i:04d}", max_length=16), cache=None, owner="greedy")
    with pytest.raises(ProtocolError, match="the most one peer may"):
        table.open(spec("greedy-0006", max_length=16), cache=None, owner="greedy")
    table.open(spec("honest-0001", max_length=16), cache=None, owner="honest")  # others still get in
    table = SessionTable(max_sessions=8, cache_tokens=2048, max_length=1024)
    with pytest.raises(ProtocolError, match="one peer may"):  # one open that would reserve the whole cache
        table.open(spec("hog-000001", max_length=1024, batch_size=2), cache=None, owner="hog")
    table.open(spec("modest-001", max_length=1024), cache=None, owner="modest")


def test_early_pushes_are_bounded_per_sender_and_taken_only_by_allowed_senders():
    pushes = EarlyPushes(max_items=8, max_bytes=10_000, ttl=30.0, sender_share=0.5)
    small = torch.zeros(1, 2, 4)  # 32 bytes
    for position in range(4):
        pushes.keep("session-a", position, small, "attacker")
    with pytest.raises(ProtocolError, match="Too many pushes from your peer"):
        pushes.keep("session-a", 4, small, "attacker")
    pushes.keep("session-a", 0, torch.ones(1, 2, 4), "upstream")
    pushes.keep("session-a", 0, torch.full((1, 2, 4), 2.0), "upstream")  # a second copy: the first wins
    [(position, hidden)] = pushes.take("session-a", {"client", "upstream"})
    assert position == 0 and torch.equal(hidden, torch.ones(1, 2, 4))
    assert pushes.take("session-a", {"client", "upstream"}) == [] and len(pushes) == 4  # the attacker's stay
    with pytest.raises(ProtocolError):
        pushes.keep("session-b", 0, torch.zeros(1, 1, 4000), "peer")  # 16 kB, over one sender's byte budget
    assert len(pushes) == 4


def test_early_pushes_expire():
    pushes = EarlyPushes(ttl=0.0)
    pushes.keep("session-a", 0, torch.zeros(1, 1, 4), "peer")
    time.sleep(0.01)
    assert pushes.take("session-a", {"peer"}) == []
    assert len(pushes) == 0
