"""The timeline picture (ftrain.telemetry.plot): a valid PNG of the promised size, coloured by bucket, drawn
whatever text the (untrusted) event log holds, and a clear error without matplotlib."""
from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ftrain.errors import UsageError
from ftrain.telemetry import plot
from ftrain.telemetry.timeline import Timeline, build

T0 = 1_700_000_000.0
KILL = "rank 1 exited with signal SIGKILL"


def run_events(endings: list[str], *, host: str = "vm", detail: str = KILL, signal: str = "SIGTERM",
               verdict: str = "rank 0: no heartbeat for 30s") -> list[dict[str, Any]]:
    """The event log of one ``ftrain launch`` whose attempts end as ``endings`` say: kill, hang, ok, preempt."""
    node = f"{host}/100"
    events: list[dict[str, Any]] = []

    def sup(t: float, ev: str, **f: Any) -> None:
        events.append({"t": t, "ev": ev, "run": "r", "src": "supervisor", "node": node, "host": host, **f})

    sup(T0 + 1, "launch", proc_start=T0, nproc=2, nnodes=[1, 1], script="train.py")
    t, step = T0 + 2, 0
    for k, ending in enumerate(endings):
        pid = 1000 + k

        def wrk(when: float, ev: str, k: int = k, pid: int = pid, **f: Any) -> None:
            events.append({"t": when, "ev": ev, "run": "r", "src": "worker", "node": node, "rank": 0,
                           "attempt": k, "group": 0, "pid": pid, **f})

        sup(t, "attempt_start", attempt=k, number=k, pid=pid - 500)
        wrk(t + 2, "session_start", proc_start=t + 1, world=2, local_rank=0, total_steps=100)
        wrk(t + 2.5, "restore", step=step, start=t + 2.2, seconds=0.3, found=k > 0)
        wrk(t + 3, "first_step", step=step + 1)
        t += 3
        for _ in range(3):  # three checkpoints, 4 steps apart, 2 s each
            step += 4
            wrk(t + 2, "save", step=step, start=t + 2, blocking=0.2)
            wrk(t + 2.3, "committed", step=step, seconds=0.3, bytes=1000)
            t += 2.3
        wrk(t + 1, "progress", step=step + 2)  # done again by the next attempt: lost
        t += 1.5
        if ending == "kill":
            sup(t, "failure", attempt=k, rank=1, exit_code=-9, detail=detail)
            sup(t, "attempt_end", attempt=k, outcome="failed", exit_code=1, detail=detail, newest=step)
            sup(t, "backoff", attempt=k, delay=1.0)
        elif ending == "hang":
            t += 5  # silent since its last progress
            sup(t, "hang", attempt=k, verdict=verdict, since=t - 5.5)
            sup(t + 0.5, "failure", attempt=k, rank=0, exit_code=None, hang=verdict, detail=f"hang: {verdict}")
            sup(t + 0.5, "attempt_end", attempt=k, outcome="hung", exit_code=1, detail=verdict, newest=step)
            sup(t + 0.5, "backoff", attempt=k, delay=1.0)
        elif ending == "preempt":
            sup(t, "signal", name=signal)
            step += 2
            wrk(t + 0.2, "save", step=step, start=t + 0.1, blocking=0.2)
            wrk(t + 0.4, "committed", step=step, seconds=0.3, bytes=1000)
            wrk(t + 0.5, "preempted", step=step)
            sup(t + 1, "attempt_end", attempt=k, outcome="preempted", exit_code=75, detail=signal, newest=step)
            sup(t + 1.1, "launch_end", exit_code=75, reason="preempted")
            return events
        else:
            step += 2
            wrk(t, "finished", step=step)
            sup(t + 1, "attempt_end", attempt=k, outcome="succeeded", exit_code=0, detail="all ranks finished",
                newest=step)
            sup(t + 1.1, "launch_end", exit_code=0, reason=f"attempt {k} succeeded")
            return events
        t += 2
    return events


def timeline(events: list[dict[str, Any]]) -> Timeline:
    tl = build(events)
    assert tl is not None
    return tl


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's signature and IHDR chunk, the first chunk of every valid PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    img = imread(path)
    return np.rint(img[..., :3] * 255).astype(np.int64)  # RGB as 0..255 integers, alpha dropped


def has_colour(img: np.ndarray, hex_colour: str) -> bool:
    """Whether bars of that colour are drawn: more of it than its patch in the legend (~200 pixels) holds."""
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((img == rgb).all(axis=-1).sum()) > 1000


def test_a_run_with_a_kill_a_hang_and_a_success_is_drawn_to_its_size_in_its_colours(tmp_path: Path) -> None:
    tl = timeline(run_events(["kill", "hang", "ok"]))
    assert len(tl.lanes) == 3 and all(tl.buckets[b] > 0 for b in ("productive", "lost", "hang", "backoff"))
    out = tmp_path / "t.png"
    size = plot.render(tl, out)
    assert png_size(out) == plot.figure_pixels(3) == size
    img = pixels(out)
    assert img.shape[:2] == (size[1], size[0])  # it decodes, to the size its header says
    packed = (img[..., 0] << 16) | (img[..., 1] << 8) | img[..., 2]
    assert len(np.unique(packed)) > 20, "a blank or nearly blank picture"
    for bucket in ("productive", "lost", "hang", "backoff", "startup"):
        assert has_colour(img, plot.COLORS[bucket]), f"no {bucket} colour in the picture"


def test_the_size_grows_with_the_lanes_and_is_capped() -> None:
    sizes = [plot.figure_pixels(n) for n in (0, 1, 5, 20, plot.MAX_LANES, plot.MAX_LANES + 1, 1000)]
    assert all(w == sizes[0][0] for w, _ in sizes)
    heights = [h for _, h in sizes]
    assert heights[:5] == sorted(set(heights[:5])), "each lane up to the cap adds height"
    assert heights[4] == heights[5] == heights[6] < 2000


# Each one alone: mathtext pairs the dollars of a whole string, so mixed together some would be quoted.
@pytest.mark.parametrize("hostile", ["$\\frac{", "$\\frac{$", "$$",
                                     "\x1b[2J\x1b]0;owned\x07\u202eevil\n{%", "$" + "\\sqrt{" * 500 + "x" * 10_000])
def test_hostile_text_in_the_log_is_drawn_not_interpreted(tmp_path: Path, hostile: str) -> None:
    events = run_events(["kill", "hang", "preempt"], host=hostile, detail=hostile, signal=hostile, verdict=hostile)
    tl = timeline(events)
    assert any(hostile[:20] in m.text for lane in tl.lanes for m in lane.marks)  # it reaches the picture
    out = tmp_path / "t.png"
    size = plot.render(tl, out, title=hostile)
    assert png_size(out) == size == plot.figure_pixels(len(tl.lanes))
    assert pixels(out).shape[:2] == (size[1], size[0])


def test_text_from_the_log_is_one_printable_line_of_bounded_length() -> None:
    assert plot.clean("short", 40) == "short"
    long = plot.clean("\x1b[2J" + "x" * 10_000, 40)
    assert len(long) == 40 and long.isprintable() and long.startswith("\\x1b[2J") and long.endswith("…")
    assert plot.clean("a\nb\u202e", 40).isprintable()


def test_a_long_host_name_keeps_the_launch_that_tells_its_lanes_apart() -> None:
    host = "ip-10-0-12-34.us-west-2.compute.internal"
    one, two = plot.lane_label(f"{host} launch 1"), plot.lane_label(f"{host} launch 2")
    assert len(one) == len(two) == 30 and one != two
    assert one.startswith("ip-10-0") and one.endswith("internal launch 1") and "…" in one
    assert plot.lane_label("vm launch 3") == "vm launch 3"
    assert plot.lane_label("\x1b[2J" * 20).isprintable()


def test_more_lanes_than_the_cap_are_cut_and_still_drawn(tmp_path: Path) -> None:
    tl = timeline(run_events(["kill"] * plot.MAX_LANES + ["ok"]))
    assert len(tl.lanes) == plot.MAX_LANES + 1
    out = tmp_path / "t.png"
    size = plot.render(tl, out)
    assert png_size(out) == size == plot.figure_pixels(plot.MAX_LANES) == plot.figure_pixels(len(tl.lanes))
    assert has_colour(pixels(out), plot.COLORS["productive"])


def test_a_run_of_one_event_is_drawn(tmp_path: Path) -> None:
    tl = timeline([{"t": T0, "ev": "launch", "run": "r", "src": "supervisor", "node": "vm/1", "host": "vm"}])
    assert tl.wall == 0
    out = tmp_path / "t.png"
    size = plot.render(tl, out)
    assert png_size(out) == size == plot.figure_pixels(len(tl.lanes))


def test_a_path_that_cannot_be_written_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot write the timeline picture"):
        plot.render(timeline(run_events(["ok"])), tmp_path / "no such dir" / "t.png")


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tl = timeline(run_events(["ok"]))
    for name in {"matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))}:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` raises ImportError; undone after
    with pytest.raises(UsageError) as err:
        plot.render(tl, tmp_path / "t.png")
    assert str(err.value) == "ftrain goodput --plot needs matplotlib: pip install 'ftrain[plot]'"
    assert not (tmp_path / "t.png").exists()
