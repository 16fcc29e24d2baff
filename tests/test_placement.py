"""Which blocks a new server picks: `choose_blocks` fills holes first, then the weakest part of the model."""

from __future__ import annotations

from molink_swarm.routing.placement import block_coverage, choose_blocks


def test_the_first_server_of_an_empty_swarm_takes_the_whole_model():
    assert choose_blocks(30, 30, []) == (0, 30)


def test_a_smaller_first_server_starts_at_block_zero():
    assert choose_blocks(30, 10, []) == (0, 10)


def test_the_next_server_takes_the_blocks_nobody_serves():
    assert choose_blocks(30, 15, [(0, 15)]) == (15, 30)


def test_a_hole_in_the_middle_is_filled():
    assert choose_blocks(30, 10, [(0, 10), (20, 30)]) == (10, 20)


def test_covering_more_missing_blocks_beats_everything_else():
    # Only 5 blocks are missing (25..29): the window must include all of them.
    assert choose_blocks(30, 10, [(0, 25)]) == (20, 30)


def test_with_everything_covered_the_least_covered_window_wins():
    assert choose_blocks(30, 15, [(0, 30), (0, 15)]) == (15, 30)


def test_raising_the_weakest_block_beats_a_lower_total_coverage():
    # Coverage is [5, 1, 5, 2, 2, 2]: the window over block 1 wins although 3..5 are less covered in total.
    swarm = [(0, 6)] + [(0, 1)] * 4 + [(2, 3)] * 4 + [(3, 6)]
    assert block_coverage(6, swarm) == [5, 1, 5, 2, 2, 2]

    assert choose_blocks(6, 3, swarm) == (1, 4)


def test_a_count_larger_than_the_model_takes_the_whole_model():
    assert choose_blocks(30, 100, [(0, 10)]) == (0, 30)


def test_block_coverage_counts_servers_per_block():
    assert block_coverage(6, [(0, 3), (2, 6), (5, 6)]) == [1, 1, 2, 1, 1, 2]


def test_block_coverage_ignores_parts_of_spans_outside_the_model():
    assert block_coverage(4, [(-2, 1), (3, 10)]) == [1, 0, 0, 1]
