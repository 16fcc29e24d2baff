"""Servers die mid-generation (SIGKILL, SIGSTOP, graceful leave); the client rebuilds the chain and the text
is exactly what local transformers produces."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.batched import BatchedDecoder
from molink_swarm.client.loop import run_sync
from molink_swarm.client.session import SwarmError
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.slow
NUM_BLOCKS = 30


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama-30"
    make_tiny_llama(seed=3, num_layers=NUM_BLOCKS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def prompt(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


class AtToken:
    """A streamer that runs ``action`` when the n-th new token arrives (put() is called once for the prompt first)."""

    def __init__(self, n: int, action):
        self.n, self.action, self.calls = n, action, 0

    def put(self, value):
        if self.calls == self.n:
            self.action()
        self.calls += 1

    def end(self):
        pass


def expected(local, ids, tokens=40):
    return local.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def open_model(swarm, model_path, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers, **kwargs)


def run_with_fault(model, ids, n_token: int, fault):
    """Generate 40 tokens; at the n-th, call ``fault(session)``."""
    holder = {}

    def act():
        fault(holder["session"])

    streamer = AtToken(n_token, act)
    with model.inference_session(max_length=ids.shape[1] + 41) as session:
        holder["session"] = session
        out = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, streamer=streamer)
        session.final_chain = session.chain  # the chain is released when the session closes
    return out, session


def server_serving(swarm, session, block: int):
    hop = next(h for h in session.chain if h.start <= block < h.end)
    return swarm.server_by_peer(hop.peer_id)


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_dead_replica_mid_generation(swarm, model_path, local, how):
    local_swarm = swarm(model_path, ["0:10", "10:20", "10:20", "20:30"])
    model = open_model(local_swarm, model_path)
    victims = []

    def fault(session):
        # Every hop, not just the first, has timed its steps: a hung one is detected in a few of them.
        assert all(hop.timer.decode_s is not None for hop in session._hops)
        victim = server_serving(local_swarm, session, 15)
        victims.append(victim)
        if how == "sigkill":
            victim.kill()
        else:
            victim.signal(signal.SIGSTOP)

    try:
        ids = prompt(seed=11)
        out, session = run_with_fault(model, ids, 10, fault)
        assert torch.equal(out, expected(local, ids))
        assert session.failovers >= 1
        assert victims[0].peer_id not in {str(h.peer_id) for h in session.final_chain}
    finally:
        for victim in victims:
            victim.signal(signal.SIGCONT)
        model.shutdown()


def test_two_replicas_die_at_once(swarm, model_path, local):
    """The replacement planned first may be the other dead replica (its record is still in the DHT): the replay
    onto it fails too, and the session moves on to the third."""
    local_swarm = swarm(model_path, ["0:10", "10:20", "10:20", "10:20", "20:30"])
    model = open_model(local_swarm, model_path)
    try:
        ids = prompt(seed=17)

        def fault(session):
            for server in local_swarm.servers[1:4]:
                if server is not server_serving(local_swarm, session, 15):
                    server.kill()
                    break
            server_serving(local_swarm, session, 15).kill()

        out, session = run_with_fault(model, ids, 10, fault)
        assert torch.equal(out, expected(local, ids))
        assert session.failovers >= 1
    finally:
        model.shutdown()


def test_kill_during_prefill(swarm, model_path, local):
    local_swarm = swarm(model_path, ["0:10", "10:20", "10:20", "20:30"])
    model = open_model(local_swarm, model_path)
    try:
        ids = prompt(length=200, seed=12)
        # put() for the prompt comes just before the prefill step: a 10:20 replica dies as the prefill starts,
        # while its record is still in the DHT, so the first chain may include it.
        out, session = run_with_fault(model, ids, 0, lambda session: local_swarm.servers[1].kill())
        assert torch.equal(out, expected(local, ids))
    finally:
        model.shutdown()


def test_replacement_with_a_different_split(swarm, model_path, local):
    local_swarm = swarm(model_path, ["0:15", "15:30"])
    model = open_model(local_swarm, model_path, wait_for_blocks_s=120)
    try:
        ids = prompt(seed=13)

        def fault(session):
            # Blocks 0:15 come back as two servers (0:8, 8:15): the replacement is split differently.
            victim = server_serving(local_swarm, session, 0)
            assert victim is local_swarm.servers[0]
            local_swarm.start_server("0:8", wait=False)
            local_swarm.start_server("8:15", wait=False)
            victim.kill()

        out, session = run_with_fault(model, ids, 10, fault)
        assert torch.equal(out, expected(local, ids))
        assert [(h.start, h.end) for h in session.final_chain] == [(0, 8), (8, 15), (15, 30)]
    finally:
        model.shutdown()


def test_only_server_of_a_span_killed_and_a_new_one_joins(swarm, model_path, local):
    local_swarm = swarm(model_path, ["0:10", "10:20", "20:30"])
    model = open_model(local_swarm, model_path, wait_for_blocks_s=120)
    try:
        ids = prompt(seed=14)

        def fault(session):
            server_serving(local_swarm, session, 15).kill()
            threading.Timer(3.0, lambda: local_swarm.start_server("10:20", wait=False)).start()

        out, session = run_with_fault(model, ids, 10, fault)
        assert torch.equal(out, expected(local, ids))
    finally:
        model.shutdown()


def test_only_server_of_a_span_killed_and_none_joins(swarm, model_path):
    local_swarm = swarm(model_path, ["0:10", "10:20", "20:30"])
    model = open_model(local_swarm, model_path, wait_for_blocks_s=5)
    try:
        started = time.monotonic()
        with pytest.raises(SwarmError, match="blocks 10:20"):
            run_with_fault(model, prompt(seed=15), 10, lambda session: server_serving(local_swarm, session, 15).kill())
        assert time.monotonic() - started < 60
    finally:
        model.shutdown()


def test_graceful_leave_moves_the_session(swarm, model_path, local):
    local_swarm = swarm(model_path, ["0:10", "10:20", "10:20", "20:30"])
    model = open_model(local_swarm, model_path)
    try:
        ids = prompt(seed=16)
        out, session = run_with_fault(
            model, ids, 10, lambda session: server_serving(local_swarm, session, 15).signal(signal.SIGTERM)
        )
        assert torch.equal(out, expected(local, ids))
    finally:
        model.shutdown()


def test_twelve_generations_with_a_random_server_killed_each_time(swarm, model_path, local):
    spans = ["0:10", "10:20", "20:30"]
    local_swarm = swarm(model_path, spans * 2)
    model = open_model(local_swarm, model_path, wait_for_blocks_s=120)
    rng = random.Random(0)
    results = []
    try:
        for i in range(12):
            ids = prompt(length=8 + i % 5, seed=100 + i)

            def fault(session):
                hop = rng.choice(session.chain)
                victim = local_swarm.server_by_peer(hop.peer_id)
                span = f"{victim_span(local_swarm, victim)}"
                for server in local_swarm.servers:  # the victim needs a live replica (maybe the one restarted last)
                    if server is not victim and victim_span(local_swarm, server) == span:
                        server.wait_online()
                victim.kill()
                local_swarm.servers.remove(victim)
                local_swarm.start_server(span, wait=False)  # comes back while generation goes on

            out, _ = run_with_fault(model, ids, rng.randrange(1, 30), fault)
            results.append(torch.equal(out, expected(local, ids)))
    finally:
        model.shutdown()
    assert sum(results) == 12, results


def victim_span(local_swarm, victim) -> str:
    args = victim.popen.args
    return args[args.index("--blocks") + 1]


def test_a_server_dies_under_a_batch_of_sessions(swarm, model_path, local):
    """Six generations of one engine share the servers' passes; the server of blocks 10:20 that holds them dies;
    every generation moves and ends exactly as local transformers."""
    local_swarm = swarm(model_path, ["0:10", "10:20", "10:20", "20:30"])
    model = open_model(local_swarm, model_path)
    decoder = BatchedDecoder(model)
    prompts = [prompt(4 + 3 * i, seed=40 + i)[0].tolist() for i in range(6)]
    victims = []

    async def generate(index: int) -> list[int]:
        tokens = []
        async for token in decoder.generate(prompts[index], 24):
            tokens.append(token)
            if index == 0 and len(tokens) == 8:
                victims.append(server_serving(local_swarm, next(iter(decoder.active)), 15))
                victims[0].kill()
        return tokens

    async def generate_all():
        return await asyncio.gather(*(generate(i) for i in range(len(prompts))))

    try:
        outputs = run_sync(generate_all())
        for ids, tokens in zip(prompts, outputs):
            want = local.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
            assert tokens == want.tolist()
        assert decoder.failovers >= 1 and victims
        assert model.swarm.group_channels.steps > 0  # the generations stepped in group steps, before and after
    finally:
        model.shutdown()
