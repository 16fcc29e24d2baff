"""The cost of spot checks: decode tokens/s, per-token latency and server compute, checks off vs on, side by side.

Swarm: blocks 0:15 and 15:30 of the default model, two servers each, on loopback (a check of a hop needs a second
server of its blocks). One client generates greedy answers in alternating sessions with spot checks off and on (at
the default rate, 5% of steps plus the first step on each server; ``--rate`` to change it). Extra server compute:
what the verifiers spent on checks (as they measured it) over what the chain spent on the same sessions. Prints one
summary line: `SPOTCHECK rate=... tok_s_off=... tok_s_on=... ratio=... latency_ms_off=... ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # all peers share this machine's cores

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from molink_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from molink_swarm.client.spot_check import DEFAULT_SPOT_CHECK_RATE  # noqa: E402
from molink_swarm.lab import LocalSwarm  # noqa: E402
from molink_swarm.models import resolve_model  # noqa: E402


class Timestamps:
    """Streamer: the time of every put() (the prompt's first, then one per new token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run(model, ids, kwargs, rate: float) -> dict:
    streamer = Timestamps()
    started = time.perf_counter()
    with model.inference_session(max_length=ids.shape[1] + kwargs["max_new_tokens"] + 1, spot_check=rate) as session:
        out = model.generate(ids, streamer=streamer, **kwargs)
    gaps = [b - a for a, b in zip(streamer.times[1:], streamer.times[2:])]  # between new tokens: decode steps
    return {
        "out": out,
        "ttft": streamer.times[1] - started,
        "tok_s": len(gaps) / (streamer.times[-1] - streamer.times[1]),
        "gaps": gaps,
        "compute_s": session.compute_s,
        "check_compute_s": session.spot_check_compute_s,
        "checks": session.spot_checks,
        "failovers": session.failovers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rate", type=float, default=DEFAULT_SPOT_CHECK_RATE)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=4, help="sessions of each kind (alternating)")
    args = parser.parse_args()

    source = resolve_model(args.model, progress=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    kwargs = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval().generate(ids, **kwargs)

    runs: dict[float, list[dict]] = {0.0: [], args.rate: []}
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start(["0:15", "0:15", "15:30", "15:30"])
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        try:
            run(model, ids, kwargs, 0.0)  # warm-up: connections, first compute
            for _ in range(args.trials):
                for rate in runs:
                    runs[rate].append(run(model, ids, kwargs, rate))
        finally:
            caught = dict(model.swarm.spot_checks.caught)
            model.shutdown()

    def summary(rate: float) -> dict:
        results = runs[rate]
        gaps = [g for r in results for g in r["gaps"]]
        return {
            "tok_s": statistics.median(r["tok_s"] for r in results),
            "mean_ms": 1000 * statistics.mean(gaps),
            "p50_ms": 1000 * statistics.median(gaps),
            "max_ms": 1000 * max(gaps),
            "ttft_ms": 1000 * statistics.median(r["ttft"] for r in results),
            "compute_s": sum(r["compute_s"] for r in results),
            "check_compute_s": sum(r["check_compute_s"] for r in results),
            "checks_per_session": statistics.mean(r["checks"] for r in results),
            "identical": sum(torch.equal(r["out"], expected) for r in results),
            "failovers": sum(r["failovers"] for r in results),
        }

    off, on = summary(0.0), summary(args.rate)
    print(
        f"SPOTCHECK rate={args.rate:g} tok_s_off={off['tok_s']:.2f} tok_s_on={on['tok_s']:.2f} "
        f"ratio={on['tok_s'] / off['tok_s']:.3f} "
        f"latency_ms_off={off['mean_ms']:.1f} latency_ms_on={on['mean_ms']:.1f} "
        f"(p50 {off['p50_ms']:.1f}/{on['p50_ms']:.1f}, max {off['max_ms']:.1f}/{on['max_ms']:.1f}) "
        f"ttft_ms_off={off['ttft_ms']:.0f} ttft_ms_on={on['ttft_ms']:.0f} "
        f"extra_server_compute={on['check_compute_s'] / on['compute_s']:.3f} "
        f"checks_per_session={on['checks_per_session']:.1f} "
        f"identical={off['identical'] + on['identical']}/{2 * args.trials} banned={len(caught)} "
        f"failovers={off['failovers'] + on['failovers']} tokens={args.tokens} trials={args.trials} model={source.name}"
    )


if __name__ == "__main__":
    main()
