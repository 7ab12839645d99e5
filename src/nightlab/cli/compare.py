"""``nightlab compare``: arms (program.md variants, researcher settings, spec overrides) on equal terms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from nightlab.errors import UsageError


def fmt(x: float | None) -> str:
    from nightlab.console import fmt_metric

    return fmt_metric(x)


def render(report: Any) -> str:
    """The report as terminal text: one row per arm, the pairwise tests, the verdict."""
    lines = [f"comparison {report.name}: {report.metric} ({report.direction}), budget {report.budget} per session, "
             f"alpha {report.alpha:g}", ""]
    head = (f"{'arm':<14} {'seeds':>5} {'best (mean)':>12} {'95% CI':>25} {'gain/run-h':>11} {'gain/$':>9} "
            f"{'keep':>6} {'crash':>6} {'invalid':>7} {'tokens':>9}")
    lines += [head, "-" * len(head)]

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.0f}%"

    for a in report.arms:
        ci = f"[{fmt(a.ci[0])}, {fmt(a.ci[1])}]" if a.ci else "—"
        gh = "—" if a.gain_per_run_hour is None else f"{a.gain_per_run_hour:.4g}"
        gd = "—" if a.gain_per_usd is None else f"{a.gain_per_usd:.4g}"
        lines.append(f"{a.name:<14} {len(a.seeds):>5} {fmt(a.mean):>12} {ci:>25} {gh:>11} {gd:>9} "
                     f"{pct(a.keep_rate):>6} {pct(a.crash_rate):>6} {pct(a.invalid_rate):>7} {a.tokens:>9}")
    for a in report.arms:
        lines.append(f"  {a.name}: {a.describe}; per seed: "
                     + ", ".join(f"s{s.seed}={fmt(s.best)}" for s in a.seeds))
    if report.pairs:
        lines += ["", "paired t-tests over seeds (two-sided, Holm-corrected):"]
        for p in report.pairs:
            better = p.a if p.mean_diff > 0 else p.b
            lines.append(f"  {p.a} vs {p.b}: {better} better by {abs(p.mean_diff):.4g} (n={p.n}, p={p.p:.3g}, "
                         f"Holm p={p.p_holm:.3g})")
    lines += ["", ("winner: " + report.winner + ". " if report.winner else "") + report.verdict]
    return "\n".join(lines)


def plot(report: Any, path: Path) -> Path | None:
    """Best-so-far against the budget spent, every seed of every arm (one colour per arm)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, a in enumerate(report.arms):
        for j, s in enumerate(a.seeds):
            if not s.curve:
                continue
            xs, ys = zip(*s.curve, strict=True)
            ax.step(xs, ys, where="post", color=colors[i % len(colors)], alpha=0.8,
                    label=a.name if j == 0 else None)
    ax.set_xlabel(f"budget spent ({report.budget.split('=')[0]})")
    ax.set_ylabel(f"best {report.metric} so far")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"comparison {report.name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@click.command()
@click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True,
              help="The lab folder (holds nightlab.toml).")
@click.option("--arm", "arms", multiple=True,
              help="NAME=program.md-variant and/or section.key=value overrides, comma-separated "
                   "(e.g. terse=variants/terse.md, cold=researcher.temperature=0.2). Two or more.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Sessions per arm; seed s shifts [run] seed and the researcher's seed by s in every arm.")
@click.option("--budget", default="experiments=20", show_default=True,
              help="Per session: experiments=N, run_s=SECONDS, usd=DOLLARS or tokens=N.")
@click.option("--name", default=None, help="The comparison's name (default: cmp-<date>); sessions <name>-<arm>-s<k>.")
@click.option("--chunk", type=click.IntRange(min=1), default=5, show_default=True,
              help="Experiments per session per round (arms are interleaved round by round).")
@click.option("--alpha", type=click.FloatRange(0.0001, 0.5), default=0.05, show_default=True)
@click.option("--resume", "resume", default=None, metavar="NAME", help="Continue the comparison NAME.")
@click.option("--show", "show", default=None, metavar="NAME", help="Print the report of comparison NAME.")
@click.option("--list", "list_", is_flag=True, help="List the comparisons of this lab.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the progress plot (default: .nightlab/compare-<name>.png).")
@click.option("--db", default=None, envvar="NIGHTLAB_DB", help="Ledger URL.")
@click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None)
@click.option("--verbose", "-v", is_flag=True, help="Say which session runs.")
def compare(lab: Path, arms: tuple[str, ...], seeds: int, budget: str, name: str | None, chunk: int, alpha: float,
            resume: str | None, show: str | None, list_: bool, as_json: bool, plot_path: Path | None,
            db: str | None, sandbox: str | None, verbose: bool) -> None:
    """Run arms against each other on equal terms and say which is better, with evidence.

    \b
    nightlab compare --arm base=program.md --arm terse=variants/terse.md --seeds 3 --budget run_s=3600
    nightlab compare --arm t0=researcher.temperature=0.2 --arm t1=researcher.temperature=1.0 --seeds 5
    nightlab compare --show NAME        nightlab compare --resume NAME        nightlab compare --list
    """
    from nightlab import compare as cmp
    from nightlab.engine import default_tag
    from nightlab.ledger import Ledger

    lab = lab.resolve()
    if list_ or show:
        with Ledger.for_lab(lab, db) as led:
            if list_:
                for row in cmp.list_comparisons(led):
                    cfg = json.loads(row["config_json"])
                    click.echo(f"{row['name']}\t{row['status']}\t{len(cfg['arms'])} arms x {cfg['seeds']} seeds\t"
                               f"{cfg['budget'][0]}={cfg['budget'][1]:g}")
                return
            report = cmp.load_report(led, str(show))
    else:
        if resume is None and len(arms) < 2:
            raise UsageError("a comparison needs at least two --arm", "e.g. --arm base=program.md --arm terse=t.md")
        plan = None
        if resume is None:
            parsed = [cmp.parse_arm(a) for a in arms]
            if len({a.name for a in parsed}) != len(parsed):
                raise UsageError("two arms have the same name", "give every --arm its own NAME")
            plan = cmp.Plan(name or f"cmp-{default_tag()}", parsed, seeds, cmp.Budget.parse(budget), chunk, alpha)
        report = _run(lab, plan, resume, db, sandbox, verbose)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
        return
    click.echo(render(report))
    out = plot(report, plot_path or lab / ".nightlab" / f"compare-{report.name}.png")
    click.echo("no plot: matplotlib is not installed" if out is None else f"plot: {out}")


def _run(lab: Path, plan: Any, resume: str | None, db: str | None, sandbox: str | None, verbose: bool) -> Any:
    from nightlab import compare as cmp

    stop_file = lab / ".nightlab" / "STOP"
    try:
        return cmp.run_compare(lab, plan, name=resume, resume=resume is not None, db=db, sandbox=sandbox,
                               say=(lambda s: click.echo(s, err=True)) if verbose else (lambda s: None),
                               stop=stop_file.exists)
    except KeyboardInterrupt:
        raise UsageError("comparison interrupted", f"continue it with `nightlab compare --resume "
                                                   f"{resume or (plan.name if plan else '?')}`") from None


@click.command("evolve-program")
@click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True)
@click.option("--from", "source", required=True, metavar="COMPARISON",
              help="A finished comparison (`nightlab compare --list`) whose arms and results seed the evolution.")
@click.option("--name", default=None, help="The evolution's name (default: <COMPARISON>-evo).")
@click.option("-n", "--variants", type=click.IntRange(1, 8), default=2, show_default=True,
              help="New program.md variants per generation.")
@click.option("--generations", "-g", type=click.IntRange(1, 20), default=1, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the dossier and the prompt; call no model, run nothing.")
@click.option("--lineage", "show_lineage", is_flag=True, help="Print the lineage of the evolution --name.")
@click.option("--db", default=None, envvar="NIGHTLAB_DB", help="Ledger URL.")
@click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None)
def evolve_program(lab: Path, source: str, name: str | None, variants: int, generations: int, dry_run: bool,
                   show_lineage: bool, db: str | None, sandbox: str | None) -> None:
    """Ask the lab's LLM for better program.md files from a comparison's evidence, and compare them.

    Each generation's variants run against the best program so far with the source comparison's seeds,
    budget and alpha; a variant replaces it only when the comparison declares it the winner.
    """
    from nightlab import evolve

    lab = lab.resolve()
    if show_lineage:
        for r in evolve.lineage_rows(lab, db, name or f"{source}-evo"):
            mean = "—" if r["mean_best"] is None else f"{r['mean_best']:.6g}"
            click.echo(f"g{r['generation']}\t{r['name']}\t<- {r['parent'] or '(seed)'}\t{r['status']}\t{mean}\t"
                       f"{r['hypothesis']}")
        return
    out = evolve.evolve(lab, source, name=name, n=variants, generations=generations, db=db, sandbox=sandbox,
                        dry_run=dry_run, say=lambda s: click.echo(s, err=True))
    if dry_run:
        click.echo("# system\n\n" + out["system"] + "\n\n# prompt\n\n" + out["prompt"])
        return
    click.echo(f"best program.md: {out['path']} ({out['name']}, from comparison {out['comparison']}, "
               f"mean best {out['mean']})")
