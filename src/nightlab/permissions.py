"""What a researcher may do, as pure functions over ``[permissions]`` (no I/O).

The spec section (:class:`nightlab.spec.PermissionsSpec`) holds the settings; this module
answers the questions:

- :func:`diff_violation` — does a candidate's canonical diff exceed ``max_diff_bytes`` or
  add more than ``max_new_files`` files? (enforced by the guard, before the run)
- :func:`command_allowed` — may an ``agent`` researcher run this shell command?
  Patterns are **shell-style globs** (``fnmatch``, case-sensitive) matched against each
  simple command of the line after splitting on ``;``, ``&&``, ``||``, ``|``, ``&``,
  newlines, ``$(``, backticks and parentheses, with runs of whitespace folded to one space.
  Every part must pass: a part matching a ``deny`` pattern is refused; with a non-empty
  ``allow`` list a part must match one of its patterns. Deny wins.
  This is a policy for the agent's own tool gate (the agent researcher passes it on), not
  a sandbox: an allowed interpreter (``python -c …``) can do anything its sandbox allows.
- :func:`host_allowed` — may the researcher process connect to this host?
  ``researcher_network`` is ``"off"``, ``"on"`` or a list of host names (``*.example.com``
  globs allowed); the agent/LLM researchers enforce it for the connections they make.

Rule names (as they appear in ``rejected`` reasons, ``policy: <rule> (<detail>)``):
``path``, ``protected``, ``editable``, ``file_type``, ``max_diff_bytes``, ``max_new_files``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

_SPLIT = re.compile(r"\|\||&&|[;|&\n()`]|\$\(|<\(|>\(")


def command_parts(command: str) -> list[str]:
    """The simple commands of a shell line (best effort; see the module docstring)."""
    parts = [" ".join(p.split()) for p in _SPLIT.split(command)]
    return [p for p in parts if p]


def command_allowed(command: str, allow: Sequence[str], deny: Sequence[str]) -> bool:
    """True when every part of ``command`` passes ``deny`` and, if given, ``allow``."""
    parts = command_parts(command)
    if not parts:
        return not allow
    for part in parts:
        if any(fnmatch.fnmatchcase(part, pat) for pat in deny):
            return False
        if allow and not any(fnmatch.fnmatchcase(part, pat) for pat in allow):
            return False
    return True


def host_allowed(host: str, network: str | Sequence[str]) -> bool:
    """May the researcher process reach ``host`` under ``researcher_network``?"""
    if isinstance(network, str):
        return network == "on"
    h = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(h, pat.lower().rstrip(".")) for pat in network)


def violation(rule: str, detail: str) -> str:
    """The guard's problem text for a rule: ``<rule> (<detail>)``; the engine prefixes ``policy: ``."""
    return f"{rule} ({detail})"


def rule_of(reason: str) -> str:
    """The rule name of a ``policy: <rule> (...)`` reason, or ``""``."""
    if not reason.startswith("policy: "):
        return ""
    return reason[len("policy: "):].split(" ", 1)[0]


def diff_violation(
    diff: str, new_files: Iterable[str], *, max_diff_bytes: int, max_new_files: int
) -> str | None:
    """The size rules on a canonical diff (``max_diff_bytes = 0`` and ``max_new_files = -1``: no limit)."""
    size = len(diff.encode("utf-8", "surrogateescape"))
    if max_diff_bytes and size > max_diff_bytes:
        return violation("max_diff_bytes", f"{size} > {max_diff_bytes}")
    added = list(new_files)
    if max_new_files >= 0 and len(added) > max_new_files:
        shown = ", ".join(added[:5]) + (", …" if len(added) > 5 else "")
        return violation("max_new_files", f"{len(added)} > {max_new_files}: {shown}")
    return None
