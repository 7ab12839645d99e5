"""``nightlab ui`` (the dashboard) and ``nightlab report`` (a shareable HTML file and progress.png).

Both need the ``ui`` extra; without it they say how to install it instead of failing on an import.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from nightlab.errors import UsageError
from nightlab.ledger import Ledger

lab_option = click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".",
                          show_default=True, help="The lab folder (holds .nightlab/).")
db_option = click.option("--db", "db", default=None, envvar="NIGHTLAB_DB",
                         help="Ledger URL (default: sqlite at <lab>/.nightlab/ledger.db).")


def _need(*modules: str) -> None:
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            raise UsageError(f"this command needs the ui extra ({m} is not installed)",
                             "pip install 'nightlab[ui]'") from None


def _ledger(lab: Path, db: str | None) -> Ledger:

    if db is None and not (lab / ".nightlab" / "ledger.db").exists():
        raise UsageError(f"no ledger at {lab.resolve() / '.nightlab' / 'ledger.db'}",
                         "pass --lab <the lab folder> or --db <ledger URL>")
    return Ledger.for_lab(lab, db)


@click.command()
@lab_option
@db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--token", default=None, envvar="NIGHTLAB_UI_TOKEN",
              help="Access token (required off loopback; approving always needs it). Default: random.")
@click.option("--home", is_flag=True,
              help="The home page of every lab you follow (`nightlab labs`) and of the --db ledger, with one "
                   "approval inbox; each lab's dashboard under /labs/<name>/. Default when --lab has no ledger "
                   "and the registry has labs.")
@click.option("--registry", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --home: the lab registry (default: ~/.config/nightlab/labs.toml).")
def ui(lab: Path, db: str | None, host: str, port: int, token: str | None, home: bool = False,
       registry: Path | None = None) -> None:
    """Serve the dashboard: sessions, live progress, experiments, costs, audit, approvals.

    Works offline: every asset is served by nightlab. Bound to 127.0.0.1 unless --host
    says otherwise. Every request needs the token: open the printed URL (…?token=…) once.
    """
    if not home and db is None and not (lab / ".nightlab" / "ledger.db").exists():
        from nightlab.labs import Registry

        home = bool(Registry(registry).labs)
    from nightlab.web.security import Access

    try:
        access = Access.make(host, token)
    except ValueError:
        raise UsageError(f"binding the dashboard to {host} exposes it beyond this machine without a token",
                         "add --token SECRET (or set NIGHTLAB_UI_TOKEN), or use --host 127.0.0.1") from None
    _need("fastapi", "uvicorn", "jinja2")
    import uvicorn

    from nightlab.web.app import create_app

    if home:
        from nightlab.labs import Registry
        from nightlab.web.home import create_home_app

        app = create_home_app(access=access, registry=Registry(registry), db_urls=[db] if db else [])
    else:
        ledger = _ledger(lab, db)
        app = create_app(ledger, lab.resolve(), access)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/?token={access.token}"  # every request needs it, loopback too (install_guard)
    click.echo(f"nightlab dashboard on {url}  (Ctrl-C to stop)")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        for led in (app.state.ledgers.values() if home else [ledger]):
            led.close()


@click.command()
@lab_option
@db_option
@click.option("--tag", default=None, help="Session to report (default: the latest).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              default="report.html", show_default=True,
              help="HTML file to write; progress.png is written beside it.")
@click.option("--compare", "comparison", default=None, metavar="NAME",
              help="Report the comparison NAME (`nightlab compare`) instead of a session.")
def report(lab: Path, db: str | None, tag: str | None, output: Path, comparison: str | None = None) -> None:
    """Write one self-contained HTML report (charts inline) and progress.png, from the ledger alone."""
    _need("jinja2", "matplotlib")
    from nightlab.report import render_compare_html, write_report

    ledger = _ledger(lab, db)
    if comparison:
        try:
            output.write_text(render_compare_html(ledger, comparison), encoding="utf-8")
        finally:
            ledger.close()
        click.echo(f"wrote {output}")
        return
    try:
        html, png = write_report(ledger, output, tag)
    finally:
        ledger.close()
    click.echo(f"wrote {html} and {png}")
