"""Spot checks' pure logic: the tolerance (honest recomputations agree, small noise does not, per dtype and wire
codec), who is judged wrong, sampling, and the choice of a verifier."""

from __future__ import annotations

import math
import random

import pytest
import torch

from molink_swarm.client.spot_check import (
    DEFAULT_SPOT_CHECK_RATE,
    Verdict,
    choose_verifier,
    disagreement,
    judge,
    sample_step,
    spot_check_rate,
)
from molink_swarm.protocol.tensors import deserialize_tensor, serialize_tensor, wire_dtype_of
from molink_swarm.routing.planner import Candidate
from molink_swarm.server.faults import FaultInjection
from tests.conftest import make_tiny_llama


def over_wire(tensor: torch.Tensor, wire: str) -> tuple[torch.Tensor, str]:
    proto = serialize_tensor(tensor, wire)
    return deserialize_tensor(proto, dtype=torch.float32), wire_dtype_of(proto)


def honest_pair(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' output for the last of 12 positions, computed twice as two honest servers would: one as a decode
    step after a cached prompt, the other in one pass over all 12 positions (other shapes, other summation order)."""
    model = make_tiny_llama(seed=seed).to(dtype)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        whole = model.model(ids).last_hidden_state[:, -1:]
        prefix = model.model(ids[:, :-1], use_cache=True)
        step = model.model(ids[:, -1:], cache=prefix.past_key_values).last_hidden_state
    return whole, step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_honest_recomputations_agree_and_noise_does_not(dtype):
    whole, step = honest_pair(dtype)
    assert disagreement(whole, step, *_wires(dtype), dtype) <= 1.0
    noisy = FaultInjection(noise=0.1).apply(step)
    assert disagreement(whole, noisy, *_wires(dtype), dtype) > 1.0


def _wires(dtype: torch.dtype) -> tuple[str, str]:
    name = str(dtype).removeprefix("torch.")
    return name, name


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8"])
def test_wire_codecs_are_allowed_for_and_noise_is_caught(wire):
    torch.manual_seed(0)
    computed = torch.randn(2, 5, 576)
    computed[..., 7] *= 300  # a Llama-style outlier channel
    honest, honest_wire = over_wire(computed, wire)
    exact, exact_wire = over_wire(computed, "float32")
    assert disagreement(honest, exact, honest_wire, exact_wire) <= 1.0
    noise = {"float32": 0.01, "float16": 0.02, "bfloat16": 0.05, "int8": 0.1}[wire]  # x RMS of the row
    noisy, noisy_wire = over_wire(FaultInjection(noise=noise).apply(computed), wire)
    assert disagreement(noisy, exact, noisy_wire, exact_wire) > 1.0


def test_float32_wire_is_tight():
    """Exact float32 on both sides: a change of a thousandth of a value's size already exceeds the tolerance."""
    a = torch.randn(1, 3, 64)
    b = a.clone()
    b[0, 1, 5] += 0.01 * a.square().mean().sqrt() + 0.002 * a[0, 1, 5].abs()
    assert disagreement(a, b, "float32", "float32") > 1.0
    assert disagreement(a, a.clone(), "float32", "float32") == 0.0


def test_shapes_and_non_finite_values_disagree():
    a = torch.randn(1, 2, 8)
    assert disagreement(a, a[:, :1], "float32", "float32") == math.inf
    b = a.clone()
    b[0, 0, 0] = math.nan
    assert disagreement(a, b, "float32", "float32") == math.inf


def test_judge():
    assert judge(primary=5.0, verifier=0.2) is Verdict.PRIMARY_WRONG
    assert judge(primary=0.3, verifier=7.0) is Verdict.VERIFIER_WRONG
    assert judge(primary=5.0, verifier=7.0) is Verdict.UNDECIDED  # the third agrees with neither
    assert judge(primary=0.9, verifier=0.9) is Verdict.UNDECIDED  # with both: on the edge, nobody is convicted
    assert judge(None, None) is Verdict.UNDECIDED  # no third opinion


def test_spot_check_rate():
    assert spot_check_rate(True) == DEFAULT_SPOT_CHECK_RATE
    assert spot_check_rate(False) == spot_check_rate(None) == 0.0
    assert spot_check_rate(0.25) == 0.25
    for bad in (1.5, -0.1, "often", math.nan):
        with pytest.raises(ValueError, match="spot_check"):
            spot_check_rate(bad)


def test_sampling_follows_the_rate():
    rng = random.Random(1)
    picked = sum(sample_step(rng, 0.05) for _ in range(20000))
    assert 800 < picked < 1200
    assert not any(sample_step(rng, 0.0) for _ in range(1000))
    assert all(sample_step(rng, 1.0) for _ in range(1000))


def test_choose_verifier():
    candidates = [
        Candidate("a", 0, 6, 100.0, rtt_s=0.001),  # the checked server itself
        Candidate("b", 0, 3, 100.0, rtt_s=0.001),  # does not hold all of 0:6
        Candidate("c", 0, 6, 100.0, rtt_s=0.050),
        Candidate("d", 0, 8, 100.0, rtt_s=0.005),
        Candidate("e", 0, 6, 100.0, rtt_s=0.0052),  # as near as d (within a millisecond)
        Candidate("f", 0, 6, 100.0, rtt_s=None),
    ]
    rng = random.Random(0)
    chosen = {choose_verifier(candidates, 0, 6, exclude={"a"}, rng=rng).peer_id for _ in range(50)}
    assert chosen == {"d", "e"}  # the nearest, at random among equals
    assert choose_verifier(candidates, 0, 6, exclude={"a", "d", "e"}).peer_id == "c"
    assert choose_verifier(candidates, 0, 6, exclude={"a", "c", "d", "e"}).peer_id == "f"
    assert choose_verifier(candidates, 0, 6, exclude={"a", "c", "d", "e", "f"}) is None
    assert choose_verifier(candidates, 2, 3, exclude={"a"}).peer_id == "b"


def test_fault_injection_on_a_fraction_of_steps():
    fault = FaultInjection(noise=0.1, rate=0.25, seed=3)
    x = torch.randn(1, 1, 16)
    changed = sum(not torch.equal(fault.apply(x), x) for _ in range(400))
    assert changed == fault.faulty_steps
    assert 60 < changed < 140


def test_web_metrics_export_the_checks():
    """The web app's /metrics reads its clients' spot-check figures at each scrape."""
    from types import SimpleNamespace

    from molink_swarm.client.spot_check import SpotCheckStats
    from molink_swarm.web.metrics import WebMetrics

    stats = SpotCheckStats(rate=0.05, checks=7, disagreements=1, compute_s=0.5, caught={"QmLiar": "wrong outputs"})
    engine = SimpleNamespace(name="tiny", model=SimpleNamespace(swarm=SimpleNamespace(spot_checks=stats)))
    metrics = WebMetrics()
    metrics.watch_spot_checks([engine])
    text = metrics.response().body.decode()
    assert 'molink_web_spot_checks_total{model="tiny",outcome="agreed"} 6.0' in text
    assert 'molink_web_spot_checks_total{model="tiny",outcome="disagreed"} 1.0' in text
    assert 'molink_web_spot_check_caught_servers_total{model="tiny"} 1.0' in text
    stats.checks += 1
    assert 'outcome="agreed"} 7.0' in metrics.response().body.decode()
