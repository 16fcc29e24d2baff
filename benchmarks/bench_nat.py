"""NAT: join-to-online time and tokens/s of a server reached directly vs one behind a NAT (relayed, and
hole-punched where the NATs allow it).

Builds a network-namespace lab (needs root, iproute2, iptables): four bootstrap/relay peers and a public server
on the public segment, a server behind a NAT (inbound drop or reset), and a client behind another NAT. Each
server holds every block of the default model; the client generates through the public one, then (that one
stopped) through the NAT'd one, first with hole punching off (relayed), then on.

Usage: python benchmarks/bench_nat.py [--inbound drop|reset] [--tokens 32]
Prints: `NAT inbound=... join_direct_s=... join_relayed_s=... direct_tok_s=... relayed_tok_s=...
punched_path=... punched_tok_s=... relayed_vs_direct=...`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from molink_swarm.lab import spawn
from molink_swarm.lab.nat_lab import NatLab, lab_unavailable_reason
from molink_swarm.models import DEFAULT_MODEL_ALIAS, resolve_model

CLIENT = """
import json, sys, time
import torch
from molink_swarm import AutoDistributedModelForCausalLM

from molink_swarm.client.loop import run_sync

tokens, hole_punching, initial_peers = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=initial_peers, hole_punching=hole_punching)
ids = torch.tensor([[1, 504, 1345, 2306, 9081, 2739, 359]])
model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: plan, connect, first session
run_sync(model.swarm.links.wait_hole_punching(timeout=120))
with model.inference_session(max_length=ids.shape[1] + tokens) as session:
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    elapsed = time.perf_counter() - started
    paths = [model.swarm.links.path_kind(hop.peer_id) for hop in session.chain]
print("RESULT " + json.dumps({"tok_s": tokens / elapsed, "paths": paths}), flush=True)
"""


def generate_from(lab: NatLab, namespace: str, initial_peers: list[str], tokens: int, hole_punching: bool) -> dict:
    args = [DEFAULT_MODEL_ALIAS, str(tokens), str(int(hole_punching)), *initial_peers]
    out = subprocess.run(
        lab.command(namespace, [sys.executable, "-c", CLIENT, *args]),
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"client failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inbound", choices=["drop", "reset"], default="drop")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    reason = lab_unavailable_reason()
    if reason:
        sys.exit(f"NAT lab unavailable: {reason}")
    resolve_model(DEFAULT_MODEL_ALIAS, progress=True)  # the one-time conversion is not part of the timings

    with tempfile.TemporaryDirectory() as logs, NatLab("bn") as lab:
        relays = [lab.add_public_host() for _ in range(4)]  # hole punching wants >= 4 observers of an address
        public_ns, _ = lab.add_public_host()
        home, client_home = lab.add_home(args.inbound), lab.add_home(args.inbound)
        processes, initial_peers = [], []
        try:
            for index, (namespace, ip) in enumerate(relays):
                extra = ["--initial-peers", *initial_peers] if initial_peers else []
                peer = spawn(f"dht-{index}", ["dht", "--host-maddrs", "/ip4/0.0.0.0/tcp/31337", *extra], log_dir=Path(logs),
                             prefix=lab.command(namespace, []))
                processes.append(peer)
                initial_peers.append(peer.wait_for(rf"(/ip4/{ip}/tcp/31337/p2p/\w+)", 60).group(1))
            join = ["join", "--model", DEFAULT_MODEL_ALIAS, "--blocks", "0:30", "--initial-peers", *initial_peers]
            timings = {}
            for name, ns in [("direct", public_ns), ("relayed", home.host)]:
                started = time.perf_counter()
                server = spawn(f"server-{name}", join, log_dir=Path(logs), prefix=lab.command(ns, []))
                processes.append(server)
                line = server.wait_for(r"Server \S+ online: .*", 240).group(0)
                timings[name] = time.perf_counter() - started
                assert name in line, line
            nat_server = processes.pop()
            nat_server.stop()  # first the public server alone
            direct = generate_from(lab, client_home.host, initial_peers, args.tokens, hole_punching=True)
            processes.pop().stop()
            server = spawn("server-relayed-2", join, log_dir=Path(logs), prefix=lab.command(home.host, []))
            processes.append(server)
            server.wait_for(r"Server \S+ online: .*relayed", 240)
            relayed = generate_from(lab, client_home.host, initial_peers, args.tokens, hole_punching=False)
            punched = generate_from(lab, client_home.host, initial_peers, args.tokens, hole_punching=True)
            assert direct["paths"] == ["direct"] and relayed["paths"] == ["relayed"], (direct, relayed)
        finally:
            for process in reversed(processes):
                process.stop()
    print(
        f"NAT inbound={args.inbound} join_direct_s={timings['direct']:.1f} join_relayed_s={timings['relayed']:.1f} "
        f"direct_tok_s={direct['tok_s']:.1f} relayed_tok_s={relayed['tok_s']:.1f} "
        f"punched_path={punched['paths'][0]} punched_tok_s={punched['tok_s']:.1f} "
        f"relayed_vs_direct={relayed['tok_s'] / direct['tok_s']:.2f} tokens={args.tokens} model=SmolLM2-135M-Instruct "
        "(join: process start to the `online` line, reachability check included; the client sits behind its own NAT)"
    )


if __name__ == "__main__":
    main()
