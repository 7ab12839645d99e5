"""The live console: what a person watching the terminal sees while a session runs.

``LiveReporter`` (a TTY): a Rich live view with the experiment in flight and a progress bar
over its budget, the incumbent and its improvement over the baseline, and the last
experiments with status colours. ``PlainReporter`` (not a TTY, e.g. piped to a file or
under nohup): one plain line per event, greppable.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from nightlab.engine import Reporter, improvement_pct
from nightlab.spec import Spec
from nightlab.text import clip, one_line, printable
from nightlab.types import Experiment, Session, Status

STATUS_STYLE = {
    Status.KEEP: "bold green",
    Status.DISCARD: "yellow",
    Status.CRASH: "bold red",
    Status.TIMEOUT: "red",
    Status.INVALID: "magenta",
    Status.REJECTED: "bold magenta",
    Status.INTERRUPTED: "cyan",
    Status.PRUNED: "dark_orange",
    Status.RUNNING: "blue",
}


def fmt_metric(v: float | None) -> str:
    return "—" if v is None else f"{v:.6g}"


def _improvement(session: Session) -> str:
    pct = improvement_pct(session.baseline_metric, session.incumbent_metric, session.direction)
    if pct is None:
        return ""
    shown = f"{pct:+.2f}" if abs(pct) < 1e6 else f"{pct:+.3g}"
    return f"{shown}% vs baseline {fmt_metric(session.baseline_metric)}"


class PlainReporter(Reporter):
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def _p(self, text: str) -> None:
        """One record; a message of several lines keeps them, each continuation indented under it."""
        lines = text.rstrip("\n").splitlines() or [""]
        print("\n".join([lines[0], *(f"    {ln}" for ln in lines[1:])]), file=self.out, flush=True)

    def session_started(self, session: Session, spec: Spec, resumed: bool) -> None:
        verb = "resuming" if resumed else "starting"
        self._p(f"nightlab: {verb} session {session.tag} on branch {session.branch} "
                f"(metric {session.metric_name}, {session.direction.value}; sandbox {session.sandbox}; "
                f"researcher {spec.researcher.kind})")

    def message(self, text: str) -> None:
        self._p(f"nightlab: {text}")

    def experiment_started(self, idx: int, description: str, budget_s: float) -> None:
        self._p(f"[{idx}] running: {clip(printable(one_line(description)), 200)} (budget {budget_s:g}s)")

    def experiment_finished(self, exp: Experiment, session: Session) -> None:
        extra = f" {clip(printable(one_line(exp.reason)), 300)}" if exp.reason and exp.status is not Status.KEEP else ""
        self._p(f"[{exp.idx}] {exp.status.value}: {session.metric_name}={fmt_metric(exp.metric)} "
                f"run {exp.run_s:.1f}s |{extra} best {fmt_metric(session.incumbent_metric)} {_improvement(session)}")

    def session_stopped(self, session: Session) -> None:
        self._p(f"nightlab: session {session.tag} {session.status}: {session.stop_reason}. "
                f"best {session.metric_name}={fmt_metric(session.incumbent_metric)} {_improvement(session)}")


class LiveReporter(Reporter):
    """Rich live view; falls back to printing for messages so nothing is lost on exit."""

    def __init__(self, console: Console | None = None, keep_last: int = 12) -> None:
        self.console = console or Console()
        self.recent: deque[Experiment] = deque(maxlen=keep_last)
        self.session: Session | None = None
        self.inflight: tuple[int, str, float, float] | None = None  # idx, description, budget, t0
        self.live = Live(console=self.console, refresh_per_second=4, get_renderable=self._render,
                         transient=False)

    def _render(self) -> Panel:
        s = self.session
        parts: list[object] = []
        if s is not None:
            head = Text.assemble(
                ("session ", "dim"), (s.tag, "bold"), ("  branch ", "dim"), (s.branch, ""),
                ("  sandbox ", "dim"), (s.sandbox, "green" if s.sandbox == "bwrap" else "bold red"),
            )
            best = Text.assemble(
                ("best ", "dim"), (f"{s.metric_name} = {fmt_metric(s.incumbent_metric)}", "bold green"),
                ("  ", ""), (_improvement(s), "green"),
            )
            parts += [head, best]
        if self.inflight:
            idx, desc, budget, t0 = self.inflight
            elapsed = time.monotonic() - t0
            bar = ProgressBar(total=budget, completed=min(elapsed, budget), width=40)
            row = Table.grid(padding=(0, 1))
            row.add_row(Text(f"[{idx}]", style="bold blue"), bar, Text(f"{elapsed:5.1f}s / {budget:g}s"),
                        Text(clip(printable(desc), 70), style="italic"))
            parts.append(row)
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for col in ("#", "status", "metric", "run s", "description"):
            table.add_column(col)
        for e in self.recent:
            table.add_row(str(e.idx), Text(e.status.value, style=STATUS_STYLE.get(e.status, "")),
                          fmt_metric(e.metric), f"{e.run_s:.1f}",
                          Text(clip(printable(one_line(e.description or e.reason)), 60)))
        parts.append(table)
        return Panel(Group(*parts), title="nightlab", border_style="blue")  # type: ignore[arg-type]

    def session_started(self, session: Session, spec: Spec, resumed: bool) -> None:
        self.session = session
        self.live.start()

    def message(self, text: str) -> None:
        self.console.print(f"[dim]nightlab:[/dim] {text}")

    def experiment_started(self, idx: int, description: str, budget_s: float) -> None:
        self.inflight = (idx, description, budget_s, time.monotonic())

    def experiment_finished(self, exp: Experiment, session: Session) -> None:
        self.session = session
        self.inflight = None
        self.recent.append(exp)

    def session_stopped(self, session: Session) -> None:
        self.session = session
        self.inflight = None
        self.live.refresh()
        self.live.stop()
        self.console.print(f"session [bold]{session.tag}[/bold] {session.status}: {session.stop_reason}")


def make_reporter(quiet: bool = False, plain: bool | None = None) -> Reporter:
    if quiet:
        return Reporter()
    if plain is None:
        plain = not sys.stdout.isatty()
    return PlainReporter() if plain else LiveReporter()
