"""Spot checks in a real swarm: a server that adds noise to its outputs (always, or on a fraction of its steps) is
caught, banned and replaced, and the text is exactly local transformers'; an honest swarm bans nobody."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.loop import run_sync

pytestmark = pytest.mark.slow  # real server processes
NEW_TOKENS = 16


def prompt(seed: int, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def expected(local, ids: torch.Tensor) -> torch.Tensor:
    return local.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


@contextlib.contextmanager
def open_model(local_swarm, path, **kwargs):
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers, **kwargs)
    try:
        yield model
    finally:
        model.shutdown()


def wait_until_known(model, server, timeout: float = 30.0) -> None:
    """Until the client's view of the swarm has ``server`` (a server's record takes a moment to reach every peer)."""
    deadline = time.monotonic() + timeout
    while server.peer_id not in {str(c.peer_id) for c in run_sync(model.swarm.candidates(refresh=True))}:
        assert time.monotonic() < deadline, f"the client never found {server.peer_id}"
        time.sleep(0.2)


def generate(model, ids: torch.Tensor):
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        session.final_chain = session.chain  # released when the session closes
    return out, session


@pytest.fixture(scope="module")
def local_swarm(module_swarm, tiny_llama_path):
    """Two honest servers of each span; those of blocks 3:6 sit behind 20 ms links, so that a faulty server of 3:6
    started next to them (see ``faulty``) is the nearest: the client chains it, or asks it to verify the one it
    chains; either way its answers are compared with an honest server's."""
    local_swarm = module_swarm(tiny_llama_path, ["0:3", "0:3"])
    honest = [local_swarm.start_server("3:6", link_delay_s=0.02, wait=False) for _ in range(2)]
    for server in honest:
        server.wait_online()
    return local_swarm


@contextlib.contextmanager
def faulty(local_swarm, fault_rate: str):
    """A server of blocks 3:6 that adds noise to its outputs on a fraction of its steps, for one test."""
    server = local_swarm.start_server("3:6", "--debug-fault-noise", "0.05", "--debug-fault-rate", fault_rate)
    try:
        yield server
    finally:
        server.stop()  # announces it leaves: the next test's client does not find it


def test_honest_swarm_bans_nobody(local_swarm, tiny_llama_path, tiny_llama_local):
    with open_model(local_swarm, tiny_llama_path, spot_check=1.0) as model:
        ids = prompt(seed=7)
        out, session = generate(model, ids)
        assert torch.equal(out, expected(tiny_llama_local, ids))
        stats = model.swarm.spot_checks
        assert stats.checks == 2 * NEW_TOKENS  # both hops, every step: the prompt and 15 decode steps
        assert stats.disagreements == 0 and not stats.caught and stats.skipped == 0
        assert session.failovers == 0 and not model.swarm.banned()
        assert session.spot_check_compute_s > 0


def test_faulty_server_is_caught_banned_and_replaced(local_swarm, tiny_llama_path, tiny_llama_local):
    """Noise on every step: the first check (the prompt's) catches it before any token is chosen."""
    with faulty(local_swarm, "1.0") as server, open_model(local_swarm, tiny_llama_path, spot_check=True) as model:
        wait_until_known(model, server)
        ids = prompt(seed=5)
        out, session = generate(model, ids)
        assert torch.equal(out, expected(tiny_llama_local, ids))
        stats = model.swarm.spot_checks
        assert set(stats.caught) == {server.peer_id}, stats
        assert server.peer_id in {str(peer) for peer in model.swarm.banned()}
        assert server.peer_id not in {str(hop.peer_id) for hop in session.final_chain}
        assert stats.disagreements == 1 and stats.undecided == 0
        assert session.failovers <= 1  # 1 if it was the server chained, 0 if it was the one asked to verify


def test_server_faulty_on_some_steps_is_caught(local_swarm, tiny_llama_path, tiny_llama_local):
    """Noise on 30% of its steps (the prompt's is honest): checking every step catches the first wrong one, and the
    step is redone on an honest server before its token is chosen."""
    with faulty(local_swarm, "0.3") as server, open_model(local_swarm, tiny_llama_path, spot_check=1.0) as model:
        wait_until_known(model, server)
        ids = prompt(seed=6)
        out, session = generate(model, ids)
        assert torch.equal(out, expected(tiny_llama_local, ids))
        stats = model.swarm.spot_checks
        assert set(stats.caught) == {server.peer_id}, stats
        assert server.peer_id not in {str(hop.peer_id) for hop in session.final_chain}
        assert stats.checks > NEW_TOKENS  # every step of every hop with a second server
