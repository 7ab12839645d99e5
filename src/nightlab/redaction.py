"""Redaction: one rule for every text nightlab stores (log tails, prompts, audit records).

:func:`env_secrets` says which values are secret; :func:`redact` replaces them. Every storage
point uses the pair: the ledger's log tails and reasons (the engine), the prompts, responses
and transcripts researchers store (through ``nightlab.context``), and the audit log's records
(``nightlab.audit.Scrubber``).

Secret values, each at least ``MIN_LEN`` (6) characters, longest first:

1. the value of every variable whose *name* looks secret (``nightlab.runenv.SECRET_NAME``:
   ``*_API_KEY``, ``*TOKEN*``, ``*PASSWORD*``, ``GH_PAT``, ...), whether or not it reached a run;
2. the value of every variable the run environment *left out* (``nightlab.runenv``: not on the
   allowlist, not in ``[run] pass_env``): ``DATABASE_URL``, ``NIGHTLAB_DB``, ... -- except values
   that cannot be credentials and that would otherwise corrupt what is stored: numbers
   (``HISTSIZE=100000`` would eat a step count), values made only of existing absolute paths
   (``PWD``, ``SHELL``, ``OLDPWD``: they prefix every traceback), single lowercase words
   (``DEBIAN_FRONTEND=noninteractive``), and the ``DESCRIPTIVE`` names (``HOSTNAME``,
   ``LS_COLORS``, ...: the machine's name is recorded with the session anyway);
3. ``extra`` values (an API key from a key file, secret-named ``[run] env`` values).

Not covered: a secret shorter than 6 characters; a secret transformed before it is printed
(base64, split across lines); a secret that was never in nightlab's environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping

from nightlab.runenv import SECRET_NAME, filter_env

MIN_LEN = 6
REDACTED = "[REDACTED]"
Secret = tuple[str, str]  # (value, name of the variable it came from; "secret" for extras)

# Left-out variables whose values describe the machine or the terminal, not a credential: the
# machine's name is recorded with every session anyway (a fail-safe rule: any other name counts).
DESCRIPTIVE = frozenset({"HOSTNAME", "HOST", "SHLVL", "_", "LS_COLORS", "COLORTERM", "TERM_PROGRAM",
                         "TERM_PROGRAM_VERSION", "DISPLAY", "COLUMNS", "LINES"})
_NUMBER = re.compile(r"[-+]?[0-9][0-9._]*([eE][-+]?[0-9]+)?")
_WORD = re.compile(r"[a-z]+")


def _harmless(value: str) -> bool:
    """A value of a left-out (not secret-named) variable that is no credential (see above)."""
    if _NUMBER.fullmatch(value) or _WORD.fullmatch(value):
        return True
    parts = [p for p in value.split(os.pathsep) if p]
    return bool(parts) and all(p.startswith("/") and os.path.lexists(p) for p in parts)


def env_secrets(environ: Mapping[str, str] | None = None, *, passed: Collection[str] | None = None,
                extra: Iterable[str] = ()) -> list[Secret]:
    """The secrets of ``environ`` (default: ``os.environ``), longest first.

    ``passed``: the names the run environment kept; ``None`` means the default allowlist
    (``nightlab.runenv.filter_env`` without ``pass_env``), which may redact a little more.
    """
    env = os.environ if environ is None else environ
    kept = set(filter_env(env) if passed is None else passed)
    found: dict[str, str] = {}
    for name, value in env.items():
        if not value or len(value) < MIN_LEN:
            continue
        if SECRET_NAME.search(name) or (name not in kept and name not in DESCRIPTIVE and not _harmless(value)):
            found.setdefault(value, name)
    for value in extra:
        if value and len(value) >= MIN_LEN:
            found.setdefault(value, "secret")
    return sorted(found.items(), key=lambda p: (-len(p[0]), p[0]))


def redact(text: str, secrets: Iterable[str | Secret], mark: str | Callable[[str], str] = REDACTED) -> str:
    """``text`` with every secret value replaced by ``mark`` (or ``mark(name)``), longest first."""
    if not text:
        return text
    for s in secrets:
        value, name = (s, "secret") if isinstance(s, str) else s
        if value and value in text:
            text = text.replace(value, mark(name) if callable(mark) else mark)
    return text


def redact_data(value: object, secrets: list[Secret] | list[str]) -> object:
    """``redact`` applied to every string inside a JSON-like value (dict keys kept)."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: redact_data(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_data(v, secrets) for v in value]
    return value


__all__ = ["MIN_LEN", "REDACTED", "Secret", "env_secrets", "redact", "redact_data"]
