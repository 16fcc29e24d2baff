"""P4: stall after SIGKILL of the server in use mid-generation, when a replica exists.

Swarm: blocks 0:10, 10:20 (x2), 20:30 of the default model on loopback. At the 10th new token the 10:20 server
in use is SIGKILLed (with its p2p daemon). Stall = time from the kill to the next token, minus the servers'
compute time to replay the session onto the replica (reported separately). Prints one summary line:
`P4 stall_s=<median> ...` (target <= 2 s).
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
from molink_swarm.lab import LocalSwarm  # noqa: E402
from molink_swarm.models import resolve_model  # noqa: E402


class KillAt:
    """Streamer: SIGKILLs the 10:20 server in use at the n-th new token and timestamps every token."""

    def __init__(self, n: int, swarm: LocalSwarm, holder: dict):
        self.n, self.swarm, self.holder = n, swarm, holder
        self.times: list[float] = []
        self.kill_time = None
        self.victim = None

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) == self.n + 1:
            hop = next(h for h in self.holder["session"].chain if h.start <= 15 < h.end)
            self.victim = self.swarm.server_by_peer(hop.peer_id)
            self.kill_time = time.perf_counter()
            self.victim.kill()

    def end(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()

    source = resolve_model(args.model, progress=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "List ten colours, one per line."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    kwargs = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval().generate(ids, **kwargs)

    stalls, raw_gaps, replays, normal_gaps, identical = [], [], [], [], 0
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(args.model, log_dir=Path(logs)) as swarm:
        swarm.start(["0:10", "10:20", "10:20", "20:30"])
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        try:
            for _ in range(args.trials):
                holder: dict = {}
                streamer = KillAt(10, swarm, holder)
                with model.inference_session(max_length=ids.shape[1] + 41) as session:
                    holder["session"] = session
                    out = model.generate(ids, streamer=streamer, **kwargs)
                identical += int(torch.equal(out, expected))
                after_kill = next(t for t in streamer.times if t > streamer.kill_time)
                raw_gaps.append(after_kill - streamer.kill_time)
                replays.append(session.replay_compute_s)
                stalls.append(raw_gaps[-1] - session.replay_compute_s)
                gaps = [b - a for a, b in zip(streamer.times[1:], streamer.times[2:])]
                normal_gaps.append(statistics.median(gaps))
                # Bring the killed replica back for the next trial.
                span = streamer.victim.popen.args[streamer.victim.popen.args.index("--blocks") + 1]
                swarm.servers.remove(streamer.victim)
                swarm.start_server(span)
        finally:
            model.shutdown()

    print(
        f"P4 stall_s={statistics.median(stalls):.3f} raw_gap_s={statistics.median(raw_gaps):.3f} "
        f"replay_compute_s={statistics.median(replays):.3f} normal_token_gap_s={statistics.median(normal_gaps):.3f} "
        f"identical={identical}/{args.trials} trials={args.trials} model={source.name} (target <= 2 s)"
    )


if __name__ == "__main__":
    main()
