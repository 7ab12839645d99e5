"""The ``nightlab`` command: a thin layer over the library, one module per command group.

Harness errors (:class:`~nightlab.errors.NightlabError`) are printed as ``error: …`` and
``fix: …`` without a traceback, with their exit code (2 for usage errors).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from nightlab import __version__
from nightlab.errors import NightlabError


class NightlabGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NightlabError as e:
            click.secho(f"error: {e.message}", fg="red", err=True)
            if e.fix:
                click.echo(f"  fix: {e.fix}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=NightlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nightlab")
def main() -> None:
    """nightlab: autonomous overnight research on a git repository.

    A researcher proposes changes to the editable files; each experiment runs in a
    sandbox under a time budget; only verified improvements advance the branch
    nightlab/<tag>. Everything is recorded in .nightlab/ledger.db.
    """


def _register() -> None:
    from nightlab.cli import audit, compare, init, labs, read, run, sweep, ui, verify

    for cmd in (init.init, run.run, run.demo, read.status, read.log, read.show, read.diff, read.export_cmd,
                sweep.sweep, compare.compare, compare.evolve_program, ui.ui, ui.report, labs.labs, labs.mcp,
                *audit.COMMANDS, *verify.COMMANDS):
        main.add_command(cmd)
    main.add_command(importlib.import_module("nightlab.cli.space").space)  # nightlab space


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
