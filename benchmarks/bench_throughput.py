"""Throughput and interference of concurrent sessions on one swarm; one function per measurement.

P3: aggregate decode tokens/s of 1, 4 and 16 concurrent generations of one engine (client/batched.py) over the same
chain, with batching on (servers batch across sessions, the engine steps generations in micro-batches) and off
(`--max-batch-size 1`, every generation on its own), side by side in one run (SPEC target: speedup16 >= 6); each
rate is the median of `--p3-repeats` runs.

P5: p50/p99 inter-token latency of 4 decoding sessions while a fifth session of the same client process sends a
2,000-token prompt, every server behind a 50 Mbit/s emulated link, vs the same sessions without the prompt; with
the client's prefill chunking on and off, side by side in one run (SPEC target: p99_ratio <= 1.25).

The decoding sessions run all along; the rounds alternate windows of decoding alone, a chunked prompt and an
unchunked one, and each step counts in the window it ended in. On one machine the servers also share its cores:
a prompt's compute then slows every decode step whatever the links do. To see the links' share, run a model of
the same width with almost no compute, e.g. a 2-block random Llama of hidden size 576 with `--blocks 0:1 1:2`.

Usage: python benchmarks/bench_throughput.py [--only p3|p5] [--model smollm2-135m-instruct] [--rounds 2]
    [--chunk-target-s S] [--no-pipelining] [--server-chunk-tokens N] [--server-threads N]
    [--pin-servers] [--no-group-steps] [--p3-repeats 3]
Prints one line per measurement, e.g.
`P3 speedup16=<16 generations' aggregate / 1 generation's> batching_gain=<on / off, 16 generations> ...`
`P5 p99_ratio=<with prompt / without> unchunked_p99_ratio=<same, chunking off> p50_ratio=... ...`
(gate_wait_s: time the prompt's chunks waited for a link that earlier chunks still occupied; measured_link: the
client's estimate of the slowest link.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # every process shares this machine's cores

import torch  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402

from molink_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from molink_swarm.client.batched import BatchedDecoder  # noqa: E402
from molink_swarm.client.chunking import ChunkPolicy  # noqa: E402
from molink_swarm.client.loop import run_sync  # noqa: E402
from molink_swarm.lab import LocalSwarm  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Decoders:
    """Sessions that decode one token after another, each in its own thread, and log every step's (start, end)."""

    def __init__(self, model, sessions: int, max_length: int = 1024):
        self.model, self.max_length = model, max_length
        self.steps: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._decode, daemon=True) for _ in range(sessions)]

    def __enter__(self) -> "Decoders":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _decode(self) -> None:
        hidden_size = self.model.config.hidden_size
        while not self._stop.is_set():  # a new session whenever one is full
            with self.model.inference_session(max_length=self.max_length) as session:
                session.step(torch.randn(1, 8, hidden_size))  # a short prompt: its time is not a decode step's
                while session.position < self.max_length and not self._stop.is_set():
                    started = time.perf_counter()
                    session.step(torch.randn(1, 1, hidden_size))
                    self.steps.append((started, time.perf_counter()))

    def latencies(self, start: float, end: float) -> list[float]:
        """Inter-token latencies of the steps that ended within [start, end]."""
        return [e - s for s, e in list(self.steps) if start <= e <= end]


def p5(args) -> str:
    """4 decoding sessions, alone and while a fifth sends a long prompt (chunked, then not), in alternating rounds."""
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start_bootstrap()
        extra = ["--chunk-tokens", str(args.server_chunk_tokens)] if args.server_chunk_tokens else []
        extra += server_threads(args)
        servers = [swarm.start_server(blocks, *extra, wait=False, link_bandwidth_mbit=args.mbit) for blocks in args.blocks]
        for server in servers:
            server.wait_online()
        pin_servers(args, servers)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        prompt = torch.randn(1, args.prompt_tokens, model.config.hidden_size)
        policy = ChunkPolicy(pipelined=not args.no_pipelining)
        if args.chunk_target_s:
            policy = dataclasses.replace(policy, target_s=args.chunk_target_s)
        windows: dict[str, list[float]] = {"alone": [], "chunked": [], "unchunked": []}
        prompt_s: dict[str, list[float]] = {"chunked": [], "unchunked": []}
        chunks: list[int] = []
        try:
            with Decoders(model, args.sessions) as decoders:
                time.sleep(args.window_s)  # warm-up: streams open, links and step times measured
                for _ in range(args.rounds):
                    for condition in ("alone", "chunked", "unchunked"):
                        started = time.perf_counter()
                        if condition == "alone":
                            time.sleep(args.window_s)
                        else:
                            options = dict(prefill_chunking=condition == "chunked", chunk_policy=policy)
                            with model.inference_session(max_length=args.prompt_tokens + 8, **options) as session:
                                session.step(prompt)
                                chunks.append(session.prefill_chunks)
                            prompt_s[condition].append(time.perf_counter() - started)
                        windows[condition] += decoders.latencies(started, time.perf_counter())
                        time.sleep(1.0)  # the previous prompt's last bytes and compute drain
            gate_wait_s = model.swarm.gate.waited_s
            measured = [model.swarm.link_throughput.get(PeerID.from_base58(server.peer_id)) for server in servers]
            link_mbit = min(8 * rate / 1e6 for rate in measured if rate is not None)
        finally:
            model.shutdown()

    alone, chunked, unchunked = windows["alone"], windows["chunked"], windows["unchunked"]
    return (
        f"P5 p99_ratio={percentile(chunked, 0.99) / percentile(alone, 0.99):.2f} "
        f"unchunked_p99_ratio={percentile(unchunked, 0.99) / percentile(alone, 0.99):.2f} "
        f"p50_ratio={statistics.median(chunked) / statistics.median(alone):.2f} "
        f"unchunked_p50_ratio={statistics.median(unchunked) / statistics.median(alone):.2f} "
        f"alone_p50_ms={1000 * statistics.median(alone):.1f} alone_p99_ms={1000 * percentile(alone, 0.99):.1f} "
        f"chunked_p99_ms={1000 * percentile(chunked, 0.99):.1f} unchunked_p99_ms={1000 * percentile(unchunked, 0.99):.1f} "
        f"prompt_s={statistics.median(prompt_s['chunked']):.2f} "
        f"unchunked_prompt_s={statistics.median(prompt_s['unchunked']):.2f} chunks={max(chunks)} gate_wait_s={gate_wait_s:.2f} "
        f"measured_link_mbit={link_mbit:.0f} chunk_target_s={policy.target_s} decode_share={policy.decode_share} pipelined={policy.pipelined} "
        f"steps={len(alone)}/{len(chunked)}/{len(unchunked)} mbit={args.mbit} prompt_tokens={args.prompt_tokens} "
        f"servers={len(args.blocks)} pinned={args.pin_servers}"
    )


def server_threads(args) -> list[str]:
    """``--threads`` for the servers: --server-threads, else each server's share of the cores (as LocalSwarm.start
    gives them; P5 starts its servers one by one, behind emulated links)."""
    threads = args.server_threads or max(1, len(os.sched_getaffinity(0)) // len(args.blocks))
    return ["--threads", str(threads)]


def pin_servers(args, servers) -> None:
    """With --pin-servers, server i computes on core i only (every thread it has, its p2p daemon excepted): as if
    each had a machine of its own, instead of all of them taking turns on every core."""
    if not args.pin_servers:
        return
    cores = sorted(os.sched_getaffinity(0))
    for index, server in enumerate(servers):
        for thread in os.listdir(f"/proc/{server.pid}/task"):
            os.sched_setaffinity(int(thread), {cores[index % len(cores)]})


def p3(args) -> str:
    """1, 4 and 16 generations at once, batching on, then the same with batching off (a fresh swarm each)."""
    rates = {}
    for batching in (True, False):
        with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
            swarm.start(args.blocks, "--max-batch-size", "32" if batching else "1", *server_threads(args))
            pin_servers(args, swarm.servers)
            model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
            try:
                decoder = BatchedDecoder(model, micro_batches=batching, group_steps=not args.no_group_steps)
                run_sync(generate_together(decoder, 2, 4))  # warm-up: streams open, step times measured
                for count in args.p3_sessions:
                    runs = []
                    for _ in range(args.p3_repeats):  # the median of a few: one run of a few seconds is noisy here
                        started = time.perf_counter()
                        tokens = run_sync(generate_together(decoder, count, args.new_tokens))
                        runs.append(tokens / (time.perf_counter() - started))
                    rates[batching, count] = statistics.median(runs)
            finally:
                model.shutdown()
    most = max(args.p3_sessions)
    on = " ".join(f"{n}:{rates[True, n]:.1f}" for n in args.p3_sessions)
    off = " ".join(f"{n}:{rates[False, n]:.1f}" for n in args.p3_sessions)
    return (
        f"P3 speedup{most}={rates[True, most] / rates[True, 1]:.2f} batching_gain={rates[True, most] / rates[False, most]:.2f} "
        f"unbatched_speedup{most}={rates[False, most] / rates[False, 1]:.2f} "
        f"on_tok_s={on.replace(' ', ',')} off_tok_s={off.replace(' ', ',')} new_tokens={args.new_tokens} "
        f"servers={len(args.blocks)} pinned={args.pin_servers} group_steps={not args.no_group_steps} "
        f"repeats={args.p3_repeats}"
    )


async def generate_together(decoder: BatchedDecoder, count: int, new_tokens: int) -> int:
    """``count`` greedy generations of ``new_tokens`` tokens at once (from different 16-token prompts); the number
    of tokens generated (a generation ends early at an end-of-sequence token)."""

    async def one(seed: int) -> int:
        prompt = torch.randint(100, 10000, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
        return len([token async for token in decoder.generate(prompt, new_tokens)])

    return sum(await asyncio.gather(*(one(seed) for seed in range(count))))


MEASUREMENTS = {"p3": p3, "p5": p5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), action="append", help="run only these measurements")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--blocks", nargs="+", default=["0:15", "15:30"], help="one server per range")
    parser.add_argument("--mbit", type=float, default=50.0, help="P5: bandwidth of each server's emulated link")
    parser.add_argument("--sessions", type=int, default=4, help="P5: decoding sessions")
    parser.add_argument("--prompt-tokens", type=int, default=2000, help="P5: the fifth session's prompt")
    parser.add_argument("--rounds", type=int, default=2, help="P5: prompts of each kind (alternating)")
    parser.add_argument("--window-s", type=float, default=5.0, help="P5: seconds of decoding alone per round")
    parser.add_argument("--chunk-target-s", type=float, default=None, help="P5: ChunkPolicy.target_s of the prompt")
    parser.add_argument("--no-pipelining", action="store_true", help="P5: chunks of the prompt go one at a time")
    parser.add_argument("--p3-sessions", type=int, nargs="+", default=[1, 4, 16], help="P3: generations at once")
    parser.add_argument("--new-tokens", type=int, default=32, help="P3: tokens each generation decodes")
    parser.add_argument("--p3-repeats", type=int, default=3, help="P3: runs of each count (their median rate counts)")
    parser.add_argument("--no-group-steps", action="store_true", help="P3: micro-batches send their steps one by one")
    parser.add_argument("--server-chunk-tokens", type=int, default=None, help="servers' compute chunk (default: theirs)")
    parser.add_argument("--server-threads", type=int, default=None, help="servers' torch threads (default: their share of the cores)")
    parser.add_argument("--pin-servers", action="store_true", help="server i computes on core i only (see pin_servers)")
    args = parser.parse_args()
    for name in args.only or sorted(MEASUREMENTS):
        print(MEASUREMENTS[name](args), flush=True)


if __name__ == "__main__":
    main()
