"""Which servers a client may chain together, from the digests of the blocks they announce (pure logic, no I/O).

Every server announces one digest per block it serves (models/fingerprint.py: names, dtypes, shapes and bytes of
the block's tensors; models/quant.py: how they are quantized). Servers that announce different digests for one block
hold different copies of the model (another fine-tune, storage dtype or quantization, a corrupted download): they
must never be in one chain. Servers also announce their quantization (``join --quant``): one chain never mixes two,
not even on different blocks, since each would add its own error to the output. The client holds no block, so it
cannot check a digest itself; it decides from what the servers announce:

1. Each server gets a score: over its blocks, the average of how many servers announce the same digest for the
   block minus how many announce another one; plus, between -1 and 1, how many servers announce its quantization
   minus how many announce another one, over all servers (the same for everyone when all agree).
2. Servers are taken from the highest score down (then the longest span, then the less lossy quantization, then by
   digests and peer id, so that every client decides alike), each only if it agrees, on every block it serves and
   on the quantization, with the servers taken before it. A server is chained whole or not at all: one block that
   differs rejects all of its blocks.
3. Only servers the client could reach and has not banned count and go first. A record is free to forge in any
   number, but one that names no live server neither counts nor outranks anyone; such servers are taken last,
   among themselves, where they agree with those taken.
4. Pinned digests (of blocks the client has already chained) and the pinned quantization are taken before
   anything: a client never switches a block to another copy, nor its chain to another quantization, so a session's
   failover never splices another copy into its chain.
5. A server that announces no digests is never chained.

What this guarantees: no two chainable servers announce different digests for a block, so a chain never mixes
copies where servers overlap, nor two quantizations anywhere; and live servers that are outnumbered on every block
they announce never displace the copy of those that outnumber them (on the blocks, each of theirs scores at most -1
and each of the others at least 1; the quantization adds at most 1 to theirs and more than -1 to the others'), so a
hostile minority cannot take over. What it cannot: tell copies apart where no server overlaps them (one copy's 0:15 and
another's 15:30 of the same quantization look like one model; the model id already separates copies whose config,
tensor names or storage dtype differ), or catch a server that announces the right digests and computes something
else (spot checks would).
"""

from __future__ import annotations

import collections
import dataclasses
from fractions import Fraction
from typing import Callable, Hashable, Iterator, Mapping, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class AnnouncedServer:
    """What a server announces about its weights."""

    peer_id: Hashable
    start: int
    end: int
    digests: Optional[tuple[str, ...]]  # one per block start..end-1; None: it announces none
    votes: bool = True  # False: the client found it unreachable or banned it
    quant: str = "none"  # how its weights are quantized (models/quant.py); older servers: none

    def pairs(self) -> Iterator[tuple[int, str]]:
        """(block, digest) for each block it serves."""
        return zip(range(self.start, self.end), self.digests or ())


@dataclasses.dataclass(frozen=True)
class CopyChoice:
    accepted: dict[int, str]  # block -> the digest the client chains
    chainable: frozenset[Hashable]
    # peer -> blocks where its digest is not accepted (all: it announces none, or another quantization)
    rejected: dict[Hashable, tuple[int, ...]]
    quant: Optional[str] = None  # the quantization the client chains (None: no server chainable, none pinned)


def choose_copy(
    servers: Sequence[AnnouncedServer], pinned: Mapping[int, str] = {}, pinned_quant: Optional[str] = None
) -> CopyChoice:
    """Choose, block by block, the digest the client chains, and the servers that announce it for all their blocks,
    all with one quantization."""
    accepted, quant = dict(pinned), pinned_quant
    complete = [s for s in servers if _complete(s)]
    chainable = set()
    for voters in (True, False):  # live servers first; the others only where they agree with those
        group = [s for s in complete if s.votes == voters]
        for server in sorted(group, key=_ranking(group)):
            if quant in (None, server.quant) and all(accepted.get(b, digest) == digest for b, digest in server.pairs()):
                accepted.update(server.pairs())
                quant = server.quant
                chainable.add(server.peer_id)
    rejected = {}
    for server in servers:
        if server.peer_id not in chainable:
            lost = tuple(block for block, digest in server.pairs() if accepted.get(block) != digest)
            whole = not _complete(server) or server.quant != quant
            rejected[server.peer_id] = tuple(range(server.start, server.end)) if whole else lost
    return CopyChoice(accepted, frozenset(chainable), rejected, quant)


def _complete(server: AnnouncedServer) -> bool:
    """It announces one digest per block it serves."""
    return server.digests is not None and len(server.digests) == server.end - server.start


# Equal otherwise, a client chains the servers that compute closest to the original weights.
_QUANT_PREFERENCE = {"none": 0, "int8": 1, "nf4": 2}


def _ranking(servers: list[AnnouncedServer]) -> Callable[[AnnouncedServer], tuple]:
    """Sort key: highest average margin of agreeing over disagreeing servers first (see the module docstring)."""
    votes: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    quants = collections.Counter(server.quant for server in servers)
    for server in servers:
        for block, digest in server.pairs():
            votes[block][digest] += 1

    def key(server: AnnouncedServer) -> tuple:
        margin = sum(2 * votes[block][digest] - votes[block].total() for block, digest in server.pairs())
        span = server.end - server.start
        quant_margin = Fraction(2 * quants[server.quant] - quants.total(), quants.total())
        preference = _QUANT_PREFERENCE.get(server.quant, len(_QUANT_PREFERENCE))
        return (-(Fraction(margin, span) + quant_margin), -span, preference, server.quant, server.digests, str(server.peer_id))

    return key
