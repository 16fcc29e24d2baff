"""A swarm across real NATs: servers and a client each behind their own MASQUERADE router (network namespaces).

The servers cannot be dialled, so they find that out at join, register with the public bootstrap peer (a relay)
and announce themselves as relayed; the client reaches them through it. Generation must be token-identical
to local transformers, whatever the NATs do with unsolicited inbound packets.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from molink_swarm.local_swarm import spawn
from molink_swarm.models import DEFAULT_MODEL_ALIAS

pytestmark = pytest.mark.slow

PROMPT = "The three primary colours are"
NEW_TOKENS = 32

CLIENT = """
import json, sys
import torch
from molink_swarm import AutoDistributedModelForCausalLM
from molink_swarm.wire import relay_peer_id

model_name, initial_peer, prompt, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=[initial_peer])
ids = torch.tensor([json.loads(sys.argv[5])])
with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    routes = model.swarm.routes
    hops = [
        {"blocks": f"{h.start}:{h.end}", "peer": str(h.peer_id),
         "path": f"relayed via {relay_peer_id(routes[h.peer_id])}" if h.peer_id in routes else "direct"}
        for h in session.chain
    ]
print("RESULT " + json.dumps({"tokens": out[0].tolist(), "hops": hops}), flush=True)
"""


LAB_PREFIX = "tn"  # namespaces of this module are named tn-*


@pytest.mark.parametrize("inbound", ["drop", "reset"])
def test_generation_across_nats_is_token_identical(lab, inbound, smollm2, tmp_path):
    _source, tokenizer, local = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = local.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    relay_ns, relay_ip = lab.add_public_host()
    server_homes = [lab.add_home(inbound), lab.add_home(inbound)]
    client_home = lab.add_home(inbound)
    processes = []
    try:
        bootstrap = spawn(
            "bootstrap", ["dht", "--host-maddrs", "/ip4/0.0.0.0/tcp/31337"], log_dir=tmp_path, prefix=lab.command(relay_ns, [])
        )
        processes.append(bootstrap)
        initial_peer = bootstrap.wait_for(rf"(/ip4/{relay_ip}/tcp/31337/p2p/\w+)", 60).group(1)
        for home, blocks in zip(server_homes, ["0:15", "15:30"]):
            args = ["join", "--model", DEFAULT_MODEL_ALIAS, "--blocks", blocks, "--initial-peers", initial_peer]
            processes.append(spawn(f"server-{blocks}", args, log_dir=tmp_path, prefix=lab.command(home.host, [])))
        for server in processes[1:]:
            online = server.wait_for(r"Server \S+ online: .*", 240).group(0)
            assert f"relayed via {initial_peer}" in online, online

        client = subprocess.run(
            lab.command(
                client_home.host,
                [sys.executable, "-c", CLIENT, DEFAULT_MODEL_ALIAS, initial_peer, PROMPT, str(NEW_TOKENS), json.dumps(ids[0].tolist())],
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        results = [line for line in client.stdout.splitlines() if line.startswith("RESULT ")]
        assert results, f"client failed:\n{client.stderr[-3000:]}"
        result = json.loads(results[-1].removeprefix("RESULT "))
        print(f"NAT ({inbound}) hops:", *(f"{h['blocks']} {h['path']}" for h in result["hops"]), sep="\n  ")
        assert [h["blocks"] for h in result["hops"]] == ["0:15", "15:30"]
        assert all(h["path"].startswith("relayed via") for h in result["hops"])
        got = torch.tensor([result["tokens"]])
        assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
    finally:
        for process in reversed(processes):  # servers first: they announce leaving through the bootstrap
            process.stop()
