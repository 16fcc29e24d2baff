"""Servers that choose their own blocks (no --blocks), with real processes: they cover the model, servers that
join at the same moment spread out, and when one leaves another moves into the hole while a generation runs on,
token-identical to local."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import torch

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.models import DEFAULT_MODEL_ALIAS

pytestmark = pytest.mark.slow

HEARTBEAT_S = 2.0


def span_of(server) -> tuple[int, int]:
    """The blocks a server last said it serves (its `online` line, or the last `Moved:` line)."""
    spans = re.findall(r"(?:online: blocks|Moved: serving blocks) (\d+):(\d+)", server.output(last=10_000))
    start, end = spans[-1]
    return int(start), int(end)


def test_two_servers_joining_at_once_take_different_spans(swarm):
    local = swarm(DEFAULT_MODEL_ALIAS, [])
    servers = [local.start_server("15", wait=False) for _ in range(2)]
    for server in servers:
        server.wait_online()
    assert {span_of(server) for server in servers} == {(0, 15), (15, 30)}


def test_a_server_moves_into_the_hole_a_leaver_makes_while_a_generation_runs(swarm, smollm2):
    source, tokenizer, local_model = smollm2
    local = swarm(DEFAULT_MODEL_ALIAS, [])
    options = ("--update-period", str(HEARTBEAT_S))
    servers = [local.start_server("15", *options) for _ in range(3)]  # one after another: each sees the others
    spans = [span_of(server) for server in servers]
    assert set(spans) == {(0, 15), (15, 30)}, spans  # the whole model, one half held twice
    lone = next(server for server, span in zip(servers, spans) if spans.count(span) == 1)
    twins = [server for server in servers if server is not lone]

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three rivers in Europe."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    expected = local_model.generate(ids, max_new_tokens=32, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL_ALIAS, initial_peers=local.initial_peers)
    outputs = {}
    try:
        with model.inference_session(max_length=ids.shape[1] + 32) as session:

            def generate():
                outputs["tokens"] = model.generate(ids, max_new_tokens=32, do_sample=False)

            thread = threading.Thread(target=generate)
            thread.start()
            while session.position < ids.shape[1] + 4 and thread.is_alive():  # a few tokens in
                time.sleep(0.05)
            lone.signal(signal.SIGTERM)
            left_at = time.monotonic()
            assert lone.popen.wait(timeout=60) == 0
            mover = None
            while mover is None and time.monotonic() - left_at < 120:
                mover = next((t for t in twins if "Moved: serving blocks" in t.output(last=10_000)), None)
                time.sleep(0.1)
            assert mover is not None, "no server moved into the hole"
            print(f"hole filled {time.monotonic() - left_at:.1f} s after the server left (heartbeat {HEARTBEAT_S} s)")
            thread.join(timeout=180)
        assert torch.equal(outputs["tokens"], expected)
        assert span_of(mover) == spans[servers.index(lone)]
        assert "Moving from blocks" not in lone.output(last=10_000)
    finally:
        model.shutdown()
