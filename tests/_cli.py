"""The ``nightlab`` command line for subprocess tests of the audit and approval commands.

Uses ``python -m nightlab`` once ``nightlab.cli.main`` registers them; until then a small
group holding ``run`` and :data:`nightlab.cli.audit.COMMANDS` with the same error handling.
"""

from __future__ import annotations

import sys

ENTRY = """
import sys
import click
try:
    from nightlab.cli.main import main
    if main.get_command(click.Context(main), "approve") is None:  # commands load lazily
        raise ImportError("approve not registered")
except ImportError:
    from nightlab.cli.audit import COMMANDS
    from nightlab.cli.run import run
    from nightlab.errors import NightlabError

    class Group(click.Group):
        def invoke(self, ctx):
            try:
                return super().invoke(ctx)
            except NightlabError as e:
                click.echo(f"error: {e.message}", err=True)
                if e.fix:
                    click.echo(f"  fix: {e.fix}", err=True)
                ctx.exit(e.exit_code)

    main = Group(commands=[run, *COMMANDS])
main(prog_name="nightlab")
"""


def nl(*args: str) -> list[str]:
    """argv for ``nightlab ARGS…`` in a subprocess (use with ``env=cli_env()``)."""
    return [sys.executable, "-c", ENTRY, *args]
