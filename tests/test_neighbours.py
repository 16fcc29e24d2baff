"""Servers measure and announce their RTT to the servers that can follow them in a chain, what their link
carries, and their compute throughput (lone, batched, prompt)."""

from __future__ import annotations

import time

from molink_swarm.dht import fetch_servers, start_dht
from molink_swarm.models import resolve_model


def test_servers_announce_rtts_to_their_possible_successors(swarm, tiny_llama_path):
    local = swarm(tiny_llama_path, ["0:3", "3:6", "2:6"], "--update-period", "1")
    first, second, overlapping = local.servers
    model_id = resolve_model(tiny_llama_path).model_id
    dht, _ = start_dht(local.initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        deadline = time.monotonic() + 60
        while True:
            records = {str(s.peer_id): s.record for s in fetch_servers(dht, model_id, 6)}
            announced = records.get(first.peer_id)
            if (
                announced is not None
                and set(announced.next_rtts) == {second.peer_id, overlapping.peer_id}
                and announced.network_throughput is not None
            ):
                break
            assert time.monotonic() < deadline, f"next_rtts never filled in: {records}"
            time.sleep(0.5)
        assert all(0 < rtt < 5 for rtt in announced.next_rtts.values())
        assert records[second.peer_id].next_rtts == {}  # the last blocks have no successor
        assert records[second.peer_id].network_throughput is None  # nobody to measure the link to
        assert announced.network_throughput > 0
        for record in records.values():
            # Each server announces what it measured (how the figures compare is a benchmark's matter: for these tiny
            # blocks on a busy machine, batched and single-step rates come within noise of each other).
            assert record.batch_throughput > 0 and record.throughput > 0 and record.prefill_throughput > 0
    finally:
        dht.shutdown()
