"""A live swarm gets a few thousand random and adversarial messages on every RPC of its servers and relay (#9).

One attacker peer (its own libp2p identity) sends garbage and truncated metadata, unknown fields, wrong dtypes and
shapes, zero-length and 5-D tensors, declared sizes far above the payload, NaN/inf, out-of-order, negative and
huge positions, huge max_length/batch_size, spans outside the server's, broken frames, streams that stall (slow
loris), a flood of sessions, and pushes into an honest client's session. Every message must get an error or be
dropped, no call may hang, the servers must stay up within 10% of their memory, and honest clients (other
identities) must keep getting exactly what local transformers generates.

The whole scenario runs once (module fixture ``fuzzed``); each test checks one promise on what it recorded. The
counts are printed: per RPC, outcome and kind of message once (``pytest -s``), per RPC and outcome again in the
captured output of each failing test.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from hivemind.p2p import P2P, PeerID

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.loop import event_loop, run_sync
from molink_swarm.lab import LocalSwarm, SwarmProcess
from molink_swarm.net.ports import free_port
from molink_swarm.protocol import messages
from tests.fuzzing import (
    HANDLERS,
    Attack,
    AttackGenerator,
    RawStream,
    ServerTarget,
    Tally,
    deliver_all,
    frame,
    open_stalls,
    stall_attacks,
    watch_stalls,
)

pytestmark = pytest.mark.slow

SEED = 9
CALL_TIMEOUT_S = 60.0  # generous: a server answers or closes within its own, shorter, timeouts
CONCURRENCY = 16
MESSAGES = {  # per RPC; about 2,500 in all with the stalled streams, the flood and the forged pushes
    "inference": 650,
    "forward": 350,
    "push": 380,
    "push_stream": 200,
    "group_step": 120,
    "info": 60,
    "ping": 60,
    "relay_call": 150,
    "relay_stream": 150,
    "relay_load": 40,
    "dial_back": 80,
    "register": 40,
}
AWAITING_PUSH = 8  # inference steps whose pushed input never comes (each takes the server's push timeout)
BLOCKS = ["0:3", "3:6"]
HIDDEN, SERVER_MAX_LENGTH = 64, 512  # the tiny Llama's hidden size and max_position_embeddings
MAX_SESSIONS, CACHE_TOKENS = 32, 32768
FLOOD_SESSIONS = 40
FLOOD_FORWARDS = 32  # concurrent forward passes from one peer, each of 512 tokens
FORGED_POSITIONS = 40
RSS_TOLERANCE = 0.10


# ---- what the scenario records


@dataclasses.dataclass
class Generation:
    """An honest greedy generation, compared with local transformers."""

    identical: bool = False
    failovers: Optional[int] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.identical and self.failovers == 0

    def __str__(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        return f"{'identical' if self.identical else 'DIFFERENT tokens'}, {self.failovers} failovers"


@dataclasses.dataclass
class Flood:
    accepted: int = 0
    refused: int = 0
    other: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    reserved_tokens: int = 0  # max_length x batch_size of the accepted sessions
    active_sessions: Optional[int] = None  # the flooded server's own count while the flood is held
    free_cache_tokens: Optional[int] = None
    honest: Generation = dataclasses.field(default_factory=Generation)


@dataclasses.dataclass
class ForwardFlood:
    outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    honest: Generation = dataclasses.field(default_factory=Generation)


@dataclasses.dataclass
class Hijack:
    pushes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    same_id_opens: list[str] = dataclasses.field(default_factory=list)  # outcomes of opens under the victim's ids
    honest: Generation = dataclasses.field(default_factory=Generation)


@dataclasses.dataclass
class FuzzRun:
    fuzz: Tally
    stalls: Tally
    stall_kinds: dict[str, collections.Counter]  # the kind of stall matters more than the RPC
    during_stalls: Generation
    flood: Flood
    forward_flood: ForwardFlood
    hijack: Hijack
    alive: dict[str, bool]
    rss_before: dict[str, float]
    rss_after: dict[str, float]
    sessions_left: dict[str, Optional[int]]
    final: Generation
    seconds: float


# ---- the scenario


@pytest.fixture(scope="module")
def fuzz_swarm(module_swarm, tiny_llama_path) -> LocalSwarm:
    return module_swarm(
        tiny_llama_path, BLOCKS, "--max-sessions", str(MAX_SESSIONS), "--cache-tokens", str(CACHE_TOKENS)
    )


@pytest.fixture(scope="module")
def fuzzed(fuzz_swarm, tiny_llama_path, tiny_llama_local) -> FuzzRun:
    started = time.monotonic()
    honest = open_model(fuzz_swarm, tiny_llama_path)
    attacker: P2P = run_sync(P2P.create(initial_peers=fuzz_swarm.initial_peers))
    try:
        run = attack_the_swarm(fuzz_swarm, tiny_llama_path, tiny_llama_local, honest, attacker)
    finally:
        honest.shutdown()
        run_sync(attacker.shutdown(), timeout=30)
    run.seconds = time.monotonic() - started
    print(report(run))
    return run


def attack_the_swarm(swarm: LocalSwarm, model_path: Path, local, honest, attacker: P2P) -> FuzzRun:
    warm_up = generate_honestly(honest, local, seed=1)
    assert warm_up.ok, f"the honest client does not work before any attack: {warm_up}"
    watched = {**{s.name: s for s in swarm.servers}, "relay": swarm.bootstrap}
    rss_before = {name: rss_mb(process) for name, process in watched.items()}

    servers = [
        ServerTarget(s.name, PeerID.from_base58(s.peer_id), *map(int, blocks.split(":")))
        for s, blocks in zip(swarm.servers, BLOCKS)
    ]
    relay = messages.relay_peer_id(swarm.initial_peers[0])  # the bootstrap peer relays
    generator = AttackGenerator(
        SEED, servers, relay, hidden_size=HIDDEN, max_length=SERVER_MAX_LENGTH, others=[attacker.peer_id]
    )

    # Slow loris: streams that stall or send nothing stay open while everything else happens.
    stall_list = stall_attacks(generator)
    stalled = run_sync(open_stalls(attacker, stall_list, CALL_TIMEOUT_S))
    watching = asyncio.run_coroutine_threadsafe(watch_stalls(stalled, CALL_TIMEOUT_S), event_loop())
    during_stalls = generate_honestly(honest, local, seed=2)

    attacks = generator.attacks(MESSAGES, closed_port=free_port(), awaiting_push=AWAITING_PUSH)
    outcomes = run_sync(deliver_all(attacker, attacks, concurrency=CONCURRENCY, timeout=CALL_TIMEOUT_S))
    fuzz = Tally("fuzzed messages")
    for attack, (outcome, detail) in zip(attacks, outcomes):
        fuzz.add(attack, outcome, detail)

    flood = flood_one_server(swarm, model_path, local, honest, attacker, servers[0])
    forward_flood = flood_forwards(local, honest, attacker, servers[1])
    hijack = forge_pushes(honest, local, attacker, generator)

    stall_outcomes = watching.result(timeout=2 * CALL_TIMEOUT_S)
    stalls = Tally("stalled streams")
    stall_kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for attack, (outcome, detail) in zip(stall_list, stall_outcomes):
        stalls.add(attack, outcome, detail)
        stall_kinds[attack.kind][outcome] += 1

    # Every attacker stream is closed now: no session may outlive its stream.
    sessions_left = {s.name: wait_for_no_sessions(honest, s) for s in servers}
    alive = {name: process.popen.poll() is None for name, process in watched.items()}
    final = generate_honestly(honest, local, seed=3)
    rss_after = {name: settled_rss_mb(process, rss_before[name]) for name, process in watched.items()}
    return FuzzRun(
        fuzz, stalls, dict(stall_kinds), during_stalls, flood, forward_flood, hijack, alive, rss_before, rss_after,
        sessions_left, final, 0.0,
    )


def flood_one_server(swarm, model_path, local, honest, attacker: P2P, server: ServerTarget) -> Flood:
    """The attacker opens FLOOD_SESSIONS sessions at the server's max_length and holds them; meanwhile another
    peer must still be able to open a session and generate."""
    flood = Flood()
    batches = random.Random(SEED).choices([1, 1, 1, 4, 16, 64], k=FLOOD_SESSIONS)  # 64 x max_length: the whole cache

    async def open_one(i: int, batch: int) -> tuple[Optional[RawStream], str, int]:
        spec = messages.SessionSpec(session_id=f"flood-{i:04d}", start=server.start, end=server.end,
                                max_length=SERVER_MAX_LENGTH, batch_size=batch)
        message = messages.request(messages.InferenceStep(open=spec, position=0), torch.randn(batch, 1, HIDDEN))
        try:
            stream = await RawStream.open(attacker, server.peer_id, HANDLERS["inference"])
        except Exception as e:
            return None, f"stream refused ({type(e).__name__})", batch
        await stream.send(message)
        try:
            kind, _ = await asyncio.wait_for(stream.next_reply(), CALL_TIMEOUT_S)
        except asyncio.TimeoutError:
            kind = "hung"
        return stream, kind, batch

    async def open_all():
        return await asyncio.gather(*(open_one(i, b) for i, b in enumerate(batches)))

    opened = run_sync(open_all())
    try:
        for _stream, kind, batch in opened:
            if kind == "reply":
                flood.accepted += 1
                flood.reserved_tokens += SERVER_MAX_LENGTH * batch
            elif kind == "error":
                flood.refused += 1
            else:
                flood.other[kind] += 1
        try:
            info = run_sync(honest.swarm.info(server.peer_id))
            flood.active_sessions, flood.free_cache_tokens = info.active_sessions, info.free_cache_tokens
        except Exception:
            pass
        victim = open_model(swarm, model_path, wait_for_blocks_s=10.0)  # another peer: its own identity
        try:
            flood.honest = generate_honestly(victim, local, seed=4)
        finally:
            victim.shutdown()
    finally:
        for stream, _kind, _batch in opened:
            if stream is not None:
                stream.close()
    return flood


def flood_forwards(local, honest, attacker: P2P, server: ServerTarget) -> ForwardFlood:
    """The attacker sends FLOOD_FORWARDS big forward passes at once; an honest session generates meanwhile."""
    result = ForwardFlood()
    hidden = torch.randn(1, SERVER_MAX_LENGTH, HIDDEN)
    request = messages.request(messages.ForwardRequest(start=server.start, end=server.end), hidden)
    attacks = [Attack("forward", "flood", server.peer_id, (frame(request),), may_succeed=True)] * FLOOD_FORWARDS
    flooding = asyncio.run_coroutine_threadsafe(
        deliver_all(attacker, attacks, concurrency=FLOOD_FORWARDS, timeout=CALL_TIMEOUT_S), event_loop()
    )
    result.honest = generate_honestly(honest, local, seed=7)
    result.outcomes.update(outcome for outcome, _detail in flooding.result(timeout=2 * CALL_TIMEOUT_S))
    return result


def forge_pushes(honest, local, attacker: P2P, generator: AttackGenerator) -> Hijack:
    """A third peer that learned an honest session's ids pushes forged inputs for its next steps, and tries to open
    a session under its id. The honest output must not change."""
    hijack = Hijack()
    first, second = prompt(10, seed=5), prompt(6, seed=6)
    expected1 = local.generate(first, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected2 = local.generate(torch.cat([expected1, second], dim=1), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    try:
        with honest.inference_session(max_length=96, forwarding=True) as session:
            out1 = honest.generate(first, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            # Leaked ids (a test may read them; an attacker would have to steal them).
            hops = [(hop.peer_id, hop.spec) for hop in session._hops]
            attacks = forged_attacks(generator, hops, session.position, first_step_tokens=second.shape[1] + 1)
            for attack, (outcome, _detail) in zip(attacks, run_sync(deliver_all(attacker, attacks, concurrency=8,
                                                                                  timeout=CALL_TIMEOUT_S))):
                if attack.kind == "open with the victim's session id":
                    hijack.same_id_opens.append(outcome)
                else:
                    hijack.pushes[outcome] += 1
            out2 = honest.generate(second, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            failovers = session.failovers
        identical = torch.equal(out1, expected1) and torch.equal(out2, expected2)
        hijack.honest = Generation(identical, failovers)
    except Exception as e:
        hijack.honest = Generation(error=repr(e)[:300])
    return hijack


def forged_attacks(generator: AttackGenerator, hops, position: int, first_step_tokens: int) -> list[Attack]:
    attacks = []
    for peer_id, spec in hops:
        pushes = []
        for offset in range(FORGED_POSITIONS):
            tokens = first_step_tokens if offset == 0 else 1
            forged = torch.randn(1, tokens, HIDDEN, generator=generator.gen) * 3
            pushes.append(messages.request(messages.PushStep(session_id=spec.session_id, position=position + offset), forged))
        # The same forged inputs twice: one by one, and over a push stream; either may be dropped silently.
        attacks += [Attack("push", "forged push", peer_id, (p.SerializeToString(),), may_succeed=True) for p in pushes]
        attacks.append(Attack("push_stream", "forged pushes", peer_id, tuple(frame(p) for p in pushes), may_succeed=True))
        same_id = messages.request(messages.InferenceStep(open=spec, position=0), torch.randn(1, 1, HIDDEN))
        attacks.append(Attack("inference", "open with the victim's session id", peer_id, (frame(same_id),),
                              may_succeed=False))
    return attacks


# ---- helpers


def open_model(swarm: LocalSwarm, model_path: Path, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers, **kwargs)


def prompt(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def generate_honestly(model, local, seed: int, tokens: int = 16) -> Generation:
    ids = prompt(seed=seed)
    expected = local.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    try:
        with model.inference_session(max_length=ids.shape[1] + tokens) as session:
            got = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return Generation(torch.equal(got, expected), session.failovers)
    except Exception as e:  # recorded: the test that checks it says what went wrong
        return Generation(error=repr(e)[:300])


def rss_mb(process: SwarmProcess) -> float:
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {process.name}")


def settled_rss_mb(process: SwarmProcess, baseline: float, wait_s: float = 10.0) -> float:
    """The lowest RSS seen within ``wait_s`` (memory freed by expiring buffers may take a moment)."""
    deadline = time.monotonic() + wait_s
    lowest = rss_mb(process)
    while lowest > baseline * (1 + RSS_TOLERANCE) and time.monotonic() < deadline and process.popen.poll() is None:
        time.sleep(1.0)
        lowest = min(lowest, rss_mb(process))
    return lowest


def wait_for_no_sessions(honest, server: ServerTarget, wait_s: float = 15.0) -> Optional[int]:
    """The server's open sessions once they have dropped to 0, or the last count seen within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    count = None
    while time.monotonic() < deadline:
        try:
            count = run_sync(honest.swarm.info(server.peer_id)).active_sessions
        except Exception:
            count = None
        if count == 0:
            return 0
        time.sleep(0.5)
    return count


def report(run: FuzzRun, *, kinds: bool = True) -> str:
    """The counts per RPC and outcome (with ``kinds``, also per kind of message) and what honest clients saw."""
    f = run.flood
    return "\n".join([
        f"fuzz scenario: {run.seconds:.0f} s, seed {SEED}",
        run.fuzz.table(),
        *(["  by kind:", run.fuzz.kinds_table()] if kinds else []),
        run.stalls.table(),
        "  by kind:",
        *(
            f"    {kind:<30} " + ", ".join(f"{o} {n}" for o, n in sorted(counts.items()))
            for kind, counts in sorted(run.stall_kinds.items())
        ),
        f"flood of {FLOOD_SESSIONS} sessions: {f.accepted} accepted ({f.reserved_tokens} cache tokens), {f.refused} "
        f"refused, other {dict(f.other)}; server says {f.active_sessions} sessions, {f.free_cache_tokens} free tokens",
        f"  honest peer during the flood: {f.honest}",
        f"flood of {FLOOD_FORWARDS} forwards: {dict(run.forward_flood.outcomes)}; "
        f"honest meanwhile: {run.forward_flood.honest}",
        f"honest while streams stall: {run.during_stalls}",
        f"forged pushes: {dict(run.hijack.pushes)}; opens under the victim's ids: {run.hijack.same_id_opens}; "
        f"victim: {run.hijack.honest}",
        f"alive: {run.alive}; sessions left: {run.sessions_left}",
        "RSS MiB: " + ", ".join(f"{n} {run.rss_before[n]:.0f} -> {run.rss_after[n]:.0f}" for n in run.rss_before),
        f"honest after the fuzzing: {run.final}",
    ])


@pytest.fixture
def scenario(fuzzed) -> FuzzRun:
    """The scenario's results; prints the counts again so that every failing test's captured output has them."""
    print(report(fuzzed, kinds=False))
    return fuzzed


# ---- the promises


def test_the_fuzzer_reaches_every_handler(scenario):
    """Guards the test itself: valid requests among the fuzz get through, so the refusals are the server's."""
    for rpc in ("inference", "forward", "info", "ping", "relay_load", "dial_back"):
        assert scenario.fuzz.counts[rpc, "reply"] > 0, f"no {rpc} request succeeded:\n{scenario.fuzz.table()}"


def test_no_call_hangs(scenario):
    hung = scenario.fuzz.violations_of("hung")
    assert not hung, f"calls neither answered nor closed within {CALL_TIMEOUT_S:.0f} s: {hung}"


def test_invalid_input_is_refused(scenario):
    accepted = scenario.fuzz.violations_of("reply")
    assert not accepted, f"invalid requests answered as if valid: {accepted}"


def test_servers_close_stalled_streams(scenario):
    """Silent streams, truncated or drip-fed frames, declared sizes above the limit: the server ends them."""
    hung = scenario.stalls.violations_of("hung")
    assert not hung, f"streams still open {CALL_TIMEOUT_S:.0f} s after the attacker stalled them: {hung}"


def test_stalled_streams_do_not_stop_others(scenario):
    assert scenario.during_stalls.ok, f"honest generation while streams stall: {scenario.during_stalls}"


def test_one_peer_cannot_fill_a_server(scenario):
    flood = scenario.flood
    assert flood.refused > 0, f"all {flood.accepted} of the flood's sessions were accepted from one peer"
    assert flood.free_cache_tokens is not None and flood.free_cache_tokens > 0, (
        f"the flood took every cache token (server says {flood.free_cache_tokens} free)"
    )
    assert flood.active_sessions is not None and flood.active_sessions < MAX_SESSIONS, (
        f"the flood took every session slot (server says {flood.active_sessions} open)"
    )
    assert flood.honest.ok, f"another peer during the flood: {flood.honest}"


def test_a_flood_of_forwards_does_not_starve_others(scenario):
    flood = scenario.forward_flood
    assert flood.outcomes["hung"] == 0, f"forward passes of the flood hung: {dict(flood.outcomes)}"
    assert flood.honest.ok, f"an honest session during a flood of forward passes: {flood.honest}"


def test_forged_pushes_never_change_a_session(scenario):
    """Pushes under a leaked session id, and a session opened under it, from a third peer: the victim's tokens
    stay exact and it never has to fail over (whether the server refuses them or keeps them apart)."""
    hijack = scenario.hijack
    assert hijack.honest.ok, (
        f"the victim of forged pushes ({dict(hijack.pushes)}; opens under its ids: {hijack.same_id_opens}): "
        f"{hijack.honest}"
    )


def test_servers_and_relay_stay_up(scenario):
    assert all(scenario.alive.values()), scenario.alive


def test_no_session_outlives_its_stream(scenario):
    assert all(n == 0 for n in scenario.sessions_left.values()), f"sessions still open: {scenario.sessions_left}"


def test_memory_stays_within_ten_percent(scenario):
    grown = {
        name: f"{scenario.rss_before[name]:.0f} -> {after:.0f} MiB"
        for name, after in scenario.rss_after.items()
        if after > scenario.rss_before[name] * (1 + RSS_TOLERANCE)
    }
    assert not grown, f"RSS grew by more than {RSS_TOLERANCE:.0%}: {grown}"


def test_an_honest_client_gets_exact_output_afterwards(scenario):
    assert scenario.final.ok, f"honest generation after the fuzzing: {scenario.final}"
