"""A swarm across real NATs: servers and a client each behind their own MASQUERADE router (network namespaces).

The servers cannot be dialled, so they find that out at join, register with the public peers (relays) and
announce themselves as relayed; the client first reaches them through a relay, then tries hole punching.
NATs that drop unsolicited inbound packets let it through (direct connections); NATs that answer with RST do
not (traffic stays on the relay). Generation must be token-identical to local transformers either way.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from molink_swarm.lab import spawn
from molink_swarm.models import DEFAULT_MODEL_ALIAS

pytestmark = pytest.mark.slow

PROMPT = "The three primary colours are"
NEW_TOKENS = 32

CLIENT = """
import json, sys
import torch
from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.client.loop import run_sync

new_tokens, ids, initial_peers = int(sys.argv[2]), torch.tensor([json.loads(sys.argv[3])]), sys.argv[4:]
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=initial_peers)

def generate():
    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        hops = [{"blocks": f"{h.start}:{h.end}", "path": model.swarm.links.path(h.peer_id)} for h in session.chain]
    return {"tokens": out[0].tolist(), "hops": hops}

first = generate()  # at once: through the relays while hole punching is tried in the background
run_sync(model.swarm.links.wait_hole_punching(timeout=120))
print("RESULT " + json.dumps({"first": first, "second": generate()}), flush=True)
"""


LAB_PREFIX = "tn"  # namespaces of this module are named tn-*


@pytest.mark.parametrize("inbound", ["drop", "reset"])
def test_generation_across_nats_is_token_identical(lab, inbound, smollm2, tmp_path):
    _source, tokenizer, local = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = local.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    # Four public peers: a peer's public address counts as confirmed once several peers have observed it.
    public = [lab.add_public_host() for _ in range(4)]
    server_homes = [lab.add_home(inbound), lab.add_home(inbound)]
    client_home = lab.add_home(inbound)
    processes = []
    try:
        initial_peers = []
        for index, (namespace, ip) in enumerate(public):
            args = ["dht", "--host-maddrs", "/ip4/0.0.0.0/tcp/31337", *(["--initial-peers", *initial_peers] if initial_peers else [])]
            peer = spawn(f"dht-{index}", args, log_dir=tmp_path, prefix=lab.command(namespace, []))
            processes.append(peer)
            initial_peers.append(peer.wait_for(rf"(/ip4/{ip}/tcp/31337/p2p/\w+)", 60).group(1))
        for home, blocks in zip(server_homes, ["0:15", "15:30"]):
            args = ["join", "--model", DEFAULT_MODEL_ALIAS, "--blocks", blocks, "--initial-peers", *initial_peers]
            processes.append(spawn(f"server-{blocks}", args, log_dir=tmp_path, prefix=lab.command(home.host, [])))
        for server in processes[len(public) :]:
            online = server.wait_for(r"Server \S+ online: .*", 240).group(0)
            assert "relayed via" in online, online

        client = subprocess.run(
            lab.command(
                client_home.host,
                [sys.executable, "-c", CLIENT, DEFAULT_MODEL_ALIAS, str(NEW_TOKENS), json.dumps(ids[0].tolist()), *initial_peers],
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        results = [line for line in client.stdout.splitlines() if line.startswith("RESULT ")]
        assert results, f"client failed:\n{client.stderr[-3000:]}"
        result = json.loads(results[-1].removeprefix("RESULT "))
        for run in ("first", "second"):
            print(f"NAT ({inbound}), {run} generation:", *(f"{h['blocks']} {h['path']}" for h in result[run]["hops"]), sep="\n  ")
            assert [h["blocks"] for h in result[run]["hops"]] == ["0:15", "15:30"]
            got = torch.tensor([result[run]["tokens"]])
            assert torch.equal(got, expected), (run, tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
        after = {"drop": "hole-punched", "reset": "relayed via"}[inbound]
        assert all(h["path"].startswith(after) for h in result["second"]["hops"]), (result["second"], client.stderr[-3000:])
        if inbound == "drop":  # servers punch holes to their next servers too (at their next heartbeat)
            first_server = processes[len(public)]
            first_server.wait_for(r"Hole punched to \S+", 60)
    finally:
        for process in reversed(processes):  # servers first: they announce leaving through the bootstrap
            process.stop()
