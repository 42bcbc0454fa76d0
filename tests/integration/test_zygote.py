"""The warm-start fork contract (issue 23): a zygote, entry processes run as torchrun would run them, tiny scripts.

Real processes, no torchrun (tests/integration/test_warm_start.py has it). The zygote preloads ``json`` (or a
test module) so that each test takes well under a second; one test preloads the real torch. Every process a test
starts carries a marker in its initial environment (a warm worker's /proc environ is the zygote's), and the
fixture checks with psutil that none is left at the end.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ftrain import envvars
from ftrain.supervisor import zygote_protocol as wire
from ftrain.supervisor.job import JobProcess
from ftrain.supervisor.zygote import Zygote

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm starts need Linux")

#: Prints what the contract is about as one JSON line on stdout, then exits with argv[1].
REPORT = """
import json, os, random, sys
print(json.dumps({
    "name": __name__, "file": __file__, "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0],
    "cwd": os.getcwd(), "x": os.environ.get("X"), "pid": os.getpid(), "ppid": os.getppid(),
    "entry": os.environ.get("FTRAIN_ENTRY_PID"), "random": random.random(),
    "numpy": __import__("numpy").random.random() if "numpy" in sys.modules else None,
    "stdout": [type(sys.stdout.buffer).__name__, sys.stdout.line_buffering, sys.stdout.write_through,
               sys.stdout.encoding, sys.stdout.name],
    "stderr": [sys.stderr.line_buffering, sys.stderr.errors],
    "sid": os.getsid(0) == os.getpid(), "umask": os.umask(0o22),
    "sigint": repr(__import__("signal").getsignal(2)), "sighup": repr(__import__("signal").getsignal(1)),
}))
sys.exit(int(sys.argv[1]))
"""


class Harness:
    """One zygote, and entry processes started the way torchrun starts them."""

    def __init__(self, sockdir: Path, marker: str) -> None:
        self.sockdir, self.marker = sockdir, marker
        self.zygote: Zygote | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "TORCHELASTIC_"))}
        self.env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(sockdir / "mods"), str(ROOT)]),
                        ZYGOTE_TEST_MARKER=marker)
        (sockdir / "mods").mkdir()
        (sockdir / "work").mkdir()
        self.log = sockdir / "zygote.log"

    def start(self, preload: tuple[str, ...] = ("json",), script: str | None = None, **env: str) -> Zygote:
        with open(self.log, "ab") as log:
            self.zygote = Zygote.start(self.sockdir / "z.sock", preload, script, env={**self.env, **env}, stderr=log)
        status = self.zygote.status(timeout=60)
        assert status.pid == self.zygote.pid
        return self.zygote

    def module(self, name: str, source: str) -> None:
        (self.sockdir / "mods" / f"{name}.py").write_text(source)

    def script(self, source: str, name: str = "script.py") -> Path:
        path = self.sockdir / "work" / name
        path.write_text(source)
        return path

    def entry(self, target: Path | str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              **popen: Any) -> subprocess.Popen[str]:
        full = {**self.env, **(env or {})}
        if self.zygote is not None:
            full.update(self.zygote.env())
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen([sys.executable, "-u", "-m", "ftrain.supervisor.entry", str(target), *args],
                                env=full, cwd=cwd or self.sockdir / "work", text=True, start_new_session=True,
                                **popen)

    def ready_worker(self, body: str = "import time\ntime.sleep(60)\n") -> tuple[subprocess.Popen[str], int]:
        """An entry running a script that prints "ready" then runs ``body``; once ready, the entry and its worker."""
        proc = self.entry(self.script("print('ready', flush=True)\n" + body))
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert self.zygote is not None
        worker = self.zygote.worker_of(proc.pid)
        assert worker is not None
        return proc, worker

    def run(self, target: Path | str, *args: str, **kw: Any) -> tuple[int, str, str]:
        proc = self.entry(target, *args, **kw)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err

    def live(self) -> list[psutil.Process]:
        """Every live process started by this test (by the marker in its initial environment)."""
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE \
                        and p.environ().get("ZYGOTE_TEST_MARKER") == self.marker:
                    found.append(p)
            except psutil.Error:
                pass
        return found


@pytest.fixture
def h() -> Iterator[Harness]:
    # Not tmp_path: a Unix socket's path must stay under ~108 bytes.
    with tempfile.TemporaryDirectory(prefix="zy", dir="/tmp") as d:
        harness = Harness(Path(d), uuid.uuid4().hex)
        try:
            yield harness
        finally:
            if harness.zygote is not None:
                harness.zygote.stop()
                assert not harness.zygote.alive()
                assert not harness.zygote.socket_path.exists()
            wait_until(lambda: not harness.live(), 10, "orphans: " + repr(harness.live()))


def wait_until(cond: Callable[[], object], timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.02)


def report(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------------------------------------------ the contract
def test_a_warm_worker_sees_what_a_cold_one_sees(h: Harness) -> None:
    z = h.start()
    script = h.script(REPORT)
    sub = script.parent / "sub"
    sub.mkdir()
    rc, out, err = h.run("../script.py", "3", "two words", env={"X": "warm"}, cwd=sub)
    assert (rc, err) == (3, "")
    warm = report(out)
    cold = subprocess.run([sys.executable, "-u", "../script.py", "3", "two words"], cwd=sub, text=True,
                          env={**h.env, "X": "warm"}, capture_output=True, timeout=60, start_new_session=True)
    assert cold.returncode == 3
    expect = report(cold.stdout)
    assert warm["ppid"] == z.pid and warm["entry"] is not None  # it was forked, not started cold
    for key in ("name", "file", "argv", "orig_argv", "path0", "cwd", "x", "stdout", "stderr", "sid", "umask",
                "sigint", "sighup"):
        assert warm[key] == expect[key], key
    assert warm["name"] == "__main__" and warm["argv"] == ["../script.py", "3", "two words"]


def test_buffering_follows_the_entrys_interpreter_options(h: Harness) -> None:
    h.start()
    script = h.script(REPORT)
    env = {k: v for k, v in h.env.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-m", "ftrain.supervisor.entry", str(script), "0"], text=True,
                          env={**env, **h.zygote.env()}, capture_output=True, timeout=60)  # type: ignore[union-attr]
    cold = subprocess.run([sys.executable, str(script), "0"], env=env, text=True, capture_output=True, timeout=60)
    assert report(proc.stdout)["entry"] is not None
    assert report(proc.stdout)["stdout"] == report(cold.stdout)["stdout"]
    assert report(proc.stdout)["stdout"][0] == "BufferedWriter"


def test_random_state_differs_across_ranks_and_starts(h: Harness) -> None:
    h.start(("json", "numpy.random"))  # numpy alone imports numpy.random lazily: after the fork
    script = h.script(REPORT)
    procs = [h.entry(script, "0", env={"RANK": str(r)}) for r in range(3)]
    procs += [h.entry(script, "0", env={"RANK": "0"})]  # rank 0 again: a restart
    seen = [report(p.communicate(timeout=60)[0]) for p in procs]
    assert all(s["entry"] is not None for s in seen)
    assert len({s["random"] for s in seen}) == 4
    assert len({s["numpy"] for s in seen}) == 4


def test_stdio_is_the_entrys(h: Harness) -> None:
    h.start()
    script = h.script("import sys\nprint('out:', sys.stdin.read().strip())\nprint('err line', file=sys.stderr)\n")
    out_path, err_path = h.sockdir / "stdout.log", h.sockdir / "stderr.log"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = h.entry(script, stdin=subprocess.PIPE, stdout=out, stderr=err)
        proc.communicate("from the entry's stdin\n", timeout=60)
    assert proc.returncode == 0
    assert out_path.read_text() == "out: from the entry's stdin\n"
    assert err_path.read_text() == "err line\n"


@pytest.mark.parametrize(("body", "code", "in_stderr"), [
    ("pass", 0, ""),
    ("sys.exit(7)", 7, ""),
    ("sys.exit('goodbye')", 1, "goodbye\n"),
    ("raise ValueError('boom')", 1,
     'script.py", line 4, in <module>\n    raise ValueError(\'boom\')\nValueError: boom'),
    ("raise KeyboardInterrupt", -signal.SIGINT, "KeyboardInterrupt"),
    ("os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)", -signal.SIGTERM, ""),
    ("threading.Thread(target=lambda: (time.sleep(0.3), print('joined'))).start()", 0, ""),
])
def test_exit_status_and_exit_hooks_as_python_has_them(h: Harness, body: str, code: int, in_stderr: str) -> None:
    h.start()
    done = h.sockdir / "atexit"
    script = h.script("import atexit, os, signal, sys, threading, time\n"
                      f"atexit.register(lambda: open({str(done)!r}, 'w').close())\n\n"
                      f"{body}\n")
    rc, out, err = h.run(script)
    assert rc == code, err
    assert in_stderr in err
    assert "warm_worker" not in err and "zygote" not in err  # the traceback shows the script's frames only
    assert done.exists() == (code != -signal.SIGTERM)  # atexit runs except on a death by signal
    if "joined" in body:
        assert out == "joined\n"  # the interpreter waits for non-daemon threads before it exits


def test_a_missing_script_fails_as_python_does(h: Harness) -> None:
    h.start()
    rc, _, err = h.run(h.sockdir / "work" / "nope.py")
    cold = subprocess.run([sys.executable, str(h.sockdir / "work" / "nope.py")], capture_output=True, text=True)
    assert (rc, err) == (cold.returncode, cold.stderr)


def test_module_mode_runs_like_python_dash_m(h: Harness) -> None:
    h.start()
    h.module("runme", "import sys\nprint(__name__, sys.argv[1:], sys.argv[0].endswith('runme.py'))\n")
    rc, out, _ = h.run("-m", "runme", "a", "b")
    assert (rc, out) == (0, "__main__ ['a', 'b'] True\n")


# ------------------------------------------------------------------------------------------------ signals
def test_signals_to_the_entry_reach_the_worker(h: Harness) -> None:
    h.start()
    got = h.sockdir / "got"
    script = h.script("import os, signal, sys, time\n"
                      "def handler(signum, frame):\n"
                      f"    open({str(got)!r}, 'a').write(signal.Signals(signum).name + '\\n')\n"
                      "    if signum == signal.SIGTERM:\n        sys.exit(42)\n"
                      "signal.signal(signal.SIGUSR1, handler)\nsignal.signal(signal.SIGTERM, handler)\n"
                      "print('ready', flush=True)\nwhile True:\n    time.sleep(0.05)\n")
    proc = h.entry(script)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    os.kill(proc.pid, signal.SIGUSR1)  # the supervisor's way: to the pid torchrun reports
    wait_until(got.exists, 10, "SIGUSR1 forwarded")
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun's way: to the entry's process group
    assert proc.wait(timeout=10) == 42
    assert got.read_text() == "SIGUSR1\nSIGTERM\n"


def test_the_supervisors_signal_reaches_the_worker_alone_not_its_children(h: Harness) -> None:
    """A stop for one rank is the worker's to handle: its DataLoader-like children (same process group, default
    SIGTERM) must not be killed under it. (The entry forwards to the whole group, as torchrun's killpg reaches a
    cold rank's; seen in CI: the rank then failed with "DataLoader worker ... killed by signal: Terminated".)"""
    z = h.start()
    got = h.sockdir / "got"
    worker = h.script("import signal, subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "def handler(signum, frame):\n"
                      "    time.sleep(0.3)  # a killed child would be dead by now\n"
                      f"    open({str(got)!r}, 'w').write(repr(child.poll()))\n"
                      "    child.kill()\n    child.wait()\n    sys.exit(0)\n"
                      "signal.signal(signal.SIGTERM, handler)\n"
                      "print('ready', flush=True)\nwhile True:\n    time.sleep(0.05)\n")
    torchrun = h.script("import subprocess, sys\n"  # torchrun's shape: one entry per rank, in its own session
                        "entry = subprocess.Popen([sys.executable, '-u', '-m', 'ftrain.supervisor.entry', sys.argv[1]],"
                        " start_new_session=True)\nsys.exit(entry.wait())\n", name="torchrun.py")
    log = h.sockdir / "job.log"
    job = JobProcess([sys.executable, str(torchrun), str(worker)], {**h.env, **z.env()}, log, warm=z.workers)
    try:
        wait_until(lambda: "ready" in log.read_text(), 30, "the worker started")
        wait_until(lambda: job.signal_new_workers(signal.SIGTERM) == 1, 10, "the rank signalled once it handles it")
        deadline = time.monotonic() + 10
        while job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.poll() == 0, log.read_text()
        assert got.read_text() == "None"  # the child was still running when the worker handled the stop
    finally:
        job.kill_tree()
        job.close()


def test_a_worker_killed_by_a_signal_kills_its_entry_with_it(h: Harness) -> None:
    z = h.start()
    proc, worker = h.ready_worker()
    assert psutil.Process(worker).ppid() == z.pid
    os.killpg(proc.pid, signal.SIGTERM)  # no handler in the worker: it dies of it, and so does the entry
    assert proc.wait(timeout=10) == -signal.SIGTERM
    wait_until(lambda: gone(worker), 10)
    wait_until(lambda: z.workers() == {}, 10)  # the workers file is rewritten just after the reap


def test_sigkill_of_the_entry_kills_the_worker_and_its_children(h: Harness) -> None:
    h.start()
    script = h.script("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "print(child.pid, flush=True)\ntime.sleep(60)\n")
    proc = h.entry(script)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    worker = h.zygote.worker_of(proc.pid)  # type: ignore[union-attr]
    assert worker is not None
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: gone(worker) and gone(grandchild), 10, "worker and its child killed with the entry")


def test_the_zygote_adopts_and_reaps_what_its_workers_leave(h: Harness) -> None:
    """A killed worker's children (its DataLoader processes) are reaped by the zygote at once, not left as zombies
    to the machine's init, which everyone's teardown would then wait for (1.7 s seen here); and what is still
    running when the zygote stops goes with it (the fixture checks that none is left)."""
    z = h.start()
    script = h.script("import subprocess, sys\n"
                      "for _ in range(2):\n"
                      "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
                      " start_new_session=True)\n    print(child.pid, flush=True)\n")  # they outlive the worker
    proc = h.entry(script)
    assert proc.stdout is not None
    orphans = [int(proc.stdout.readline()) for _ in range(2)]
    assert proc.wait(timeout=10) == 0
    for orphan in orphans:
        wait_until(lambda: psutil.Process(orphan).ppid() == z.pid, 10, "adopted by the zygote")
    os.kill(orphans[0], signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(orphans[0]), 10, "reaped, not left a zombie")


# ------------------------------------------------------------------------------------------------ cold starts
def test_a_module_that_starts_a_thread_at_import_means_cold_starts(h: Harness) -> None:
    h.module("threaded", "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True)"
                         ".start()\n")
    script = h.script("import threaded\nimport os\nprint(os.environ.get('FTRAIN_ENTRY_PID'), os.getpid())\n")
    z = h.start(("json",), str(script))
    status = z.status()
    assert status.state == "cold" and "importing threaded started a thread (2 threads)" in status.reason
    proc = h.entry(script)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert err == "ftrain: starting cold: importing threaded started a thread (2 threads)\n"
    assert out == f"None {proc.pid}\n"  # the script ran in the entry's own process


def test_script_imports_are_preloaded_only_when_safe(h: Harness) -> None:
    h.module("installed", "")
    h.module("excluded", "")
    script = h.script("import json\nimport installed\nimport beside\nfrom . import x\nimport excluded\n"
                      "try:\n    import missing_mod\nexcept ImportError:\n    pass\n"
                      "def f():\n    import never_at_top\n")
    h.script("", "beside.py")
    # The script's directory on the zygote's path too: only the locality rule keeps `beside` out.
    path = os.pathsep.join([h.env["PYTHONPATH"], str(script.parent)])
    status = h.start(("json", "-excluded"), str(script), PYTHONPATH=path).status()
    assert status.state == "warm" and status.preloaded == ["json", "installed"]
    assert [s.split(":")[0] for s in status.skipped] == ["beside", "excluded", "missing_mod"]
    assert status.skipped[0] == "beside: the script's own module (it may change between restarts)"


def test_a_thread_that_appears_later_is_seen_before_the_next_fork(h: Harness) -> None:
    h.module("late", "import signal, threading, time\n"
                     "signal.signal(signal.SIGALRM, lambda s, f: threading.Thread(target=time.sleep, args=(600,),"
                     " daemon=True).start())\n")
    z = h.start(("late",))
    os.kill(z.pid, signal.SIGALRM)
    wait_until(lambda: z.status().threads == 2, 10)
    rc, _, err = h.run(h.script("pass\n"))
    assert rc == 0 and err == "ftrain: starting cold: the zygote has 2 threads\n"


def test_cuda_is_checked_through_torch_cuda_is_initialized(h: Harness) -> None:
    # A stand-in torch (first on PYTHONPATH) records the calls: the zygote asks after each import and before each
    # fork, and refuses once CUDA is initialized.
    calls = h.sockdir / "calls"
    (h.sockdir / "mods" / "torch").mkdir()
    (h.sockdir / "mods" / "torch" / "__init__.py").write_text("from torch import cuda\n")
    (h.sockdir / "mods" / "torch" / "cuda.py").write_text(
        f"import os\ndef is_initialized():\n    open({str(calls)!r}, 'a').write('x')\n"
        f"    return os.path.exists({str(h.sockdir / 'cuda-on')!r})\n")
    z = h.start(("torch",))
    assert z.status().cuda_initialized is False
    rc, _, err = h.run(h.script("pass\n"))
    assert (rc, err) == (0, "")
    assert len(calls.read_text()) >= 3  # after the import, for the status, before the fork
    (h.sockdir / "cuda-on").touch()
    rc, _, err = h.run(h.script("pass\n"))
    assert rc == 0 and err == "ftrain: starting cold: CUDA is initialized in the zygote\n"


@pytest.mark.parametrize(("setup", "line"), [
    ("unset", f"ftrain: starting cold: {envvars.ZYGOTE_SOCKET} is not set\n"),
    ("missing", "ftrain: starting cold: cannot reach the zygote at "),
    ("env", "ftrain: starting cold: the environment differs from the zygote's in variables read at start-up: "
            "OMP_NUM_THREADS\n"),
])
def test_no_usable_zygote_means_one_line_and_a_cold_start(h: Harness, setup: str, line: str) -> None:
    script = h.script("import os\nprint(os.environ.get('FTRAIN_ENTRY_PID'), os.getpid())\n")
    env = {}
    if setup == "missing":
        env[envvars.ZYGOTE_SOCKET] = str(h.sockdir / "nobody.sock")
    elif setup == "env":
        h.start()
        env["OMP_NUM_THREADS"] = "4"
    proc = h.entry(script, env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == f"None {proc.pid}\n"
    assert err.startswith(line) and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ lifetimes
def test_stopping_the_zygote_kills_its_workers(h: Harness) -> None:
    z = h.start()
    proc, worker = h.ready_worker()
    z.stop()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert gone(worker) and not z.socket_path.exists()


def test_a_worker_outlives_a_dead_zygote_and_its_entry_waits_for_it(h: Harness) -> None:
    z = h.start()
    release = h.sockdir / "release"
    proc, worker = h.ready_worker(f"import os, time\nwhile not os.path.exists({str(release)!r}):\n"
                                  "    time.sleep(0.02)\n")
    os.kill(z.pid, signal.SIGKILL)  # as with its supervisor: the worker must get the chance to save
    z.proc.wait()
    time.sleep(0.3)
    assert not gone(worker) and proc.poll() is None
    release.touch()
    assert proc.wait(timeout=10) == 1
    assert proc.stderr is not None and "the zygote died" in proc.stderr.read()
    wait_until(lambda: gone(worker), 10)


def test_the_zygote_dies_with_its_supervisor(h: Harness) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ftrain.supervisor.zygote import Zygote\n"
         "z = Zygote.start(sys.argv[1], ['json'])\nz.status()\nprint(z.pid, flush=True)\ntime.sleep(60)\n",
         str(h.sockdir / "z.sock")], env=h.env, stdout=subprocess.PIPE, text=True)
    assert supervisor.stdout is not None
    zygote = int(supervisor.stdout.readline())
    supervisor.kill()
    supervisor.wait()
    wait_until(lambda: gone(zygote), 10, "the zygote outlived its supervisor")


def test_stop_also_kills_what_a_dead_zygote_left(h: Harness) -> None:
    z = h.start()
    proc, worker = h.ready_worker()
    os.kill(z.pid, signal.SIGKILL)
    z.proc.wait()
    z.stop()  # from the workers file the dead zygote left
    assert gone(worker) and proc.wait(timeout=10) == 1


def test_the_worker_reports_with_its_entrys_pid(h: Harness) -> None:
    """Heartbeats, error files and stack dumps as ftrain's worker side writes them, under the entry's pid."""
    from ftrain.attempt import AttemptFiles

    files = AttemptFiles(h.sockdir / "attempt")
    files.create()
    h.start()
    script = h.script("import signal, sys, time\nfrom ftrain.session.liveness import Liveness\n"
                      "lv = Liveness(1, ['SIGTERM'], 30.0)\nlv.beat('step', 5)\n"
                      "print('ready', flush=True)\nsys.stdin.readline()\nraise RuntimeError('boom')\n")
    proc = h.entry(script, env={envvars.ATTEMPT_DIR: str(files.root), "RANK": "1"}, stdin=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    os.kill(proc.pid, signal.SIGUSR2)  # the hang detector's stack-dump request, to the pid torchrun knows
    wait_until(lambda: "most recent call first" in files.stacks(1).read_text(), 10, "stack dump")
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=10) == 1
    assert files.read_heartbeats()[1].pid == proc.pid
    assert files.read_errors()[1].pid == proc.pid and files.read_errors()[1].message == "boom"


def test_a_worker_whose_torchrun_died_saves_and_leaves(h: Harness) -> None:
    """A cold worker notices its parent (torchrun) is gone; a warm one watches its entry's parent instead."""
    from ftrain.attempt import AttemptFiles

    files = AttemptFiles(h.sockdir / "attempt")
    files.create()
    h.start()
    out = h.sockdir / "reason"
    script = h.script("import time\nfrom ftrain.session.liveness import Liveness\n"
                      "lv = Liveness(0, [], 0.5)\nprint('ready', flush=True)\n"
                      "while not lv.preempt_requested:\n    time.sleep(0.05)\n"
                      f"open({str(out)!r}, 'w').write(lv.preempt_reason)\ntime.sleep(60)\n")
    # A stand-in torchrun that starts the entry and dies.
    env = {**h.env, **h.zygote.env(), envvars.ATTEMPT_DIR: str(files.root)}  # type: ignore[union-attr]
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys\n"
                               "p = subprocess.Popen([sys.executable, '-u', '-m', 'ftrain.supervisor.entry', "
                               f"{str(script)!r}], stdout=subprocess.PIPE, text=True)\n"
                               "print(p.pid, p.stdout.readline(), flush=True, end='')\n"],
                              env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    entry_pid, ready = parent.stdout.readline().split()
    assert ready == "ready"
    parent.wait(timeout=10)
    wait_until(out.exists, 10, "the worker noticed")
    assert out.read_text() == "parent process (torchrun) died"
    # Then it leaves, its grace period over, and its entry with it (no longer the test's child: no status here).
    psutil.Process(int(entry_pid)).wait(timeout=10)


def test_records_are_typed_and_checked() -> None:
    good = wire.from_json({"type": "exited", "returncode": -9})
    assert good == wire.Exited(-9)
    for bad in ({"type": "exited", "returncode": "9"}, {"type": "exited"}, {"type": "exited", "returncode": 1, "x": 1},
                {"type": "nope"}, {"type": "exited", "returncode": True}, []):
        with pytest.raises(wire.ProtocolError):
            wire.from_json(bad)
    with pytest.raises(wire.ProtocolError):
        wire.from_json({"type": "cold", "reason": "x"}, (wire.Started,))


# ------------------------------------------------------------------------------------------------ torch
def test_with_torch_preloaded(h: Harness) -> None:
    """The real (default) preload: CUDA untouched and one thread in the zygote, torch._dynamo included; each worker's
    torch generator freshly seeded (a fresh torch seeds it non-deterministically); the start costs a fork."""
    from ftrain.config import SupervisorConfig

    z = h.start(tuple(SupervisorConfig().preload))
    status = z.status()
    assert (status.state, status.threads, status.cuda_initialized) == ("warm", 1, False)
    assert "torch._dynamo" in status.preloaded, status
    script = h.script("import time\nt0 = time.time()\nimport torch, sys\n"
                      "print(torch.initial_seed(), torch.rand(1).item(), time.time() - t0,"
                      " torch.cuda.is_initialized())\n")
    seen = []
    for _ in range(2):
        rc, out, err = h.run(script)
        assert rc == 0, err
        seed, draw, import_time, cuda = out.split()
        seen.append((seed, draw))
        assert float(import_time) < 0.05 and cuda == "False"
    assert seen[0] != seen[1]


def test_stale_socket_directories_of_sigkilled_launches_are_swept_live_ones_kept(tmp_path: Path) -> None:
    from ftrain.supervisor.zygote import SOCKET_DIR_PREFIX, SOCKET_NAME, listen, sweep_stale

    def made(name: str, *, live: bool, age: float) -> tuple[Path, socket.socket | None]:
        d = tmp_path / f"{SOCKET_DIR_PREFIX}{name}"
        d.mkdir()
        sock = listen(d / SOCKET_NAME)  # a real socket file, as a zygote leaves it
        if not live:
            sock.close()  # its zygote died (SIGKILL with its supervisor): the file stays, nobody listens
        (d / f"{SOCKET_NAME}.workers").write_text("{}")
        os.utime(d, (time.time() - age, time.time() - age))
        return d, sock if live else None

    dead, _ = made("dead", live=False, age=600)
    young, _ = made("young", live=False, age=1)  # maybe a launch that is starting its zygote right now
    alive, sock = made("alive", live=True, age=600)
    other = tmp_path / "not-ours"
    other.mkdir()
    try:
        assert sweep_stale(tmp_path) == [dead]
        assert not dead.exists() and young.exists() and alive.exists() and other.exists()
    finally:
        assert sock is not None
        sock.close()
