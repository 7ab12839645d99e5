"""``nightlab sweep``: the same lab at several settings of a researcher knob, compared on cost.

    nightlab sweep --knob think=1,2,4 --experiments 20

Each setting runs as its own session (tag ``<base>-<knob><value>``, branch
``nightlab/<base>-<knob><value>``), from the same base commit, with the same spec (so the same
run seed) and the same experiment budget; only the ``[researcher]`` option named by the knob
differs. The table gives the best metric reached and the tokens and dollars spent; the plot
(with matplotlib installed) draws the best metric so far against cumulative tokens and dollars.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from nightlab import researchers
from nightlab.console import fmt_metric, make_reporter
from nightlab.engine import Engine, default_tag
from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.spec import SPEC_FILE, ResearcherSpec, load_spec
from nightlab.types import Direction, Experiment, Usage


@dataclass(frozen=True)
class SweepRow:
    setting: str
    tag: str
    best: float | None
    experiments: int
    keeps: int
    usage: Usage
    curve: tuple[tuple[int, float, float], ...]  # (cumulative tokens, cumulative USD, best metric so far)


def parse_knob(text: str) -> tuple[str, list[Any]]:
    """``think=1,2,4`` -> ("think", [1, 2, 4]); values are JSON scalars, else strings."""
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.+)", text.strip())
    if not m:
        raise UsageError(f"--knob {text!r} is not NAME=V1,V2,...", "write e.g. --knob think=1,2,4")
    values: list[Any] = []
    for raw in m.group(2).split(","):
        raw = raw.strip()
        try:
            values.append(json.loads(raw))
        except json.JSONDecodeError:
            values.append(raw)
    return m.group(1), values


def curve(exps: list[Experiment], direction: Direction) -> tuple[tuple[int, float, float], ...]:
    out: list[tuple[int, float, float]] = []
    tokens, usd, best = 0, 0.0, None
    for e in exps:
        tokens += e.usage.tokens_in + e.usage.tokens_out
        usd += e.usage.cost_usd
        kept = e.status.value == "keep" and e.metric is not None
        if kept and (best is None or direction.better(e.metric, best)):  # type: ignore[arg-type]
            best = e.metric
        if best is not None:
            out.append((tokens, usd, best))
    return tuple(out)


def run_sweep(lab: Path, knob: str, values: list[Any], experiments: int, base: str, *,
              db: str | None = None, sandbox: str | None = None, quiet: bool = True) -> list[SweepRow]:
    """One session per setting: a :mod:`nightlab.compare` comparison with one seed (tags ``<base>-<knob><v>``)."""
    from nightlab import compare as cmp

    spec = load_spec(lab)
    for v in values:  # every setting must validate before the first session starts
        rspec = ResearcherSpec.model_validate({**spec.researcher.model_dump(), knob: v})
        researchers.validate_options(lab / SPEC_FILE, rspec)
    arms = [cmp.Arm(re.sub(r"[^A-Za-z0-9_-]", "_", f"{knob}{v}")[:32], "", ((f"researcher.{knob}", v),))
            for v in values]
    plan = cmp.Plan(base, arms, 1, cmp.Budget("experiments", experiments), chunk=experiments, seedless_tags=True)

    def engine(*args: Any, **kw: Any) -> Engine:
        return Engine(*args, reporter=make_reporter(quiet, True), **kw)

    cmp.run_compare(lab, plan, db=db, sandbox=sandbox, engine_factory=engine)
    rows = []
    with Ledger.for_lab(lab.resolve(), db) as ledger:
        for v, arm in zip(values, arms, strict=True):
            session = ledger.get_session(cmp.session_tag(base, arm.name, 0, True))
            if session is None:
                break
            exps = ledger.experiments(session.id)
            tried = [e for e in exps if e.idx > 0]
            rows.append(SweepRow(f"{knob}={v}", session.tag, session.incumbent_metric, len(tried),
                                 sum(1 for e in tried if e.status.value == "keep"), ledger.usage_totals(session.id),
                                 curve(exps, session.direction)))
    return rows


def table(rows: list[SweepRow], metric: str) -> str:
    best = "best " + metric
    head = f"{'setting':<16} {'tag':<24} {'exps':>5} {'keeps':>5} {best:>14} {'tokens':>10} {'USD':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.setting:<16} {r.tag:<24} {r.experiments:>5} {r.keeps:>5} {fmt_metric(r.best):>14} "
                     f"{r.usage.tokens_in + r.usage.tokens_out:>10} {r.usage.cost_usd:>9.4f}")
    return "\n".join(lines)


def plot(rows: list[SweepRow], metric: str, path: Path) -> Path | None:
    """Best metric so far against tokens and dollars, one line per setting; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        if not r.curve:
            continue
        toks, usd, best = zip(*r.curve, strict=True)
        axes[0].step(toks, best, where="post", marker="o", label=r.setting)
        axes[1].step(usd, best, where="post", marker="o", label=r.setting)
    axes[0].set_xlabel("tokens (in + out, cumulative)")
    axes[1].set_xlabel("USD (cumulative)")
    for ax in axes:
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("metric reached against researcher spend")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@click.command()
@click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default=True, help="The lab folder (holds nightlab.toml).")
@click.option("--knob", required=True, help="A [researcher] option and its values, e.g. think=1,2,4.")
@click.option("--experiments", "-k", type=click.IntRange(min=1), required=True,
              help="Experiments per setting (after the baseline).")
@click.option("--tag", "base", default=None,
              help="Base tag; sessions are <tag>-<knob><value> (default: today).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the plot (default: .nightlab/sweep-<tag>.png).")
@click.option("--db", default=None, envvar="NIGHTLAB_DB", help="Ledger URL.")
@click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None)
@click.option("--verbose", "-v", is_flag=True, help="Print each experiment.")
def sweep(lab: Path, knob: str, experiments: int, base: str | None, plot_path: Path | None, db: str | None,
          sandbox: str | None, verbose: bool) -> None:
    """Run the lab once per knob setting on the same budget; compare metric against tokens and dollars."""
    name, values = parse_knob(knob)
    base = base or default_tag()
    rows = run_sweep(lab, name, values, experiments, base, db=db, sandbox=sandbox, quiet=not verbose)
    metric = load_spec(lab).metric.name
    click.echo(table(rows, metric))
    out = plot(rows, metric, plot_path or lab / ".nightlab" / f"sweep-{base}.png")
    if out is None:
        click.echo("no plot: matplotlib is not installed (pip install matplotlib)")
    else:
        click.echo(f"plot: {out}")
