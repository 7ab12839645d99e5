"""``nightlab calibrate``, ``nightlab replay`` and ``nightlab verify``: is the progress real?"""

from __future__ import annotations

import json
from pathlib import Path

import click

from nightlab.console import fmt_metric
from nightlab.engine import Engine, Reporter, install_signal_handlers
from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.spec import Spec

lab_option = click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".",
                          show_default=True, help="The lab folder (holds nightlab.toml).")
db_option = click.option("--db", "db", default=None, envvar="NIGHTLAB_DB",
                         help="Ledger URL (default: sqlite at <lab>/.nightlab/ledger.db).")
tag_option = click.option("--tag", default=None, help="The session (default: the latest).")
sandbox_option = click.option("--sandbox", type=click.Choice(["auto", "required", "none"]), default=None,
                              help="Override [sandbox] mode.")


def open_session_engine(lab: Path, tag: str | None, db: str | None, sandbox: str | None) -> Engine:
    """An engine on an existing session, with the spec the session recorded (not today's file)."""
    with Ledger.for_lab(lab.resolve(), db) as ledger:
        session = ledger.get_session(tag) if tag else ledger.latest_session()
        if session is None:
            what = f"session '{tag}'" if tag else "any session"
            raise UsageError(f"no {what} in {ledger.shown}",
                             "start one with `nightlab run` or `nightlab calibrate`")
        spec_json, _ = ledger.session_json(session.id)
    spec = Spec.model_validate_json(spec_json)
    return Engine(lab, tag=session.tag, resume=True, db_url=db, spec=spec, sandbox_mode=sandbox,
                  build_researcher=False)


class _Echo(Reporter):
    def message(self, text: str) -> None:
        click.echo(text)


@click.command()
@lab_option
@click.option("--tag", default=None, help="The session; created (baseline only) when it does not exist.")
@click.option("-k", "--k", "k", type=click.IntRange(min=2), default=None,
              help="Runs of the baseline (default: [accept] calibrate).")
@db_option
@sandbox_option
def calibrate(lab: Path, tag: str | None, k: int | None, db: str | None, sandbox: str | None) -> None:
    """Measure the noise floor: run the baseline k times with seeds seed+1..seed+k.

    Stores the metric's spread (sigma, mean, samples) on the session; threshold and repeat
    policies use it. `nightlab run` calibrates by itself when its policy needs it.
    """
    with Ledger.for_lab(lab.resolve(), db) as ledger:
        exists = (ledger.get_session(tag) if tag else ledger.latest_session()) is not None
    if exists:
        engine = open_session_engine(lab, tag, db, sandbox)
    else:
        engine = Engine(lab, tag=tag, db_url=db, sandbox_mode=sandbox, build_researcher=False)
        engine.session = engine.ledger.update_session(
            engine.session.id, status="stopped", stop_reason="calibrated; continue: nightlab run --resume")
    engine.reporter = _Echo()
    restore = install_signal_handlers(engine)
    try:
        engine.run_setup()
        rec = engine.verifier.calibrate(k)
    finally:
        restore()
        engine.close()
    click.echo(f"session {engine.session.tag}: {engine.spec.metric.name} over {rec['k']} runs: "
               f"mean {fmt_metric(rec['mean'])}, sigma {fmt_metric(rec['sigma'])} ({rec['trust']})")


@click.command()
@click.argument("idx", type=int)
@lab_option
@tag_option
@db_option
@sandbox_option
def replay(idx: int, lab: Path, tag: str | None, db: str | None, sandbox: str | None) -> None:
    """Re-run experiment IDX from its recorded commit, commands, env and seed.

    Reports the replayed metric, its difference from the recorded one, and that difference
    in units of the session's noise floor (when calibrated). Exit code 1 when the replay
    did not produce a metric.
    """
    engine = open_session_engine(lab, tag, db, sandbox)
    try:
        engine.run_setup()
        r = engine.verifier.replay(idx)
    finally:
        engine.close()
    click.echo(f"experiment {idx} at {r.commit[:10]} (seed {r.seed}): recorded {fmt_metric(r.recorded)}, "
               f"replayed {fmt_metric(r.replayed)}")
    if r.replayed is None:
        click.echo(f"  the replay failed: {r.status.value}: {r.reason}")
        raise SystemExit(1)
    if r.diff is not None:
        line = f"  difference {r.diff:+.6g}"
        if r.exact:
            line += " (exact)"
        elif r.z is not None:
            line += f" = {r.z:+.2f} sigma (noise floor {fmt_metric(r.sigma)})"
        else:
            line += " (no noise floor: run `nightlab calibrate`)"
        click.echo(line)


@click.command()
@lab_option
@tag_option
@click.option("-r", "--repeats", type=click.IntRange(min=2), default=5, show_default=True,
              help="Runs of each commit, with fresh seeds.")
@click.option("--each", is_flag=True, help="Verify every kept commit, not only the incumbent.")
@click.option("--level", type=click.FloatRange(0.5, 0.999), default=0.95, show_default=True,
              help="Confidence level of the intervals.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@db_option
@sandbox_option
def verify(lab: Path, tag: str | None, repeats: int, each: bool, level: float, as_json: bool, db: str | None,
           sandbox: str | None) -> None:
    """Re-run the baseline and the incumbent REPEATS times each; report the verified improvement.

    The improvement is the difference of means with a Welch confidence interval and a
    one-sided p-value; it is stored on the session.
    """
    engine = open_session_engine(lab, tag, db, sandbox)
    restore = install_signal_handlers(engine)
    try:
        engine.run_setup()
        report = engine.verifier.verify(repeats, each=each, level=level)
    finally:
        restore()
        engine.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    pct = round(level * 100)
    click.echo(f"{report.metric} ({report.direction.value}), {repeats} runs each, {pct}% intervals")
    for row in report.rows:
        ci = f"[{fmt_metric(row.ci[0])}, {fmt_metric(row.ci[1])}]" if row.ci else "—"
        line = f"  {row.label:<9} {row.commit[:10]}  mean {fmt_metric(row.mean)}  CI {ci}"
        if row.gain is not None and row.gain_ci is not None:
            line += (f"  improvement {row.gain:+.6g} [{row.gain_ci[0]:+.6g}, {row.gain_ci[1]:+.6g}]"
                     f"  p = {row.p:.3g}")
        click.echo(line)


COMMANDS = (calibrate, replay, verify)
