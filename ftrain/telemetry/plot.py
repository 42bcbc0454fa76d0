"""The timeline of a run as a PNG: where its wall time went, at a glance (``ftrain goodput --plot``).

The x axis is the time since the run began (seconds, minutes or hours, by its
length). The top lane, ``job``, is the whole run painted in its buckets (see
:mod:`ftrain.telemetry.timeline`); below it one lane per attempt of a
single-node launch, or one lane per node of a multi-node launch (``<host>
launch <n>``), each painted with that node's own timeline over the time it
lasted. Each bucket has one fixed colour, so pictures of different runs
compare: green is productive, red lost, blue save, purple restore, amber
startup, tan rendezvous, magenta hang, grey backoff, light grey other, hatched
white down. On the lanes: black ticks are committed checkpoints, red crosses
failures (with their cause), magenta diamonds hangs, orange triangles
preemptions (with the signal), purple triangles restores, cyan squares resizes
(membership changes); a node killed whole ends in a red cross, "node lost".
The legend gives each bucket's share of the wall time; the title, the goodput.

Lane labels and mark texts come from the event log, which is untrusted: they
are made printable, truncated, and drawn with mathtext and TeX off, so a field
such as ``$\\frac{`` is shown as typed instead of failing the render.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

from ftrain.errors import UsageError, printable
from ftrain.telemetry.timeline import BUCKETS, Timeline, duration

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
WIDTH = 1400
#: Lanes drawn at most (the job lane aside): beyond that the picture stops being readable.
MAX_LANES = 40
_TOP, _BOTTOM, _LEFT, _RIGHT = 125, 75, 200, 30  # pixels: title and legend; axis; lane labels
# Rows shrink after the first few so that 40 lanes still fit a screen. Every pixel count is a multiple
# of 25, so inches = pixels / DPI is exact in binary and the PNG is exactly figure_pixels() big.
_ROW, _ROW_SMALL, _ROWS_BIG = 50, 25, 10
#: Text labels drawn at most: a run with thousands of failures would otherwise be a blot of text.
MAX_LABELS = 60

COLORS = {
    "productive": "#2ca02c", "startup": "#ffbf00", "rendezvous": "#d2b48c", "restore": "#9467bd",
    "save": "#1f77b4", "lost": "#d62728", "hang": "#c71585", "backoff": "#7f7f7f", "other": "#d9d9d9",
    "down": "#ffffff",
}
#: kind: (marker, face colour, legend text, whether its text is drawn beside it)
MARKS = {
    "commit": ("|", "#000000", "checkpoint committed", False),
    "failure": ("X", "#d62728", "failure", True),
    "hang": ("D", "#c71585", "hang detected", True),
    "preemption": ("v", "#ff7f0e", "preemption", True),
    "restore": ("^", "#9467bd", "restore", False),
    "resize": ("s", "#17becf", "resize", False),
}
_MISSING = "ftrain goodput --plot needs matplotlib: pip install 'ftrain[plot]'"


def figure_pixels(n_lanes: int) -> tuple[int, int]:
    """(width, height) in pixels of the picture :func:`render` draws for a timeline of ``n_lanes`` lanes."""
    rows = 1 + min(max(n_lanes, 0), MAX_LANES)
    return WIDTH, _TOP + _BOTTOM + _ROW * min(rows, _ROWS_BIG) + _ROW_SMALL * max(0, rows - _ROWS_BIG)


def clean(text: object, limit: int) -> str:
    """Untrusted text made fit for a picture: one printable line of at most ``limit`` characters."""
    s = printable(text)
    return s if len(s) <= limit else s[:limit - 1] + "…"


def lane_label(text: object, limit: int = 30) -> str:
    """A lane's label cut in the middle when too long: a long host name must not cut off the ``launch <n>``
    or ``attempt <a>`` that tells two lanes of one host apart."""
    s = printable(text)
    if len(s) <= limit:
        return s
    head = (limit - 1) // 3
    return s[:head] + "…" + s[len(s) - (limit - 1 - head):]


def render(tl: Timeline, path: str | os.PathLike[str], *, title: str | None = None) -> tuple[int, int]:
    """Write the timeline picture of ``tl`` to ``path`` (PNG, whatever its suffix); its (width, height) in pixels."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UsageError(_MISSING) from e
    width, height = figure_pixels(len(tl.lanes))
    # A user's matplotlibrc must not turn hostile text into TeX or mathtext, nor crop the picture.
    with matplotlib.rc_context({"text.usetex": False, "text.parse_math": False, "savefig.bbox": "standard",
                                "font.size": 9}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # exotic characters in hostile labels
        # A Figure of its own, not pyplot: no backend switch in the caller's process, no figure left open.
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((_LEFT / width, _BOTTOM / height, 1 - (_LEFT + _RIGHT) / width,
                           1 - (_TOP + _BOTTOM) / height))
        _draw(ax, tl)
        fig.suptitle(clean(title, 200) if title is not None else
                     f"goodput {tl.goodput:.1%} of {duration(tl.wall)}", y=1 - 10 / height, va="top",
                     fontsize=13, parse_math=False)
        _legend(fig, tl, height)
        if len(tl.lanes) > MAX_LANES:
            fig.text(8 / width, 8 / height, f"+{len(tl.lanes) - MAX_LANES} more lane(s) not drawn "
                     "(the job lane covers their time)", fontsize=8, parse_math=False)
        try:
            fig.savefig(os.fspath(path), format="png", dpi=DPI)
        except OSError as e:  # a user's mistake (no such folder, no permission): a message, not a traceback
            raise UsageError(f"cannot write the timeline picture {printable(os.fspath(path))}: "
                             f"{e.strerror or e}") from e
    return width, height


def _draw(ax: Axes, tl: Timeline) -> None:
    from matplotlib.collections import PolyCollection

    wall = max(tl.wall, 0.0)
    unit, scale = ("hours", 3600.0) if wall >= 3 * 3600 else ("minutes", 60.0) if wall >= 180 else ("seconds", 1.0)
    lanes = tl.lanes[:MAX_LANES]
    rows = [("job", tl.job), *((lane_label(lane.label), lane.segments) for lane in lanes)]
    ax.set_xlim(0, wall / scale if wall > 0 else 1)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the job lane on top, attempts below in order
    # One collection of bars per bucket over all lanes, not one per lane and bucket: ten artists to draw
    # instead of hundreds (a second saved at 40 lanes), and no autoscaling after each.
    h = 0.35
    for bucket in BUCKETS:
        boxes = [[(x0, y - h), (x0, y + h), (x1, y + h), (x1, y - h)] for y, (_, segments) in enumerate(rows)
                 for s in segments if s.bucket == bucket and s.end > s.start
                 for x0, x1 in [((s.start - tl.start) / scale, (s.end - tl.start) / scale)]]
        if boxes:
            ax.add_collection(PolyCollection(boxes, facecolors=COLORS[bucket], linewidths=0, edgecolors="#bbbbbb",
                                             hatch="///" if bucket == "down" else None), autolim=False)
    small = len(rows) > _ROWS_BIG
    size = 5.0 if small else 8.0
    for kind, (marker, color, _, _) in MARKS.items():
        at = [((m.t - tl.start) / scale, y) for y, lane in enumerate(lanes, start=1) for m in lane.marks
              if m.kind == kind]
        if at:
            tick = kind == "commit"  # a thin line, not a filled shape
            ax.plot([x for x, _ in at], [y for _, y in at], linestyle="none", marker=marker, zorder=3,
                    markersize=size * 1.3 if tick else size, markerfacecolor=color,
                    markeredgecolor=color if tick else "black", markeredgewidth=1.2 if tick else 0.6)
    labels = 0
    for y, lane in enumerate(lanes, start=1):
        # Two slots per lane, above and below its bar: a hang and the failure it causes come a moment apart,
        # and their texts would print over each other in one.
        last = [-1.0, -1.0]
        for m in sorted((m for m in lane.marks if m.kind in MARKS and MARKS[m.kind][3] and m.text),
                        key=lambda m: m.t):
            f = (m.t - tl.start) / wall if wall > 0 else 0.0
            slot = next((i for i in (0, 1) if f - last[i] > 0.17), None)  # 40 characters: ~0.17 of the axis
            if slot is None or labels >= MAX_LABELS:
                continue
            last[slot], labels = f, labels + 1
            right = f > 0.7  # keep the label inside the axes
            ax.annotate(clean(m.text, 40), ((m.t - tl.start) / scale, y),
                        xytext=(-5 if right else 5, (1 if slot == 0 else -1) * (5 if small else 7)),
                        textcoords="offset points", ha="right" if right else "left",
                        va="bottom" if slot == 0 else "top", fontsize=7, parse_math=False, annotation_clip=True,
                        clip_on=True, bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7 if small else 8)
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.set_xlabel(f"{unit} since the run began")
    ax.grid(axis="x", linestyle=":", color="#999999", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend(fig: Figure, tl: Timeline, height: int) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    wall = tl.wall
    handles: list[Patch | Line2D] = [
        Patch(facecolor=COLORS[b], edgecolor="#888888", hatch="///" if b == "down" else None, linewidth=0.5,
              label=f"{b} {tl.buckets.get(b, 0.0) / wall:.1%}")
        for b in BUCKETS if wall > 0 and tl.buckets.get(b, 0.0) > 0]
    n_buckets = len(handles)
    kinds = {m.kind for lane in tl.lanes[:MAX_LANES] for m in lane.marks}
    handles += [Line2D([], [], linestyle="none", marker=marker, markerfacecolor=color, markersize=7,
                       markeredgecolor="black" if kind != "commit" else color, label=text)
                for kind, (marker, color, text, _) in MARKS.items() if kind in kinds]
    # Two rows, buckets then marks, each read left to right (one legend would fill column by column).
    for row, items in enumerate((handles[:n_buckets], handles[n_buckets:])):
        if items:
            fig.legend(handles=items, loc="upper center", bbox_to_anchor=(0.5, 1 - (40 + 24 * row) / height),
                       ncol=len(items), frameon=False, fontsize=8, handlelength=1.6, columnspacing=1.2)
