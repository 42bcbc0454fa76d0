"""One writing job per checkpoint root, with real processes: two `ftrain launch` runs, two plain Session scripts,
and a `--force` takeover (docs/FORMAT.md, "Lease")."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from ftrain import exitcodes
from ftrain.checkpoint import format as layout
from ftrain.checkpoint.lease_rules import FIX  # the message's fix, as the product words it
from ftrain.checkpoint.store import CheckpointStore

from helpers import EXAMPLE, ROOT, Launch, assert_no_orphans, child_env, final_hash, launch_env

pytestmark = pytest.mark.slow



def manifests(root: Path) -> dict[str, bytes]:
    return {p.name: (p / layout.MANIFEST).read_bytes() for p in sorted(root.glob("step-*"))}


def verify(root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ftrain", "ckpt", "verify", str(root)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def launch(root: Path, run_id: str, *args: str) -> list[str]:
    return ["--nproc", "1", "--ckpt-dir", str(root), "--keep-last", "0", "--rdzv-id", run_id, *args]


def script_args(steps: int, sleep: float = 0.0) -> list[str]:
    return [str(EXAMPLE), "--steps", str(steps), "--workers", "0", "--print-every", "0", "--step-sleep", str(sleep)]


def test_a_second_launch_is_refused_at_once_and_the_first_is_untouched(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    ref = Launch(launch(tmp_path / "ref", "lease-ref", "--save-every-steps", "5") + script_args(40), launch_env())
    first = Launch(launch(root, "lease-a", "--save-every-steps", "5") + script_args(40, 0.1), launch_env())
    first.wait_for(r"saved step 10 ")
    before = manifests(root)
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "ftrain", "launch",
                             *launch(root, "lease-b", "--save-every-steps", "5"), *script_args(40)],
                            env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert second.returncode == exitcodes.USAGE, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert re.fullmatch(rf"ftrain: error: checkpoint dir {re.escape(str(root))} is in use by another job: run "
                        rf"lease-a \(pid {first.proc.pid} on host \S+\) since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
                        rf"\(lease generation 1, renewed \d+s ago\); {re.escape(FIX)}", lines[0]), lines[0]
    assert "attempt" not in second.stdout + second.stderr  # refused before any worker started
    assert elapsed < 30, f"refusing took {elapsed:.1f}s"

    assert first.wait() == 0, first.output[-3000:]
    assert ref.wait() == 0, ref.output[-3000:]
    assert "attempt 1" not in first.output
    assert final_hash(first.output) == final_hash(ref.output)  # as if the second had never been started
    after = manifests(root)
    assert all(after.get(name) == data for name, data in before.items()), "the first run's checkpoints changed"
    assert sorted(after) == sorted(manifests(tmp_path / "ref"))
    verify(root)
    assert not (root / layout.LEASE_RECORD).exists() and (root / layout.LEASE_LOCK).exists()  # released at exit
    assert_no_orphans("lease-a")


SESSION_SCRIPT = textwrap.dedent("""
    import sys, time, pathlib
    import torch, ftrain
    from ftrain.config import CheckpointConfig, FtrainConfig
    root, role = pathlib.Path(sys.argv[1]), sys.argv[2]
    s = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=str(root))))
    s.register(model=torch.nn.Linear(4, 4))
    try:
        step = s.restore()
        if role == "first":
            s.save(step + 1, blocking=True)
            print("saved", step + 1, flush=True)
            while not (root.parent / "go").exists():  # hold the lease until the test says go
                time.sleep(0.05)
            s.save(step + 2)  # in the background; close() waits for the commit
        s.close()
        print("record after close:", (root / "lease.json").exists(), flush=True)  # released by close()
    except ftrain.FtrainError as e:
        print(f"ftrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
""")


def test_a_second_plain_session_is_refused_and_the_first_still_commits(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    script = tmp_path / "job.py"
    script.write_text(SESSION_SCRIPT)
    first = subprocess.Popen([sys.executable, str(script), str(root), "first"], env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "saved 1"
        # What the first's next save would have in flight: the refused job must not clean it up.
        leftover = root / layout.tmp_dirname(2, "0123456789abcd")
        leftover.mkdir()
        second = subprocess.run([sys.executable, str(script), str(root), "second"], env=child_env(),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == exitcodes.USAGE, second.stderr
        assert re.search(rf"^ftrain: error: checkpoint dir {re.escape(str(root))} is in use by another job: run "
                         rf"session-\S+ \(pid {first.pid} on host \S+\) since .*; {re.escape(FIX)}$",
                         second.stderr, re.M), second.stderr
        assert leftover.is_dir(), "the refused session ran the startup cleanup"
        leftover.rmdir()
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert "record after close: False" in out, out
    assert CheckpointStore(root).steps() == [1, 2]
    verify(root)
    assert not (root / layout.LEASE_RECORD).exists()


def test_force_takes_over_and_the_displaced_run_commits_nothing_after(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    # The first renews every 0.7 s (ttl 2 s) and saves every 5 steps, so it notices the takeover quickly.
    first = Launch(launch(root, "force-a", "--save-every-steps", "5", "--max-restarts", "0")
                   + script_args(400, 0.1), launch_env(FTRAIN_CHECKPOINT_LEASE_TTL_SECONDS="2"))
    first.wait_for(r"saved step 10 ")
    second = Launch(launch(root, "force-b", "--save-every-steps", "7", "--force") + script_args(30), launch_env())
    taken = second.wait_for(r"taking over .*$")
    assert re.search(rf"from run force-a \(pid {first.proc.pid} on host \S+\), generation 1, held since .*; it stops "
                     r"committing \(now generation 2, run force-b\)", taken[0]), taken[0]
    record = json.loads((root / layout.LEASE_RECORD).read_text())
    assert (record["run_id"], record["generation"]) == ("force-b", 2)

    assert first.wait(timeout=120) == exitcodes.FAILURE, first.output[-3000:]
    refused = re.search(rf"lost the lease of {re.escape(str(root))} to run force-b \(pid {second.proc.pid} on "
                        r"host \S+\) — not committing step (\d+)", first.output)
    assert refused, first.output[-3000:]
    assert "this job will not commit any further checkpoint there" in first.output  # the renewal noticed too
    assert second.wait() == 0, second.output[-3000:]
    assert re.search(r"restored step (\d+)", second.output)

    store = CheckpointStore(root)
    by_first = []
    for step in store.steps():
        m = store.validate(step)  # every checkpoint, the first's included, still verifies
        if m.meta["config"]["checkpoint"]["every_steps"] == 5:
            by_first.append(step)
            assert m.created_unix < record["acquired_unix"], f"step {step} committed by the displaced run"
    assert by_first and max(by_first) < int(refused[1]), (by_first, refused[1])
    verify(root)
    assert_no_orphans("force-a")
    assert_no_orphans("force-b")


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_lets_go(tmp_path: Path) -> None:
    """DataLoader workers are forked from the rank that holds the lease: their copy of the lock descriptor must
    not keep the OS lock (and so the directory) held after the parent released it or died."""
    from ftrain.checkpoint.lease import Lease
    from ftrain.checkpoint.lease_rules import SESSION, Owner

    root = tmp_path / "ckpt"
    root.mkdir()
    held = Lease(root, Owner.current("parent", SESSION), ttl=60)
    held.acquire()
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, fork() may deadlock": not here
        pid = os.fork()
    if pid == 0:  # the child: outlives the parent's lease, like a DataLoader worker mid-shutdown
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        held.release()
        after = Lease(root, Owner.current("next", SESSION), ttl=60)
        after.acquire()  # refused ("a running process holds lease.lock") if the child still held the lock
        after.release()
    finally:
        os.close(w)
        os.waitpid(pid, 0)
