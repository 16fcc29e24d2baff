"""Spot checks: the pure logic (no I/O) of re-running a sample of steps on a second server and judging the answers.

A client with spot checks on re-runs a sample of its steps, span by span, on a second server holding the same
blocks (a *verifier*), and compares that server's outputs with the ones its chain produced. Two honest servers
never agree bit for bit: they batch and chunk steps differently (other summation orders), and each sends its
outputs in its own wire encoding. So the comparison allows, per value, what the encodings of both answers can
change (known exactly from each reply's codec, see protocol/tensors.py) plus what computing in the session's dtype
can change (scaled by the row's RMS and by the value itself). A wrong answer beyond that is a *disagreement*; a
third server (or nobody, if none holds the blocks) tells which of the two is wrong (:func:`judge`).

What is sampled: each step with probability ``rate``, every hop of the chain at once (a checked step waits for
its slowest check, so a few slow steps beat many), plus always the first step of each server a session chains,
so a server that lies from the start is caught before it has produced a token.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from typing import Hashable, Iterable, Optional, Sequence

import torch

from molink_swarm.routing.planner import DEFAULT_RTT_S, Candidate

DEFAULT_SPOT_CHECK_RATE = 0.05  # of steps; what `spot_check=True` and `web` use

# Honest servers computing the same step in the same dtype differ by summation order only (batches, chunks); per
# value, at most atol * RMS(row) + rtol * |value|. Measured differences are far below these (float32: ~1e-6).
_COMPUTE_TOLERANCE = {  # dtype -> (atol as a fraction of the row's RMS, rtol)
    torch.float32: (1e-3, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
# Rounding of the 16-bit wire dtypes, relative to the value (half a unit in the last place).
_WIRE_RTOL = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
_INT8_OUTLIERS = 4  # int8 rows send their 4 largest values exactly (protocol/tensors.py)


class WrongOutputs(Exception):
    """A server's outputs disagreed with two others' (or with a local run): it is faulty or lying."""


class Verdict(enum.Enum):
    PRIMARY_WRONG = "primary wrong"  # the chain's server
    VERIFIER_WRONG = "verifier wrong"
    UNDECIDED = "undecided"  # no third opinion, or it agrees with neither


def spot_check_rate(value: Optional[bool | float]) -> float:
    """``spot_check=`` as a rate: True is the default rate, False/None/0 is off, else a fraction of steps."""
    if value is None or value is False:
        return 0.0
    if value is True:
        return DEFAULT_SPOT_CHECK_RATE
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not 0.0 <= rate <= 1.0:  # NaN fails this too
        raise ValueError(f"spot_check={value!r}: pass a fraction of steps between 0 and 1, or True/False")
    return rate


def sample_step(rng: random.Random, rate: float) -> bool:
    """Whether a step is checked on every hop of its chain."""
    return rate > 0.0 and rng.random() < rate


def wire_error_bound(values: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """How far each of ``values`` (as decoded, [..., width]) may be from what its sender computed, given the wire
    dtype it came in: 0 for float32, half a unit in the last place for 16 bits, and for int8 half a quantization step
    of its row (``absmax(rest) / 254``, rest: all but the row's 4 exact outliers; +1% for the bfloat16 scale)."""
    values = values.float()
    if wire_dtype == "int8":
        magnitudes = values.abs()
        k = min(_INT8_OUTLIERS, values.shape[-1] - 1)
        rest = magnitudes.scatter(-1, magnitudes.topk(k, dim=-1).indices, 0.0) if k > 0 else magnitudes
        return (rest.amax(dim=-1, keepdim=True) / 254 * 1.01).expand_as(values)
    return values.abs() * _WIRE_RTOL.get(wire_dtype, 2.0**-8)


def disagreement(
    a: torch.Tensor, b: torch.Tensor, wire_a: str, wire_b: str, dtype: torch.dtype = torch.float32
) -> float:
    """The worst ratio, over values, of |a - b| to what honest servers may differ by (see the module docstring):
    at most 1 when ``a`` and ``b`` agree. ``wire_a``/``wire_b``: the wire dtype each answer came in."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    atol, rtol = _COMPUTE_TOLERANCE.get(dtype, _COMPUTE_TOLERANCE[torch.bfloat16])
    rms = torch.maximum(a.square().mean(-1, keepdim=True), b.square().mean(-1, keepdim=True)).sqrt()
    allowed = (
        wire_error_bound(a, wire_a)
        + wire_error_bound(b, wire_b)
        + atol * rms
        + rtol * torch.maximum(a.abs(), b.abs())
        + 1e-6  # an all-zero row
    )
    return float(((a - b).abs() / allowed).max())


def judge(primary: Optional[float], verifier: Optional[float]) -> Verdict:
    """Who is wrong after the chain's server and the verifier disagreed, from a third opinion's disagreements
    (:func:`disagreement`) with each of them (None: no third opinion could be had)."""
    if primary is None or verifier is None:
        return Verdict.UNDECIDED
    if primary > 1.0 and verifier <= 1.0:
        return Verdict.PRIMARY_WRONG
    if verifier > 1.0 and primary <= 1.0:
        return Verdict.VERIFIER_WRONG
    return Verdict.UNDECIDED  # it agrees with both (answers on the edge of the tolerance) or with neither


def choose_verifier(
    candidates: Sequence[Candidate], start: int, end: int, exclude: Iterable[Hashable], rng: Optional[random.Random] = None
) -> Optional[Candidate]:
    """A server holding all of blocks ``start..end-1`` that is not in ``exclude`` (the server checked, banned ones,
    verifiers already asked): the nearest, then the least loaded; ties broken at random, so that a liar cannot
    count on never being the one asked. None if there is none."""
    excluded = set(exclude)
    eligible = [c for c in candidates if c.start <= start and end <= c.end and c.peer_id not in excluded]
    if not eligible:
        return None
    rng = rng or random.Random()

    def cost(c: Candidate) -> float:
        rtt = DEFAULT_RTT_S if c.rtt_s is None else c.rtt_s
        return round(rtt, 3) + 0.01 * c.load  # within a millisecond: equally near

    best = min(cost(c) for c in eligible)
    return rng.choice([c for c in eligible if cost(c) <= best])


@dataclasses.dataclass
class SpotCheckStats:
    """What one client's spot checks found (its metrics, the web status page)."""

    rate: float = 0.0
    checks: int = 0  # hop-steps compared with a verifier
    disagreements: int = 0  # of those, answers beyond tolerance
    undecided: int = 0  # disagreements nobody could settle
    skipped: int = 0  # checks that could not run (no second server, verifier failed)
    compute_s: float = 0.0  # verifiers' and third opinions' compute time, as they measured it
    caught: dict[str, str] = dataclasses.field(default_factory=dict)  # peer id -> what it got wrong
