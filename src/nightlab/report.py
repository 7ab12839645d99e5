"""``nightlab report``: one self-contained HTML file and a ``progress.png``, from the ledger alone.

The HTML inlines everything (stylesheet, SVG charts, highlighted diffs): it opens offline,
from a mail attachment or a file share, and references no URL. ``progress.png`` is drawn
with matplotlib (the picture autoresearch users share). Secrets are masked as on the
dashboard. Needs the ``ui`` extra (jinja2, matplotlib): ``pip install 'nightlab[ui]'``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nightlab import prune, queries
from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.types import Session, Status

HERE = Path(__file__).parent / "web"
TABLE_ROWS = 1000


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"`nightlab report` needs {module.split('.')[0]}, which is not installed",
                         "pip install 'nightlab[ui]'") from None


def pick_session(ledger: Ledger, tag: str | None) -> Session:
    s = ledger.get_session(tag) if tag else ledger.latest_session()
    if s is None:
        raise UsageError(f"no session {tag!r} in {ledger.shown}" if tag else f"no session in {ledger.shown}",
                         "run one with `nightlab run`, or pass --tag / --db")
    return s


def render_html(ledger: Ledger, session: Session, png_name: str = "progress.png") -> str:
    """The report as one HTML string (no external references)."""
    jinja2 = _require("jinja2")
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import DiffLexer

    from nightlab.web import charts
    from nightlab.web.app import duration, improvement_pct, time_unit
    from nightlab.web.security import Redactor, spec_secrets

    spec = queries.spec_json(ledger, session.id)
    red = Redactor.from_env().with_values(spec_secrets(spec))
    data = queries.chart_data(ledger, session, 4000)
    chart = charts.progress_svg(data, href=lambda i: f"#e{i}")
    t = queries.timing(ledger, session.id)
    series = queries.cost_series(ledger, session.id)
    unit, div = time_unit(t.span_s)
    xs = [b.t0 / div for b in series.buckets]
    cum, acc = [], 0.0
    for b in series.buckets:
        acc += b.cost_usd
        cum.append(acc)
    spend = charts.line_svg(xs, cum, x_label=f"{unit} since start", y_label="spend (USD, cumulative)")
    secs = charts.stacked_svg(
        xs, {"proposing": [b.propose_s for b in series.buckets], "running": [b.run_s for b in series.buckets],
             "overhead": [b.overhead_s for b in series.buckets]},
        {"proposing": "#fdae61", "running": "#2b83ba", "overhead": "#bbbbbb"},
        x_label=f"{unit} since start", y_label="seconds",
    )
    fmt = HtmlFormatter(noclasses=True, nowrap=False)
    kept = [e for e in ledger.experiments(session.id, status=Status.KEEP)]
    kept_view = [dict(e=e, diff=highlight(red.text(e.diff), DiffLexer(), fmt) if e.diff else "",
                      rationale=red.text(e.rationale), description=red.text(e.description)) for e in kept]
    page = queries.experiments_page(ledger, session.id, order="asc", limit=queries.MAX_LIMIT)
    rows, offset = list(page.rows), page.limit
    while offset < min(page.total, TABLE_ROWS):
        more = queries.experiments_page(ledger, session.id, order="asc", limit=queries.MAX_LIMIT,
                                        offset=offset)
        rows += more.rows
        offset += more.limit
    rows = rows[:TABLE_ROWS]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    env.filters["metric"] = lambda v: "—" if v is None else charts.fmt(float(v))
    env.filters["duration"] = duration
    env.filters["clock"] = lambda x: time.strftime("%Y-%m-%d %H:%M", time.localtime(x)) if x else "—"
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.0f}%"
    return str(env.get_template("report.html").render(
        s=session, chart=chart, spend_svg=spend, secs_svg=secs, t=t, kept=kept_view, rows=rows, red=red,
        total=page.total, truncated=page.total > len(rows), counts=queries.status_counts(ledger, session.id),
        improvement=improvement_pct(session), usage=t.usage(),
        **dict(zip(("pruned", "saved_s"), prune.savings(ledger.experiments(session.id, status=Status.PRUNED)),
                   strict=True)),
        css=(HERE / "static" / "style.css").read_text(encoding="utf-8"), generated=time.time(),
        spec=red.data(spec), machine=red.data(session.machine), png_name=png_name,
    ))


def render_compare_html(ledger: Ledger, name: str) -> str:
    """A ``nightlab compare`` report as one self-contained HTML string (table, tests, verdict, chart)."""
    jinja2 = _require("jinja2")
    from nightlab import compare as cmp
    from nightlab.web import charts, compare_view

    report = cmp.load_report(ledger, name)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    env.filters["metric"] = lambda v: "—" if v is None else charts.fmt(float(v))
    env.filters["clock"] = lambda x: time.strftime("%Y-%m-%d %H:%M", time.localtime(x)) if x else "—"
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.0f}%"
    return str(env.get_template("report_compare.html").render(
        standalone=True, css=(HERE / "static" / "style.css").read_text(encoding="utf-8"), generated=time.time(),
        **compare_view.context(report)))


CRASHED = (Status.CRASH.value, Status.TIMEOUT.value)
CRASH_LABEL = "crash / timeout"


def no_metric_marks(points: Sequence[queries.Point]) -> dict[str, list[queries.Point]]:
    """The chart's marks under the plot, by legend label: every crash or timeout (what the summary
    counts as crashed), and the other experiments without a metric, labelled with their statuses."""
    crashed = [p for p in points if p.status in CRASHED]
    rest = [p for p in points if p.metric is None and p.status not in CRASHED]
    label = "no metric: " + ", ".join(sorted({p.status for p in rest})) if rest else "no metric"
    return {CRASH_LABEL: crashed, label: rest}


def progress_png(ledger: Ledger, session: Session, path: Path) -> Path:
    """The progress chart as a PNG: discards grey, keeps green, the running best, the baseline."""
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    data = queries.chart_data(ledger, session, 20000)
    fig, ax = plt.subplots(figsize=(11, 4.6), dpi=120)
    try:
        marks = no_metric_marks(data.points)
        crashed = marks[CRASH_LABEL]
        others = [p for p in data.points if p.metric is not None and p.status != Status.KEEP.value
                  and p.status not in CRASHED]
        keeps = [p for p in data.points if p.metric is not None and p.status == Status.KEEP.value]
        ax.scatter([p.idx for p in others], [float(p.metric or 0.0) for p in others], s=12, facecolors="none",
                   edgecolors="#a0a0a0", linewidths=0.8, label="discarded", zorder=2)
        ax.scatter([p.idx for p in keeps], [float(p.metric or 0.0) for p in keeps], s=30, color="#1a9850",
                   label="kept", zorder=4)
        if data.best:
            xs = [i for i, _ in data.best] + [data.last_idx]
            ys = [m for _, m in data.best] + [data.best[-1][1]]
            ax.step(xs, ys, where="post", color="#1a9850", alpha=0.8, linewidth=1.8, label="best so far",
                    zorder=3)
        if data.baseline is not None:
            ax.axhline(data.baseline, color="#555", linestyle="--", linewidth=1, label="baseline", zorder=1)
        hold = [p for p in data.points if p.holdout is not None]
        if hold:
            ax.scatter([p.idx for p in hold], [float(p.holdout or 0.0) for p in hold], marker="D", s=28,
                       facecolors="none", edgecolors="#e6a100", label="holdout", zorder=5)
        y0 = ax.get_ylim()[0]
        if crashed:
            ax.scatter([p.idx for p in crashed], [y0] * len(crashed), marker="x", s=14, color="#d73027",
                       label=CRASH_LABEL, zorder=2, clip_on=False)
        for label, pts in marks.items():
            if label != CRASH_LABEL and pts:
                ax.scatter([p.idx for p in pts], [y0] * len(pts), marker="x", s=14, color="#8e44ad",
                           label=label, zorder=2, clip_on=False)
        n_keep = sum(1 for p in data.points if p.status == Status.KEEP.value)
        ax.set_title(f"nightlab {session.tag}: {data.total} experiments, {n_keep} kept"
                     + (f" (showing {len(data.points)})" if data.downsampled else ""))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("experiment")
        ax.set_ylabel(f"{session.metric_name} ({session.direction.value})")
        ax.grid(alpha=0.25)
        ax.legend(loc="best", fontsize=8, frameon=False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_report(ledger: Ledger, out: Path, tag: str | None = None) -> tuple[Path, Path]:
    """Write ``out`` (HTML) and ``progress.png`` beside it; return both paths."""
    session = pick_session(ledger, tag)
    out = Path(out)
    png = out.with_name("progress.png")
    progress_png(ledger, session, png)
    out.write_text(render_html(ledger, session, png.name), encoding="utf-8")
    return out, png
