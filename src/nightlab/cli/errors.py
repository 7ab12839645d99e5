"""How every CLI error is printed: ``error: <message>`` (lowercase, one style) and ``  fix: <fix>``.

A message of several lines (a git error, a log tail) keeps its lines, each indented under
the first, so that no line of it reads as a line of its own.
"""

from __future__ import annotations

import click

from nightlab.errors import NightlabError


def _indent(text: str) -> str:
    lines = text.rstrip("\n").splitlines() or [""]
    return "\n".join([lines[0], *("  " + ln if ln.strip() else ln for ln in lines[1:])])


def show_error(message: str, fix: str = "") -> None:
    click.secho(f"error: {_indent(message)}", fg="red", err=True)
    if fix:
        click.echo(f"  fix: {_indent(fix)}", err=True)


def show_click_error(e: click.ClickException) -> None:
    """A click error (bad option, missing argument) in the same style, usage line first."""
    if isinstance(e, click.UsageError) and e.ctx is not None:
        click.echo(e.ctx.get_usage(), err=True)
        click.echo(f"Try '{e.ctx.command_path} --help' for help.\n", err=True)
    fix = getattr(e, "fix", "")
    show_error(e.format_message(), fix)


class NightlabClickError(click.ClickException):
    """A :class:`NightlabError` raised through click (commands used without the ``nightlab`` group)."""

    def __init__(self, err: NightlabError) -> None:
        super().__init__(err.message)
        self.fix = err.fix
        setattr(self, "exit_code", err.exit_code)  # noqa: B010 (click declares it a class variable)

    def show(self, file: object = None) -> None:
        show_error(self.message, self.fix)
