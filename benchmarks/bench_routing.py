"""P7: route planning time over 1,000 simulated server records (pure planner, no network).

Each record serves a random span of an 80-block model and announces RTTs to 8 random other servers; the
client has measured RTTs to all. Prints one summary line per target measured:
`P7 plan_ms=<median ms, forwarding mode> relayed_ms=<...> throughput_ms=<...>` (target <= 50 ms).
(P2, per-token latency over emulated WAN links with and without server-to-server forwarding, lands with the
forwarding path.)
"""

from __future__ import annotations

import random
import statistics
import time

from molink_swarm.routing.planner import Candidate, plan_chain


def simulated_swarm(num_servers: int = 1000, num_blocks: int = 80, seed: int = 0) -> list[Candidate]:
    rng = random.Random(seed)
    swarm = []
    for i in range(num_servers):
        start = rng.randrange(0, num_blocks - 1)
        end = min(num_blocks, start + rng.randint(4, 24))
        links = {f"s{rng.randrange(num_servers)}": rng.uniform(0.002, 0.15) for _ in range(8)}
        swarm.append(
            Candidate(
                f"s{i}",
                start,
                end,
                throughput=rng.uniform(20, 2000),
                rtt_s=rng.uniform(0.005, 0.25),
                load=rng.random() * 0.5,
                free_cache_tokens=rng.randrange(0, 100_000),
                next_rtts=links,
            )
        )
    return swarm


def median_ms(fn, repeats: int = 21) -> float:
    fn()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def main() -> None:
    swarm = simulated_swarm()
    results = {
        mode: median_ms(lambda mode=mode: plan_chain(80, swarm, mode=mode, min_cache_tokens=2048))
        for mode in ("forwarding", "relayed", "throughput")
    }
    print(
        f"P7 plan_ms={results['forwarding']:.1f} relayed_ms={results['relayed']:.1f} "
        f"throughput_ms={results['throughput']:.1f} servers=1000 blocks=80 (target <= 50 ms)"
    )


if __name__ == "__main__":
    main()
