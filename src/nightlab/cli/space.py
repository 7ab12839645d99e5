"""``nightlab space``: the search space the researchers will use, at any time."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("space")
@click.option("--lab", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True,
              help="The lab folder (with nightlab.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def space(lab: Path, as_json: bool) -> None:
    """Show the search space: every constant found in the editable files, its current value, the
    range searched (from [researcher.space], a # nightlab: comment or the default) or why it is
    not searched, and the asserts in the code that candidates must satisfy.

    Read by the `search` and `local` researchers; `llm` and `agent` edit files freely."""
    from nightlab import space as space_mod
    from nightlab.spec import load_spec

    spec = load_spec(lab)
    found = space_mod.lab_space(spec, lab.resolve())
    if as_json:
        click.echo(space_mod.to_json(found))
        return
    click.echo(space_mod.table(found))
    if spec.researcher.kind not in space_mod.READERS:
        click.echo(f"\nnote: [researcher] kind = {spec.researcher.kind!r} does not read this space "
                   f"(only {' and '.join(space_mod.READERS)} do)")
