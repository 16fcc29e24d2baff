"""P6: seconds from `molink-swarm join` of 15 blocks of the default model to its `online` line (after the
one-time GGUF conversion), next to the time plain transformers takes to load the whole model, same run.

Usage: python benchmarks/bench_join.py [--blocks 0:15] [--repeats 3]
Prints one summary line: `P6 join_s=<median s> ratio_to_target=<join_s / 10 s> local_load_s=... ...` (target <= 10 s).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from molink_swarm.lab import LocalSwarm
from molink_swarm.models import resolve_model

TARGET_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--blocks", default="0:15")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    source = resolve_model(args.model, progress=True)  # the one-time conversion is not part of P6
    load_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        load_times.append(time.perf_counter() - started)

    join_times = []
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start_bootstrap()
        for _ in range(args.repeats):
            started = time.perf_counter()
            server = swarm.start_server(args.blocks, wait=False)
            server.wait_online(120)
            join_times.append(time.perf_counter() - started)
            server.stop()

    join_s = statistics.median(join_times)
    print(
        f"P6 join_s={join_s:.2f} ratio_to_target={join_s / TARGET_S:.2f} local_load_s={statistics.median(load_times):.2f} "
        f"join_vs_local_load={join_s / statistics.median(load_times):.1f} blocks={args.blocks} model={source.name} "
        f"runs={[round(t, 2) for t in join_times]} (target: join_s <= {TARGET_S:.0f}; join includes process start, "
        "DHT bootstrap, loading the blocks, measuring throughput and announcing)"
    )


if __name__ == "__main__":
    main()
