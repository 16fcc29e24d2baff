"""Continuous batching on a server: packed steps of many sessions equal each session run alone.

In-process (the blocks and caches a server builds), so that every combination of lengths, positions, joins and
leaves is cheap to check; tests/test_generate_tiny.py checks the same through real server processes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from molink_swarm.client.batched import GroupCount, PromptsInFlight, Sampling, SharedHead
from molink_swarm.models import load_config, read_tensors, resolve_model, tensor_names
from molink_swarm.models.family import adapter_for
from molink_swarm.models.packed import PackedStep
from molink_swarm.server.scheduler import (
    PREFILL_NICE,
    BatchWork,
    ComputeQueue,
    PassTimes,
    Priority,
    between_layers,
    select_batch,
)
from tests.conftest import make_tiny_llama

HIDDEN = 64


def build_blocks(model, start: int = 0, end: int | None = None):
    config = model.config
    adapter = adapter_for(AutoConfig.for_model(**config.to_dict()))
    state = model.state_dict()
    end = adapter.num_blocks if end is None else end
    return adapter.build_blocks(start, end, state.keys(), lambda names: {n: state[n] for n in names}, dtype=torch.float32)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_llama(seed=3)


@pytest.fixture(scope="module")
def blocks(llama):
    return build_blocks(llama)


def _last_layer_output(model, hidden: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model.model(inputs_embeds=hidden)
    finally:
        handle.remove()
    return captured["h"]


def test_one_session_equals_transformers(llama, blocks):
    torch.manual_seed(0)
    hidden = torch.randn(1, 9, HIDDEN)
    expected = _last_layer_output(llama, hidden)
    cache = blocks.new_cache()
    prefill = blocks(hidden[:, :6], cache=cache)
    decoded = [blocks(hidden[:, i : i + 1], position=i, cache=cache) for i in range(6, 9)]
    torch.testing.assert_close(torch.cat([prefill, *decoded], dim=1), expected, atol=1e-5, rtol=1e-4)


def test_packed_steps_of_different_lengths_equal_each_alone(blocks):
    """Sessions at different positions, decode steps next to a prompt chunk, all in one pass."""
    torch.manual_seed(1)
    prompts = [torch.randn(1, n, HIDDEN) for n in (3, 11, 7)]
    alone_caches = [blocks.new_cache() for _ in prompts]
    packed_caches = [blocks.new_cache() for _ in prompts]
    for prompt, cache in zip(prompts, alone_caches):
        blocks(prompt, cache=cache)
    for prompt, cache in zip(prompts, packed_caches):
        blocks(prompt, cache=cache)
    positions = [p.shape[1] for p in prompts]
    for step in range(4):
        inputs = [torch.randn(1, 1 if i != 1 or step != 2 else 5, HIDDEN) for i in range(len(prompts))]
        alone = [blocks(x, position=pos, cache=c) for x, pos, c in zip(inputs, positions, alone_caches)]
        packed = blocks.forward_packed([PackedStep(x, pos, c) for x, pos, c in zip(inputs, positions, packed_caches)])
        for a, b in zip(alone, packed):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        positions = [pos + x.shape[1] for pos, x in zip(positions, inputs)]


def test_sessions_join_and_leave_mid_batch(blocks):
    torch.manual_seed(2)
    caches, alone, positions = {}, {}, {}
    for name, length in (("a", 4), ("b", 9)):
        prompt = torch.randn(1, length, HIDDEN)
        caches[name], alone[name] = blocks.new_cache(), blocks.new_cache()
        blocks(prompt, cache=caches[name])
        blocks(prompt, cache=alone[name])
        positions[name] = length
    schedule = [["a", "b"], ["a", "b", "c"], ["b", "c"], ["c"], ["a", "c"]]
    for step, members in enumerate(schedule):
        if "c" in members and "c" not in caches:
            prompt = torch.randn(1, 2, HIDDEN)
            caches["c"], alone["c"] = blocks.new_cache(), blocks.new_cache()
            blocks(prompt, cache=caches["c"])
            blocks(prompt, cache=alone["c"])
            positions["c"] = 2
        inputs = {name: torch.randn(1, 1, HIDDEN) for name in members}
        packed = blocks.forward_packed([PackedStep(inputs[n], positions[n], caches[n]) for n in members])
        for name, output in zip(members, packed):
            expected = blocks(inputs[name], position=positions[name], cache=alone[name])
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
            positions[name] += 1


def test_sessions_with_several_rows_pack_with_single_row_ones(blocks):
    torch.manual_seed(3)
    wide, narrow = torch.randn(3, 5, HIDDEN), torch.randn(1, 8, HIDDEN)
    wide_cache, narrow_cache = blocks.new_cache(), blocks.new_cache()
    outputs = blocks.forward_packed([PackedStep(wide, 0, wide_cache), PackedStep(narrow, 0, narrow_cache)])
    torch.testing.assert_close(outputs[0], blocks(wide), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[1], blocks(narrow), atol=1e-5, rtol=1e-4)


def test_cache_grows_in_place_and_rolls_back(blocks):
    torch.manual_seed(4)
    hidden = torch.randn(1, 40, HIDDEN)
    cache = blocks.new_cache(max_length=40)
    for i in range(40):
        blocks(hidden[:, i : i + 1], position=i, cache=cache)
    layer = cache.layer(0)
    assert layer.get_seq_length() == 40 and layer._keys.shape[-2] == 40  # capped at max_length, not doubled past it
    cache.truncate(30)
    redo = blocks(hidden[:, 30:32], position=30, cache=cache)
    fresh = blocks(hidden[:, :32])
    torch.testing.assert_close(redo, fresh[:, 30:32], atol=1e-5, rtol=1e-4)


def tiny_model(model_type: str, **options):
    """A 2-layer random model of ``model_type`` (seed it before), attending with sdpa."""
    config = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **options,
    )
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_sliding_windows_in_packed_steps(model_type):
    """Families with sliding-window attention: the window is applied per step (a window of 5 over 12 tokens)."""
    torch.manual_seed(5)
    options = dict(use_sliding_window=True, max_window_layers=0) if model_type == "qwen2" else {}
    model = tiny_model(model_type, sliding_window=5, **options)
    spans = build_blocks(model)
    hidden = torch.randn(1, 12, HIDDEN)
    expected = _last_layer_output(model, hidden)
    cache, other = spans.new_cache(), spans.new_cache()
    spans(hidden[:, :7], cache=cache)
    spans(torch.randn(1, 3, HIDDEN), cache=other)
    outputs = []
    for i in range(7, 12):
        out, _ = spans.forward_packed([PackedStep(hidden[:, i : i + 1], i, cache), PackedStep(torch.randn(1, 1, HIDDEN), i - 4, other)])
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected[:, 7:], atol=1e-5, rtol=1e-4)


_MOE_OPTIONS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
}


@pytest.mark.parametrize("model_type", sorted(_MOE_OPTIONS))
def test_blocks_load_checkpoints_through_the_familys_conversions(model_type, tmp_path):
    """MoE checkpoints store each expert's weights apart, transformers runs them fused: blocks built from the saved
    checkpoint, as a server reads it, compute what the model computes."""
    torch.manual_seed(6)
    model = tiny_model(model_type, **_MOE_OPTIONS[model_type])
    model.save_pretrained(tmp_path)
    source = resolve_model(tmp_path)
    names = tensor_names(source)
    assert any(".experts.0." in name for name in names)  # stored expert by expert
    adapter = adapter_for(load_config(source))
    spans = adapter.build_blocks(0, 2, names, lambda wanted: read_tensors(source, wanted), dtype=torch.float32)
    hidden = torch.randn(1, 7, HIDDEN)
    torch.testing.assert_close(spans(hidden), _last_layer_output(model, hidden), atol=1e-5, rtol=1e-4)


# ---- the server's compute queue: what joins a pass


def queue_recorder(queue_kwargs=None):
    passes: list[list[str]] = []

    def run(works):
        passes.append([w.payload for w in works])
        if any(w.payload == "faulty" for w in works):
            raise ValueError("bad input")
        time.sleep(0.02)
        return [f"out-{w.payload}" for w in works]

    return ComputeQueue("test", **(queue_kwargs or {})), passes, run


async def test_steps_arriving_during_a_pass_join_the_next_one():
    queue, passes, run = queue_recorder()
    try:
        first = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "a", run, decode=True), Priority.DECODE))
        await asyncio.sleep(0.005)  # "a" computes alone: nothing waits for a batch to fill
        others = [
            asyncio.ensure_future(queue.run_batched(BatchWork(key, 1, name, run, decode=True), Priority.DECODE))
            for key, name in [("span", "b"), ("span", "c"), ("other-span", "d"), ("span", "e")]
        ]
        results = await asyncio.wait_for(asyncio.gather(first, *others), 5)
    finally:
        queue.shutdown()
    assert results == ["out-a", "out-b", "out-c", "out-d", "out-e"]
    assert passes[0] == ["a"]
    assert sorted(map(sorted, passes[1:])) == [["b", "c", "e"], ["d"]]  # batched by blocks, never across them


async def test_a_faulty_member_fails_alone():
    queue, passes, run = queue_recorder()
    try:
        blocker = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "a", run, decode=True), Priority.DECODE))
        await asyncio.sleep(0.005)
        good = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "b", run, decode=True), Priority.DECODE))
        bad = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "faulty", run, decode=True), Priority.DECODE))
        assert await asyncio.wait_for(good, 5) == "out-b"
        with pytest.raises(ValueError):
            await asyncio.wait_for(bad, 5)
        await blocker
    finally:
        queue.shutdown()
    assert ["b", "faulty"] in passes and ["b"] in passes  # tried together, then each alone


async def test_batching_off_runs_one_step_per_pass():
    queue, passes, run = queue_recorder({"max_batch": 1})
    try:
        tasks = [asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, str(i), run, decode=True), Priority.DECODE)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    finally:
        queue.shutdown()
    assert [len(p) for p in passes] == [1, 1, 1, 1]


def test_prompt_chunks_join_within_the_token_budget_and_decode_steps_always():
    def work(tokens):
        return BatchWork("span", tokens, tokens, run=None, decode=tokens <= 4)

    head = work(200)
    chosen = select_batch(head, [work(1), work(100), work(50), work(1), work(6)], max_items=32, max_tokens=256)
    assert [w.payload for w in chosen] == [200, 1, 50, 1]
    assert len(select_batch(work(1), [work(1)] * 40, max_items=32, max_tokens=256)) == 32


async def test_a_prompts_chunks_run_in_order_one_per_pass():
    """Even when its last chunk would fit a pass its earlier ones do not, and decode steps come between."""
    queue, passes, run = queue_recorder({"max_batch_tokens": 256})
    try:
        blocker = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "a", run, decode=True), Priority.DECODE))
        await asyncio.sleep(0.005)
        chunks = [BatchWork("span", tokens, name, run) for tokens, name in ((256, "x0"), (256, "x1"), (44, "x2"))]
        prompt = asyncio.ensure_future(queue.run_sequence(chunks, Priority.PREFILL))
        await asyncio.sleep(0)
        decode = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "y", run, decode=True), Priority.DECODE))
        assert await asyncio.wait_for(prompt, 5) == ["out-x0", "out-x1", "out-x2"]
        await asyncio.gather(blocker, decode)
    finally:
        queue.shutdown()
    order = [name for members in passes for name in members if name.startswith("x")]
    assert order == ["x0", "x1", "x2"]
    assert all(sum(name.startswith("x") for name in members) <= 1 for members in passes)
    assert passes.index(next(p for p in passes if "y" in p)) < passes.index(next(p for p in passes if "x1" in p))


async def test_with_a_prefill_worker_a_decode_step_runs_while_a_prompt_chunk_computes():
    """On a CPU server a prompt never holds up decode steps: they run beside its chunks, not after them."""
    finished: list[str] = []

    def run(works):
        time.sleep(0.3 if works[0].payload == "chunk" else 0.01)
        finished.extend(w.payload for w in works)
        return [f"out-{w.payload}" for w in works]

    queue = ComputeQueue("test", prefill_worker=True)
    try:
        prompt = asyncio.ensure_future(queue.run_sequence([BatchWork("span", 64, "chunk", run)], Priority.PREFILL))
        await asyncio.sleep(0.05)  # the chunk computes
        decode = await asyncio.wait_for(queue.run_batched(BatchWork("span", 1, "step", run, decode=True), Priority.DECODE), 5)
        assert decode == "out-step" and finished == ["step"]  # done while the chunk still computes
        assert await asyncio.wait_for(prompt, 5) == ["out-chunk"]
    finally:
        queue.shutdown()


async def test_a_prefill_pass_gives_way_between_its_layers_while_a_decode_pass_computes():
    """The two lanes do not share the server's cores: a prompt's pass waits at its next layer while decode steps
    compute, then goes on."""
    events: list[str] = []

    def run(works):
        if works[0].payload == "chunk":
            for layer in range(4):
                if layer:
                    between_layers()
                events.append(f"chunk layer {layer}")
                time.sleep(0.05)
        else:
            events.append("decode starts")
            time.sleep(0.2)
            events.append("decode ends")
        return [w.payload for w in works]

    queue = ComputeQueue("test", prefill_worker=True)
    try:
        prompt = asyncio.ensure_future(queue.run_sequence([BatchWork("span", 64, "chunk", run)], Priority.PREFILL))
        await asyncio.sleep(0.02)  # layer 0 of the chunk computes
        await asyncio.wait_for(queue.run_batched(BatchWork("span", 1, "step", run, decode=True), Priority.DECODE), 5)
        await asyncio.wait_for(prompt, 5)
    finally:
        queue.shutdown()
    assert events == ["chunk layer 0", "decode starts", "decode ends", "chunk layer 1", "chunk layer 2", "chunk layer 3"]
    between_layers()  # on any other thread: nothing to wait for


async def test_the_prefill_worker_runs_at_a_lower_os_priority_and_decode_steps_never_join_its_passes():
    queue, passes, run = queue_recorder({"prefill_worker": True})
    try:
        threads = {thread.name: thread for thread in threading.enumerate() if thread.name.startswith("test-")}
        assert os.getpriority(os.PRIO_PROCESS, threads["test-prefill"].native_id) == PREFILL_NICE
        assert os.getpriority(os.PRIO_PROCESS, threads["test-decode"].native_id) == os.getpriority(os.PRIO_PROCESS, 0)
        chunks = [BatchWork("span", 8, f"x{i}", run) for i in range(3)]
        prompt = asyncio.ensure_future(queue.run_sequence(chunks, Priority.PREFILL))
        steps = [queue.run_batched(BatchWork("span", 1, f"d{i}", run, decode=True), Priority.DECODE) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(prompt, *steps), 5)
    finally:
        queue.shutdown()
    assert all(all(name.startswith("x") for name in p) or all(name.startswith("d") for name in p) for p in passes)
    assert [name for p in passes for name in p if name.startswith("x")] == ["x0", "x1", "x2"]  # in order
    assert queue.prompt_chunk(256) == 256  # decode steps never wait on a chunk: chunks need not shrink


def test_micro_batches_in_flight_follow_the_measured_trip_and_slowest_stage():
    count = GroupCount(max_groups=8)
    assert count.target() == 1  # nothing measured: one group
    count.record(trip_s=0.40, stage_s=0.10)  # four stages of about equal time: four groups keep each one busy
    assert count.target() == 4
    for _ in range(30):
        count.record(trip_s=0.40, stage_s=0.40)  # one stage is all of the trip: more groups would only queue there
    assert count.target() == 1
    for _ in range(30):
        count.record(trip_s=5.0, stage_s=0.01)
    assert count.target() == 8


def test_micro_batches_in_flight_settle_on_the_best_measured_throughput():
    """Stages that share hardware overlap less than the first guess says: the count moves to what measures best."""
    count = GroupCount(max_groups=8, window_s=1.0)
    count.record(trip_s=0.4, stage_s=0.1)
    assert count.target() == 4  # the first guess
    tokens_per_s = {1: 100, 2: 140, 3: 120, 4: 90, 5: 80}  # 2 groups are best here
    now, used = 0.0, []
    for _ in range(1200):  # 120 s of trips of 0.1 s
        groups = count.target()
        used.append(groups)
        now += 0.1
        count.record_tokens(round(tokens_per_s[groups] * 0.1), population=16, now=now)
    assert count.target() == 2
    assert used[-600:].count(2) > 0.8 * 600  # trying the neighbours again now and then costs little
    # Another load (fewer generations): what was measured is forgotten, and the count moves again if need be.
    tokens_per_s = {1: 100, 2: 60, 3: 50}
    for _ in range(300):
        groups = count.target()
        now += 0.1
        count.record_tokens(round(tokens_per_s[groups] * 0.1), population=3, now=now)
    assert count.target() == 1


def test_more_micro_batches_are_kept_only_if_they_measure_clearly_better():
    """Where more groups buy next to nothing (servers sharing cores), the count settles on fewer: each costs passes."""
    count = GroupCount(max_groups=8, window_s=1.0, margin=0.05)
    count.record(trip_s=0.4, stage_s=0.1)
    assert count.target() == 4  # the first guess
    tokens_per_s = {1: 1000, 2: 1030, 3: 1040, 4: 1010, 5: 900}  # within 5% of each other up to 4 groups
    now = 0.0
    for _ in range(600):
        groups = count.target()
        now += 0.1
        count.record_tokens(round(tokens_per_s[groups] * 0.1), population=16, now=now)
    assert count.target() == 1
    # With no margin it keeps whatever measured best, however slightly.
    greedy = GroupCount(max_groups=8, window_s=1.0, margin=0.0)
    greedy.record(trip_s=0.4, stage_s=0.1)
    for _ in range(600):
        groups = greedy.target()
        now += 0.1
        greedy.record_tokens(round(tokens_per_s[groups] * 0.1), population=16, now=now)
    assert greedy.target() == 3


async def test_rows_that_reach_the_head_while_it_computes_go_together_in_its_next_run():
    runs = []
    release = threading.Event()

    def head(hidden: torch.Tensor) -> torch.Tensor:
        runs.append(hidden[:, 0].tolist())
        if len(runs) == 1:
            release.wait(5)  # the first run computes while others arrive
        if hidden[0, 0] < 0:
            raise ValueError("bad row")
        return hidden * 10

    shared = SharedHead(head)
    first = asyncio.create_task(shared.logits(torch.tensor([[1.0, 1.0]])))
    await asyncio.sleep(0.05)  # a lone row runs at once
    assert runs == [[1.0]]
    later = [asyncio.create_task(shared.logits(torch.tensor([[float(i), 0.0]] * i))) for i in (2, 3)]
    await asyncio.sleep(0.05)
    release.set()
    results = await asyncio.gather(first, *later)
    assert runs == [[1.0], [2.0, 2.0, 3.0, 3.0, 3.0]] and shared.batches == [1, 5]
    assert [r[:, 0].tolist() for r in results] == [[10.0], [20.0, 20.0], [30.0, 30.0, 30.0]]
    with pytest.raises(ValueError, match="bad row"):  # a failed run fails its rows, and the head goes on
        await shared.logits(torch.tensor([[-1.0, 0.0]]))
    assert (await shared.logits(torch.tensor([[4.0, 0.0]])))[0, 0] == 40.0


async def test_groups_let_the_prompts_in_flight_finish_first():
    prompts = PromptsInFlight(hold_s=5.0)
    started = time.monotonic()
    await prompts.wait()  # no prompt in flight: a lone generation never waits
    assert time.monotonic() - started < 0.05 and prompts.waits == 0

    async def prompt(seconds: float) -> None:
        with prompts.computing():
            await asyncio.sleep(seconds)

    short = asyncio.create_task(prompt(0.3))
    await asyncio.sleep(0)  # it has started
    started = time.monotonic()
    await prompts.wait()
    waited = time.monotonic() - started
    assert short.done() and 0.2 < waited < 1.0  # until the prompt was done, not the 5 s bound
    assert prompts.waits == 1


async def test_a_prompt_holds_the_groups_only_briefly_and_later_ones_do_not_prolong_a_wait():
    prompts = PromptsInFlight(hold_s=0.4)

    async def prompt(seconds: float) -> None:
        with prompts.computing():
            await asyncio.sleep(seconds)

    long = asyncio.create_task(prompt(3.0))  # a long prompt: decoding goes on 0.4 s after it started
    await asyncio.sleep(0)
    started = time.monotonic()
    waiting = asyncio.create_task(prompts.wait())
    await asyncio.sleep(0.2)
    later = asyncio.create_task(prompt(3.0))  # started while the group waited: not waited for
    await waiting
    assert 0.3 < time.monotonic() - started < 0.7 and not long.done()
    started = time.monotonic()
    await prompts.wait()  # the next step: the long prompt's time is over, the later one's 0.4 s are not
    assert 0.1 < time.monotonic() - started < 0.5
    await prompts.wait()
    assert time.monotonic() - started < 0.6  # both are past their bound: no more waiting
    never = PromptsInFlight(hold_s=0.0)  # the engine's prompt_first_s=0: groups never wait
    with never.computing():
        started = time.monotonic()
        await never.wait()
    assert time.monotonic() - started < 0.05 and never.waits == 0
    for task in (long, later):
        task.cancel()
    await asyncio.gather(long, later, return_exceptions=True)


def test_prompt_chunks_shrink_while_sessions_decode():
    def work(tokens):
        return BatchWork("span", tokens, None, run=None, decode=tokens <= 4)

    times = PassTimes(prompt_token_s=0.001, share=0.25, min_tokens=16, idle_s=1.0)
    assert times.prompt_chunk(256) == 256  # nobody decodes: full chunks
    for _ in range(20):
        times.record([work(1), work(1)], 0.2)  # decode passes of 0.2 s
    assert times.prompt_chunk(256) == 50  # a quarter of a decode pass: 0.05 s of prompt tokens at 1 ms each
    times.record([work(1), work(100)], 0.2 + 100 * 0.004)  # prompt tokens turn out to cost 4 ms each
    assert 16 <= times.prompt_chunk(256) < 50
    times.last_decode_at -= 2.0  # decoding stopped a while ago
    assert times.prompt_chunk(256) == 256


def test_sampling_at_a_tiny_temperature_is_greedy_not_an_error():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert Sampling(temperature=1e-40).choose(logits, None) == 1
    assert Sampling(temperature=0.0).choose(logits, None) == 1
    generator = torch.Generator().manual_seed(0)
    assert Sampling(temperature=1.0, top_p=0.3).choose(logits, generator) == 1  # the top token alone reaches 0.3


class Member:
    """Stands for a session: decode steps carry their session as ``member``."""

    def __init__(self, name: str):
        self.name = name


async def test_steps_that_ran_together_wait_for_each_other_and_a_lone_step_never_waits():
    """Steps of one pass arrive a few messages apart next time: the first waits for its partners instead of going
    alone, so they run in one pass again. A session that ran alone, or whose partners are all there, never waits."""
    queue, passes, run = queue_recorder()
    queue.hold_share = 500.0  # of a ~20 ms pass: a wait of ~10 s, far longer than the test may take
    a, b, c, lone = (Member(name) for name in "abcl")

    def step(member: Member, key: str = "span") -> asyncio.Future:
        work = BatchWork(key, 1, member.name, run, decode=True, member=member)
        return asyncio.ensure_future(queue.run_batched(work, Priority.DECODE))

    try:
        blocker = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "x", run, decode=True), Priority.DECODE))
        await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(blocker, step(a), step(b), step(c)), 5)
        assert passes[-1] == ["a", "b", "c"]
        for _ in range(2):  # they arrive 10 ms apart, each pass takes 20 ms: without the wait a would go alone
            first = step(a)
            await asyncio.sleep(0.01)
            second = step(b)
            await asyncio.sleep(0.01)
            await asyncio.wait_for(asyncio.gather(first, second, step(c)), 5)
            assert passes[-1] == ["a", "b", "c"]
        await asyncio.wait_for(step(lone), 5)  # never ran with anyone: no wait
        await asyncio.wait_for(step(lone), 5)  # ran alone: still no wait
        assert passes[-2:] == [["l"], ["l"]]
        await asyncio.wait_for(asyncio.gather(step(a), step(b), step(c)), 5)  # all there at once: no wait either
        assert passes[-1] == ["a", "b", "c"]
    finally:
        queue.shutdown()


async def test_a_partner_that_does_not_come_is_waited_for_once_and_only_briefly():
    queue, passes, run = queue_recorder()
    a, b, c = (Member(name) for name in "abc")

    def step(member: Member) -> asyncio.Future:
        return asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, member.name, run, decode=True, member=member), Priority.DECODE))

    try:
        blocker = asyncio.ensure_future(queue.run_batched(BatchWork("span", 1, "x", run, decode=True), Priority.DECODE))
        await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(blocker, step(a), step(b), step(c)), 5)
        queue.hold_share = 5.0  # c has left: a and b wait for it about 5 passes (~0.1 s), then go together
        await asyncio.wait_for(asyncio.gather(step(a), step(b)), 5)
        assert passes[-1] == ["a", "b"]
        queue.hold_share = 500.0  # now they expect only each other: no wait of ~10 s for c again
        await asyncio.wait_for(asyncio.gather(step(a), step(b)), 5)
        assert passes[-1] == ["a", "b"]
    finally:
        queue.shutdown()
