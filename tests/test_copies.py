"""Which servers a client chains when servers announce different weights for a block (routing/copies.py)."""

from __future__ import annotations

import collections
import random

from molink_swarm.routing.copies import AnnouncedServer, choose_copy

A, B, C = "a" * 16, "b" * 16, "c" * 16  # the digest every block has in copies A, B and C


def server(name: str, start: int, end: int, copy: str | list[str] | None = A, *, votes: bool = True) -> AnnouncedServer:
    digests = None if copy is None else tuple(copy if isinstance(copy, list) else [copy] * (end - start))
    return AnnouncedServer(name, start, end, digests, votes=votes)


def chosen(*servers: AnnouncedServer, pinned=None) -> set[str]:
    return set(choose_copy(servers, pinned or {}).chainable)


def test_servers_that_agree_are_all_chained():
    assert chosen(server("s1", 0, 3), server("s2", 3, 6), server("s3", 2, 5)) == {"s1", "s2", "s3"}


def test_the_copy_most_servers_hold_wins_a_block():
    servers = [server("a1", 0, 6), server("a2", 3, 6), server("b1", 3, 6, B)]

    choice = choose_copy(servers)

    assert choice.chainable == {"a1", "a2"}
    assert choice.rejected == {"b1": (3, 4, 5)}
    assert choice.accepted == {block: A for block in range(6)}


def test_a_copy_differing_in_one_block_is_rejected_whole():
    # b1 agrees with copy A on blocks 3 and 5 but not on 4: none of its blocks is chained.
    servers = [server("a1", 0, 6), server("a2", 4, 5), server("b1", 3, 6, [A, B, A])]

    choice = choose_copy(servers)

    assert choice.chainable == {"a1", "a2"}
    assert choice.rejected == {"b1": (4,)}


def test_a_tie_goes_to_the_copy_covering_more_blocks():
    # One server of each copy per block: copy A's server covers every block, copy B's two servers half each.
    assert chosen(server("a1", 0, 6), server("b1", 0, 3, B), server("b2", 3, 6, B)) == {"a1"}


def test_a_tie_of_equals_goes_the_same_way_for_every_client():
    servers = [server("x", 0, 6, B), server("y", 0, 6, A)]
    assert chosen(*servers) == chosen(*reversed(servers)) == {"y"}


def test_a_server_that_loses_a_block_no_longer_votes_on_its_others():
    # b-servers win blocks 0:3 (two against one); a1 loses there, so its vote on 3:6 no longer counts against b3.
    servers = [server("a1", 0, 6), server("b1", 0, 3, B), server("b2", 0, 3, B), server("b3", 3, 6, B)]

    choice = choose_copy(servers)

    assert choice.chainable == {"b1", "b2", "b3"}
    assert choice.accepted == {block: B for block in range(6)}


def test_forged_records_of_dead_servers_do_not_outvote_live_ones():
    honest = [server("a1", 0, 3), server("a2", 3, 6)]
    forged = [server(f"forged{i}", 0, 6, B, votes=False) for i in range(10)]

    assert chosen(*honest, *forged) == {"a1", "a2"}


def test_servers_that_cannot_vote_fill_only_the_blocks_no_voter_holds():
    servers = [server("a1", 0, 3), server("quiet", 3, 6, votes=False), server("quiet-b", 0, 6, B, votes=False)]

    assert chosen(*servers) == {"a1", "quiet"}


def test_a_hostile_minority_cannot_displace_the_copy_most_servers_hold():
    honest = [server("a1", 0, 3), server("a2", 0, 3), server("a3", 3, 6), server("a4", 3, 6)]
    hostile = [server("h1", 0, 6, B), server("h2", 2, 4, B)]

    assert chosen(*honest, *hostile) == {"a1", "a2", "a3", "a4"}


def test_pinned_digests_win_whatever_the_vote():
    # The client chained copy A on 3:6; copy B's three servers outnumber it there, and a2 has left.
    servers = [server("a1", 0, 3), server("b1", 3, 6, B), server("b2", 3, 6, B), server("b3", 0, 6, B)]

    choice = choose_copy(servers, pinned={block: A for block in range(6)})

    assert choice.chainable == {"a1"}  # blocks 3:6 go missing rather than come from another copy
    assert choice.rejected == {"b1": (3, 4, 5), "b2": (3, 4, 5), "b3": (0, 1, 2, 3, 4, 5)}


def test_a_server_without_digests_is_never_chained():
    choice = choose_copy([server("old", 0, 6, None), server("a1", 0, 3)])

    assert choice.chainable == {"a1"}
    assert choice.rejected == {"old": (0, 1, 2, 3, 4, 5)}


def test_no_two_chainable_servers_ever_disagree_on_a_block():
    rng = random.Random(0)
    for _ in range(300):
        servers = []
        for i in range(rng.randint(1, 12)):
            start = rng.randrange(8)
            end = rng.randint(start + 1, 8)
            digests = [rng.choice([A, A, B, C]) for _ in range(start, end)]
            servers.append(server(f"s{i}", start, end, digests, votes=rng.random() < 0.8))
        pinned = {block: rng.choice([A, B]) for block in rng.sample(range(8), rng.randint(0, 2))}

        choice = choose_copy(servers, pinned)

        seen: dict[int, str] = dict(pinned)
        for s in servers:
            if s.peer_id in choice.chainable:
                for block, digest in s.pairs():
                    assert seen.setdefault(block, digest) == digest, (servers, pinned)
        assert set(choice.chainable) | set(choice.rejected) == {s.peer_id for s in servers}


def test_live_servers_outnumbered_on_every_block_they_announce_never_displace_the_others():
    rng = random.Random(1)
    for _ in range(300):
        honest = []
        for i in range(rng.randint(1, 10)):
            start = rng.randrange(8)
            honest.append(server(f"a{i}", start, rng.randint(start + 1, 8)))
        held = collections.Counter(block for s in honest for block, _ in s.pairs())
        hostile: list[AnnouncedServer] = []
        for i in range(10):
            start = rng.randrange(8)
            candidate = server(f"h{i}", start, rng.randint(start + 1, 8), rng.choice([B, C]))
            against = collections.Counter(block for s in [*hostile, candidate] for block, _ in s.pairs())
            if all(against[block] < held[block] for block in against):
                hostile.append(candidate)

        choice = choose_copy([*honest, *hostile])

        assert choice.chainable == {s.peer_id for s in honest}, (honest, hostile)


# --- quantization: one per chain ---------------------------------------------------------------------------------


def quantized(name: str, start: int, end: int, quant: str, *, votes: bool = True) -> AnnouncedServer:
    """A server of copy A quantized as ``quant``: its block digests differ from copy A's (models/quant.py)."""
    digests = tuple(A if quant == "none" else quant[0] * 16 for _ in range(start, end))
    return AnnouncedServer(name, start, end, digests, votes=votes, quant=quant)


def test_of_one_unquantized_and_one_int8_server_of_the_same_blocks_the_unquantized_one_is_chained():
    servers = [quantized("q", 0, 6, "int8"), quantized("plain", 0, 6, "none")]

    for order in (servers, servers[::-1]):  # every client decides alike
        choice = choose_copy(order)
        assert choice.chainable == {"plain"} and choice.quant == "none"
        assert choice.rejected == {"q": (0, 1, 2, 3, 4, 5)}


def test_a_chain_never_mixes_quantizations_even_on_different_blocks():
    # Nothing overlaps, so the digests cannot tell; the announced quantization does.
    choice = choose_copy([quantized("plain", 0, 3, "none"), quantized("q", 3, 6, "int8")])

    assert choice.chainable == {"plain"}
    assert choice.rejected == {"q": (3, 4, 5)}


def test_the_quantization_most_servers_announce_wins():
    servers = [quantized("q1", 0, 6, "int8"), quantized("q2", 0, 3, "int8"), quantized("q3", 3, 6, "int8"), quantized("plain", 0, 6, "none")]

    choice = choose_copy(servers)

    assert choice.chainable == {"q1", "q2", "q3"} and choice.quant == "int8"


def test_a_pinned_quantization_wins_whatever_the_vote():
    servers = [quantized("q1", 0, 6, "int8"), quantized("q2", 0, 6, "int8"), quantized("plain", 3, 6, "none")]

    choice = choose_copy(servers, pinned_quant="none")

    assert choice.chainable == {"plain"} and choice.quant == "none"
    assert choice.rejected == {"q1": (0, 1, 2, 3, 4, 5), "q2": (0, 1, 2, 3, 4, 5)}


def test_servers_of_another_quantization_that_cannot_vote_are_not_taken_to_fill_a_gap():
    choice = choose_copy([quantized("plain", 0, 3, "none"), quantized("quiet", 3, 6, "nf4", votes=False)])

    assert choice.chainable == {"plain"}


def test_chainable_servers_never_mix_quantizations_nor_disagree_on_a_block():
    rng = random.Random(2)
    for _ in range(300):
        servers = []
        for i in range(rng.randint(1, 12)):
            start = rng.randrange(8)
            servers.append(quantized(f"s{i}", start, rng.randint(start + 1, 8), rng.choice(["none", "none", "int8", "nf4"]), votes=rng.random() < 0.8))

        choice = choose_copy(servers, pinned_quant=rng.choice([None, None, "int8"]))

        taken = [s for s in servers if s.peer_id in choice.chainable]
        assert len({s.quant for s in taken}) <= 1 and all(s.quant == choice.quant for s in taken)
        seen: dict[int, str] = {}
        for s in taken:
            for block, digest in s.pairs():
                assert seen.setdefault(block, digest) == digest


def test_a_hostile_minority_of_another_quantization_cannot_take_over_even_when_more_numerous():
    # Outnumbered on every block it announces (2 to 1), yet more servers in all (3 to 2) than the honest ones.
    honest = [quantized("a1", 0, 6, "none"), quantized("a2", 0, 6, "none")]
    hostile = [quantized(f"h{i}", 2 * i, 2 * i + 2, "int8") for i in range(3)]

    assert chosen(*honest, *hostile) == {"a1", "a2"}
