"""The comparison page of the dashboard and the report: ``nightlab compare`` results as a table and a chart."""

from __future__ import annotations

from html import escape
from typing import Any

from nightlab.web.charts import _axis_labels, _frame, _open, grid

ARM_COLOURS = ["#2b83ba", "#d7191c", "#1a9641", "#fdae61", "#7b3294", "#008837", "#a6611a", "#5e3c99"]


def steps_svg(series: dict[str, list[list[tuple[float, float]]]], *, x_label: str, y_label: str,
              width: int = 760, height: int = 300) -> str:
    """Best-so-far step lines against the budget spent: one colour per arm, one line per seed."""
    ml, mr, mt, mb = 64, 12, 26, 36
    pw, ph = width - ml - mr, height - mt - mb
    out = [_open("nl-compare", width, height), _frame(ml, mt, pw, ph)]
    pts = [p for curves in series.values() for c in curves for p in c]
    if pts:
        x_hi = max(p[0] for p in pts) or 1.0
        sx, sy = grid(out, (ml, mt, pw, ph), (0.0, x_hi), (min(p[1] for p in pts), max(p[1] for p in pts)))
        for i, (arm, curves) in enumerate(series.items()):
            colour = ARM_COLOURS[i % len(ARM_COLOURS)]
            for c in curves:
                if not c:
                    continue
                d = f"M{sx(c[0][0]):.1f},{sy(c[0][1]):.1f}"
                for x1, y1 in c[1:]:
                    d += f" H{sx(x1):.1f} V{sy(y1):.1f}"
                d += f" H{sx(x_hi):.1f}"
                out.append(f'<path class="arm" data-arm="{escape(arm)}" d="{d}" fill="none" stroke="{colour}" '
                           f'stroke-width="1.6" opacity="0.85"/>')
            out.append(f'<rect x="{ml + 110 * i}" y="6" width="10" height="10" fill="{colour}"/>'
                       f'<text x="{ml + 110 * i + 14}" y="15" fill="#444">{escape(arm)}</text>')
    out.append(_axis_labels(ml, mt, pw, ph, height, x_label, y_label))
    return "".join(out)


def context(report: Any) -> dict[str, Any]:
    """What compare.html needs: the report and its chart."""
    series = {a.name: [list(s.curve) for s in a.seeds] for a in report.arms}
    kind = report.budget.split("=")[0]
    chart = steps_svg(series, x_label=f"budget spent ({kind})", y_label=f"best {report.metric} so far")
    return {"r": report, "chart": chart}
