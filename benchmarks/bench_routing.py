"""P2 and P7: per-token latency over emulated WAN links, and route planning time at scale.

P2: the default model over 3 servers (blocks 0:10, 10:20, 20:30), each behind an emulated link with RTT 40 ms
(a relay process adding 20 ms each way). Per-token decode latency with server-to-server forwarding and with
the client relaying every hop, in the same run, against the bound compute + (k+1) * RTT / 2, where compute is
local transformers' per-token decode time on the same model. Prints
`P2 ratio_to_bound=<forwarding latency / bound> forwarding_speedup=<relayed / forwarding>` (target <= 1.10).

P7: 1,000 simulated server records over an 80-block model, each announcing RTTs to 8 random other servers.
Prints `P7 plan_ms=<median ms, forwarding mode> ...` (target <= 50 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # all peers share this machine's cores

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from molink_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from molink_swarm.lab import LocalSwarm  # noqa: E402
from molink_swarm.models import resolve_model  # noqa: E402
from molink_swarm.routing.planner import Candidate, plan_chain  # noqa: E402


def simulated_swarm(num_servers: int = 1000, num_blocks: int = 80, seed: int = 0) -> list[Candidate]:
    rng = random.Random(seed)
    swarm = []
    for i in range(num_servers):
        start = rng.randrange(0, num_blocks - 1)
        end = min(num_blocks, start + rng.randint(4, 24))
        links = {f"s{rng.randrange(num_servers)}": rng.uniform(0.002, 0.15) for _ in range(8)}
        swarm.append(
            Candidate(
                f"s{i}",
                start,
                end,
                throughput=rng.uniform(20, 2000),
                rtt_s=rng.uniform(0.005, 0.25),
                load=rng.random() * 0.5,
                free_cache_tokens=rng.randrange(0, 100_000),
                next_rtts=links,
            )
        )
    return swarm


def median_ms(fn, repeats: int = 21) -> float:
    fn()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def per_token_s(model, ids: torch.Tensor, new_tokens: int, repeats: int, **session_options) -> float:
    """Median seconds per decoded token: (time for N+1 tokens - time for 1 token) / N, prefill excluded."""

    def timed(n: int) -> float:
        session = model.inference_session(max_length=ids.shape[1] + n + 1, **session_options) if session_options else None
        started = time.perf_counter()
        with session or contextlib.nullcontext():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    timed(2)
    samples = []
    for _ in range(repeats):
        one = timed(1)
        samples.append((timed(new_tokens + 1) - one) / new_tokens)
    return statistics.median(samples)


def measure_p2(model_name: str, rtt_s: float, new_tokens: int, repeats: int) -> str:
    source = resolve_model(model_name, progress=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the sea."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    compute = per_token_s(local, ids, new_tokens, repeats)
    del local
    spans = ["0:10", "10:20", "20:30"]
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(model_name, log_dir=Path(logs)) as swarm:
        swarm.start([])
        servers = [swarm.start_server(span, link_delay_s=rtt_s / 2, wait=False) for span in spans]
        for server in servers:
            server.wait_online()
        model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=swarm.initial_peers)
        try:
            forwarding = per_token_s(model, ids, new_tokens, repeats, forwarding=True)
            relayed = per_token_s(model, ids, new_tokens, repeats, forwarding=False)
        finally:
            model.shutdown()
    hops = len(spans)
    bound = compute + (hops + 1) * rtt_s / 2
    return (
        f"P2 ratio_to_bound={forwarding / bound:.3f} forwarding_speedup={relayed / forwarding:.2f} "
        f"forwarding_ms={forwarding * 1000:.1f} relayed_ms={relayed * 1000:.1f} bound_ms={bound * 1000:.1f} "
        f"compute_ms={compute * 1000:.1f} hops={hops} rtt_ms={rtt_s * 1000:.0f} model={source.name} (target <= 1.10)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-p2", action="store_true", help="only the (fast, network-free) P7 measurement")
    args = parser.parse_args()
    if not args.skip_p2:
        print(measure_p2(args.model, args.rtt_ms / 1000, args.new_tokens, args.repeats), flush=True)
    swarm = simulated_swarm()
    results = {
        mode: median_ms(lambda mode=mode: plan_chain(80, swarm, mode=mode, min_cache_tokens=2048))
        for mode in ("forwarding", "relayed", "throughput")
    }
    print(
        f"P7 plan_ms={results['forwarding']:.1f} relayed_ms={results['relayed']:.1f} "
        f"throughput_ms={results['throughput']:.1f} servers=1000 blocks=80 (target <= 50 ms)"
    )


if __name__ == "__main__":
    main()
