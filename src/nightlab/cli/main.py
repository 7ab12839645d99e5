"""The ``nightlab`` command: a thin layer over the library, one module per command group.

Commands are registered lazily (:data:`COMMANDS`: name -> module, attribute, one-line help):
``nightlab --version`` and ``nightlab --help`` import click and nothing else, and a command
imports only its own module. Nothing heavy (SQLAlchemy, pydantic, Optuna) is imported at
package import; ``tests/test_startup.py`` asserts the import graph.

Every error is printed one way, ``error: …`` (lowercase) and ``  fix: …``, without a
traceback: harness errors (:class:`~nightlab.errors.NightlabError`) with their exit code
(2 for usage errors), and click's own usage errors (exit 2).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from nightlab import __version__
from nightlab.cli.errors import show_click_error, show_error
from nightlab.errors import NightlabError

# name -> (module, attribute, short help). The help is shown by `nightlab --help` without
# importing the module; tests/test_startup.py checks it is the command's get_short_help_str(limit=72).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("nightlab.cli.init", "init", "Write a starter nightlab.toml and program.md into a git repository."),
    "run": ("nightlab.cli.run", "run", "Run (or resume) a research session until a stop rule fires."),
    "demo": ("nightlab.cli.run", "demo", "Copy an example lab into a fresh git repo at PATH and run the search..."),
    "status": ("nightlab.cli.read", "status",
        "Where a session stands: incumbent, improvement, counts, cost (--all:..."),
    "log": ("nightlab.cli.read", "log", "The session's experiments, one row each (the last 50 by default)."),
    "show": ("nightlab.cli.read", "show", "Everything about experiment N of the session."),
    "diff": ("nightlab.cli.read", "diff", "Print experiment N's diff (plain text, for piping into `git apply`)."),
    "export": ("nightlab.cli.read", "export_cmd",
        "Export the session: karpathy-compatible results.tsv, CSV or JSONL, or..."),
    "sweep": ("nightlab.cli.sweep", "sweep", "Run the lab once per knob setting on the same budget; compare metric..."),
    "compare": ("nightlab.cli.compare", "compare",
        "Run arms against each other on equal terms and say which is better,..."),
    "evolve-program": ("nightlab.cli.compare", "evolve_program",
        "Ask the lab's LLM for better program.md files from a comparison's..."),
    "space": ("nightlab.cli.space", "space", "Show the search space: every constant found in the editable files,..."),
    "labs": ("nightlab.cli.labs", "labs", "The labs you follow: one home page (`nightlab ui --home`), one inbox,..."),
    "mcp": ("nightlab.cli.labs", "mcp", "Serve nightlab to coding agents over the Model Context Protocol (stdio)."),
    "ui": ("nightlab.cli.ui", "ui", "Serve the dashboard: sessions, live progress, experiments, costs,..."),
    "report": ("nightlab.cli.ui", "report", "Write one self-contained HTML report (charts inline) and..."),
    "audit": ("nightlab.cli.audit", "audit", "Check and read the tamper-evident audit log (.nightlab/audit.jsonl)."),
    "approve": ("nightlab.cli.audit", "approve",
        "Approve experiment N's pending request (its run in review mode, its..."),
    "reject": ("nightlab.cli.audit", "reject", "Reject experiment N's pending request: it does not run (review) or..."),
    "pending": ("nightlab.cli.audit", "pending",
        "List the requests waiting for a human, with their diff and rationale."),
    "calibrate": ("nightlab.cli.verify", "calibrate",
        "Measure the noise floor: run the baseline k times with seeds..."),
    "replay": ("nightlab.cli.verify", "replay",
        "Re-run experiment IDX from its recorded commit, commands, env and seed."),
    "pool": ("nightlab.cli.pool", "pool", "Host a research pool (untrusted workers search, this lab verifies),..."),
    "verify": ("nightlab.cli.verify", "verify",
        "Re-run the baseline and the incumbent REPEATS times each; report the..."),
}


def load_command(name: str) -> click.Command:
    module, attr, _ = COMMANDS[name]
    cmd = getattr(importlib.import_module(module), attr)
    assert isinstance(cmd, click.Command)
    return cmd


class NightlabGroup(click.Group):
    """A group whose commands are imported only when used, and whose errors all read ``error: …``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *sorted(n for n in self.commands if n not in COMMANDS)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in COMMANDS:
            return None
        cmd = load_command(cmd_name)
        self.commands[cmd_name] = cmd
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in COMMANDS]
        rows += [(n, c.get_short_help_str(limit=80)) for n, c in sorted(self.commands.items()) if n not in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NightlabError as e:
            show_error(e.message, e.fix)
            ctx.exit(e.exit_code)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as e:
            show_click_error(e)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=NightlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nightlab")
def main() -> None:
    """nightlab: autonomous overnight research on a git repository.

    A researcher proposes changes to the editable files; each experiment runs in a
    sandbox under a time budget; only verified improvements advance the branch
    nightlab/<tag>. Everything is recorded in .nightlab/ledger.db.
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
