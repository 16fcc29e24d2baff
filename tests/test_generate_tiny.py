"""A tiny random Llama served by three real server processes gives exactly what local transformers gives."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import urllib.request

import pytest
import torch

from molink_swarm import AutoDistributedModelForCausalLM


@pytest.fixture(scope="module")
def tiny_swarm(module_swarm, tiny_llama_path):
    return module_swarm(tiny_llama_path, ["0:2", "2:4", "4:6"], "--metrics-port", "0", "--chunk-tokens", "128")


@pytest.fixture(scope="module")
def distributed(tiny_swarm, tiny_llama_path):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_path, initial_peers=tiny_swarm.initial_peers)
    yield model
    model.shutdown()


def prompt(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def test_full_forward_logits_match_local(distributed, tiny_llama_local):
    ids = prompt(20)
    with torch.no_grad():
        expected = tiny_llama_local(ids).logits
        got = distributed(ids).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_forward_of_a_batch_matches_local(distributed, tiny_llama_local):
    ids = torch.cat([prompt(9, seed=2), prompt(9, seed=3)])
    with torch.no_grad():
        assert torch.allclose(distributed(ids).logits, tiny_llama_local(ids).logits, atol=1e-4)


def test_greedy_generate_is_token_identical(distributed, tiny_llama_local):
    ids = prompt()
    expected = tiny_llama_local.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    got = distributed.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert got.shape == (1, ids.shape[1] + 32)
    assert torch.equal(got, expected)


def test_multi_turn_session_equals_local_on_concatenated_history(distributed, tiny_llama_local):
    first, second = prompt(10, seed=4), prompt(6, seed=5)
    with distributed.inference_session(max_length=128) as session:
        out1 = distributed.generate(first, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        out2 = distributed.generate(second, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        # The servers hold the whole conversation except the last generated token, which nobody has fed yet.
        assert session.position == out2.shape[1] - 1
    expected1 = tiny_llama_local.generate(first, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    expected2 = tiny_llama_local.generate(
        torch.cat([expected1, second], dim=1), max_new_tokens=8, do_sample=False, min_new_tokens=8
    )
    assert torch.equal(out1, expected1)
    assert torch.equal(out2, expected2)


def test_sampling_with_the_same_seed_matches_local(distributed, tiny_llama_local):
    ids = prompt(seed=6)
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9)
    torch.manual_seed(42)
    expected = tiny_llama_local.generate(ids, **kwargs)
    torch.manual_seed(42)
    got = distributed.generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_streamer_receives_every_token(distributed):
    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    streamer = Collect()
    ids = prompt(seed=7)
    out = distributed.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])  # first chunk is the prompt
    assert torch.equal(streamed, out[0, ids.shape[1] :])


def test_session_longer_than_max_length_fails_clearly(distributed):
    from molink_swarm.client.session import SwarmError

    with distributed.inference_session(max_length=16):
        with pytest.raises(SwarmError, match="max_length"):
            distributed.generate(prompt(12), max_new_tokens=10, min_new_tokens=10, do_sample=False)


def test_decode_steps_travel_server_to_server(distributed, tiny_llama_local):
    from molink_swarm.client.loop import run_sync

    ids = prompt(seed=8)
    with distributed.inference_session(max_length=64, forwarding=True) as session:
        got = distributed.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        chain = session.chain
    assert torch.equal(got, tiny_llama_local.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False))
    swarm = distributed.swarm
    forwarded = [run_sync(swarm.info(hop.peer_id)).inputs_from_servers for hop in chain[1:]]
    assert all(count > 0 for count in forwarded), forwarded


def test_relayed_mode_gives_the_same_tokens(distributed, tiny_llama_local):
    ids = prompt(seed=9)
    with distributed.inference_session(max_length=64, forwarding=False):
        got = distributed.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, tiny_llama_local.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False))


def test_threads_generate_at_once_each_in_its_own_session(tiny_swarm, distributed, tiny_llama_local):
    """Sessions of different lengths that start and end at different times share the servers' passes (continuous
    batching), and each gets what it would get alone: identical tokens, logits within 1e-4."""
    before = batch_totals(tiny_swarm.servers)
    jobs = [(prompt(3 + 5 * i, seed=20 + i), 6 + 3 * (i % 4)) for i in range(10)]

    def run(job):
        ids, new_tokens = job
        return distributed.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(run, jobs))
    for (ids, new_tokens), got in zip(jobs, outputs):
        want = tiny_llama_local.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=0)
    assert_batched_since(tiny_swarm.servers, before)


def batch_counts(server) -> tuple[float, float]:
    """(passes, steps) a server has computed: more steps than passes means steps of sessions were batched."""
    values = server_metrics(server)
    return float(values["molink_server_batch_steps_count"]), float(values["molink_server_batch_steps_sum"])


def batch_totals(servers) -> tuple[float, float]:
    """(passes, steps) of all ``servers`` together."""
    counts = [batch_counts(server) for server in servers]
    return sum(passes for passes, _ in counts), sum(steps for _, steps in counts)


def assert_batched_since(servers, before: tuple[float, float]) -> None:
    """Some pass of ``servers`` since ``before`` (from :func:`batch_totals`) computed steps of two sessions."""
    passes, steps = (now - then for now, then in zip(batch_totals(servers), before))
    assert steps > passes, "no pass of any server computed the steps of two sessions together"


def server_metrics(server) -> dict[str, str]:
    url = server.wait_for(r"metrics at (\S+)", 5).group(1)
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return dict(re.findall(r"^(molink_server_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, re.MULTILINE))


def test_servers_export_prometheus_metrics(tiny_swarm, distributed):
    distributed.generate(prompt(10, seed=7), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    for server in tiny_swarm.servers:
        values = server_metrics(server)
        assert float(values['molink_server_tokens_total{kind="decode"}']) >= 5
        assert float(values['molink_server_tokens_total{kind="prefill"}']) >= 10
        assert float(values['molink_server_step_seconds_count{kind="decode"}']) >= 5
        assert float(values["molink_server_cache_tokens_total"]) == 32768
        assert float(values["molink_server_blocks"]) == 2
        assert "molink_server_active_sessions" in values and "molink_server_cache_tokens_reserved" in values



def test_long_generation_in_one_session_needs_no_failover(distributed, tiny_llama_local):
    """Well past the ~65 steps after which duplicate pushes used to fill a server's inbox and break the session."""
    ids = prompt(seed=7)
    expected = tiny_llama_local.generate(ids, max_new_tokens=150, do_sample=False, min_new_tokens=150)
    with distributed.inference_session(max_length=200) as session:
        got = distributed.generate(ids, max_new_tokens=150, do_sample=False, min_new_tokens=150)
        assert session.failovers == 0
        assert len(session.chain) == 3  # forwarded server to server over every hop
    assert torch.equal(got, expected)


def test_long_prompts_computed_in_chunks_match_local(distributed, tiny_llama_local):
    """Servers split long work into chunks (128 tokens here; decode steps of others run between them)."""
    ids = prompt(300, seed=8)
    with torch.no_grad():
        assert torch.allclose(distributed(ids).logits, tiny_llama_local(ids).logits, atol=1e-4)
    expected = tiny_llama_local.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(distributed.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8), expected)


def generate_like_local(decoder, jobs: list[tuple[list[int], int]], local) -> None:
    """Run every (prompt ids, new tokens) job on ``decoder`` at once; each must equal local greedy decoding."""
    from molink_swarm.client.loop import run_sync

    async def generate(ids, new_tokens):
        return [token async for token in decoder.generate(ids, new_tokens)]

    async def generate_all():
        return await asyncio.gather(*(generate(*job) for job in jobs))

    outputs = run_sync(generate_all())
    for (ids, new_tokens), tokens in zip(jobs, outputs):
        want = local.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        assert tokens == want[0, len(ids) :].tolist()


def test_one_engine_generates_many_at_once(distributed, tiny_llama_local):
    """The web app's engine: generations of different lengths at once, each equal to local greedy decoding, with
    the client's LM head run once per step for all of them, and no failover on the way."""
    from molink_swarm.client.batched import BatchedDecoder

    decoder = BatchedDecoder(distributed, max_groups=1)  # one micro-batch: every generation's head runs together
    jobs = [(prompt(2 + 4 * i, seed=60 + i)[0].tolist(), 5 + 2 * i) for i in range(6)]
    groups = distributed.swarm.group_channels
    steps, failed = groups.steps, groups.failed
    generate_like_local(decoder, jobs, tiny_llama_local)
    assert decoder.failovers == 0 and not decoder.active
    assert max(decoder.head_batches) > 1, "the LM head never ran for two generations at once"
    assert groups.steps > steps and groups.failed == failed, "decode steps did not go as group steps, one per hop"


def test_engine_groups_merge_and_split_between_steps(distributed, tiny_llama_local):
    """Generations move between micro-batches as the group count changes, and each still equals local decoding."""
    from molink_swarm.client.batched import BatchedDecoder, GroupCount

    class Flipping(GroupCount):  # a count that keeps changing: 1, 1, 1, 3, 3, 3, 1, ...
        calls = 0

        def target(self) -> int:
            self.calls += 1
            return 1 + 2 * (self.calls // 3 % 2)

    decoder = BatchedDecoder(distributed)
    decoder.group_count = Flipping()
    jobs = [(prompt(3 + 2 * i, seed=80 + i)[0].tolist(), 12) for i in range(5)]
    generate_like_local(decoder, jobs, tiny_llama_local)
    assert decoder.regroups >= 2 and decoder.failovers == 0 and not decoder.active and not decoder.groups


def test_engine_scores_a_long_prompt_and_its_answer_like_local(distributed, tiny_llama_local):
    """The engine's log-probabilities: a prompt longer than a slice of the head's scoring (and sent in chunks), then
    greedy tokens, each scored as local transformers scores the whole sequence; max_new_tokens=0 only scores."""
    from molink_swarm.client.batched import PROMPT_SCORING_ROWS, BatchedDecoder
    from molink_swarm.client.loop import run_sync

    decoder = BatchedDecoder(distributed)
    ids = prompt(PROMPT_SCORING_ROWS + 70, seed=70)[0].tolist()

    async def scored(new_tokens):
        return [token async for token in decoder.generate_scored(ids, new_tokens, logprobs=3, score_prompt=True)]

    tokens = run_sync(scored(5))
    assert [t.prompt for t in tokens] == [True] * len(ids) + [False] * 5
    assert [t.id for t in tokens[: len(ids)]] == ids and tokens[0].logprob is None and tokens[0].top == ()
    sequence = [t.id for t in tokens]
    with torch.no_grad():
        expected = torch.log_softmax(tiny_llama_local(torch.tensor([sequence])).logits[0], dim=-1)
    greedy = tiny_llama_local.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert sequence[len(ids) :] == greedy[0, len(ids) :].tolist()
    for position, token in enumerate(tokens[1:], start=1):
        row = expected[position - 1]
        assert token.logprob == pytest.approx(float(row[token.id]), abs=1e-4)
        assert [alt for alt, _ in token.top] == row.topk(3).indices.tolist()
        assert [lp for _, lp in token.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    only_prompt = run_sync(scored(0))
    assert len(only_prompt) == len(ids)
    assert [t.logprob for t in only_prompt[1:]] == pytest.approx([t.logprob for t in tokens[1 : len(ids)]], abs=1e-5)
    assert decoder.failovers == 0 and not decoder.active


def test_servers_of_one_machine_share_its_cores(tiny_swarm):
    """LocalSwarm (the demo's) gives each of its servers a share of the cores, not every core to every server."""
    share = max(1, len(os.sched_getaffinity(0)) // len(tiny_swarm.servers))
    for server in tiny_swarm.servers:
        assert server.wait_for(r"computing with (\d+) torch threads", 5).group(1) == str(share), server.output()
