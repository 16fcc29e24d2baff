"""How the client picks its chain of servers: `plan_chain` on small hand-made swarms."""

from __future__ import annotations

import math
import random

import pytest

from molink_swarm.routing.planner import Candidate, Hop, MissingBlocksError, format_blocks, plan_chain


def server(peer_id: str, start: int, end: int, *, rtt_s=0.01, throughput=1000.0, **kwargs) -> Candidate:
    return Candidate(peer_id, start, end, throughput=throughput, rtt_s=rtt_s, **kwargs)


def spans(hops: list[Hop]) -> list[tuple[int, int]]:
    return [(hop.start, hop.end) for hop in hops]


def test_one_server_holding_every_block_beats_two_hops_at_the_same_rtt():
    swarm = [server("first-half", 0, 10), server("second-half", 10, 20), server("whole", 0, 20)]

    assert plan_chain(20, swarm) == [Hop("whole", 0, 20)]


def test_two_nearby_servers_beat_one_distant_server():
    swarm = [server("first-half", 0, 10), server("second-half", 10, 20), server("far-away", 0, 20, rtt_s=0.5)]

    assert plan_chain(20, swarm) == [Hop("first-half", 0, 10), Hop("second-half", 10, 20)]


def test_the_replica_with_the_lower_rtt_wins():
    swarm = [server("slow", 0, 20, rtt_s=0.08), server("fast", 0, 20, rtt_s=0.02), server("middle", 0, 20, rtt_s=0.05)]

    assert plan_chain(20, swarm) == [Hop("fast", 0, 20)]


def test_a_measured_server_wins_over_an_unmeasured_replica():
    swarm = [server("never-pinged", 0, 20, rtt_s=None), server("pinged", 0, 20, rtt_s=0.05)]

    assert plan_chain(20, swarm) == [Hop("pinged", 0, 20)]


def test_a_server_whose_span_starts_earlier_is_entered_midway():
    swarm = [server("a", 0, 20), server("b", 10, 30)]

    assert spans(plan_chain(30, swarm)) == [(0, 20), (20, 30)]
    assert [hop.peer_id for hop in plan_chain(30, swarm)] == ["a", "b"]


def test_banned_peers_are_not_used():
    swarm = [server("best", 0, 20, rtt_s=0.01), server("backup", 0, 20, rtt_s=0.09)]

    assert plan_chain(20, swarm, banned={"best"}) == [Hop("backup", 0, 20)]


def test_banning_the_only_holder_of_some_blocks_makes_them_missing():
    swarm = [server("a", 0, 10), server("b", 10, 20)]

    with pytest.raises(MissingBlocksError) as error:
        plan_chain(20, swarm, banned=["b"])
    assert error.value.missing == list(range(10, 20))


def test_an_idle_replica_wins_over_a_busy_one_at_equal_rtt():
    swarm = [server("busy", 0, 20, load=1.0), server("idle", 0, 20, load=0.0)]

    assert plan_chain(20, swarm) == [Hop("idle", 0, 20)]


def test_servers_without_enough_free_cache_are_skipped():
    swarm = [server("full", 0, 20, rtt_s=0.001, free_cache_tokens=10), server("roomy", 0, 20, free_cache_tokens=4096)]

    assert plan_chain(20, swarm, min_cache_tokens=100) == [Hop("roomy", 0, 20)]
    assert plan_chain(20, swarm) == [Hop("full", 0, 20)]


def test_a_server_with_unknown_free_cache_is_not_skipped():
    swarm = [server("unknown", 0, 20, free_cache_tokens=None)]

    assert plan_chain(20, swarm, min_cache_tokens=100) == [Hop("unknown", 0, 20)]


def test_a_gap_in_the_middle_is_reported_exactly():
    swarm = [server("a", 0, 10), server("b", 20, 30)]

    with pytest.raises(MissingBlocksError) as error:
        plan_chain(30, swarm)
    assert error.value.missing == list(range(10, 20))
    assert format_blocks(error.value.missing) == "10:20"
    assert "10:20" in str(error.value)


def test_every_gap_after_the_first_is_reported_too():
    swarm = [server("a", 0, 5), server("b", 10, 15)]

    with pytest.raises(MissingBlocksError) as error:
        plan_chain(20, swarm)
    assert format_blocks(error.value.missing) == "5:10, 15:20"


def test_an_empty_swarm_misses_every_block():
    with pytest.raises(MissingBlocksError) as error:
        plan_chain(6, [])
    assert error.value.missing == [0, 1, 2, 3, 4, 5]


def test_a_sub_range_is_planned_inside_one_server():
    assert plan_chain(30, [server("whole", 0, 30)], start=10, end=20) == [Hop("whole", 10, 20)]


def test_a_sub_range_is_planned_across_servers():
    swarm = [server("a", 0, 15), server("b", 15, 30)]

    assert plan_chain(30, swarm, start=5, end=25) == [Hop("a", 5, 15), Hop("b", 15, 25)]


def test_a_sub_range_ignores_gaps_outside_it():
    swarm = [server("middle", 10, 20)]

    assert plan_chain(30, swarm, start=10, end=20) == [Hop("middle", 10, 20)]


def test_format_blocks_renders_half_open_ranges():
    assert format_blocks([0, 1, 2, 5]) == "0:3, 5:6"
    assert format_blocks([7, 3, 4]) == "3:5, 7:8"
    assert format_blocks([]) == ""


def test_a_thousand_random_servers_over_80_blocks_give_a_contiguous_chain():
    rng = random.Random(1234)
    swarm = []
    for index in range(1000):
        start = rng.randrange(80)
        end = rng.randint(start + 1, min(80, start + 20))
        swarm.append(
            Candidate(
                f"peer-{index}",
                start,
                end,
                throughput=rng.uniform(10, 1000),
                rtt_s=rng.choice([None, rng.uniform(0.001, 0.3)]),
                load=rng.random(),
            )
        )
    by_id = {c.peer_id: c for c in swarm}

    hops = plan_chain(80, swarm)

    assert hops[0].start == 0 and hops[-1].end == 80
    assert all(previous.end == following.start for previous, following in zip(hops, hops[1:]))
    assert all(by_id[hop.peer_id].start <= hop.start < hop.end <= by_id[hop.peer_id].end for hop in hops)


def test_forwarding_mode_prefers_servers_that_announced_a_fast_link_between_them():
    # Same client RTTs everywhere; only "a" announced a fast link to "b2", so a->b2 beats a->b1.
    swarm = [
        server("a", 0, 10, rtt_s=0.05, next_rtts={"b2": 0.002}),
        server("b1", 10, 20, rtt_s=0.05),
        server("b2", 10, 20, rtt_s=0.05),
    ]

    assert [hop.peer_id for hop in plan_chain(20, swarm, mode="forwarding")] == ["a", "b2"]


def test_forwarding_makes_more_hops_affordable_when_servers_are_close_to_each_other():
    # Relayed, every hop costs a full client round trip: one far server wins. Forwarding between close servers
    # costs half a round trip in, tiny links between them, half a round trip out.
    swarm = [
        server("x", 0, 10, rtt_s=0.10, next_rtts={"y": 0.001}),
        server("y", 10, 20, rtt_s=0.10, next_rtts={"z": 0.001}),
        server("z", 20, 30, rtt_s=0.10),
        server("whole", 0, 30, rtt_s=0.16),
    ]

    assert [hop.peer_id for hop in plan_chain(30, swarm, mode="relayed")] == ["whole"]
    assert [hop.peer_id for hop in plan_chain(30, swarm, mode="forwarding")] == ["x", "y", "z"]


def test_an_allow_list_restricts_the_chain():
    swarm = [server("a", 0, 20, rtt_s=0.01), server("b", 0, 20, rtt_s=0.05), server("c", 0, 20, rtt_s=0.09)]

    assert plan_chain(20, swarm, allowed={"b", "c"}) == [Hop("b", 0, 20)]
    with pytest.raises(MissingBlocksError):
        plan_chain(20, swarm, allowed={"nobody"})


def test_throughput_mode_spreads_requests_over_equal_replicas():
    swarm = [server(f"replica-{i}", 0, 20) for i in range(4)]
    rng = random.Random(0)

    chosen = {plan_chain(20, swarm, mode="throughput", rng=rng)[0].peer_id for _ in range(50)}

    assert len(chosen) >= 3


def test_throughput_mode_avoids_a_loaded_server():
    swarm = [server("busy", 0, 20, load=0.9), server("idle", 0, 20, load=0.0)]

    picks = [plan_chain(20, swarm, mode="throughput", rng=random.Random(i))[0].peer_id for i in range(20)]

    assert picks.count("idle") == 20


def test_plans_over_a_thousand_servers_with_announced_links_in_every_mode():
    rng = random.Random(1)
    swarm = []
    for i in range(1000):
        start = rng.randrange(0, 79)
        end = min(80, start + rng.randint(1, 20))
        links = {f"s{rng.randrange(1000)}": rng.uniform(0.001, 0.1) for _ in range(8)}
        swarm.append(server(f"s{i}", start, end, rtt_s=rng.uniform(0.005, 0.2), next_rtts=links))
    for mode in ("forwarding", "relayed", "throughput"):
        hops = plan_chain(80, swarm, mode=mode)
        assert hops[0].start == 0 and hops[-1].end == 80
        assert all(a.end == b.start for a, b in zip(hops, hops[1:]))


# --- figures a bad peer may announce: the planner never trusts them (records are also checked when read) ------

BAD_FIGURES = [
    {"throughput": math.inf},
    {"throughput": math.nan},
    {"throughput": -1000.0},
    {"rtt_s": -0.5},
    {"rtt_s": math.nan},
    {"load": math.nan},
    {"load": -5.0},
    {"free_cache_tokens": -1},
]


@pytest.mark.parametrize("figures", BAD_FIGURES, ids=lambda f: f"{next(iter(f))}={next(iter(f.values()))}")
@pytest.mark.parametrize("mode", ["relayed", "forwarding", "throughput"])
def test_a_server_announcing_impossible_figures_is_never_chosen(figures, mode):
    swarm = [server("liar", 0, 20, **{"rtt_s": 0.001, "throughput": 1e6, **figures}), server("honest", 0, 20, rtt_s=0.05)]

    picks = {plan_chain(20, swarm, mode=mode, rng=random.Random(i))[0].peer_id for i in range(10)}

    assert picks == {"honest"}


@pytest.mark.parametrize("figures", BAD_FIGURES, ids=lambda f: f"{next(iter(f))}={next(iter(f.values()))}")
def test_a_server_announcing_impossible_figures_does_not_count_as_covering_its_blocks(figures):
    swarm = [server("honest", 0, 10), server("liar", 10, 20, **figures)]

    with pytest.raises(MissingBlocksError) as error:
        plan_chain(20, swarm)
    assert error.value.missing == list(range(10, 20))


@pytest.mark.parametrize("rtt", [-1.0, math.nan, -math.inf])
def test_an_impossible_announced_link_is_ignored(rtt):
    # "a" claims an impossibly fast link to "b1": without it, a->b2 (a real fast link) is the better chain.
    swarm = [
        server("a", 0, 10, rtt_s=0.05, next_rtts={"b1": rtt, "b2": 0.002}),
        server("b1", 10, 20, rtt_s=0.05),
        server("b2", 10, 20, rtt_s=0.05),
    ]

    assert [hop.peer_id for hop in plan_chain(20, swarm, mode="forwarding")] == ["a", "b2"]
