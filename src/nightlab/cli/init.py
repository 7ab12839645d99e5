"""``nightlab init``."""

from __future__ import annotations

from pathlib import Path

import click

from nightlab.errors import NightlabError
from nightlab.scaffold import init_lab


@click.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--from-autoresearch", is_flag=True,
              help="Recognise karpathy/autoresearch: train.py editable, prepare.py protected, val_bpb, 300 s.")
@click.option("--force", is_flag=True, help="Overwrite an existing nightlab.toml.")
def init(path: Path, from_autoresearch: bool, force: bool) -> None:
    """Write a starter nightlab.toml and program.md into a git repository."""
    written = init_lab(path, from_autoresearch=from_autoresearch, force=force)
    for p in written:
        click.echo(f"wrote {p}")
    click.echo("\nsearch space (`nightlab space` shows it again; edit [researcher.space] in nightlab.toml):")
    try:
        from nightlab.space import lab_space, table
        from nightlab.spec import load_spec

        click.echo(table(lab_space(load_spec(written[0]), written[0].parent)))
    except NightlabError as e:
        click.echo(f"  cannot read it yet: {e.message}\n  fix: {e.fix}")
    click.echo("next: review nightlab.toml (metric name, command, budget) and program.md, commit them "
               "(git add nightlab.toml program.md && git commit -m 'nightlab lab'), then `nightlab run`")
