"""The multi-node pure parts: which worker group a pid belongs to, and why a group ended (no processes)."""
from __future__ import annotations

from ftrain.attempt import ErrorRecord, PreemptedRecord
from ftrain.supervisor.membership import (
    Ending,
    GroupWatch,
    classify_group,
    is_communication_failure,
    parse_worker_exits,
)

GLOO_LOST = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
             "[127.0.0.1]:16307. This is typically caused by a remote worker crashing.")
MESH = ("Gloo connectFullMesh failed with [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:152] "
        "timed out connecting: SO_ERROR: Connection refused, remote=[127.0.0.1]:29520")


def err(pid: int, exc_type: str, message: str, t: float = 1.0) -> ErrorRecord:
    return ErrorRecord(pid=pid, exc_type=exc_type, message=message, time=t, group=0)


def test_communication_failures_are_recognised() -> None:
    assert is_communication_failure(err(1, "RuntimeError", GLOO_LOST))
    assert is_communication_failure(err(1, "RuntimeError", MESH))
    assert is_communication_failure(err(1, "DistNetworkError", "anything"))
    assert is_communication_failure(err(1, "DistBackendError", "NCCL watchdog"))
    assert not is_communication_failure(err(1, "ValueError", "loss is nan"))
    assert not is_communication_failure(err(1, "RuntimeError", "shape mismatch"))


def test_no_error_at_all_is_a_membership_change() -> None:
    end = classify_group(frozenset({10, 11}), {}, {}, None)
    assert end.ending is Ending.MEMBERSHIP and not end.ending.counted


def test_a_group_without_a_trace_finished_if_torchrun_exited_0() -> None:
    # Workers that finish look like workers stopped for a re-rendezvous until torchrun exits (or restarts them).
    done = classify_group(frozenset({10, 11}), {}, {}, None, finished=True)
    assert done.ending is Ending.FINISHED and not done.ending.counted
    assert "membership" not in done.detail and "re-rendezvous" not in done.detail
    again = classify_group(frozenset({10, 11}), {}, {}, None, finished=False)
    assert again.ending is Ending.MEMBERSHIP and "finished" not in again.detail
    assert "or they finished" in classify_group(frozenset({10, 11}), {}, {}, None).detail  # not known yet


def test_finished_only_decides_a_group_without_a_trace() -> None:
    lost = {0: err(10, "RuntimeError", GLOO_LOST)}
    assert classify_group(frozenset({10, 11}), lost, {}, None, finished=True).ending is Ending.MEMBERSHIP
    saved = classify_group(frozenset({10, 11}), {}, {}, PreemptedRecord(step=15, pid=10), finished=True)
    assert saved.ending is Ending.MEMBERSHIP and "saved step 15" in saved.detail
    crashed = classify_group(frozenset({10, 11}), {}, {11: -9}, None, finished=True)
    assert crashed.ending is Ending.FAILED


def test_only_lost_peers_is_a_membership_change() -> None:
    errors = {0: err(10, "RuntimeError", GLOO_LOST, 2.0), 1: err(11, "RuntimeError", GLOO_LOST, 1.0)}
    end = classify_group(frozenset({10, 11}), errors, {10: 1}, None)
    assert end.ending is Ending.MEMBERSHIP
    assert "a peer was lost (rank 1: RuntimeError: [/__w" in end.detail


def test_a_local_exception_is_a_counted_failure_even_among_lost_peers() -> None:
    errors = {0: err(10, "RuntimeError", GLOO_LOST, 1.0), 1: err(11, "ValueError", "loss is nan\nmore", 2.0)}
    end = classify_group(frozenset({10, 11}), errors, {}, None)
    assert end.ending is Ending.FAILED and end.ending.counted and end.rank == 1
    assert end.detail == "rank 1 (ValueError: loss is nan)"


def test_ranks_that_stopped_because_another_failed_are_not_a_local_fault() -> None:
    # A save that failed on a rank of another node: this node's ranks raise PeerFailed; the other node counts it.
    peer = "another rank failed while handling checkpoints; see its log"
    errors = {0: err(10, "PeerFailed", peer, 1.0), 1: err(11, "PeerFailed", peer, 1.1)}
    assert classify_group(frozenset({10, 11}), errors, {}, None).ending is Ending.MEMBERSHIP
    # With the failing rank on this node, its own error is the counted cause.
    errors[1] = err(11, "OSError", "No space left on device", 0.9)
    end = classify_group(frozenset({10, 11}), errors, {}, None)
    assert end.ending is Ending.FAILED and end.rank == 1


def test_errors_of_earlier_groups_do_not_count() -> None:
    errors = {1: err(99, "ValueError", "old group's crash")}  # rank 1's file, written by a dead group's pid
    assert classify_group(frozenset({10, 11}), errors, {}, None).ending is Ending.MEMBERSHIP


def test_scale_up_stop_with_a_save_is_a_membership_change() -> None:
    end = classify_group(frozenset({10, 11}), {}, {}, PreemptedRecord(step=15, pid=10))
    assert end.ending is Ending.MEMBERSHIP and "saved step 15" in end.detail
    stale = classify_group(frozenset({10, 11}), {}, {}, PreemptedRecord(step=5, pid=7))
    assert "saved" not in stale.detail


def test_a_worker_killed_without_an_error_file_is_a_counted_failure() -> None:
    exits = parse_worker_exits(["E1201 ... api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 11) of binary: x"])
    assert exits == {11: -9}
    end = classify_group(frozenset({10, 11}), {}, exits, None)
    assert end.ending is Ending.FAILED and "pid 11 exited with signal SIGKILL" in end.detail
    # A worker that exited 75 saved (another rank's preemption): not a failure.
    assert classify_group(frozenset({10, 11}), {}, {11: 75}, None).ending is Ending.MEMBERSHIP
    # Another group's pid in torchrun's output is not ours.
    assert classify_group(frozenset({10, 11}), {}, {5: -9}, None).ending is Ending.MEMBERSHIP


def test_hang_and_signal_take_precedence() -> None:
    errors = {0: err(10, "ValueError", "x")}
    assert classify_group(frozenset({10}), errors, {}, None, hang="rank 0 made no progress").ending is Ending.HUNG
    assert classify_group(frozenset({10}), errors, {}, None, signalled=True).ending is Ending.PREEMPTED


def test_group_watch_tracks_starts_ends_and_late_workers() -> None:
    w = GroupWatch()
    assert w.observe([], 0.0) == (None, None)
    ended, started = w.observe([10], 1.0)
    assert ended is None and started is not None and started.number == 0 and started.started == 1.0
    assert w.observe([10, 11], 1.5) == (None, None)  # torchrun's second worker: the same group
    assert w.current is not None and w.current.pids == {10, 11}
    assert w.observe([11], 2.0) == (None, None)  # one died, torchrun is stopping the other
    ended, started = w.observe([], 3.0)
    assert ended is not None and ended.pids == {10, 11} and started is None
    ended, started = w.observe([20, 21], 9.0)
    assert ended is None and started is not None and started.number == 1 and started.started == 9.0
    ended, started = w.observe([30, 31], 20.0)  # replaced between two looks
    assert ended is not None and ended.number == 1 and started is not None and started.number == 2


def test_on_a_single_node_a_rank_killed_among_lost_peers_is_the_failure() -> None:
    # 4 ranks, rank 2 SIGKILLed: the others' collectives fail (their error files), and torchrun logged only the first
    # failed exit it saw, a survivor's. On several nodes that reads as a lost peer; on one node it is a local failure.
    pids = frozenset({10, 11, 12, 13})
    errors = {r: err(pid, "RuntimeError", GLOO_LOST, 1.0 + r) for r, pid in ((0, 10), (1, 11), (3, 13))}
    ranks = {10: 0, 11: 1, 12: 2, 13: 3}
    assert classify_group(pids, errors, {11: 1}, None, ranks=ranks).ending is Ending.MEMBERSHIP
    end = classify_group(pids, errors, {11: 1}, None, local_only=True, ranks=ranks)
    assert end.ending is Ending.FAILED and end.rank == 2
    assert end.detail.startswith("rank 2 died without an error file (killed by a signal?); the other ranks lost it")
    # Without a trace at all, and torchrun restarted the group: a failure too, named by its pid if no rank is known.
    bare = classify_group(frozenset({10, 11}), {}, {}, None, finished=False, local_only=True)
    assert bare.ending is Ending.FAILED and bare.detail.startswith("worker pid 10 died without an error file")
    # A group that saved (a stop) or finished is still not a failure.
    assert classify_group(frozenset({10, 11}), {}, {}, PreemptedRecord(step=3, pid=10), finished=False,
                          local_only=True).ending is Ending.MEMBERSHIP
    assert classify_group(frozenset({10, 11}), {}, {}, None, finished=True, local_only=True).ending is Ending.FINISHED
