"""Two more inline SVG charts: a run's progress curve, and the session's Pareto view.

- :func:`curve_svg`: the progress lines of one run (``evidence["curve"]``, see nightlab.prune),
  with the baseline's curve as a reference and, for a pruned run, the step it was stopped at.
- :func:`stage_rows`: where one experiment's time went, stage by stage (``evidence["timing"]``,
  written by the engine's pipeline), as rows for the experiment page.
- :func:`pareto_svg`: every measured experiment as metric (y) against a secondary figure (x),
  kept ones green, discarded grey, the non-dominated front (better metric, lower figure)
  drawn as a step line. Each point is a ``<circle data-idx=..>`` linking to its experiment.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from nightlab.types import STAGES
from nightlab.web.charts import BASELINE, STATUS_COLOURS, _axis_labels, _frame, _open, _text, fmt, grid

CURVE = "#2b83ba"
PRUNED = "#d73027"
FRONT = "#1a9850"


def stage_rows(timing: object) -> list[tuple[str, float, float]]:
    """``(stage, seconds, share of the total in %)`` in the pipeline's order; [] without timing."""
    if not isinstance(timing, dict):
        return []
    vals = {str(k): float(v) for k, v in timing.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0}
    total = sum(vals.values())
    order = sorted(vals, key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
    return [(k, vals[k], 100 * vals[k] / total if total > 0 else 0.0) for k in order]


def _finite(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    out = []
    for p in points:
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            out.append((x, y))
    return out


def curve_svg(curve: Sequence[Sequence[float]], metric: str, *, reference: Sequence[Sequence[float]] = (),
              pruned_at: int | None = None, width: int = 640, height: int = 240) -> str:
    """The run's curve (step, value); ``reference`` (the baseline's) in grey; the pruning step in red."""
    ml, mr, mt, mb = 64, 14, 22, 36
    pw, ph = width - ml - mr, height - mt - mb
    mine, ref = _finite(curve), _finite(reference)
    out = [_open("nl-curve", width, height), _frame(ml, mt, pw, ph)]
    both = mine + ref
    if both:
        xs, ys = [p[0] for p in both], [p[1] for p in both]
        sx, sy = grid(out, (ml, mt, pw, ph), (min(xs), max(xs)), (min(ys), max(ys)))
        for pts, colour, w in ((ref, BASELINE, 1.2), (mine, CURVE, 2.0)):
            if pts:
                line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
                dash = ' stroke-dasharray="4 3"' if pts is ref else ""
                out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="{w}"{dash}/>')
        if pruned_at is not None:
            x = sx(float(pruned_at))
            out.append(f'<line class="pruned-at" x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" '
                       f'stroke="{PRUNED}" stroke-width="1.5"/>'
                       + _text(x - 4, mt + 12, f"pruned at step {pruned_at}", "end", PRUNED))
        legend = [("this run", CURVE)] + ([("baseline", BASELINE)] if ref else [])
        cx: float = ml
        for name, colour in legend:
            out.append(f'<rect x="{cx}" y="6" width="10" height="10" fill="{colour}"/>'
                       + _text(cx + 14, 15, name, fill="#444"))
            cx += 24 + 6.5 * len(name)
    else:
        out.append(_text(ml + pw / 2, mt + ph / 2, "no progress lines (print 'nightlab: step=N "
                                                     f"{metric}=V')", "middle"))
    out.append(_axis_labels(ml, mt, pw, ph, height, "step", metric))
    return "".join(out)


@dataclass(frozen=True)
class Point:
    idx: int
    x: float
    y: float
    status: str


def front(points: Sequence[Point], minimize: bool) -> list[Point]:
    """The non-dominated points: no other point has a lower-or-equal x and a better-or-equal metric."""
    sign = 1.0 if minimize else -1.0
    out: list[Point] = []
    best = math.inf
    for p in sorted(points, key=lambda p: (p.x, sign * p.y)):
        if sign * p.y < best:
            out.append(p)
            best = sign * p.y
    return out


def pareto_svg(points: Sequence[Point], *, x_label: str, y_label: str, minimize: bool,
               href: Callable[[int], str] | None = None, width: int = 640, height: int = 280) -> str:
    ml, mr, mt, mb = 64, 14, 22, 36
    pw, ph = width - ml - mr, height - mt - mb
    pts = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
    out = [_open("nl-pareto", width, height), _frame(ml, mt, pw, ph)]
    if pts:
        xs, ys = [p.x for p in pts], [p.y for p in pts]
        sx, sy = grid(out, (ml, mt, pw, ph), (min(xs), max(xs)), (min(ys), max(ys)))
        fr = front(pts, minimize)
        if len(fr) > 1:
            steps = []
            for a, b in itertools.pairwise(fr):
                steps += [f"{sx(a.x):.1f},{sy(a.y):.1f}", f"{sx(b.x):.1f},{sy(a.y):.1f}"]
            steps.append(f"{sx(fr[-1].x):.1f},{sy(fr[-1].y):.1f}")
            out.append(f'<polyline class="front" points="{" ".join(steps)}" fill="none" stroke="{FRONT}" '
                       f'stroke-width="1.2" stroke-dasharray="3 2"/>')
        on_front = {p.idx for p in fr}
        # one point per 8-pixel cell besides the keeps and the front: a session of 100,000 experiments
        # draws a few thousand circles, and the picture is the same
        seen: set[tuple[int, int]] = set()
        shown = []
        for p in sorted(pts, key=lambda p: (p.status != "keep", p.idx not in on_front)):
            cell = (int(sx(p.x) // 8), int(sy(p.y) // 8))
            if p.status == "keep" or p.idx in on_front or cell not in seen:
                seen.add(cell)
                shown.append(p)
        for p in sorted(shown, key=lambda p: p.status == "keep"):
            colour = STATUS_COLOURS.get(p.status, "#a0a0a0")
            r = 4.5 if p.status == "keep" else 3.2
            ring = f' stroke="{FRONT}" stroke-width="1.5"' if p.idx in on_front else ""
            circle = (f'<circle data-idx="{p.idx}" data-status="{escape(p.status)}" cx="{sx(p.x):.1f}" '
                      f'cy="{sy(p.y):.1f}" r="{r}" fill="{colour}"{ring}><title>#{p.idx} {escape(p.status)}: '
                      f'{escape(y_label)} {fmt(p.y)}, {escape(x_label)} {fmt(p.x)}</title></circle>')
            out.append(f'<a href="{escape(href(p.idx))}">{circle}</a>' if href else circle)
        cx: float = ml
        for name, colour in (("keep", STATUS_COLOURS["keep"]), ("discard", STATUS_COLOURS["discard"]),
                             ("front", FRONT)):
            out.append(f'<circle cx="{cx + 5}" cy="11" r="4" fill="{colour}"/>' + _text(cx + 14, 15, name, fill="#444"))
            cx += 24 + 6.5 * len(name)
    else:
        out.append(_text(ml + pw / 2, mt + ph / 2, f"no measured experiment reports {x_label}", "middle"))
    out.append(_axis_labels(ml, mt, pw, ph, height, x_label, y_label))
    return "".join(out)
