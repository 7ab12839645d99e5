"""Harness errors: one root exception, a message and a fix, no traceback for the user.

A crashed *experiment* is data (a row with status ``crash``), never one of these.
These are for the harness itself: a bad spec, a lab that is not a git repo, a missing
tool, a refused operation. The CLI prints ``message`` and ``fix`` and exits with
``exit_code`` (2 for usage errors, as click does).
"""

from __future__ import annotations


class NightlabError(Exception):
    exit_code = 1

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}" if self.fix else self.message


class UsageError(NightlabError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class SpecError(UsageError):
    """``nightlab.toml`` is invalid. The message names the file and the key."""


class SandboxError(NightlabError):
    """The sandbox cannot start where it must (fails closed)."""


class GitError(NightlabError):
    """A git operation the harness needed failed."""


class LedgerError(NightlabError):
    """The ledger cannot be opened or written."""
