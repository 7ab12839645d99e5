"""``nightlab labs add|remove|list`` (the lab registry) and the table behind ``nightlab status --all``."""

from __future__ import annotations

import json
from pathlib import Path

import click

registry_option = click.option(
    "--registry", "registry", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="the lab registry file (default: $NIGHTLAB_REGISTRY or ~/.config/nightlab/labs.toml)")


@click.group()
def labs() -> None:
    """The labs you follow: one home page (`nightlab ui --home`), one inbox, `nightlab status --all`."""


@labs.command("add")
@registry_option
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--name", default=None, help="the lab's name (default: [lab] name, else the folder's name)")
@click.option("--db", default="", help="the lab's ledger URL, when it is not LAB/.nightlab/ledger.db")
def add(registry: Path | None, path: Path, name: str | None, db: str) -> None:
    """Follow the lab at PATH (default: the current folder)."""
    from nightlab.labs import Registry

    reg = Registry(registry)
    entry = reg.add(path, name, db)
    click.echo(f"added lab '{entry.name}' ({entry.path}) to {reg.path}")


@labs.command("remove")
@registry_option
@click.argument("name")
def remove(registry: Path | None, name: str) -> None:
    """Stop following the lab NAME (its files and ledger are not touched)."""
    from nightlab.labs import Registry

    reg = Registry(registry)
    entry = reg.remove(name)
    click.echo(f"removed lab '{entry.name}' ({entry.path}) from {reg.path}")


@labs.command("list")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object per lab")
def list_(registry: Path | None, as_json: bool) -> None:
    """The labs you follow."""
    from nightlab.labs import Registry

    reg = Registry(registry)
    if as_json:
        click.echo(json.dumps([lab.__dict__ for lab in reg.labs], indent=2))
        return
    if not reg.labs:
        click.echo(f"no labs in {reg.path}: add one with `nightlab labs add PATH`")
    for lab in reg.labs:
        click.echo(f"{lab.name}\t{lab.path}" + (f"\t{lab.db}" if lab.db else ""))


def print_all(registry: Path | None, db: str | None, as_json: bool = False) -> None:
    """Every followed lab (and every lab of the shared ledger ``db``) as one table."""
    from rich.console import Console
    from rich.table import Table

    from nightlab.labs import Registry, all_labs, lab_state, sparkline

    reg = Registry(registry)
    states = [lab_state(lab) for lab in all_labs(reg, [db] if db else [])]
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in states], indent=2))
        return
    if not states:
        click.echo(f"no labs in {reg.path}: add one with `nightlab labs add PATH`")
        return
    t = Table(box=None, pad_edge=False)
    for col in ("lab", "state", "session", "metric", "best", "vs baseline", "24h", "spend 24h", "best so far",
                "why / what waits"):
        t.add_column(col, no_wrap=col not in ("why / what waits",))
    for s in states:
        imp = "—" if s.improvement_pct is None else f"{s.improvement_pct:+.2f}%"
        t.add_row(s.name, s.state, s.tag or "—", s.metric_name or "—",
                  "—" if s.incumbent is None else f"{s.incumbent:.6g}", imp, str(s.experiments_24h),
                  f"${s.cost_24h:.2f}", sparkline(s.best_so_far[-20:], s.direction or "minimize"), s.detail)
    Console(highlight=False, width=200).print(t)


@click.command()
@click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True,
              help="the lab that tools use when they name none")
@registry_option
def mcp(lab: Path, registry: Path | None) -> None:
    """Serve nightlab to coding agents over the Model Context Protocol (stdio).

    Add it to Claude Code with `claude mcp add nightlab -- nightlab mcp --lab /path/to/lab`
    (Codex: an [mcp_servers.nightlab] entry with command = "nightlab", args = ["mcp"]).
    """
    try:
        import mcp as _sdk  # noqa: F401
    except ImportError:
        from nightlab.errors import UsageError

        raise UsageError("`nightlab mcp` needs the official MCP SDK", "pip install 'nightlab[mcp]'") from None
    from nightlab.mcp_server import serve

    serve(lab.resolve(), registry)
