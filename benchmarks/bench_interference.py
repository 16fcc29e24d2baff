"""One peer's long forward passes vs another peer's decode steps on the same server (issue: hostile peers).

A server computes one task at a time; a forward pass of many tokens used to be one task, so every decode step
that arrived behind it waited for all of it. Now long work runs in chunks, and decode steps go between them.

Usage: python benchmarks/bench_interference.py [--forward-tokens 1024] [--steps 40]
Prints one line: `INTERFERENCE mean_ratio=<with / alone> p99_ratio=<with / alone> ...` (decode step latency of
one session while a second peer sends back-to-back forward passes, vs the same session alone, same run). The mean
is the decode rate the session keeps; p99 (with 40 steps, about the longest) is the worst stall.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from molink_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from molink_swarm.lab import LocalSwarm  # noqa: E402


def step_latencies(model, steps: int) -> list[float]:
    """Seconds per decode step of one session (the prompt's prefill excluded)."""
    hidden_size = model.config.hidden_size
    latencies = []
    with model.inference_session(max_length=steps + 8) as session:
        session.step(torch.randn(1, 4, hidden_size))
        for _ in range(steps):
            started = time.perf_counter()
            session.step(torch.randn(1, 1, hidden_size))
            latencies.append(time.perf_counter() - started)
    return latencies


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--forward-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start(["0:30"])
        decoder = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        other = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        try:
            step_latencies(decoder, 4)  # warm-up
            alone = step_latencies(decoder, args.steps)
            stop, passes = threading.Event(), []

            def forward_passes() -> None:
                ids = torch.randint(3, 1000, (1, args.forward_tokens))
                while not stop.is_set():
                    started = time.perf_counter()
                    with torch.no_grad():
                        other(ids)
                    passes.append(time.perf_counter() - started)

            thread = threading.Thread(target=forward_passes, daemon=True)
            thread.start()
            time.sleep(1.0)  # the first pass is under way
            loaded = step_latencies(decoder, args.steps)
            stop.set()
            thread.join()
        finally:
            decoder.shutdown()
            other.shutdown()

    print(
        f"INTERFERENCE mean_ratio={statistics.mean(loaded) / statistics.mean(alone):.2f} "
        f"p50_ratio={statistics.median(loaded) / statistics.median(alone):.2f} "
        f"p99_ratio={p99(loaded) / p99(alone):.2f} alone_p50_s={statistics.median(alone):.3f} "
        f"alone_p99_s={p99(alone):.3f} with_forward_p50_s={statistics.median(loaded):.3f} "
        f"with_forward_p99_s={p99(loaded):.3f} forward_tokens={args.forward_tokens} "
        f"forward_pass_s={statistics.median(passes) if passes else float('nan'):.2f} steps={args.steps}"
    )


if __name__ == "__main__":
    main()
