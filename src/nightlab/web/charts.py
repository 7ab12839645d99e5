"""Charts as inline SVG strings, drawn server-side: no JavaScript library, no network.

Used by the dashboard pages (the live page swaps in a freshly drawn chart) and by the
self-contained report. Colours are attributes, not CSS, so a chart looks the same when
pasted anywhere. Every experiment of the progress chart is one ``<circle data-idx=..>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

from nightlab.queries import ChartData

STATUS_COLOURS = {
    "keep": "#1a9850",
    "discard": "#a0a0a0",
    "crash": "#d73027",
    "timeout": "#f46d43",
    "invalid": "#b15cc8",
    "rejected": "#8e44ad",
    "interrupted": "#4fb3bf",
    "pruned": "#e08214",
    "running": "#2b83ba",
}
BEST = "#1a9850"
BASELINE = "#555555"
HOLDOUT = "#e6a100"
FONT = 'font-family="system-ui, -apple-system, Segoe UI, sans-serif" font-size="11"'


def fmt(v: float) -> str:
    """A compact number for axes and tooltips."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.3g}"
    return f"{v:.6g}" if a < 1 else f"{v:.5g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def _y_domain(data: ChartData) -> tuple[float, float]:
    core = [m for _, m in data.best]
    core += [p.holdout for p in data.points if p.holdout is not None]
    if data.baseline is not None:
        core.append(data.baseline)
    others = sorted(p.metric for p in data.points if p.metric is not None)
    if len(others) >= 20:  # a few wild outliers must not flatten the interesting part
        others = [_quantile(others, 0.02), _quantile(others, 0.98)]
    vals = core + others
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def progress_svg(
    data: ChartData,
    *,
    width: int = 960,
    height: int = 380,
    href: Callable[[int], str] | None = None,
) -> str:
    """The progress chart: one circle per experiment, keeps filled, the running best as a step
    line, the baseline dashed, holdout figures as diamonds. Experiments without a metric
    (crash, timeout, invalid, rejected, running) sit in a strip under the plot."""
    ml, mr, mt, mb, strip = 70, 18, 26, 46, 16
    pw, ph = width - ml - mr, height - mt - mb - strip
    x_hi = max(1, data.last_idx)
    y_lo, y_hi = _y_domain(data)

    def sx(i: float) -> float:
        return ml + pw * (i / x_hi)

    def sy(v: float) -> float:
        return mt + ph * (1 - (v - y_lo) / (y_hi - y_lo))

    out = [
        f'<svg class="nl-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" data-total="{data.total}" data-shown="{len(data.points)}" '
        f'aria-label="{escape(data.metric_name)} per experiment" {FONT}>',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fbfbfb" stroke="#e3e3e3"/>',
    ]
    for t in nice_ticks(y_lo, y_hi):
        y = sy(t)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ececec"/>')
        out.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#666">{fmt(t)}</text>')
    for t in nice_ticks(0, x_hi, 8):
        if t != int(t):
            continue
        x = sx(t)
        y0 = mt + ph
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + strip + 4}" stroke="#ccc"/>')
        out.append(_text(x, y0 + strip + 18, str(int(t)), "middle"))
    out.append(f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" fill="#444">experiment</text>')
    out.append(f'<text transform="translate(14 {mt + ph / 2}) rotate(-90)" text-anchor="middle" fill="#444">'
               f'{escape(data.metric_name)} ({escape(data.direction)})</text>')
    out.append(f'<text x="{ml - 6}" y="{mt + ph + strip - 3}" text-anchor="end" fill="#999">no metric</text>')
    if data.baseline is not None:
        y = sy(data.baseline)
        out.append(f'<line class="baseline" x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{BASELINE}" stroke-dasharray="5 4"/>')
        out.append(f'<text x="{ml + pw - 4}" y="{y - 4:.1f}" text-anchor="end" fill="{BASELINE}">'
                   f'baseline {fmt(data.baseline)}</text>')
    if data.best:
        (i0, m0), rest = data.best[0], data.best[1:]
        d = [f"M{sx(i0):.1f} {sy(m0):.1f}"] + [f"H{sx(i):.1f}V{sy(m):.1f}" for i, m in rest]
        d.append(f"H{sx(x_hi):.1f}")
        out.append(f'<path class="best" d="{" ".join(d)}" fill="none" stroke="{BEST}" stroke-width="2" '
                   f'stroke-opacity="0.8"/>')
    out.append('<g class="points">')
    for p in data.points:
        colour = STATUS_COLOURS.get(p.status, "#888")
        label = f"#{p.idx} {p.status}" + (f" {fmt(p.metric)}" if p.metric is not None else "")
        if p.metric is not None:
            v = min(max(p.metric, y_lo), y_hi)
            cls = "pt" + (" clip" if v != p.metric else "")
            y = sy(v)
        else:
            cls, y = "pt nometric", mt + ph + strip / 2
        r = 4.5 if p.status == "keep" else 3
        fill = colour if p.status in ("keep", "running") or p.metric is None else "white"
        circle = (f'<circle class="{cls} st-{p.status}" data-idx="{p.idx}" data-status="{p.status}" '
                  f'cx="{sx(p.idx):.1f}" cy="{y:.1f}" r="{r}" fill="{fill}" stroke="{colour}" '
                  'stroke-width="1.5">'
                  f'<title>{escape(label)}</title></circle>')
        out.append(f'<a href="{escape(href(p.idx))}">{circle}</a>' if href else circle)
    out.append("</g>")
    for p in data.points:
        if p.holdout is not None:
            x, y = sx(p.idx), sy(min(max(p.holdout, y_lo), y_hi))
            out.append(f'<path class="holdout" d="M{x:.1f} {y - 5:.1f}l5 5l-5 5l-5 -5z" fill="none" '
                       f'stroke="{HOLDOUT}" stroke-width="1.5">'
                       f'<title>#{p.idx} holdout {fmt(p.holdout)}</title></path>')
    has_holdout = any(p.holdout is not None for p in data.points)
    out.append(_legend(ml + 4, 14, data.baseline is not None, has_holdout))
    if data.downsampled:
        out.append(f'<text x="{ml + pw}" y="14" text-anchor="end" fill="#999">showing {len(data.points)} of '
                   f'{data.total} (every keep; min/max of the rest)</text>')
    out.append("</svg>")
    return "".join(out)


def _legend(x: float, y: float, baseline: bool, holdout: bool) -> str:
    items = [("keep", STATUS_COLOURS["keep"], True), ("discard", STATUS_COLOURS["discard"], False),
             ("crash/timeout", STATUS_COLOURS["crash"], True)]
    out, cx = [], x
    for name, colour, filled in items:
        out.append(f'<circle cx="{cx + 4}" cy="{y - 4}" r="4" fill="{colour if filled else "white"}" '
                   f'stroke="{colour}" stroke-width="1.5"/>' + _text(cx + 12, y, name, fill="#444"))
        cx += 22 + 6.5 * len(name)
    out.append(f'<line x1="{cx}" x2="{cx + 18}" y1="{y - 4}" y2="{y - 4}" stroke="{BEST}" stroke-width="2"/>'
               f'<text x="{cx + 22}" y="{y}" fill="#444">best so far</text>')
    cx += 100
    if baseline:
        out.append(f'<line x1="{cx}" x2="{cx + 18}" y1="{y - 4}" y2="{y - 4}" stroke="{BASELINE}" '
                   f'stroke-dasharray="5 4"/><text x="{cx + 22}" y="{y}" fill="#444">baseline</text>')
        cx += 80
    if holdout:
        out.append(f'<path d="M{cx + 6} {y - 9}l5 5l-5 5l-5 -5z" fill="none" stroke="{HOLDOUT}" '
                   f'stroke-width="1.5"/>' + _text(cx + 16, y, "holdout", fill="#444"))
    return "".join(out)


def line_svg(
    xs: Sequence[float], ys: Sequence[float], *, x_label: str, y_label: str,
    width: int = 460, height: int = 220, colour: str = "#2b83ba",
) -> str:
    """A small line chart (e.g. cumulative spend over hours)."""
    ml, mr, mt, mb = 60, 12, 12, 36
    pw, ph = width - ml - mr, height - mt - mb
    out = [_open("nl-line", width, height), _frame(ml, mt, pw, ph)]
    if xs:
        sx, sy = grid(out, (ml, mt, pw, ph), (min(xs), max(xs)), (min(0.0, min(ys)), max(ys)))
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
    out.append(_axis_labels(ml, mt, pw, ph, height, x_label, y_label))
    return "".join(out)


def grid(out: list[str], box: tuple[float, float, float, float], xr: tuple[float, float],
         yr: tuple[float, float]) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """Horizontal grid lines with y labels and x labels for the data ranges ``xr``, ``yr`` inside ``box``
    (left, top, width, height), appended to ``out``; returns the data-to-pixel functions ``sx``, ``sy``."""
    ml, mt, pw, ph = box
    x_lo, x_hi = xr if xr[1] > xr[0] else (xr[0] - 0.5, xr[0] + 0.5)  # one value: centred
    y_lo, y_hi = yr if yr[1] > yr[0] else (yr[0] - 0.5, yr[0] + 0.5)

    def sx(v: float) -> float:
        return ml + pw * (v - x_lo) / (x_hi - x_lo)

    def sy(v: float) -> float:
        return mt + ph * (1 - (v - y_lo) / (y_hi - y_lo))

    for t in nice_ticks(y_lo, y_hi, 4):
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ececec"/>'
                   + _text(ml - 5, sy(t) + 4, fmt(t), "end"))
    for t in nice_ticks(x_lo, x_hi, 5):
        out.append(_text(sx(t), mt + ph + 15, fmt(t), "middle"))
    return sx, sy


def stacked_svg(
    xs: Sequence[float], series: dict[str, Sequence[float]], colours: dict[str, str], *,
    x_label: str, y_label: str, width: int = 460, height: int = 220,
) -> str:
    """Stacked bars, one per x (e.g. seconds proposing / running / overhead per time bucket)."""
    ml, mr, mt, mb = 60, 12, 22, 36
    pw, ph = width - ml - mr, height - mt - mb
    out = [_open("nl-stack", width, height), _frame(ml, mt, pw, ph)]
    n = len(xs)
    totals = [sum(s[i] for s in series.values()) for i in range(n)]
    top = max(totals, default=0.0) or 1.0
    bw = pw / max(1, n)
    for t in nice_ticks(0, top, 4):
        y = mt + ph * (1 - t / top)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ececec"/>'
                   f'<text x="{ml - 5}" y="{y + 4:.1f}" text-anchor="end" fill="#666">{fmt(t)}</text>')
    for i in range(n):
        base = 0.0
        for name, vals in series.items():
            v = vals[i]
            if v <= 0:
                continue
            y0, y1 = mt + ph * (1 - base / top), mt + ph * (1 - (base + v) / top)
            out.append(f'<rect x="{ml + i * bw + bw * 0.1:.1f}" y="{y1:.1f}" width="{bw * 0.8:.1f}" '
                       f'height="{max(0.5, y0 - y1):.1f}" fill="{colours[name]}"><title>{escape(name)} '
                       f'{fmt(v)}</title></rect>')
            base += v
    if n:
        for t in nice_ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, 5):
            x = ml + pw * ((t - min(xs)) / ((max(xs) - min(xs)) or 1))
            out.append(_text(x, mt + ph + 15, fmt(t), "middle"))
    cx: float = ml
    for name, colour in colours.items():
        out.append(f'<rect x="{cx}" y="4" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{cx + 14}" y="13" fill="#444">{escape(name)}</text>')
        cx += 24 + 6.5 * len(name)
    out.append(_axis_labels(ml, mt, pw, ph, height, x_label, y_label))
    return "".join(out)


def _text(x: float, y: float, s: str, anchor: str = "start", fill: str = "#666") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">{escape(s)}</text>'


def _open(cls: str, width: int, height: int) -> str:
    return (f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="100%" {FONT}>')


def _frame(x: float, y: float, w: float, h: float) -> str:
    return f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="#fbfbfb" stroke="#e3e3e3"/>'


def _axis_labels(ml: float, mt: float, pw: float, ph: float, height: float, x_label: str,
                 y_label: str) -> str:
    return (_text(ml + pw / 2, height - 4, x_label, "middle", "#444")
            + f'<text transform="translate(12 {mt + ph / 2}) rotate(-90)" text-anchor="middle" fill="#444">'
            f'{escape(y_label)}</text></svg>')
