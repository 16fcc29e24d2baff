"""Routing on emulated WAN links: sessions take the lowest-latency chain, and move when it loses a server."""

from __future__ import annotations

import signal

import pytest
import torch

from molink_swarm import AutoDistributedModelForCausalLM
from tests.test_failover import AtToken

pytestmark = pytest.mark.slow


def test_sessions_take_the_fast_chain_and_move_when_it_loses_a_server(swarm, tiny_llama_path, tiny_llama_local):
    local = swarm(tiny_llama_path, [])
    fast = [local.start_server(span, link_delay_s=0.010, wait=False) for span in ("0:3", "3:6")]  # RTT 20 ms
    slow = [local.start_server(span, link_delay_s=0.040, wait=False) for span in ("0:3", "3:6")]  # RTT 80 ms
    for server in fast + slow:
        server.wait_online()
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_path, initial_peers=local.initial_peers)
    try:
        fast_peers = {server.peer_id for server in fast}
        for seed in range(3):
            ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(seed))
            with model.inference_session(max_length=40) as session:
                out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
                assert {str(hop.peer_id) for hop in session.chain} == fast_peers
            assert torch.equal(out, tiny_llama_local.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False))
        measured = {str(peer): rtt for peer, rtt in model.swarm.links.rtts.items()}
        assert all(measured[s.peer_id] >= 0.020 for s in fast) and all(measured[s.peer_id] >= 0.080 for s in slow)

        # A server of the fast chain leaves mid-generation (long enough to outlast its grace period for open
        # sessions): the session moves, the text does not change.
        ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(99))
        streamer = AtToken(6, lambda: fast[1].signal(signal.SIGTERM))
        kwargs = dict(max_new_tokens=150, min_new_tokens=150, do_sample=False)
        with model.inference_session(max_length=200) as session:
            out = model.generate(ids, streamer=streamer, **kwargs)
            chain = {str(hop.peer_id) for hop in session.chain}
        assert fast[1].peer_id not in chain and slow[1].peer_id in chain
        assert session.failovers >= 1
        assert torch.equal(out, tiny_llama_local.generate(ids, **kwargs))
    finally:
        model.shutdown()
