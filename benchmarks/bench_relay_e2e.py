"""What the end-to-end channel through a relay costs (protocol/e2e.py): bytes and per-token latency of decode steps,
and the time to open a session, on one relayed path with the channel and without it, side by side in one run.

A loopback swarm: a bootstrap peer (the relay) and one server holding every block of the model, reachable only
through the relay (``--force-relay``); the client does not hole-punch. Sessions alternate between sealed and plain
(``paths.END_TO_END``, a benchmark-only switch), ``--rounds`` of each: a prompt, then ``--tokens`` decode steps,
each timed. Bytes are those of the frames the client's streams write and read (both ways), per decode token.

Usage: python benchmarks/bench_relay_e2e.py [--model smollm2-135m-instruct] [--tokens 32] [--rounds 4]
Prints one summary line: `RELAY_E2E decode_ms_e2e=... decode_ms_plain=... latency_ratio=... bytes_per_token_e2e=...
bytes_per_token_plain=... bytes_ratio=... open_ms_e2e=... open_ms_plain=...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # processes share the cores (see bench_generate.py)

import torch  # noqa: E402

from molink_swarm import AutoDistributedModelForCausalLM  # noqa: E402
from molink_swarm.client.loop import run_sync  # noqa: E402
from molink_swarm.lab import LocalSwarm, use_forkserver  # noqa: E402
from molink_swarm.models import load_config, resolve_model  # noqa: E402
from molink_swarm.net import paths  # noqa: E402
from molink_swarm.protocol import streams  # noqa: E402

FRAME_HEADER = 9  # marker byte + 8-byte length


class FrameBytes:
    """Counts the bytes of the frames this process's streams write and read (client side only)."""

    def __init__(self):
        self.total = 0
        write, read = streams.write_frame, streams.read_frame

        async def counting_write(writer, message):
            self.total += FRAME_HEADER + message.ByteSize()
            return await write(writer, message)

        async def counting_read(reader, limits, wait_s):
            marker, body = await read(reader, limits, wait_s)
            self.total += FRAME_HEADER + len(body)
            return marker, body

        streams.write_frame, streams.read_frame = counting_write, counting_read


def session(model, ids: torch.Tensor, tokens: int, counter: FrameBytes, sealed: bool) -> dict:
    paths.END_TO_END = sealed
    step_ids = torch.randint(3, 1000, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + tokens):
        started = time.perf_counter()
        model(ids)
        open_s = time.perf_counter() - started
        before, times = counter.total, []
        for i in range(tokens):
            started = time.perf_counter()
            model(step_ids[:, i : i + 1])
            times.append(time.perf_counter() - started)
        decode_bytes = counter.total - before
    return {"open_s": open_s, "times": times, "bytes_per_token": decode_bytes / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    use_forkserver()
    source = resolve_model(args.model, progress=True)
    blocks = load_config(source).num_hidden_layers
    ids = torch.tensor([[1, 504, 1345, 2306, 9081, 2739, 359, 260, 3458, 30]])

    results = {True: [], False: []}
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start_bootstrap()
        swarm.start_server(f"0:{blocks}", "--force-relay")
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers, hole_punching=False)
        try:
            counter = FrameBytes()
            session(model, ids, 4, counter, sealed=True)  # warm-up: plan, connect, first session
            [server] = [s.peer_id for s in run_sync(model.swarm.servers())]
            assert model.swarm.links.path_kind(server) == "relayed", "the server is not reached through the relay"
            for _ in range(args.rounds):
                for sealed in (True, False):
                    results[sealed].append(session(model, ids, args.tokens, counter, sealed))
        finally:
            paths.END_TO_END = True
            model.shutdown()

    def decode_ms(sealed: bool) -> float:
        return 1000 * statistics.median(t for r in results[sealed] for t in r["times"])

    def open_ms(sealed: bool) -> float:
        return 1000 * statistics.median(r["open_s"] for r in results[sealed])

    def per_token(sealed: bool) -> float:
        return statistics.mean(r["bytes_per_token"] for r in results[sealed])

    print(
        f"RELAY_E2E decode_ms_e2e={decode_ms(True):.2f} decode_ms_plain={decode_ms(False):.2f} "
        f"latency_ratio={decode_ms(True) / decode_ms(False):.3f} bytes_per_token_e2e={per_token(True):.0f} "
        f"bytes_per_token_plain={per_token(False):.0f} bytes_ratio={per_token(True) / per_token(False):.3f} "
        f"open_ms_e2e={open_ms(True):.1f} open_ms_plain={open_ms(False):.1f} model={source.name} "
        f"hidden={load_config(source).hidden_size} tokens={args.tokens} rounds={args.rounds} "
        "(median per decode step through one relay; bytes: client frames both ways per decode token; open: first step "
        "of a session, stream open and handshake included)"
    )


if __name__ == "__main__":
    main()
