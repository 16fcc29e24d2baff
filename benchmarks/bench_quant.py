"""Quantized blocks (`join --quant`) on the real default model: memory per block, accuracy and speed of each mode
against unquantized float32 blocks, measured side by side in one run.

Every mode's blocks are built as a server builds them (all 30 blocks of SmolLM2, models/quant.build_quantized) and run
as a server runs them (BlockSpan with per-session caches, in this process: the network is the same for every mode).
- memory: bytes of the blocks' parameters and buffers, per block;
- accuracy: the local model's greedy answer to a chat prompt (48 tokens), teacher-forced through each mode's blocks:
  the largest absolute logit difference from the unquantized blocks', the relative error of the logits, and the
  share of the answer's positions whose greedy token is the same;
- speed: decode steps of one session (tokens/s through all blocks), decode steps of 16 sessions batched in one
  pass, and a 128-token prompt chunk. The modes take turns, round after round, and each figure is the median of its
  rounds, so that load from other processes falls on every mode alike. ``int8-dense`` is int8 without torch's int8
  kernel (weights dequantized for every matmul): what the kernel is worth.

Usage: python benchmarks/bench_quant.py [--model smollm2-135m-instruct] [--rounds 7] [--threads N]
Prints one summary line: `QUANT int8_memory_ratio=... nf4_memory_ratio=... int8_max_logit_diff=... int8_decode_ratio=...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from molink_swarm.models import load_config, read_tensors, resolve_model, tensor_names  # noqa: E402
from molink_swarm.models import quant as quant_module  # noqa: E402
from molink_swarm.models.family import adapter_for  # noqa: E402
from molink_swarm.models.packed import PackedStep  # noqa: E402
from molink_swarm.models.quant import build_quantized, module_bytes  # noqa: E402

MODES = ("none", "int8", "nf4")
PROMPT = "What is the capital of France? Answer in one sentence, then name three rivers."


def build(source, mode: str):
    config = load_config(source)
    adapter = adapter_for(config)
    names = tensor_names(source)

    def build_span(first: int, last: int):
        return adapter.build_blocks(first, last, names, lambda wanted: read_tensors(source, wanted), dtype=torch.float32)

    return build_quantized(build_span, 0, adapter.num_blocks, mode, blocks_at_once=adapter.num_blocks)


def decode_speed(blocks, hidden_size: int, steps: int) -> float:
    """Tokens/s of one session's decode steps through all blocks (after an 8-token prompt)."""
    cache = blocks.new_cache()
    blocks(torch.randn(1, 8, hidden_size), cache=cache)
    hidden = torch.randn(1, 1, hidden_size)
    started = time.perf_counter()
    for position in range(8, 8 + steps):
        blocks(hidden, position=position, cache=cache)
    return steps / (time.perf_counter() - started)


def batch_speed(blocks, hidden_size: int, sessions: int = 16, steps: int = 4) -> float:
    """Tokens/s of ``sessions`` decode steps computed in one pass (a server's continuous batching)."""
    caches = [blocks.new_cache() for _ in range(sessions)]
    for cache in caches:
        blocks(torch.randn(1, 8, hidden_size), cache=cache)
    started = time.perf_counter()
    for position in range(8, 8 + steps):
        blocks.forward_packed([PackedStep(torch.randn(1, 1, hidden_size), position, cache) for cache in caches])
    return sessions * steps / (time.perf_counter() - started)


def prefill_speed(blocks, hidden_size: int, tokens: int = 128) -> float:
    started = time.perf_counter()
    blocks(torch.randn(1, tokens, hidden_size), cache=blocks.new_cache())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    source = resolve_model(args.model, progress=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()  # embeddings, norm, head
    hidden_size = local.config.hidden_size
    blocks = {mode: build(source, mode) for mode in MODES}
    num_blocks = blocks["none"].end - blocks["none"].start

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    with torch.inference_mode():
        answer = local.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        logits = {mode: local.lm_head(local.model.norm(span(local.model.embed_tokens(answer)))) for mode, span in blocks.items()}
    positions = slice(ids.shape[1] - 1, -1)
    results: dict[str, dict[str, float]] = {}
    for mode in MODES:
        diff = logits[mode] - logits["none"]
        results[mode] = {
            "memory_per_block": module_bytes(blocks[mode]) / num_blocks,
            "max_logit_diff": diff.abs().max().item(),
            "relative_error": (diff.norm() / logits["none"].norm()).item(),
            "greedy_agree": (logits[mode][0, positions].argmax(-1) == logits["none"][0, positions].argmax(-1)).float().mean().item(),
        }

    runs = [*MODES, "int8-dense"]
    timings: dict[str, dict[str, list[float]]] = {run: {"decode": [], "batch16": [], "prefill": []} for run in runs}
    kernel_rows = quant_module.INT8_KERNEL_MAX_ROWS
    with torch.inference_mode():
        for mode in MODES:  # warm up (first calls allocate, pick kernels)
            decode_speed(blocks[mode], hidden_size, 2)
        for _ in range(args.rounds):
            for run in runs:
                span = blocks["int8" if run == "int8-dense" else run]
                quant_module.INT8_KERNEL_MAX_ROWS = 0 if run == "int8-dense" else kernel_rows
                timings[run]["decode"].append(decode_speed(span, hidden_size, args.decode_steps))
                timings[run]["batch16"].append(batch_speed(span, hidden_size))
                timings[run]["prefill"].append(prefill_speed(span, hidden_size))
        quant_module.INT8_KERNEL_MAX_ROWS = kernel_rows
    speed = {run: {kind: statistics.median(values) for kind, values in kinds.items()} for run, kinds in timings.items()}

    print(f"{args.model}: {num_blocks} blocks, float32, {torch.get_num_threads()} torch threads, {args.rounds} rounds")
    print(f"{'mode':<11}{'MB/block':>9}{'max|dlogit|':>12}{'rel.err':>9}{'greedy':>8}{'decode tok/s':>14}"
          f"{'16 batched':>12}{'prefill tok/s':>15}")
    for run in runs:
        r = results.get(run.split("-")[0], {})
        accuracy = (f"{r['memory_per_block'] / 1e6:>9.2f}{r['max_logit_diff']:>12.3f}{r['relative_error']:>9.3f}"
                    f"{r['greedy_agree']:>8.2f}") if run in results else " " * 38
        print(f"{run:<11}{accuracy}{speed[run]['decode']:>14.1f}{speed[run]['batch16']:>12.1f}{speed[run]['prefill']:>15.1f}")

    none = speed["none"]
    fields = [f"none_memory_per_block_mb={results['none']['memory_per_block'] / 1e6:.2f}"]
    for mode in ("int8", "nf4"):
        fields.append(f"{mode}_memory_ratio={results[mode]['memory_per_block'] / results['none']['memory_per_block']:.3f}")
    for mode in ("int8", "nf4"):
        fields.append(f"{mode}_max_logit_diff={results[mode]['max_logit_diff']:.3f}")
        fields.append(f"{mode}_greedy_agree={results[mode]['greedy_agree']:.2f}")
    fields.append(f"none_decode_tok_s={none['decode']:.1f}")
    for run in ("int8", "nf4", "int8-dense"):
        name = run.replace("-", "_")
        for kind in ("decode", "batch16", "prefill"):
            fields.append(f"{name}_{kind}_ratio={speed[run][kind] / none[kind]:.2f}")
    print("QUANT " + " ".join(fields))


if __name__ == "__main__":
    main()
