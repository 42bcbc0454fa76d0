"""The checkpoint-root lease (ftrain/checkpoint/lease.py, docs/FORMAT.md "Lease"): real files and real flocks, no
subprocesses. Other processes are simulated by records naming them (a dead pid, our parent with a wrong start time,
another host) and a second lock descriptor in this process (flock locks belong to the open file, not the process)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from ftrain.checkpoint import format as layout
from ftrain.checkpoint.lease import Lease, for_writer, read_record, write_record
from ftrain.checkpoint.lease_rules import FIX, LAUNCH, SESSION, LeaseRecord, Owner, ProcessState, Verdict, decide
from ftrain.errors import CheckpointError, LeaseError

TTL = 60.0
T0 = 1_800_000_000.0


def me(run: str = "run-a", role: str = LAUNCH, **kw: object) -> Owner:
    return replace(Owner.current(run, role), **kw)  # type: ignore[arg-type]


def record(owner: Owner, *, generation: int = 1, renewed: float = T0, ttl: float = TTL) -> LeaseRecord:
    return LeaseRecord(generation, "0123456789abcdef", owner.role, owner.run_id, owner.host, owner.boot_id, owner.pid,
                       owner.pid_start_unix, renewed - 5, renewed, ttl)


def lease(root: Path, run: str = "run-a", *, clock: float | None = None, **kw: object) -> Lease:
    return Lease(root, me(run, **kw), ttl=TTL, **({"clock": lambda: clock} if clock is not None else {}))


def dead_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    return path


# ----------------------------------------------------------------------------- files and processes
def test_acquire_writes_the_record_and_release_removes_it(root: Path) -> None:
    a = lease(root)
    decision = a.acquire()
    assert decision.verdict is Verdict.FREE
    rec, problem = read_record(root)
    assert problem == "" and rec is not None
    assert (rec.run_id, rec.pid, rec.generation, rec.role) == ("run-a", os.getpid(), 1, LAUNCH)
    assert rec.pid_start_unix == pytest.approx(psutil.Process().create_time())
    assert json.loads((root / layout.LEASE_RECORD).read_text())["lease_version"] == 1
    a.check("not committing step 1")  # ours: no error
    a.release()
    assert not (root / layout.LEASE_RECORD).exists()
    assert (root / layout.LEASE_LOCK).exists()  # never removed: a lock on a deleted file would protect nothing
    assert not layout.is_garbage(layout.LEASE_LOCK) and not layout.is_garbage(layout.LEASE_RECORD)
    assert layout.parse_step_dirname(layout.LEASE_RECORD) is None
    with pytest.raises(CheckpointError, match="not held"):
        a.check("not committing step 2")
    b = lease(root, "run-b")
    assert b.acquire().verdict is Verdict.FREE  # released: free again
    b.release()


def test_a_second_acquire_is_refused_while_the_os_lock_is_held(root: Path) -> None:
    a = lease(root)
    a.acquire()
    b = lease(root, "run-b")  # its own descriptor of lease.lock: flock refuses it although we are one process
    with pytest.raises(LeaseError) as info:
        b.acquire()
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message
    assert f"checkpoint dir {root} is in use by another job: run run-a (pid {os.getpid()} on host " in message
    assert " since " in message and message.endswith(FIX), message
    a.check("not committing step 1")  # the refused acquire changed nothing
    b.release()  # never held: must not remove a's record
    assert read_record(root)[0] is not None
    a.release()


def test_an_owner_whose_process_is_gone_is_taken_over(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = me()
    write_record(root, record(replace(host, pid=dead_pid()), generation=4))
    a = lease(root)
    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        assert a.acquire().verdict is Verdict.DEAD
    assert a.generation == 5
    assert any("that process is gone" in r.getMessage() for r in caplog.records)
    a.release()


def test_a_reused_pid_is_taken_over(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = psutil.Process(os.getppid())  # alive, but not the process the record describes
    write_record(root, record(replace(me(), pid=parent.pid, pid_start_unix=parent.create_time() - 3600)))
    a = lease(root)
    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        assert a.acquire().verdict is Verdict.DEAD
    assert any("now belongs to a process started at another time" in r.getMessage() for r in caplog.records)
    a.release()


def test_a_live_owner_on_this_host_is_refused_even_when_the_os_lock_is_free(root: Path) -> None:
    parent = psutil.Process(os.getppid())  # flock may be a no-op on a shared filesystem: the record is trusted
    write_record(root, record(replace(me("run-p"), pid=parent.pid, pid_start_unix=parent.create_time())))
    with pytest.raises(LeaseError, match=f"run run-p \\(pid {parent.pid} on host "):
        lease(root).acquire()


def test_another_hosts_lease_is_refused_until_it_expires(root: Path) -> None:
    write_record(root, record(me("run-x", host="elsewhere"), renewed=T0, ttl=30))
    with pytest.raises(LeaseError, match=r"run run-x \(pid \d+ on host elsewhere\) since .* renewed 29s ago"):
        lease(root, clock=T0 + 29).acquire()
    a = lease(root, clock=T0 + 31)
    decision = a.acquire()
    assert decision.verdict is Verdict.EXPIRED and "not renewed for 31s" in decision.message
    assert a.generation == 2
    rec = read_record(root)[0]
    assert rec is not None and rec.previous == decision.message  # who was displaced, for the humans
    a.release()


def test_force_takes_over_and_the_displaced_holder_stops(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = lease(root)
    a.acquire()
    b = lease(root, "run-b")
    with caplog.at_level(logging.WARNING, logger="ftrain.checkpoint"):
        decision = b.acquire(force=True)  # a still holds the OS lock: b goes ahead on the record
    assert decision.verdict is Verdict.FORCED and "from run run-a" in decision.message
    assert b.generation == a.generation + 1
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ftrain.checkpoint"):
        assert not a.renew()  # the renewal notices (the daemon thread's job, every ttl/3) ...
        assert not a.renew()
        with pytest.raises(CheckpointError) as info:  # ... and the commit guard refuses
            a.check("not committing step 7")
    assert str(info.value) == (f"lost the lease of {root} to run run-b (pid {os.getpid()} on host "
                               f"{me().host}) — not committing step 7")
    lost = [r.getMessage() for r in caplog.records if "lost the lease" in r.getMessage()]
    assert len(lost) == 1 and "this job will not commit any further checkpoint there" in lost[0], lost  # once
    b.check("not committing step 8")
    a.release()  # not ours any more: the record stays
    assert read_record(root)[0].run_id == "run-b"  # type: ignore[union-attr]
    assert b.renew()  # and b picks up the OS lock a let go of
    assert b._locked
    b.release()


def test_renewal_refreshes_the_record_and_notices_a_takeover(root: Path) -> None:
    now = [T0]
    a = Lease(root, me(), ttl=TTL, clock=lambda: now[0])
    a.acquire()
    now[0] += 20
    assert a.renew()
    assert read_record(root)[0].renewed_unix == T0 + 20  # type: ignore[union-attr]
    write_record(root, record(me("run-z", host="elsewhere"), generation=9))  # someone else's record
    assert not a.renew() and not a.holds()
    a.release()
    assert read_record(root)[0].run_id == "run-z"  # type: ignore[union-attr]


def test_a_second_session_in_this_process_supersedes_an_unclosed_one(root: Path) -> None:
    first = for_writer(root, ttl=TTL, force=False, run_id=None, launcher=None)
    second = for_writer(root, ttl=TTL, force=False, run_id=None, launcher=None)
    assert isinstance(first, Lease) and isinstance(second, Lease)
    with pytest.raises(CheckpointError, match="lost the lease"):
        first.check("not committing step 3")
    second.check("not committing step 3")
    assert second.generation == first.generation + 1 and second._locked
    first.release()
    second.release()
    assert read_record(root) == (None, "")


def test_workers_check_the_launchers_lease(root: Path) -> None:
    launcher = lease(root, "run-l")
    launcher.acquire()
    fence = for_writer(root, ttl=TTL, force=False, run_id="run-l", launcher=(str(root), launcher.generation,
                                                                              os.getpid()))
    fence.check("not committing step 1")
    with pytest.raises(LeaseError, match="this job \\(run run-l, lease generation 9\\) will not write to it"):
        for_writer(root, ttl=TTL, force=False, run_id="run-l", launcher=(str(root), 9, None))
    other = lease(root, "run-m")
    other.acquire(force=True)
    with pytest.raises(CheckpointError, match=r"lost the lease of .* to run run-m"):
        fence.check("not committing step 2")
    launcher.release()
    other.release()


@pytest.mark.parametrize("content", [b"{not json", b"[]", json.dumps({"lease_version": 99}).encode(),
                                     json.dumps({"lease_version": 1, "pid": "1"}).encode()])
def test_an_unreadable_record_is_taken_over_only_with_the_lock(root: Path, content: bytes) -> None:
    (root / layout.LEASE_RECORD).write_bytes(content)
    a = lease(root)
    assert a.acquire().verdict is Verdict.UNREADABLE
    a.release()


def test_a_linked_record_is_not_followed(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_text("{}")
    (root / layout.LEASE_RECORD).symlink_to(tmp_path / "elsewhere.json")
    assert read_record(root) == (None, "a symbolic link")


# ----------------------------------------------------------------------------- the rules, pure
ME = Owner("h1", "boot-1", 100, 50.0, "run-me", SESSION)


def rules(rec: LeaseRecord | None, *, locked: bool = True, force: bool = False, now: float = T0,
          state: ProcessState = ProcessState.ALIVE, who: Owner = ME) -> Verdict:
    return decide(rec, now=now, me=who, locked=locked, force=force, probe=lambda pid, start: state, where="/r").verdict


def test_the_rules_in_order() -> None:
    other = Owner("h1", "boot-1", 200, 60.0, "run-o", SESSION)
    assert rules(None) is Verdict.FREE
    assert rules(None, locked=False) is Verdict.REFUSE
    assert rules(None, locked=False, force=True) is Verdict.FORCED
    assert rules(record(ME)) is Verdict.OWN
    assert rules(record(ME), locked=False) is Verdict.REFUSE  # another lock descriptor of this process
    assert rules(record(other)) is Verdict.REFUSE
    assert rules(record(other), locked=False, force=True) is Verdict.FORCED
    assert rules(record(other), state=ProcessState.GONE) is Verdict.DEAD
    assert rules(record(other), state=ProcessState.REUSED) is Verdict.DEAD
    assert rules(record(other), locked=False, state=ProcessState.GONE) is Verdict.REFUSE  # the lock says alive
    assert rules(record(replace(other, boot_id="boot-0"))) is Verdict.DEAD  # rebooted since
    far = replace(other, host="h2")
    assert rules(record(far, renewed=T0 - TTL + 1)) is Verdict.REFUSE
    assert rules(record(far, renewed=T0 - TTL - 1)) is Verdict.EXPIRED
    # An earlier attempt of the same supervised run (e.g. rank 0 restarted on another node) is taken over.
    supervised = replace(ME, supervised=True)
    assert rules(record(replace(far, run_id="run-me")), locked=False, who=supervised) is Verdict.SAME_RUN
    assert rules(record(replace(far, run_id="run-me")), who=ME) is Verdict.REFUSE  # not supervised: no such rule
    assert rules(record(replace(far, run_id="run-me", role=LAUNCH)), who=supervised) is Verdict.REFUSE


def test_the_refusal_names_the_owner_and_the_fix() -> None:
    far = Owner("gpu-7", "b", 4242, 1.0, "20260101-120000-abc123", LAUNCH)
    d = decide(record(far, renewed=T0 - 12), now=T0, me=ME, locked=True, force=False,
               probe=lambda pid, start: ProcessState.ALIVE, where="/ckpt/run1")
    assert d.message == ("checkpoint dir /ckpt/run1 is in use by another job: run 20260101-120000-abc123 (pid 4242 "
                         "on host gpu-7) since 2027-01-15 07:59:43 UTC (lease generation 1, renewed 12s ago); stop "
                         "that job, or pass --force / set checkpoint.lease.takeover: true to take the directory over; "
                         "the other job then stops committing")
    hostile = replace(far, host="evil\x1b[2J\nforged")
    d = decide(record(hostile), now=T0, me=ME, locked=True, force=False,
               probe=lambda pid, start: ProcessState.ALIVE, where="/r")
    assert "\x1b" not in d.message and "\n" not in d.message
