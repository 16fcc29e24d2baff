"""Load test of the web app: N concurrent chat requests through `molink-swarm web` over a 2-server swarm.

Usage: python benchmarks/bench_web.py [--concurrency 20] [--max-tokens 32] [--server-threads N]
Runs one request alone, then N at once (each from its own OpenAI client), all in the same run, and prints:
`WEB n=<N> ok=<completed>/<N> p50_s=... p95_s=... single_s=... p50_vs_single=... aggregate_tok_s=...`
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import openai

from molink_swarm.lab import LocalSwarm
from molink_swarm.models import resolve_model

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--server-threads", type=int, default=None, help="servers' torch threads (join --threads)")
    args = parser.parse_args()

    source = resolve_model(args.model, progress=True)
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start(["0:15", "15:30"], *(["--threads", str(args.server_threads)] if args.server_threads else []))
        _web, url = swarm.start_web(
            "--max-concurrent", str(args.concurrency), "--max-sessions-per-client", str(args.concurrency)
        )

        def ask(index: int) -> tuple[float, int]:
            client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=600)
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model=source.name,
                messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
                max_tokens=args.max_tokens,
                temperature=0,
            )
            return time.perf_counter() - started, reply.usage.completion_tokens

        ask(0)  # warm-up
        singles = [ask(i) for i in range(3)]
        single_s = statistics.median(seconds for seconds, _tokens in singles)
        single_tok_s = sum(t for _s, t in singles) / sum(s for s, _t in singles)
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(ask, i) for i in range(args.concurrency)]
            results, failures = [], []
            for future in futures:
                try:
                    results.append(future.result())
                except Exception as e:  # counted and shown: a load test reports failures, it does not hide them
                    failures.append(repr(e))
        wall_s = time.perf_counter() - started

    latencies = [seconds for seconds, _tokens in results]
    tokens = sum(t for _seconds, t in results)
    p50 = percentile(latencies, 0.5) if latencies else float("nan")
    for failure in failures[:3]:
        print("failed:", failure)
    print(
        f"WEB n={args.concurrency} ok={len(results)}/{args.concurrency} p50_s={p50:.2f} "
        f"p95_s={percentile(latencies, 0.95) if latencies else float('nan'):.2f} single_s={single_s:.2f} "
        f"p50_vs_single={p50 / single_s:.2f} aggregate_tok_s={tokens / wall_s:.1f} "
        f"single_tok_s={single_tok_s:.1f} max_tokens={args.max_tokens} model={source.name}"
    )


if __name__ == "__main__":
    main()
