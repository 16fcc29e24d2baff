"""Compressed activations on the real default model: bytes per decode token per hop, and what each wire dtype costs
in accuracy against float32, over a 2-server chain (servers and client set to the same wire dtype).

For each wire dtype a fresh swarm runs the local model's 64 greedy tokens teacher-forced (the prompt in one step,
then one decode step per token) and compares the logits with local transformers in float32: the largest absolute
difference, and the share of steps whose greedy token is the same; then generates freely and counts the tokens
identical to local greedy before the first difference. Bytes per token are read from the servers'
/metrics (molink_server_activation_bytes_total / _tokens_total, direction="out") over the decode steps only.

Usage: python benchmarks/bench_wire.py [--model smollm2-135m-instruct] [--new-tokens 64]
Prints one summary line: `WIRE float32_bytes_per_token=... float16_ratio=... int8_ratio=... int8_max_logit_diff=...`.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # processes share the cores (see bench_generate.py)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from molink_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from molink_swarm.lab import LocalSwarm, use_forkserver  # noqa: E402
from molink_swarm.models import load_config, resolve_model  # noqa: E402

WIRES = ("float32", "float16", "bfloat16", "int8")


def sent(servers) -> tuple[float, float]:
    """(bytes, tokens) of hidden states the servers have sent so far, summed over them."""
    pattern = r'^molink_server_activation_(bytes|tokens)_total\{direction="out"\} ([0-9.e+-]+)$'
    totals = {"bytes": 0.0, "tokens": 0.0}
    for server in servers:
        url = server.wait_for(r"metrics at (\S+)", 5).group(1)
        with urllib.request.urlopen(url, timeout=10) as reply:
            for kind, value in re.findall(pattern, reply.read().decode(), re.MULTILINE):
                totals[kind] += float(value)
    return totals["bytes"], totals["tokens"]


def measure(model_name: str, wire: str, greedy: torch.Tensor, prompt_tokens: int, local_logits: torch.Tensor, logs: Path):
    sequence, new_tokens = greedy[:, :-1], greedy.shape[1] - prompt_tokens
    num_blocks = load_config(resolve_model(model_name)).num_hidden_layers
    half = num_blocks // 2
    (logs / wire).mkdir()
    with LocalSwarm(model_name, log_dir=logs / wire) as swarm:
        swarm.start([f"0:{half}", f"{half}:{num_blocks}"], "--wire-dtype", wire, "--metrics-port", "0")
        model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=swarm.initial_peers, wire_dtype=wire)
        try:
            with torch.no_grad(), model.inference_session(max_length=sequence.shape[1]):
                steps = [model(sequence[:, :prompt_tokens]).logits]
                before = sent(swarm.servers)
                steps += [model(sequence[:, i : i + 1]).logits for i in range(prompt_tokens, sequence.shape[1])]
                after = sent(swarm.servers)
            free_run = model.generate(sequence[:, :prompt_tokens], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)
        finally:
            model.shutdown()
    logits = torch.cat(steps, dim=1)
    decode = slice(prompt_tokens - 1, None)
    agreement = (logits[0, decode].argmax(-1) == local_logits[0, decode].argmax(-1)).float().mean().item()
    return {
        # Per message, so per hop: a forwarding server sends each output twice (a push to the next server, a reply
        # to the client), and counts its tokens twice.
        "bytes_per_token": (after[0] - before[0]) / (after[1] - before[1]),
        "max_logit_diff": (logits - local_logits).abs().max().item(),
        "greedy_agree": agreement,
        "same_prefix": int((free_run[0] == greedy[0]).int().cumprod(0).sum()) - prompt_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    use_forkserver()  # four swarms of three processes: import torch & co once, not twelve times

    source = resolve_model(args.model, progress=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    messages = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    with torch.no_grad():
        greedy = local.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
        sequence = greedy[:, :-1]  # every position's logits predict the next greedy token
        local_logits = local(sequence).logits
    del local

    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for wire in WIRES:
            results[wire] = measure(args.model, wire, greedy, ids.shape[1], local_logits, Path(logs))
    base = results["float32"]["bytes_per_token"]
    fields = [f"float32_bytes_per_token={base:.0f}"]
    for wire in WIRES[1:]:
        fields.append(f"{wire}_ratio={results[wire]['bytes_per_token'] / base:.3f}")
    for wire in WIRES:
        fields.append(f"{wire}_max_logit_diff={results[wire]['max_logit_diff']:.3g}")
        fields.append(f"{wire}_greedy_agree={results[wire]['greedy_agree']:.3f}")
        fields.append(f"{wire}_same_prefix={results[wire]['same_prefix']}")
    print(
        "WIRE " + " ".join(fields) + f" logit_std={local_logits.std():.2f} model={source.name} "
        f"hidden={load_config(source).hidden_size} servers=2 "
        f"new_tokens={args.new_tokens} (bytes per decode token per hop, sent by servers; logits and greedy agreement "
        "teacher-forced vs local float32; same_prefix: tokens of a free greedy run identical to local)"
    )


if __name__ == "__main__":
    main()
