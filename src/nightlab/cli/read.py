"""Read-only commands over the ledger: ``status``, ``log``, ``show``, ``diff``, ``export``.

Each is a standalone ``click.Command`` (the CLI's ``main`` group adds them with
``main.add_command``). Each takes ``--lab`` (default ``.``), ``--db`` (a ledger URL; default
``$NIGHTLAB_DB`` or ``<lab>/.nightlab/ledger.db``) and ``--tag`` (default: the latest session).
They never create a ledger, never write to one, and turn nightlab errors into a message,
its fix and the error's exit code (2 for usage errors), without a traceback.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nightlab.cli.errors import NightlabClickError
from nightlab.errors import NightlabError, UsageError
from nightlab.export import FORMATS, export
from nightlab.ledger_read import LedgerReads, open_fast
from nightlab.text import clip, printable
from nightlab.types import STAGES, Experiment, Session, Status

F = TypeVar("F", bound=Callable[..., Any])

STATUS_STYLE = {
    Status.RUNNING: "cyan",
    Status.KEEP: "bold green",
    Status.DISCARD: "yellow",
    Status.CRASH: "bold red",
    Status.TIMEOUT: "red",
    Status.INVALID: "magenta",
    Status.REJECTED: "magenta",
    Status.INTERRUPTED: "dim",
    Status.PRUNED: "dark_orange",
}


def _errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NightlabError as e:
            raise NightlabClickError(e) from None

    return wrapper  # type: ignore[return-value]


def _common(fn: F) -> F:
    """``--lab``, ``--db``, ``--tag``, and nightlab errors as click errors."""
    fn = _errors(fn)
    fn = click.option("--tag", default=None, help="session tag (default: the latest session)")(fn)
    fn = click.option(
        "--db", default=None, help=f"ledger URL (default: ${DB_ENV} or LAB/.nightlab/ledger.db)"
    )(fn)
    fn = click.option(
        "--lab",
        default=".",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="the lab folder",
    )(fn)
    return fn


DB_ENV = "NIGHTLAB_DB"  # as nightlab.ledger.DB_ENV (not imported: it imports SQLAlchemy)


def _open(lab: Path, db: str | None, tag: str | None) -> tuple[LedgerReads, Session]:
    """The lab's ledger and the session ``tag`` (the latest when None). Caller closes the ledger.

    The lab's own SQLite ledger is read with ``sqlite3`` (:mod:`nightlab.ledger_read`), anything
    else (``--db``, ``$NIGHTLAB_DB``, a ledger that needs a migration) through SQLAlchemy.
    Raises UsageError when there is no ledger or no such session; never creates a ledger.
    """
    where = Path(lab) / ".nightlab"
    none = UsageError(f"no nightlab session in {where}", fix="run `nightlab run`")
    url = db or os.environ.get(DB_ENV)
    if url is None and not (where / "ledger.db").is_file():
        raise none
    led: LedgerReads | None = open_fast(where / "ledger.db") if url is None else None
    if led is None:
        from nightlab.ledger import Ledger

        led = Ledger.for_lab(Path(lab), db)
    try:
        session = led.get_session(tag) if tag else led.latest_session()
        if session is None and tag:
            tags = ", ".join(s.tag for s in led.list_sessions()) or "none"
            raise UsageError(f"no session '{tag}' in {led.shown}", fix=f"sessions: {tags}")
        if session is None:
            raise none
    except BaseException:
        led.close()
        raise
    return led, session


def _console() -> Console:
    return Console(highlight=False)


def _fmt(x: float | None, digits: int = 6) -> str:
    """Fixed-point for ordinary values; huge or non-finite ones compactly (never 300 digits)."""
    if x is None:
        return "—"
    if not math.isfinite(x) or abs(x) >= 1e12:
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"


def _signed(x: float, digits: int = 6) -> str:
    return f"{x:+.{digits}g}" if not math.isfinite(x) or abs(x) >= 1e12 else f"{x:+.{digits}f}"


def _warnings(e: Experiment) -> list[str]:
    """Warnings stored with the measurement (duplicate keys, an absurd metric refused)."""
    ws = e.evidence.get("warnings") if isinstance(e.evidence, dict) else None
    return [str(w) for w in ws] if isinstance(ws, list) else []


def _short(sha: str | None) -> str:
    return (sha or "")[:7] or "—"


def _status_text(status: Status) -> Text:
    return Text(status.value, style=STATUS_STYLE.get(status, ""))


def _baseline(led: LedgerReads, session: Session) -> float | None:
    if session.baseline_metric is not None:
        return session.baseline_metric
    base = led.get_experiment(session.id, 0)
    return base.metric if base is not None and base.status is Status.KEEP else None


def _improvement(session: Session, new: float | None, old: float | None) -> str:
    if new is None or old is None:
        return "—"
    gain = session.direction.improvement(new, old)
    ratio = 100 * gain / abs(old) if old != 0 else math.nan
    if not math.isfinite(ratio):
        pct = ""
    elif abs(ratio) >= 1e6:
        pct = f" ({ratio:+.3g}%)"
    else:
        pct = f" ({ratio:+.2f}%)"
    return f"{_signed(gain)}{pct}"


def _latency(led: LedgerReads, session_id: int) -> dict[str, float]:
    """Mean proposal and run seconds of the session's experiments (the baseline has no proposal)."""
    exps = [e for e in led.experiments(session_id) if e.idx > 0 and e.status is not Status.RUNNING]
    return {"n": len(exps), "propose_s": sum(e.propose_s for e in exps), "run_s": sum(e.run_s for e in exps)}


@click.command()
@_common
@click.option("--all", "all_labs", is_flag=True,
              help="every lab you follow (`nightlab labs`) and every lab of the --db ledger, as one table")
@click.option("--registry", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="with --all: the lab registry file (default: ~/.config/nightlab/labs.toml)")
def status(lab: Path, db: str | None, tag: str | None, all_labs: bool = False, registry: Path | None = None) -> None:
    """Where a session stands: incumbent, improvement, counts, cost (--all: every lab you follow)."""
    if all_labs:
        from nightlab.cli.labs import print_all

        return print_all(registry, db)
    led, s = _open(lab, db, tag)
    with led:
        counts = led.count_by_status(s.id)
        usage = led.usage_totals(s.id)
        last = led.experiments(s.id, order="desc", limit=1)
        lat = _latency(led, s.id)
        baseline = _baseline(led, s)
        extra = led.session_json(s.id)[1]
        pruned = led.experiments(s.id, status=Status.PRUNED)
    con = _console()
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    state = s.status + (f" ({s.stop_reason})" if s.stop_reason else "")
    t.add_row("session", Text(f"{s.tag}  branch {s.branch}"))
    t.add_row("status", Text(state))
    t.add_row("sandbox", Text(s.sandbox))
    t.add_row("researcher", Text(s.researcher))
    t.add_row("metric", Text(f"{s.metric_name} ({s.direction.value})"))
    t.add_row("baseline", _fmt(baseline))
    t.add_row("incumbent", Text(f"{_short(s.incumbent_commit)}  {_fmt(s.incumbent_metric)}"))
    t.add_row("improvement", _improvement(s, s.incumbent_metric, baseline))
    total = sum(counts.values())
    by_status = "  ".join(f"{st.value} {counts[st]}" for st in Status if st in counts)
    t.add_row("experiments", f"{total}" + (f"  ({by_status})" if by_status else ""))
    cached = f" ({100 * usage.tokens_cached / usage.tokens_in:.0f}% of input)" if usage.tokens_in else ""
    t.add_row(
        "usage",
        f"tokens in {usage.tokens_in:,}  out {usage.tokens_out:,}  cached {usage.tokens_cached:,}{cached}  "
        f"${usage.cost_usd:.2f}  propose {usage.seconds:.1f}s",
    )
    if lat["n"]:
        t.add_row("latency", f"propose {lat['propose_s'] / lat['n']:.1f}s  run {lat['run_s'] / lat['n']:.1f}s  "
                             f"per experiment (mean of {lat['n']})")
    if pruned:
        from nightlab import prune  # imports Optuna: only for sessions that pruned runs

        n_pruned, saved = prune.savings(pruned)
        t.add_row("pruning", f"{n_pruned} run(s) stopped early, about {saved:.1f}s of run time saved")
    noise = extra.get("sigma")
    if noise is not None:
        t.add_row("noise", f"sigma {float(noise):.6g} from {extra.get('k', '?')} baseline runs")
    hold = extra.get("holdout") or {}
    if isinstance(hold, dict) and hold.get("baseline") is not None:
        t.add_row("holdout", f"baseline {_fmt(hold.get('baseline'))}  latest {_fmt(hold.get('latest'))}")
    moves = [r for r in extra.get("rebaselines") or [] if isinstance(r, dict)]
    if moves:
        m = moves[-1]
        t.add_row("re-baselined", Text(f"at #{m.get('at_idx')} on {str(m.get('to', ''))[:10]} ({m.get('why', '')})"
                                       + (f", {len(moves)} times" if len(moves) > 1 else "")))
    for w in extra.get("warnings") or []:
        t.add_row("warning", Text(str(w), style="yellow"))
    ex = extra.get("executor") or {}
    if ex:
        t.add_row("executor", f"{ex.get('slots', 1)} slot(s), pipeline {'on' if ex.get('pipeline') else 'off'}, "
                              f"duty cycle {100 * float(ex.get('duty_cycle', 0)):.1f}%")
    if last:
        e = last[0]
        line = Text(f"#{e.idx} ")
        line.append_text(_status_text(e.status))
        line.append(f"  {_fmt(e.metric)}  {clip(printable(e.description), 80)}")
        t.add_row("last", line)
    con.print(t)


@click.command()
@_common
@click.option(
    "--status", "status_", type=click.Choice([s.value for s in Status]), default=None, help="only this status"
)
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True, help="the last N")
@click.option("--all", "show_all", is_flag=True, help="every experiment (no --limit)")
def log(lab: Path, db: str | None, tag: str | None, status_: str | None, limit: int, show_all: bool) -> None:
    """The session's experiments, one row each (the last 50 by default)."""
    led, s = _open(lab, db, tag)
    with led:
        kept = led.experiments(s.id, status=Status.KEEP)
        wanted = Status(status_) if status_ else None
        rows = led.experiments(s.id, status=wanted, order="desc", limit=None if show_all else limit)
    rows.reverse()
    # the metric of each kept commit, so a row can be compared with the incumbent it started from
    kept_metric = {(e.commit or e.parent_commit): e.metric for e in kept if e.metric is not None}
    t = Table(title=f"{s.tag}: {s.metric_name} ({s.direction.value})", title_justify="left")
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("status", no_wrap=True)
    t.add_column(s.metric_name, justify="right", no_wrap=True)
    t.add_column("Δ parent", justify="right", no_wrap=True)
    t.add_column("trust", no_wrap=True)
    t.add_column("run s", justify="right", no_wrap=True)
    t.add_column("description")
    warned = 0
    for e in rows:
        cell = Text(clip(printable(e.description), 44))
        if _warnings(e):
            warned += 1
            cell = Text("⚠ ", style="bold yellow") + cell
        t.add_row(
            str(e.idx),
            _status_text(e.status),
            _fmt(e.metric),
            _delta(s, e, kept_metric),
            e.trust if e.metric is not None else "",
            f"{e.run_s:.1f}",
            cell,
        )
    con = _console()
    con.print(t)
    if warned:
        con.print(Text(f"⚠ {warned} experiment(s) with measurement warnings (duplicate keys, absurd metrics): "
                       "see `nightlab show N`", style="yellow"))


def _delta(s: Session, e: Experiment, kept_metric: dict[str, float]) -> Text:
    parent = kept_metric.get(e.parent_commit)
    if e.metric is None or parent is None or e.idx == 0:
        return Text("")
    diff = e.metric - parent
    style = "green" if s.direction.better(e.metric, parent) else "red" if diff else ""
    return Text(_signed(diff), style=style)


def _get(led: LedgerReads, s: Session, n: int) -> Experiment:
    e = led.get_experiment(s.id, n)
    if e is None:
        count = led.count_experiments(s.id)
        raise UsageError(
            f"no experiment {n} in session '{s.tag}' ({count} experiments)",
            fix="`nightlab log` lists them",
        )
    return e


def _pool_line(p: dict[str, Any]) -> str:
    v = p.get("verification") if isinstance(p.get("verification"), dict) else {}
    assert isinstance(v, dict)
    gain = v.get("gain_pct")
    return (f"claim {p.get('claim_id')} by worker {p.get('worker')}: claimed {_fmt(p.get('claimed'))} "
            f"({p.get('experiments')} experiments, {p.get('compute_s')}s on {p.get('hardware') or '?'}, seed "
            f"{p.get('seed')}); verified: {v.get('status')}, measured {_fmt(v.get('measured'))} in "
            f"{v.get('verify_s')}s" + (f", gain {gain:+.3f}% of the baseline" if isinstance(gain, int | float) else "")
            + (", strike" if v.get("strike") else "") + (f" — {v.get('reason')}" if v.get("reason") else ""))


@click.command()
@_common
@click.argument("n", type=int)
def show(lab: Path, db: str | None, tag: str | None, n: int) -> None:
    """Everything about experiment N of the session."""
    led, s = _open(lab, db, tag)
    with led:
        e = _get(led, s, n)
    con = _console()
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("experiment", f"#{e.idx} of {s.tag}")
    t.add_row("status", _status_text(e.status))
    t.add_row("reason", Text(printable(e.reason or "—")))
    trust = f"  (trust: {e.trust})" if e.metric is not None else ""
    t.add_row("metric", Text(f"{s.metric_name} = {_fmt(e.metric)}{trust}"))
    t.add_row("secondary", Text(", ".join(f"{k} = {v}" for k, v in sorted(e.secondary.items())) or "—"))
    for w in _warnings(e):
        t.add_row("warning", Text(w, style="yellow"))
    t.add_row("parent", e.parent_commit or "—")
    t.add_row("commit", e.commit or "—")
    t.add_row("seed", str(e.seed))
    t.add_row("exit code", "—" if e.exit_code is None else str(e.exit_code))
    t.add_row("timings", f"propose {e.propose_s:.1f}s  run {e.run_s:.1f}s  overhead {e.overhead_s:.1f}s")
    stages = e.evidence.get("timing")
    if isinstance(stages, dict) and stages:  # where the experiment's time went, stage by stage
        order = sorted(stages, key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
        t.add_row("stages", "  ".join(f"{k} {stages[k]:.3f}s" for k in order if isinstance(stages[k], (int, float))))
    u = e.usage
    t.add_row(
        "usage",
        f"tokens in {u.tokens_in:,}  out {u.tokens_out:,}  cached {u.tokens_cached:,}  "
        f"${u.cost_usd:.4f}  {u.seconds:.1f}s",
    )
    t.add_row("researcher", Text(printable(e.researcher or "—")))
    pool = e.evidence.get("pool")
    if isinstance(pool, dict):  # a research-pool claim the host verified (nightlab.pool.feeder)
        t.add_row("pool", Text(_pool_line(pool)))
    # what a run or a researcher wrote reaches the terminal with its control characters escaped (an ESC
    # sequence in a log tail could move the cursor and redraw the table above, say "keep")
    t.add_row("description", Text(printable(e.description)))
    t.add_row("rationale", Text(printable(e.rationale or "—")))
    t.add_row("params", Text(printable(json.dumps(e.params, sort_keys=True, default=str)) if e.params else "—"))
    shown = {k: v for k, v in e.evidence.items() if k != "timing"}  # timing: the stages row above
    t.add_row("evidence", Text(printable(json.dumps(shown, sort_keys=True, default=str)) if shown else "—"))
    if e.worktree and Path(e.worktree).is_dir():  # removed after the run: not shown as if it were there
        t.add_row("worktree", Text(printable(e.worktree)))
    con.print(t)
    if e.log_tail:
        con.rule("log tail")
        tail = e.log_tail.rstrip("\n").replace("\r\n", "\n").replace("\r", "\n")  # progress bars redraw with CR
        con.print(Text(printable(tail)))


@click.command()
@_common
@click.argument("n", type=int)
def diff(lab: Path, db: str | None, tag: str | None, n: int) -> None:
    """Print experiment N's diff (plain text, for piping into `git apply`)."""
    led, s = _open(lab, db, tag)
    with led:
        e = _get(led, s, n)
    click.echo(e.diff, nl=False)


@click.command("export")
@_common
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="tsv", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write here (default: stdout)",
)
@click.option("--memory-key", default="", help="secondary figure in MB for the tsv memory_gb column")
@click.option("--mlflow", "to_mlflow", is_flag=True,
              help="log every experiment as an MLflow run instead (pip install 'nightlab[mlflow]'); idempotent")
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
              help="with --mlflow: the tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default)")
def export_cmd(
    lab: Path, db: str | None, tag: str | None, fmt: str, output: Path | None, memory_key: str,
    to_mlflow: bool = False, tracking_uri: str | None = None,
) -> None:
    """Export the session: karpathy-compatible results.tsv, CSV or JSONL, or MLflow runs (--mlflow)."""
    if to_mlflow:
        from nightlab.api import Lab
        from nightlab.mlflow_export import export_mlflow

        r = export_mlflow(Lab(lab, db), tag, tracking_uri)
        click.echo(f"MLflow experiment {r.experiment_id} at {r.tracking_uri}: {r.created} runs created, "
                   f"{r.replaced} replaced, {r.unchanged} unchanged")
        return
    led, s = _open(lab, db, tag)
    with led:
        if output is None:
            export(led, s, fmt, sys.stdout, memory_key=memory_key)
            return
        with output.open("w", encoding="utf-8", newline="") as fh:
            n = export(led, s, fmt, fh, memory_key=memory_key)
    click.echo(f"wrote {n} rows to {output}", err=True)
