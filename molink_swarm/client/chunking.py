"""How long a prompt's chunks should be: each chunk's input and output cross the slowest link of the chain in about
``target_s``, or in one round trip over a link slower than that.

Why chunks: a prompt sent whole occupies each link for as long as its activations take to cross it (seconds for
a 2k-token prompt over a home uplink), and every decode step sent after it, by any session of this process,
waits behind it. A chunk that takes ``target_s`` is all a decode step can find ahead of it (see link_gate.py),
and chunks let the hops of a chain work on different chunks at once (session.py). Too small a chunk wastes
round trips and per-step overhead, hence a floor; too large a one stalls decode steps, hence a ceiling. A chunk
costs a round trip on each hop whatever its size: over a far link, chunks that carry less than a round trip's
worth would leave the link idle most of the time (and there decode steps take several round trips, so such a
chunk delays them by a like share).

Link throughput is measured from the chunks themselves: a relayed step's bytes (input up, output down) over its
time minus the server's compute time and the round trip. Until a link has been measured, a slow home link is
assumed: the first chunk is small, and the next ones grow to what the link carries.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Iterable, Optional


@dataclasses.dataclass(frozen=True)
class ChunkPolicy:
    # A chunk's input and output cross its slowest link in about this (~25 ms each way). Smaller chunks delay decode
    # steps less on the link but cost more round trips and more turns in the servers' compute queues, where each
    # chunk may wait behind decode steps (see server/scheduler.py): under heavy decode load a prompt in tiny
    # chunks crawls.
    target_s: float = 0.05
    # While other sessions decode through the chain's servers, a chunk crosses a link in at most this share of their
    # decode step's time (measured): a step that finds one chunk ahead of it on each link slows by about that much.
    decode_share: float = 0.2
    min_tokens: int = 32
    max_tokens: int = 512
    unmeasured_bytes_per_s: float = 10e6 / 8  # a link not measured yet is taken for a 10 Mbit/s one
    # The hops of a chain work on different chunks at once (on machines of their own, that is pure gain; servers
    # sharing one machine's cores also take them from each other, and from other sessions' decode steps).
    pipelined: bool = True

    def tokens(
        self, bytes_per_token: int, link_bytes_per_s: float, rtt_s: float = 0.0, decode_s: Optional[float] = None
    ) -> int:
        """Tokens per chunk (per sequence) when one token position costs ``bytes_per_token`` on the wire, input
        and output together, over a link that carries ``link_bytes_per_s`` with round trips of ``rtt_s``, while
        other sessions take ``decode_s`` per decode step through the same servers (None: nobody decodes there)."""
        target_s = self.target_s if decode_s is None else min(self.target_s, self.decode_share * decode_s)
        ideal = int(max(target_s, rtt_s) * link_bytes_per_s / bytes_per_token)
        return max(min(self.min_tokens, self.max_tokens), min(self.max_tokens, ideal))


class DecodePace:
    """How long decode steps take through each server lately (per process: every session of a client counts), for
    sizing prompt chunks while others decode (:class:`ChunkPolicy`). A server no decode step went through for
    ``recent_s`` has nobody decoding there, as far as this client knows."""

    def __init__(self, recent_s: float = 1.0, weight: float = 0.2):
        self.recent_s, self.weight = recent_s, weight
        self._steps: dict[Hashable, tuple[float, float]] = {}  # peer -> (smoothed step seconds, when last seen)

    def record(self, peers: Iterable[Hashable], seconds: float, now: float) -> None:
        """A decode step through ``peers`` took ``seconds`` (the whole chain, as its session saw it)."""
        for peer in peers:
            previous = self._steps.get(peer)
            smoothed = seconds if previous is None else previous[0] + self.weight * (seconds - previous[0])
            self._steps[peer] = (smoothed, now)

    def recent(self, peers: Iterable[Hashable], now: float) -> Optional[float]:
        """The shortest recent decode step time through any of ``peers`` (None: no decode step lately)."""
        seen = [self._steps[peer] for peer in peers if peer in self._steps]
        return min((seconds for seconds, at in seen if now - at <= self.recent_s), default=None)


class LinkThroughput:
    """Bytes per second to each server, measured from relayed steps (per process: every session of a client shares
    its links): the bytes they carried over the time they took to cross, both decayed by ``weight`` per new step.

    A step's bytes weigh in with their number: a small one, whose time is mostly fixed costs (encoding, the event
    loops, the daemons), moves the figure little, where averaging each step's rate would let it pull the figure
    far off (a 37 kB prompt says more of overheads than of the link)."""

    def __init__(self, weight: float = 0.5, min_transfer_s: float = 1e-3):
        self.weight = weight  # of a new step: links change (other traffic), and the first guess is a guess
        self.min_transfer_s = min_transfer_s  # below this a step's transfer time is noise, not a measurement
        self._sums: dict[Hashable, tuple[float, float]] = {}  # peer -> (bytes, seconds), decayed
        self._rates: dict[Hashable, float] = {}

    def record(self, peer: Hashable, nbytes: int, elapsed_s: float, compute_s: float, rtt_s: float) -> None:
        """A step that sent and received ``nbytes`` in all took ``elapsed_s``, of which the server computed for
        ``compute_s`` (queueing included) and ``rtt_s`` was the round trip."""
        transfer_s = max(self.min_transfer_s, elapsed_s - compute_s - rtt_s)
        total_bytes, total_s = self._sums.get(peer, (0.0, 0.0))
        keep = 1 - self.weight
        total_bytes, total_s = keep * total_bytes + nbytes, keep * total_s + transfer_s
        self._sums[peer] = (total_bytes, total_s)
        self._rates[peer] = total_bytes / total_s

    def get(self, peer: Hashable) -> float | None:
        return self._rates.get(peer)

    def slowest(self, peers: Iterable[Hashable], unmeasured: float) -> float:
        """The lowest throughput among ``peers`` (``unmeasured`` for one not measured yet)."""
        return min((self._rates.get(peer, unmeasured) for peer in peers), default=unmeasured)
