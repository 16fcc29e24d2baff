"""P1: decode tokens/s of a 3-server loopback swarm vs local transformers, same model and dtype, same run.

Usage: python benchmarks/bench_generate.py [--model smollm2-135m-instruct] [--new-tokens 64] [--repeats 3]
    [--server-threads N]
Prints one summary line: `P1 ratio=<swarm tok/s / local tok/s> ...` (SPEC target >= 0.9).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

# All processes share this machine's cores: spinning idle OpenMP threads would steal them from the peer that
# is computing (servers set this themselves; the client and the local baseline get the same setting here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer

from molink_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from molink_swarm.lab import LocalSwarm
from molink_swarm.models import load_config, resolve_model


def split(num_blocks: int, parts: int) -> list[str]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def decode_rate(model, ids: torch.Tensor, new_tokens: int, repeats: int, **session_options) -> float:
    """Median decode tokens/s: (time for N+1 new tokens - time for 1 new token) / N, so prefill is excluded."""
    kwargs = dict(do_sample=False, pad_token_id=0)

    def timed(n: int) -> float:
        session = model.inference_session(max_length=ids.shape[1] + n + 1, **session_options) if session_options else None
        started = time.perf_counter()
        with session or contextlib.nullcontext():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - started

    timed(4)  # warm-up
    rates = []
    for _ in range(repeats):
        prefill_and_one = timed(1)
        rates.append(new_tokens / max(timed(new_tokens + 1) - prefill_and_one, 1e-9))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-threads", type=int, default=None, help="servers' torch threads (join --threads)")
    args = parser.parse_args()

    source = resolve_model(args.model, progress=True)
    num_blocks = load_config(source).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    messages = [{"role": "user", "content": "Write a short story about a robot learning to paint."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)

    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    local_rate = decode_rate(local, ids, args.new_tokens, args.repeats)
    del local

    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start(split(num_blocks, args.servers), *(["--threads", str(args.server_threads)] if args.server_threads else []))
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        try:
            swarm_rate = decode_rate(model, ids, args.new_tokens, args.repeats, forwarding=True)
            relayed_rate = decode_rate(model, ids, args.new_tokens, args.repeats, forwarding=False)
        finally:
            model.shutdown()

    print(
        f"P1 ratio={swarm_rate / local_rate:.3f} swarm_tok_s={swarm_rate:.1f} local_tok_s={local_rate:.1f} "
        f"relayed_tok_s={relayed_rate:.1f} servers={args.servers} server_threads={args.server_threads or 'share'} "
        f"model={source.name} dtype=float32 "
        f"new_tokens={args.new_tokens} (SPEC target >= 0.9; swarm = server-to-server forwarding, relayed = client "
        "talks to each server in turn)"
    )


if __name__ == "__main__":
    main()
