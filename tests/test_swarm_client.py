"""How a client keeps its view of the swarm between DHT reads: departures, failed pings, relays, dtypes.

The client is real (its own DHT peer, no other peers); what its DHT reads return and how its pings go are
scripted, so each test says exactly what the swarm looked like.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Iterator, Optional

import multihash
import pytest
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from molink_swarm.client import swarm as swarm_module
from molink_swarm.client.loop import run_sync
from molink_swarm.client.session import SwarmError, plan_with_wait
from molink_swarm.client.swarm import SwarmClient
from molink_swarm.dht import Reachability, ServerInfo, ServerRecord, ServerState
from molink_swarm.net import links as links_module
from molink_swarm.routing.planner import UNREACHABLE_RTT_S

MODEL_ID, FINGERPRINT = "tiny-01234567", "0123456789abcdef"
COPY_A, COPY_B = [f"a{b:015x}" for b in range(6)], [f"b{b:015x}" for b in range(6)]  # each block's digest in two copies
RELAYS = [f"/ip4/10.0.0.{i}/tcp/31337/p2p/{PeerID(multihash.encode(bytes([i]) * 32, 'sha2-256')).to_base58()}" for i in (1, 2)]


def peer(name: str) -> PeerID:
    return PeerID(multihash.encode(hashlib.sha256(name.encode()).digest(), "sha2-256"))


def server(name: str, start: int = 0, end: int = 6, *, expires_in: float = 60.0, **fields) -> ServerInfo:
    record = ServerRecord(
        **{
            "state": ServerState.ONLINE,
            "start": start,
            "end": end,
            "model_fingerprint": FINGERPRINT,
            "throughput": 1000.0,
            "free_cache_tokens": 8192,
            "max_sessions": 8,
            "software_version": "test",
            "block_digests": tuple(COPY_A[start:end]),
            **fields,
        }
    )
    return ServerInfo(peer(name), record, get_dht_time() + expires_in)


class ScriptedSwarm:
    """What the client's DHT reads return (one list per read; the last one repeats) and which calls fail."""

    def __init__(self):
        self.reads: list[list[ServerInfo]] = []
        self.down: set[PeerID] = set()  # servers whose pings fail
        self.dead_relays: set[str] = set()  # pings through these fail
        self.pings: list[tuple[PeerID, Optional[str]]] = []

    def fetch_servers(self, _dht, model_id: str, _num_blocks: int, latest: bool = True) -> list[ServerInfo]:
        assert model_id == MODEL_ID
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


class FakeStub:
    def __init__(self, script: ScriptedSwarm, peer_id: PeerID, relay: Optional[str]):
        self.script, self.peer_id, self.relay = script, peer_id, relay

    async def rpc_ping(self, _request, timeout=None):
        self.script.pings.append((self.peer_id, self.relay))
        if self.peer_id in self.script.down or self.relay in self.script.dead_relays:
            raise ConnectionError("unreachable")
        return None


@pytest.fixture
def scripted(monkeypatch) -> Iterator[tuple[SwarmClient, ScriptedSwarm]]:
    """A client (its own DHT peer, alone) whose DHT reads, relays and pings are scripted."""
    script = ScriptedSwarm()
    monkeypatch.setattr(swarm_module, "fetch_servers", script.fetch_servers)
    monkeypatch.setattr(links_module, "connect", _no_op)
    monkeypatch.setattr(links_module, "relay_load", _idle_relay)
    client = SwarmClient([], MODEL_ID, FINGERPRINT, 6, hole_punching=False)
    monkeypatch.setattr(client.links, "stub", lambda peer_id: FakeStub(script, peer_id, client.links.relay_for(peer_id)))
    try:
        yield client, script
    finally:
        client.shutdown()


async def _no_op(*_args, **_kwargs) -> None:
    return None


async def _idle_relay(*_args, **_kwargs) -> float:
    return 0.0


def online(client: SwarmClient, refresh: bool = True) -> set[PeerID]:
    return {s.peer_id for s in run_sync(client.servers(refresh=refresh))}


# --- departures ------------------------------------------------------------------------------------------------


def test_a_server_missing_from_one_read_has_not_left(scripted):
    client, script = scripted
    a, b = server("a"), server("b")
    script.reads = [[a, b], [a], [a]]

    assert online(client) == {a.peer_id, b.peer_id}
    assert online(client) == {a.peer_id, b.peer_id}  # one missed read: still there, no replay
    assert b.peer_id not in client.departed
    assert online(client) == {a.peer_id}  # missing from two reads in a row: gone
    assert b.peer_id in client.departed


def test_a_server_that_is_back_after_one_missed_read_never_left(scripted):
    client, script = scripted
    a, b = server("a"), server("b")
    script.reads = [[a, b], [a], [a, b], [a]]

    for _ in range(4):
        online(client)

    assert b.peer_id not in client.departed


def test_a_server_that_announced_offline_has_left_at_once(scripted):
    client, script = scripted
    a, b = server("a"), server("b")
    script.reads = [[a, b], [a, server("b", state=ServerState.OFFLINE)]]

    online(client)

    assert online(client) == {a.peer_id}
    assert b.peer_id in client.departed


def test_a_server_whose_record_expired_has_left_at_once(scripted):
    client, script = scripted
    a, b = server("a"), server("b", expires_in=-1.0)
    script.reads = [[a, b], [a]]

    online(client)

    assert online(client) == {a.peer_id}
    assert b.peer_id in client.departed


# --- pings -------------------------------------------------------------------------------------------------------


def test_a_failed_ping_is_remembered_instead_of_repeated_on_every_plan(scripted):
    client, script = scripted
    up, down = server("up", 0, 6), server("down", 0, 6)
    script.reads = [[up, down]]
    script.down = {down.peer_id}

    for _ in range(3):
        candidates = {c.peer_id: c for c in run_sync(client.candidates(refresh=True))}

    assert [p for p, _ in script.pings].count(down.peer_id) == 1
    assert [p for p, _ in script.pings].count(up.peer_id) == 2  # measured once: the first call opens the connection
    assert candidates[down.peer_id].rtt_s == UNREACHABLE_RTT_S  # far: chosen only if nothing else serves its blocks
    assert candidates[up.peer_id].rtt_s is not None and candidates[up.peer_id].rtt_s < UNREACHABLE_RTT_S


def test_an_unreachable_server_is_pinged_again_once_its_time_is_up(scripted):
    client, script = scripted
    down = server("down", 0, 6)
    script.reads = [[down]]
    script.down = {down.peer_id}
    client.links.unreachable_for_s = 0.0

    run_sync(client.candidates(refresh=True))
    script.down = set()
    [candidate] = run_sync(client.candidates(refresh=True))

    assert [p for p, _ in script.pings] == [down.peer_id] * 3  # failed; then measured (its first call connects)
    assert candidate.rtt_s is not None and candidate.rtt_s < UNREACHABLE_RTT_S


# --- relays -------------------------------------------------------------------------------------------------------


def relayed(name: str, relays=RELAYS) -> ServerInfo:
    return server(name, reachability=Reachability.RELAYED, relay_addrs=tuple(relays))


def test_a_failed_call_through_a_relay_moves_to_the_next_relay_before_banning(scripted):
    client, script = scripted
    behind_nat = relayed("behind-nat")
    script.reads = [[behind_nat]]
    online(client)
    first = client.links.relay_for(behind_nat.peer_id)

    run_sync(client.report_failure(behind_nat.peer_id))

    second = client.links.relay_for(behind_nat.peer_id)
    assert {first, second} == set(RELAYS)
    assert behind_nat.peer_id not in client.banned()
    run_sync(client.report_failure(behind_nat.peer_id))  # through the other relay too: now it is the server
    assert behind_nat.peer_id in client.banned()


def test_a_ping_through_a_dead_relay_is_tried_through_the_next_one(scripted):
    client, script = scripted
    behind_nat = relayed("behind-nat")
    script.reads = [[behind_nat]]
    online(client)
    script.dead_relays = {client.links.relay_for(behind_nat.peer_id)}

    [candidate] = run_sync(client.candidates(refresh=True))

    assert [relay for _, relay in script.pings][-1] not in script.dead_relays
    assert candidate.rtt_s is not None and candidate.rtt_s < UNREACHABLE_RTT_S
    assert client.links.relay_for(behind_nat.peer_id) not in script.dead_relays


def test_the_route_stays_on_the_next_relay_after_a_refresh(scripted):
    client, script = scripted
    behind_nat = relayed("behind-nat")
    script.reads = [[behind_nat]]
    online(client)
    run_sync(client.report_failure(behind_nat.peer_id))
    moved_to = client.links.relay_for(behind_nat.peer_id)

    online(client)

    assert client.links.relay_for(behind_nat.peer_id) == moved_to


# --- dtypes -------------------------------------------------------------------------------------------------------


def test_servers_in_another_dtype_are_never_chained(scripted):
    client, script = scripted
    same, other = server("float32", 0, 6), server("float16", 0, 6, torch_dtype="float16")
    script.reads = [[same, other]]

    assert online(client) == {same.peer_id}


def test_missing_blocks_served_in_another_dtype_are_named_in_the_error(scripted):
    client, script = scripted
    script.reads = [[server("first", 0, 3), server("half", 3, 6, torch_dtype="float16")]]

    with pytest.raises(SwarmError) as error:
        run_sync(plan_with_wait(client, 0.0, "Tiny"))

    message = str(error.value)
    assert "No server in the swarm holds blocks 3:6 of Tiny" in message
    assert "servers of blocks 3:6 run float16; pass dtype=torch.float16" in message
    assert "\n" not in message


# --- busy servers -------------------------------------------------------------------------------------------------


def test_a_server_without_room_is_avoided_for_a_moment_not_banned(scripted):
    """"No room now" (sessions, cache, one peer's share) is not a failure: the server is left alone briefly and its
    failure count, which makes bans longer, does not grow."""
    import uuid

    from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError

    from molink_swarm.protocol.errors import ServerBusy
    from molink_swarm.protocol.messages import SessionSpec
    from molink_swarm.server.sessions import SessionTable

    def session_spec() -> SessionSpec:
        return SessionSpec(session_id=uuid.uuid4().hex, start=0, end=6, max_length=10)

    client, script = scripted
    full = server("full")
    script.reads = [[full]]
    online(client)
    table = SessionTable(max_sessions=1, cache_tokens=1000, max_length=100)
    with pytest.raises(ServerBusy) as refused:  # what the server raises; the client gets only its text
        table.open(session_spec(), None, owner="a")
        table.open(session_spec(), None, owner="a")
    run_sync(client.report_failure(full.peer_id, P2PHandlerError(str(refused.value))))
    assert full.peer_id in client.banned()
    assert client._bans[full.peer_id][0] == 0  # no failure counted
    assert client._bans[full.peer_id][1] - time.monotonic() <= swarm_module.BUSY_AVOID_S
    run_sync(client.report_failure(full.peer_id, P2PHandlerError("Hidden states contain NaN")))
    assert client._bans[full.peer_id][0] == 1  # a real failure still bans


# --- copies (servers whose block digests disagree) ------------------------------------------------------------


def other_copy(name: str, start: int, end: int, **fields) -> ServerInfo:
    return server(name, start, end, block_digests=tuple(COPY_B[start:end]), **fields)


def test_a_server_of_another_copy_is_never_chained_and_a_warning_names_it(scripted, caplog):
    client, script = scripted
    a1, a2, b = server("a1", 0, 6), server("a2", 3, 6), other_copy("b", 3, 6)
    script.reads = [[a1, a2, b]]

    with caplog.at_level(logging.WARNING, logger=swarm_module.__name__):
        assert online(client) == {a1.peer_id, a2.peer_id}
        assert online(client) == {a1.peer_id, a2.peer_id}

    [warning] = [r.getMessage() for r in caplog.records if "Not chaining" in r.getMessage()]  # once, not per read
    assert f"server {b.peer_id} (blocks 3:6)" in warning
    assert "blocks 3:6 differ from those of servers" in warning
    assert str(a1.peer_id) in warning and str(a2.peer_id) in warning


def test_a_client_never_switches_a_block_to_another_copy(scripted):
    client, script = scripted
    a1, a2, b = server("a1", 0, 3), server("a2", 3, 6), [other_copy(f"b{i}", 3, 6) for i in range(3)]
    script.reads = [[a1, a2], [a1, a2, *b], [a1, server("a2", 3, 6, state=ServerState.OFFLINE), *b]]
    run_sync(plan_with_wait(client, 0.0, "Tiny", refresh=True))  # a chain of copy A: its digests are pinned

    assert online(client) == {a1.peer_id, a2.peer_id}  # copy B's three servers outnumber a2 on 3:6, in vain
    with pytest.raises(SwarmError) as error:  # a2 left: blocks 3:6 go missing rather than come from copy B
        run_sync(plan_with_wait(client, 0.0, "Tiny", refresh=True))

    message = str(error.value)
    assert "No server in the swarm holds blocks 3:6 of Tiny" in message
    assert "hold blocks 3:6 with other weights than the ones this client chains" in message
    assert all(str(s.peer_id) in message for s in b)


def test_before_its_first_plan_a_client_goes_with_the_majority(scripted):
    client, script = scripted
    a2, b1, b2 = server("a2", 3, 6), other_copy("b1", 3, 6), other_copy("b2", 3, 6)
    script.reads = [[a2], [a2, b1, b2]]

    assert online(client) == {a2.peer_id}
    assert online(client) == {b1.peer_id, b2.peer_id}


def test_forged_records_of_servers_that_do_not_answer_do_not_outvote_live_ones(scripted):
    client, script = scripted
    live, forged = server("live", 0, 6), [other_copy(f"forged{i}", 0, 6) for i in range(3)]
    script.reads = [[live, *forged]]
    script.down = {f.peer_id for f in forged}

    hops = run_sync(plan_with_wait(client, 0.0, "Tiny", refresh=True))

    assert [hop.peer_id for hop in hops] == [live.peer_id]
    assert client.pinned == dict(enumerate(COPY_A))


def test_a_chained_server_that_does_not_answer_pins_nothing(scripted):
    client, script = scripted
    forged, live = other_copy("forged", 0, 6), [server(f"live{i}", 0, 6) for i in range(2)]
    script.reads = [[forged], [forged, *live]]
    script.down = {forged.peer_id}

    assert [hop.peer_id for hop in run_sync(plan_with_wait(client, 0.0, "Tiny", refresh=True))] == [forged.peer_id]
    assert client.pinned == {}  # it was the only one, but its ping failed: the live copy is still welcome
    assert online(client) == {s.peer_id for s in live}


def test_a_server_that_announces_no_digests_is_never_chained(scripted):
    client, script = scripted
    script.reads = [[server("old", 0, 6, block_digests=None), server("new", 0, 3)]]

    assert online(client) == {server("new").peer_id}


# --- quantization (join --quant): one per chain -----------------------------------------------------------------


def quantized(name: str, start: int = 0, end: int = 6, quant: str = "int8", **fields) -> ServerInfo:
    digests = tuple(f"{ord(quant[0]):02x}{b:014x}" for b in range(start, end))  # a quantized block: another digest
    return server(name, start, end, quant=quant, block_digests=digests, **fields)


def test_of_an_unquantized_and_an_int8_server_of_the_same_blocks_one_is_chained_and_the_other_named(scripted, caplog):
    client, script = scripted
    plain, q = server("plain", 0, 6), quantized("q", 0, 6)
    script.reads = [[q, plain]]

    with caplog.at_level(logging.WARNING, logger=swarm_module.__name__):
        for _ in range(3):
            assert online(client) == {plain.peer_id}
            assert [hop.peer_id for hop in run_sync(plan_with_wait(client, 0.0, "Tiny", refresh=True))] == [plain.peer_id]

    [warning] = [r.getMessage() for r in caplog.records if "Not chaining" in r.getMessage()]
    assert f"server {q.peer_id} (blocks 0:6)" in warning
    assert "int8-quantized" in warning and "chains unquantized servers" in warning
    assert client.pinned_quant == "none"


def test_a_client_never_switches_its_chain_to_another_quantization(scripted):
    client, script = scripted
    q1, q2 = quantized("q1", 0, 3), quantized("q2", 3, 6)
    plain = [server(f"plain{i}", 0, 6) for i in range(3)]
    script.reads = [[q1, q2], [q1, q2, *plain], [q1, quantized("q2", 3, 6, state=ServerState.OFFLINE), *plain]]
    run_sync(plan_with_wait(client, 0.0, "Tiny", refresh=True))  # an int8 chain: the quantization is pinned

    assert online(client) == {q1.peer_id, q2.peer_id}  # three unquantized servers outnumber them, in vain
    with pytest.raises(SwarmError) as error:  # q2 left: blocks 3:6 go missing rather than come unquantized
        run_sync(plan_with_wait(client, 0.0, "Tiny", refresh=True))

    message = str(error.value)
    assert "No server in the swarm holds blocks 3:6 of Tiny" in message
    assert "hold blocks 3:6 unquantized, and this client chains int8-quantized servers" in message
