"""Long prompts go in chunks, pipelined over the chain, each chunk behind other sessions' decode steps on each
link: the output is what one step of the whole prompt gives, failover included."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.chunking import ChunkPolicy, DecodePace, LinkThroughput
from molink_swarm.client.link_gate import LinkGate

# ---- the gate (pure asyncio, no network)


def test_a_chunk_goes_at_once_on_an_idle_link():
    async def main():
        gate = LinkGate()
        async with gate.prefill("a", 0.5):
            assert gate.busy_s("a") > 0.4  # it holds the link for its transmission
        assert gate.waited_s == 0

    asyncio.run(main())


def test_chunks_to_one_server_are_spaced_by_their_transmission_in_order_and_other_links_do_not_wait():
    async def main():
        gate, sent = LinkGate(), []

        async def chunk(peer, name, link_s):
            async with gate.prefill(peer, link_s):
                sent.append((name, time.monotonic()))

        started = time.monotonic()
        await asyncio.gather(chunk("a", "a1", 0.05), chunk("a", "a2", 0.05), chunk("b", "b1", 0.05), chunk("a", "a3", 0.05))
        times = dict(sent)
        assert [name for name, _ in sent if name.startswith("a")] == ["a1", "a2", "a3"]
        assert times["a2"] - times["a1"] >= 0.045 and times["a3"] - times["a2"] >= 0.045
        assert times["b1"] - started < 0.03  # another server's link is free

    asyncio.run(main())


def test_a_chunk_holds_a_measured_link_for_its_transmission_only_not_while_its_server_computes():
    """Prompts that start together reach the server together (it computes them in one pass): the second chunk is
    sent while the first is still being answered."""

    async def main():
        gate, events = LinkGate(), []
        answered = asyncio.Event()

        async def chunk(name):
            async with gate.prefill("a", 0.001):
                events.append(f"{name} sent")
                await answered.wait()  # the server computes both in one pass
                events.append(f"{name} answered")

        tasks = [asyncio.create_task(chunk(name)) for name in ("first", "second")]
        await asyncio.sleep(0.05)
        assert events == ["first sent", "second sent"]
        answered.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_chunk_holds_an_unmeasured_link_until_it_is_answered():
    async def main():
        gate, events = LinkGate(), []
        release = asyncio.Event()

        async def chunk(name, link_s):
            async with gate.prefill("a", link_s):
                events.append(f"{name} sent")
                await release.wait()
                events.append(f"{name} answered")

        tasks = [asyncio.create_task(chunk("first", None)), asyncio.create_task(chunk("second", 0.001))]
        await asyncio.sleep(0.02)
        assert events == ["first sent"]  # the second waits: nobody knows yet how long the first takes to cross
        release.set()
        await asyncio.gather(*tasks)
        assert events == ["first sent", "first answered", "second sent", "second answered"]

    asyncio.run(main())


def test_a_chunk_whose_sending_fails_frees_the_link():
    async def main():
        gate = LinkGate()
        with pytest.raises(ConnectionError):
            async with gate.prefill("a", None):
                raise ConnectionError("server gone")
        await asyncio.wait_for(_enter(gate, "a"), 1.0)

    async def _enter(gate, peer):
        async with gate.prefill(peer, None):
            pass

    asyncio.run(main())


# ---- chunk sizing (pure)


def test_chunks_take_about_the_target_time_or_a_round_trip_on_the_slowest_link_within_bounds():
    policy = ChunkPolicy(target_s=0.1, min_tokens=16, max_tokens=512)
    per_token = 2 * 576 * 4  # SmolLM2's hidden states, float32, there and back
    assert policy.tokens(per_token, 50e6 / 8) == 135  # 50 Mbit/s: 0.1 s carries 135 positions
    assert policy.tokens(per_token, 1e3) == 16
    assert policy.tokens(per_token, 1e12) == 512
    assert ChunkPolicy(min_tokens=16, max_tokens=8).tokens(per_token, 1e3) == 8  # the ceiling wins
    assert policy.tokens(per_token, 50e6 / 8, rtt_s=0.2) == 271  # a far link: a round trip's worth per chunk


def test_link_throughput_leaves_out_compute_and_round_trip_and_takes_the_slowest():
    links = LinkThroughput(weight=0.5)
    links.record("fast", 1_000_000, elapsed_s=0.35, compute_s=0.2, rtt_s=0.05)  # 0.1 s of transfer
    links.record("slow", 1_000_000, elapsed_s=1.3, compute_s=0.2, rtt_s=0.1)  # 1 s
    assert links.get("fast") == pytest.approx(1e7)
    assert links.slowest(["fast", "slow"], unmeasured=1e9) == pytest.approx(1e6)
    assert links.slowest(["fast", "new"], unmeasured=5e5) == 5e5  # not measured yet: assumed slow
    links.record("slow", 1_000_000, elapsed_s=0.6, compute_s=0.0, rtt_s=0.1)  # 2e6: the average moves halfway
    assert links.get("slow") == pytest.approx(1.5e6)


def test_while_others_decode_chunks_take_a_share_of_their_step_on_the_link():
    policy = ChunkPolicy(target_s=0.1, decode_share=0.2, min_tokens=16, max_tokens=512)
    per_token = 2 * 576 * 4
    assert policy.tokens(per_token, 50e6 / 8, decode_s=None) == 135  # nobody decodes: the target
    assert policy.tokens(per_token, 50e6 / 8, decode_s=0.1) == 27  # steps of 0.1 s: 20 ms of link per chunk
    assert policy.tokens(per_token, 50e6 / 8, decode_s=2.0) == 135  # slow steps: never above the target


def test_the_decode_pace_of_a_server_is_its_recent_steps():
    pace = DecodePace(recent_s=1.0, weight=0.5)
    assert pace.recent(["a"], now=0.0) is None
    pace.record(["a", "b"], 0.2, now=10.0)
    pace.record(["a"], 0.1, now=10.5)
    assert pace.recent(["a"], now=10.6) == pytest.approx(0.15)
    assert pace.recent(["b", "c"], now=10.6) == pytest.approx(0.2)
    assert pace.recent(["b"], now=11.5) is None  # nobody decoded through it for a second


def test_a_small_step_moves_the_link_figure_little():
    """A small prompt's time is mostly fixed costs: it must not drag the link's figure to its own rate."""
    links = LinkThroughput(weight=0.5)
    links.record("a", 1_000_000, elapsed_s=0.2, compute_s=0.1, rtt_s=0.0)  # 1e7 bytes/s
    links.record("a", 37_000, elapsed_s=0.02, compute_s=0.0, rtt_s=0.0)  # 1.85e6 bytes/s, as it looks
    assert links.get("a") > 0.7e7  # averaging the two rates would give 5.9e6


def test_the_first_ping_of_a_server_is_not_its_round_trip():
    """The first call to a peer also opens the connection (a dial and handshakes): the round trip is what follows."""
    from molink_swarm.net.links import PeerLinks

    class Stub:
        calls = 0

        async def rpc_ping(self, request, timeout):
            Stub.calls += 1
            await asyncio.sleep(0.3 if Stub.calls == 1 else 0.01)

    class P2P:
        class peer_id:
            @staticmethod
            def to_base58():
                return "client"

    async def main():
        links = PeerLinks(P2P(), hole_punching=False)
        links.stub = lambda peer: Stub()
        assert await links.ping("server") < 0.1
        assert links.rtts["server"] < 0.1 and Stub.calls == 2
        await links.ping("server")
        assert Stub.calls == 3  # later pings are taken once

    asyncio.run(main())


# ---- through a real swarm of a tiny random model

SMALL_CHUNKS = ChunkPolicy(min_tokens=8, max_tokens=8)


@pytest.fixture(scope="module")
def tiny_swarm(module_swarm, tiny_llama_path):
    # A replica of 2:4, so that one can be killed mid-prompt.
    return module_swarm(tiny_llama_path, ["0:2", "2:4", "2:4", "4:6"])


@pytest.fixture(scope="module")
def distributed(tiny_swarm, tiny_llama_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_path, initial_peers=tiny_swarm.initial_peers)
    yield model
    model.shutdown()


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def test_chunked_prefill_equals_one_shot_prefill(distributed):
    hidden = torch.randn(1, 100, distributed.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ways = {
        "one shot": dict(prefill_chunking=False),
        "pipelined": dict(chunk_policy=SMALL_CHUNKS),
        "one chunk at a time": dict(chunk_policy=dataclasses.replace(SMALL_CHUNKS, pipelined=False)),
    }
    outputs = {}
    for way, options in ways.items():
        with distributed.inference_session(max_length=128, **options) as session:
            prompt_output = session.step(hidden)
            outputs[way] = prompt_output, session.step(hidden[:, :1])  # the caches hold the same prompt
            assert session.prefill_chunks == (0 if way == "one shot" else 13)
    expected_prompt, expected_next = outputs["one shot"]
    for way in ("pipelined", "one chunk at a time"):
        got_prompt, got_next = outputs[way]
        assert torch.allclose(got_prompt, expected_prompt, atol=1e-5), (way, (got_prompt - expected_prompt).abs().max())
        assert torch.allclose(got_next, expected_next, atol=1e-5), way


def test_chunked_prompts_of_a_chat_generate_what_local_transformers_does(distributed, tiny_llama_local):
    first, second = prompt(60, seed=1), prompt(30, seed=2)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with distributed.inference_session(max_length=128, chunk_policy=SMALL_CHUNKS) as session:
        out1 = distributed.generate(first, **kwargs)
        out2 = distributed.generate(second, **kwargs)
        assert session.prefill_chunks == 8 + 4  # 60 tokens, then 31 (the last token of the first answer + 30)
    expected1 = tiny_llama_local.generate(first, **kwargs)
    assert torch.equal(out1, expected1)
    assert torch.equal(out2, tiny_llama_local.generate(torch.cat([expected1, second], dim=1), **kwargs))


def test_a_server_killed_mid_prompt_is_replaced_and_the_output_is_unchanged(tiny_swarm, distributed, tiny_llama_local):
    ids = prompt(200, seed=3)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    killed_at_position, done = [], threading.Event()

    with distributed.inference_session(max_length=256, chunk_policy=SMALL_CHUNKS) as session:

        def kill_after_a_few_chunks():
            # A few chunks in, the middle hop has cached some of them: its replacement must replay them.
            while session.prefill_chunks < 5 and not done.is_set():
                time.sleep(0.001)
            if not done.is_set():
                hop = next(h for h in session.chain if h.start == 2)
                tiny_swarm.server_by_peer(hop.peer_id).kill()
                killed_at_position.append(session.position)

        killer = threading.Thread(target=kill_after_a_few_chunks)
        killer.start()
        try:
            out = distributed.generate(ids, **kwargs)
        finally:
            done.set()
            killer.join()
        assert session.failovers == 1
    assert killed_at_position == [0]  # during the prompt
    assert torch.equal(out, tiny_llama_local.generate(ids, **kwargs))
