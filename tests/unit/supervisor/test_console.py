"""The console filter (ftrain.supervisor.console), fed the lines torchrun really writes; no processes."""
from __future__ import annotations

from ftrain import envvars
from ftrain.supervisor.console import Console, strip_prefix

LOG = "/ck/logs/run/vm/attempt-000/torchrun.log"
_SITE = "/work/main/.venv/lib/python3.11/site-packages/torch/distributed"
_ELASTIC = ".venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py"
_GLOO = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
         "by peer [127.0.0.1]:32654. This is typically caused by a remote worker crashing. Check the logs of the "
         "remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f")


def _traceback(rank: int, exc: str) -> list[str]:
    """A surviving rank's traceback out of its collective, as torchrun tees it (both prefixes)."""
    p = f"@@ftrain-rank{rank}@@[rank{rank}]: "
    return [p + s for s in (
        "Traceback (most recent call last):",
        '  File "/work/main/examples/train.py", line 217, in <module>',
        "    sys.exit(main())",
        "             ^^^^^^",
        '  File "/work/main/ftrain/session/session.py", line 246, in step',
        "    (time_due, preempt, failed, busy), values = self.coll.agree(",
        "                                                ^^^^^^^^^^^^^^^^",
        '  File "/work/main/ftrain/session/collectives.py", line 83, in agree',
        "    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)",
        f'  File "{_SITE}/distributed_c10d.py", line 3252, in all_reduce',
        "    work.wait()",
        exc)]


# torchrun's own traceback and its ChildFailedError report, after a worker was SIGKILLed (from a real torchrun.log).
TORCHRUN_WALL = [
    f"W1202 05:10:23.238000 22452 {_ELASTIC}:1028] Sending process 22457 closing signal SIGTERM",
    f"E1202 05:10:23.337000 22452 {_ELASTIC}:1002] failed (exitcode: -9) local_rank: 1 (pid: 22458) of binary: "
    "/work/main/.venv/bin/python",
    "Traceback (most recent call last):",
    '  File "<frozen runpy>", line 198, in _run_module_as_main',
    '  File "<frozen runpy>", line 88, in _run_code',
    f'  File "{_SITE}/run.py", line 1032, in <module>',
    "    main()",
    f'  File "{_SITE}/launcher/api.py", line 383, in launch_agent',
    "    raise ChildFailedError(",
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    "============================================================",
    "examples/train.py FAILED",
    "------------------------------------------------------------",
    "Failures:",
    "[1]:",
    "  time      : 2026-12-02_05:10:23",
    "  rank      : 0 (local_rank: 0)",
    "  exitcode  : 1 (pid: 22457) ",
    "  error_file: <N/A>",
    "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
    "------------------------------------------------------------",
    "Root Cause (first observed failure):",
    "[0]:",
    "  time      : 2026-12-02_05:10:23",
    "  rank      : 1 (local_rank: 1)",
    "  exitcode  : -9 (pid: 22458)  (SIGKILL)",
    "  error_file: <N/A>",
    "  traceback : Signal 9 (SIGKILL) received by PID 22458",
    "============================================================",
]

NORMAL = [
    "@@ftrain-rank1@@[ftrain r1] INFO no valid checkpoint in /tmp/cf/ck: starting fresh at step 0",
    "@@ftrain-rank0@@world 2: batches of 16 x 2 per rank and step, global batch 64; starting after step 0",
    "@@ftrain-rank1@@[rank1]:[W1202 05:10:22.837644680 reducer.cpp:1529] Warning: find_unused_parameters=True was "
    "specified in DDP constructor, but did not find any unused parameters in the forward pass. (function operator())",
    "@@ftrain-rank0@@step 1 loss 1.4126 lr 6.00e-04",
    "@@ftrain-rank0@@step 4 loss 1.4179 lr 1.50e-03",
    "@@ftrain-rank0@@[ftrain r0] INFO saved step 4 (0.1 MB, 4 file(s)) in 0.068s, training blocked 0.004s",
    "@@ftrain-rank2@@/work/main/examples/train.py:40: UserWarning: an ordinary warning of the user's script",
    "@@ftrain-rank2@@  warnings.warn('an ordinary warning')",
    "W1202 05:10:20.000000 22452 torch/distributed/elastic/agent/server/api.py:700] [default] an unrelated warning",
]

KILLED = [*NORMAL[:5], *_traceback(0, _GLOO), *NORMAL[5:], *TORCHRUN_WALL]


def _feed(console: Console, raw: list[str]) -> list[str]:
    """What the console shows for ``raw``, as lines."""
    return "".join(console(line + "\n") for line in raw).splitlines()


def test_a_peer_killed_folds_the_wall_into_one_summary_line() -> None:
    console = Console(LOG, env={})
    shown = _feed(console, KILLED)
    assert shown == [strip_prefix(line + "\n").rstrip("\n") for line in NORMAL]  # normal lines unchanged, in order
    assert not any("Traceback" in s or "=====" in s or "closing signal" in s for s in shown)
    summary = console.summary()
    assert summary == [f"rank 0: a collective error after a peer died (RuntimeError: [gloo] Connection closed by "
                       f"peer [127.0.0.1]:32654.); full text in {LOG}"]
    assert console.summary() == []  # said once, then forgotten


def test_surviving_ranks_are_listed_compactly_with_the_first_error() -> None:
    console = Console(LOG, env={})
    reset = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer"
    shown = _feed(console, [*_traceback(2, reset), "@@ftrain-rank0@@step 5 loss 1.3628",
                            *_traceback(0, reset.replace("reset by peer", "closed by peer")), *TORCHRUN_WALL])
    assert shown == ["step 5 loss 1.3628"]
    [line] = console.summary()
    assert line.startswith("ranks 0, 2: collective errors after a peer died (RuntimeError: [gloo] Connection reset")
    assert "Connection reset by peer" in line and line.endswith(f"full text in {LOG}")
    assert len(line) < 260


def test_a_user_exception_is_one_line_with_its_message() -> None:
    console = Console(LOG, env={})
    value = [
        "@@ftrain-rank1@@Traceback (most recent call last):",
        '@@ftrain-rank1@@  File "/work/main/examples/train.py", line 120, in main',
        '@@ftrain-rank1@@    raise ValueError("boom")',
        "@@ftrain-rank1@@ValueError: boom",
    ]
    shown = _feed(console, [*value, *_traceback(0, _GLOO), *TORCHRUN_WALL])
    assert shown == [f"[rank 1] ValueError: boom (traceback in {LOG})"]
    [line] = console.summary()
    assert line.startswith("rank 0: a collective error after a peer died")


def test_a_chained_exception_stays_folded_and_normal_output_after_it_passes() -> None:
    console = Console(LOG, env={})
    chained = [*_traceback(1, "KeyError: 'x'"), "@@ftrain-rank1@@[rank1]: ",
               "@@ftrain-rank1@@[rank1]: During handling of the above exception, another exception occurred:",
               "@@ftrain-rank1@@[rank1]: ", *_traceback(1, "ValueError: bad x")]
    shown = _feed(console, [*chained, "@@ftrain-rank1@@", "@@ftrain-rank1@@still running"])
    assert shown == [f"[rank 1] KeyError: 'x' (traceback in {LOG})", f"[rank 1] ValueError: bad x (traceback in {LOG})",
                     "[rank 1] ", "[rank 1] still running"]


def test_torchruns_own_other_errors_are_one_line() -> None:
    console = Console(LOG, env={})
    shown = _feed(console, ["Traceback (most recent call last):", '  File "x.py", line 1, in f',
                            "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError: rendezvous timed out"])
    assert shown == [f"torchrun: torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError: rendezvous timed out "
                     f"(traceback in {LOG})"]


def test_an_unterminated_traceback_is_counted_not_printed() -> None:
    console = Console(LOG, env={})
    shown = _feed(console, ["@@ftrain-rank0@@step 1", *_traceback(3, _GLOO)[:-1]])
    assert shown == ["step 1"]
    assert console.summary() == [f"rank 3: traceback cut off (the job ended while it was written); full text in {LOG}"]
    assert _feed(console, ["@@ftrain-rank3@@step 1 again"]) == ["[rank 3] step 1 again"]  # a new attempt starts clean


def test_raw_console_passes_everything() -> None:
    console = Console(LOG, env={envvars.RAW_CONSOLE: "1"})
    assert _feed(console, KILLED) == [strip_prefix(line + "\n").rstrip("\n") for line in KILLED]
    assert console.summary() == []


def test_messages_are_sanitised_and_shortened() -> None:
    console = Console(LOG + "\x1b[2J", env={})
    [line] = _feed(console, ["@@ftrain-rank1@@Traceback (most recent call last):",
                             "@@ftrain-rank1@@ValueError: \x1b]0;evil\x07" + "x" * 300])
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line and len(line) < 200


def test_permanent_errors_are_left_to_the_supervisor_and_stopped_ranks_are_one_line() -> None:
    """Every rank raising one mistake would print it once per rank; the supervisor says it once instead."""
    console = Console(LOG, env={})
    mistake = "ftrain.errors.UsageError: the global batch of 64 cannot be split evenly over 3 ranks"
    raw = [*_traceback(0, mistake), *_traceback(2, mistake),
           *_traceback(1, "ftrain.errors.PeerFailed: another rank failed while handling checkpoints; see its "
                          "log"), "@@ftrain-rank0@@a normal line"]
    assert _feed(console, raw) == ["a normal line"]
    assert console.summary() == [f"rank 1: stopped because another rank failed; full text in {LOG}"]
    # Any other error is still shown.
    assert _feed(console, _traceback(1, "KeyError: 'x'")) == [f"[rank 1] KeyError: 'x' (traceback in {LOG})"]


def test_a_caught_mistake_printed_by_every_rank_is_left_to_the_supervisor(tmp_path) -> None:
    """A script that catches the error, prints it and exits with its code: the printed lines repeat the recorded
    permanent error (the attempt's error files), so they are dropped; other lines pass."""
    from ftrain.attempt import AttemptFiles, write_error_file
    from ftrain.errors import UsageError

    files = AttemptFiles(tmp_path)
    files.create()
    console = Console(LOG, env={}, mistakes=files.mistakes)
    message = "the global batch of 64 cannot be split evenly over 3 ranks"
    assert _feed(console, [f"@@ftrain-rank1@@ftrain: error: {message}"]) == [f"[rank 1] ftrain: error: {message}"]
    write_error_file(files.error(2), 2, UsageError(message))
    raw = [f"@@ftrain-rank{r}@@ftrain: error: {message}" for r in (2, 0)] + ["@@ftrain-rank0@@step 5 loss 1.0"]
    assert _feed(console, raw) == ["step 5 loss 1.0"]
