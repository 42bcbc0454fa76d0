"""Where a checkpoint's bytes are and how each disk gets what its ranks read (checkpoint/assembly.py): pure."""
from __future__ import annotations

import itertools

import pytest

from ftrain.checkpoint import assembly
from ftrain.checkpoint.assembly import REMOTE, Held, Transfer, Unassemblable
from ftrain.checkpoint.format import MANIFEST, shard_names

A, B, C = "a" * 32, "b" * 32, "c" * 32


def files(*ranks: int) -> frozenset[str]:
    return frozenset(n for r in ranks for n in shard_names(r))


ALL = files(0, 1, 2, 3)


def held(*ranks: int, digest: str = "d1", placed: tuple[str, ...] = (A, B)) -> Held:
    return Held(digest, ALL, files(*ranks), frozenset(placed))


def test_the_newest_step_that_all_sources_together_complete_is_chosen() -> None:
    # Disk A has ranks 0-1 of 8 and 12, disk B ranks 2-3 of 8 only (it died during 12's save): 12 is incomplete.
    holdings = {A: {8: held(0, 1), 12: held(0, 1)}, B: {8: held(2, 3)}}
    choice = assembly.choose(holdings, [A, B])
    assert choice is not None and choice.step == 8
    assert choice.holders[shard_names(0)[1]] == (A,) and choice.holders[shard_names(3)[0]] == (B,)
    assert set(choice.manifests) == {A, B}
    # A replica of B's files on A (or the remote tier) completes 12.
    holdings[A][12] = Held("d1", ALL, files(0, 1, 2, 3))
    assert assembly.choose(holdings, [A, B]).step == 12  # type: ignore[union-attr]
    holdings[A][12] = held(0, 1)
    holdings[REMOTE] = {12: held(0, 1, 2, 3)}
    got = assembly.choose(holdings, [A, B, REMOTE])
    assert got is not None and got.step == 12 and got.holders[shard_names(2)[1]] == (REMOTE,)
    assert assembly.choose(holdings, [A, B]).step == 8  # type: ignore[union-attr]  # no remote tier configured


def test_bad_copies_skip_and_only_restrict() -> None:
    holdings = {A: {8: held(0, 1, 2, 3), 12: held(0, 1, 2, 3)}, B: {12: held(2, 3)}}
    bin2 = shard_names(2)[1]
    assert assembly.choose(holdings, [A, B], bad={12: {(A, bin2)}}).holders[bin2] == (B,)  # type: ignore[union-attr]
    assert assembly.choose(holdings, [A, B], bad={12: {(A, bin2), (B, bin2)}}).step == 8  # type: ignore[union-attr]
    # A damaged manifest on A: B's copy is read (A's shard files still count); both damaged: the step is out.
    assert assembly.choose(holdings, [A, B], bad={12: {(A, MANIFEST)}}).manifests == (B,)  # type: ignore[union-attr]
    assert assembly.choose(holdings, [A, B], bad={12: {(A, MANIFEST), (B, MANIFEST)}}).step == 8  # type: ignore[union-attr]
    assert assembly.choose(holdings, [A, B], skip={12}).step == 8  # type: ignore[union-attr]
    assert assembly.choose(holdings, [A, B], only={8}).step == 8  # type: ignore[union-attr]
    assert assembly.choose(holdings, [A, B], only={4}) is None
    assert assembly.choose({}, [A]) is None


def test_two_checkpoints_of_one_step_are_never_mixed() -> None:
    """The same step saved by two runs (different manifests): files of one never complete the other."""
    holdings = {A: {8: held(0, 1, digest="old")}, B: {8: held(2, 3, digest="new")}}
    assert assembly.choose(holdings, [A, B]) is None
    holdings[C] = {8: held(0, 1, digest="new")}
    choice = assembly.choose(holdings, [A, B, C])
    assert choice is not None and choice.digest == "new" and choice.manifests == (B, C)


def test_transfers_take_the_nearest_intact_copy_and_nothing_that_is_already_there() -> None:
    holdings = {A: {8: held(0, 1, 2, 3)}, B: {8: held(2, 3)}, REMOTE: {8: held(0, 1, 2, 3)}}
    choice = assembly.choose(holdings, [A, B, REMOTE])
    assert choice is not None
    bin0, bin2 = shard_names(0)[1], shard_names(2)[1]
    # B's ranks read their own files and rank 0's: only rank 0's record and .bin move, from A (a peer) not remote.
    needs = {A: set(files(0, 1)), B: {*files(2, 3), shard_names(0)[0], bin0}}
    assert assembly.transfers(choice, needs, [A, B, REMOTE]) == [Transfer(bin0, A, B),
                                                                  Transfer(shard_names(0)[0], A, B)]
    # A's copy of rank 0's .bin is bad: the remote tier's; and B's own copy of rank 2's .bin is bad: A's.
    needs[B].add(bin2)
    got = assembly.transfers(choice, needs, [A, B, REMOTE], bad={(A, bin0), (B, bin2)})
    assert Transfer(bin0, REMOTE, B) in got and Transfer(bin2, A, B) in got
    with pytest.raises(Unassemblable, match=bin0):
        assembly.transfers(choice, needs, [A, B, REMOTE], bad={(A, bin0), (REMOTE, bin0)})


def test_a_disk_without_the_step_gets_its_manifest_first() -> None:
    holdings = {A: {8: held(0, 1, 2, 3)}}
    choice = assembly.choose(holdings, [A, C])
    assert choice is not None
    moves = assembly.transfers(choice, {A: set(files(0, 1)), C: set(files(2, 3))}, [A, C])
    assert moves[0] == Transfer(MANIFEST, A, C) and {m.file for m in moves[1:]} == set(files(2, 3))


def test_replicated_tensors_are_read_where_the_file_already_is() -> None:
    # After a rejoin the ranks were renumbered: disk B (new ranks 0-1) holds old ranks 2-3's files.
    holdings = {A: {8: held(0, 1)}, B: {8: held(2, 3)}}
    choice = assembly.choose(holdings, [A, B])
    assert choice is not None
    bins = {r: shard_names(r)[1] for r in range(4)}
    assert assembly.readers(choice, bins, [B, B, A, A]) == {0: 2, 1: 2, 2: 0, 3: 0}
    assert assembly.readers(choice, bins, [A, A, B, B]) == {0: 0, 1: 1, 2: 2, 3: 3}  # the saver itself
    assert assembly.readers(choice, bins, [A, A]) == {0: 0, 1: 1, 2: 0, 3: 1}  # a resize to 2: dealt round-robin


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("replicas", [0, 1, 2, 4])
def test_replica_rounds_leave_every_file_on_replicas_plus_one_disks(n: int, replicas: int) -> None:
    disks = [f"{i:032x}" for i in range(n)]
    rounds = assembly.replica_rounds(disks, replicas)
    assert len(rounds) == min(replicas, n - 1)
    copies = {d: {d} for d in disks}
    for pairs in rounds:
        assert sorted(src for src, _ in pairs) == sorted(disks) == sorted(dst for _, dst in pairs)
        for src, dst in pairs:
            assert dst not in copies[src]  # never the same disk twice
            copies[src].add(dst)
    for lost in itertools.combinations(disks, min(len(rounds), n - 1) or 0):
        assert all(copies[d] - set(lost) for d in disks), lost  # any `rounds` disks lost: a copy survives


def test_safe_elsewhere_gaps_and_describe() -> None:
    holdings = {A: {8: held(0, 1, 2, 3), 12: held(0, 1, 2, 3)},
                B: {8: held(2, 3, 0, 1), 12: held(2, 3, 0, 1)}}
    assert assembly.newest_safe(holdings, [A, B]) == 12
    holdings[B][12] = held(2, 3)  # rank 0-1's files of 12 only on A: A's loss would take them
    assert assembly.newest_safe(holdings, [A, B]) == 8
    assert assembly.newest_safe({A: holdings[A], REMOTE: {12: held(0, 1, 2, 3)}}, [A, REMOTE]) == 12
    holdings[A][12] = held(0, 1)
    # Disk B gone (not in the job now): 12 is only half here and was partly written to B.
    only_a = {A: holdings[A]}
    assert assembly.elsewhere(only_a, [A, C]) == [12]
    assert assembly.elsewhere(only_a, [A, B]) == []  # B is here: what it lacks is damaged or lost, not away
    assert assembly.elsewhere({A: {8: Held("d", ALL, ALL, frozenset({A, B}))}}, [A, C]) == []  # complete here
    bad = {(A, shard_names(2)[1]): "checksum mismatch"}
    gaps = assembly.gaps(only_a, 12, [A], bad)
    assert set(gaps) == set(files(2, 3)) and gaps[shard_names(2)[0]] == [(A, "not held")]
    assert assembly.gaps({A: {8: Held("d", ALL, ALL)}}, 8, [A], bad) == {shard_names(2)[1]: [(A, "checksum mismatch")]}
    text = assembly.describe(holdings, [A, B, REMOTE], {A: "node a"})
    assert "node a: step 12: ranks 0-1 of 4; step 8: ranks 0-3 of 4" in text
    assert f"disk {B[:8]}: step 12: ranks 2-3 of 4" in text and "the remote tier: nothing" in text
    assert assembly.ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
