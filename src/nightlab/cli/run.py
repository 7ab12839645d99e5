"""``nightlab run`` and ``nightlab demo``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nightlab.console import fmt_metric, make_reporter
from nightlab.engine import Engine, improvement_pct, install_signal_handlers
from nightlab.scaffold import copy_example
from nightlab.types import Session

lab_option = click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".",
                          show_default=True, help="The lab folder (holds nightlab.toml).")
db_option = click.option("--db", "db", default=None, envvar="NIGHTLAB_DB",
                         help="Ledger URL (default: sqlite at <lab>/.nightlab/ledger.db).")


def _run_engine(engine: Engine) -> Session:
    restore = install_signal_handlers(engine)
    try:
        return engine.run()
    finally:
        restore()
        engine.close()


def _summary(session: Session, lab: Path) -> None:
    pct = improvement_pct(session.baseline_metric, session.incumbent_metric, session.direction)
    click.echo(f"\nsession {session.tag}: {session.status} ({session.stop_reason})")
    click.echo(f"  baseline {session.metric_name} = {fmt_metric(session.baseline_metric)}")
    click.echo(f"  best     {session.metric_name} = {fmt_metric(session.incumbent_metric)}"
               + (f"  ({pct:+.2f}%)" if pct is not None else "")
               + f"  at {session.incumbent_commit[:10]} on branch {session.branch}")
    click.echo(f"  ledger   {lab.resolve() / '.nightlab' / 'ledger.db'}")


@click.command()
@lab_option
@click.option("--tag", default=None, help="Session name; the branch is nightlab/<tag>. Default: today, e.g. nov23.")
@click.option("--resume", is_flag=True, help="Continue a session (default: the latest) from its incumbent.")
@click.option("--rebaseline", is_flag=True,
              help="With --resume: re-measure the baseline at the lab's HEAD and continue the session from there "
                   "(after a change to the metric, the commands or the code).")
@click.option("--allow-dirty", is_flag=True,
              help="Snapshot uncommitted changes into the session's first commit instead of refusing them.")
@db_option
@click.option("--max-experiments", type=click.IntRange(min=0), default=None,
              help="Override [stop] max_experiments.")
@click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None,
              help="Override [sandbox] mode.")
@click.option("--autonomy", type=click.Choice(["auto", "approve-keep", "review"]), default=None,
              help="Override [autonomy] level: review (each candidate waits for a human before it runs), "
                   "approve-keep (a keep waits before the branch advances), auto (nothing waits).")
@click.option("--slots", type=click.IntRange(min=1), default=None, help="Override [executor] slots.")
@click.option("--executor", "executor_kind", type=click.Choice(["local", "ray"]), default=None,
              help="Override [executor] kind.")
@click.option("--address", default=None, help="Ray cluster address (auto, ray://host:port); implies --executor ray.")
@click.option("--plain", is_flag=True, help="Plain log lines instead of the live view.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the final summary.")
def run(lab: Path, tag: str | None, resume: bool, rebaseline: bool, allow_dirty: bool, db: str | None,
        max_experiments: int | None,
        sandbox: str | None, autonomy: str | None, slots: int | None, executor_kind: str | None,
        address: str | None, plain: bool, quiet: bool) -> None:
    """Run (or resume) a research session until a stop rule fires.

    Ctrl-C kills the experiment in flight, records it as interrupted and stops;
    SIGTERM or a file .nightlab/STOP stops after the experiment in flight.
    In review or approve-keep mode the session waits for `nightlab approve N` / `nightlab reject N`.
    """
    executor: dict[str, object] = {}
    if slots is not None:
        executor["slots"] = slots
    if address is not None:
        executor.update(kind="ray", address=address)
    if executor_kind is not None:
        executor["kind"] = executor_kind
    engine = Engine(lab, tag=tag, resume=resume, db_url=db, reporter=make_reporter(quiet, plain or None),
                    max_experiments=max_experiments, sandbox_mode=sandbox, autonomy=autonomy,
                    executor=executor or None, allow_dirty=allow_dirty, rebaseline=rebaseline)
    session = _run_engine(engine)
    _summary(session, lab)
    if session.stop_reason.startswith("interrupted"):
        sys.exit(130)


@click.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), default="nightlab-demo")
@click.option("--example", default="quickfit", show_default=True, help="Which example lab to copy.")
@click.option("--experiments", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--plain", is_flag=True, help="Plain log lines instead of the live view.")
@click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None)
def demo(path: Path, example: str, experiments: int, plain: bool, sandbox: str | None) -> None:
    """Copy an example lab into a fresh git repo at PATH and run the search researcher on it."""
    dest = copy_example(example, path)
    click.echo(f"copied the {example} example lab into {dest} (a fresh git repository)")
    engine = Engine(dest, tag="demo", reporter=make_reporter(False, plain or None),
                    max_experiments=experiments, sandbox_mode=sandbox)
    session = _run_engine(engine)
    _summary(session, dest)
    click.echo(f"\nnext: nightlab log --lab {path}    nightlab show 1 --lab {path}    "
               f"git -C {path} log --oneline nightlab/demo")
    if session.stop_reason.startswith("interrupted"):
        sys.exit(130)
