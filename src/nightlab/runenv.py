"""What a run's environment holds: an allowlist, never a denylist.

A run (and the evaluator, the holdout check, the setup command) gets, of the harness's own
environment, only the variables below, plus ``[run] pass_env`` (names, or prefixes written
``PREFIX_*``), plus ``[run] env``, plus the ``NIGHTLAB_*`` variables nightlab itself sets for the
run. Everything else stays behind: ``DATABASE_URL``, ``GH_PAT``, ``NIGHTLAB_DB``, ``AWS_*``,
``SSH_AUTH_SOCK``, ``PYTHONPATH``, ``TMPDIR``, ... A name denylist cannot win this (a secret is
whatever the user named it); an allowlist fails safe.

Allowed by default:

- ``PATH``, ``HOME``, ``USER``, ``LOGNAME`` (``getpass.getuser``), ``LANG``, ``LANGUAGE``, ``LC_*``,
  ``TZ``, ``TERM``: what programs need to find commands, a home, a locale and a time zone;
- ``CUDA_*``, ``NVIDIA_*``, ``HIP_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``, ``LD_LIBRARY_PATH``
  (CUDA images set it): which accelerator and which driver libraries;
- ``OMP_*``, ``MKL_*``, ``OPENBLAS_*``: thread counts of numerical libraries;
- ``VIRTUAL_ENV`` and the ``PYTHON*`` variables that change only how the interpreter encodes,
  buffers, hashes and reports (``PYTHONHASHSEED``, ``PYTHONIOENCODING``, ``PYTHONUTF8``,
  ``PYTHONUNBUFFERED``, ``PYTHONDONTWRITEBYTECODE``, ``PYTHONFAULTHANDLER``) -- not the ones that
  say where code is loaded from (``PYTHONPATH``, ``PYTHONHOME``, ``PYTHONSTARTUP``,
  ``PYTHONUSERBASE``): they point at host folders a sandboxed run does not see, or run host code.

A variable matched by a default *prefix* whose name looks secret (``NVIDIA_API_KEY``) is not
passed; ``pass_env`` passes whatever it names, secret-looking or not (the user asked for it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

ALLOWED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM",
    "VIRTUAL_ENV", "LD_LIBRARY_PATH", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "PYTHONFAULTHANDLER",
})
ALLOWED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_")

# Names whose value is a credential. Used to refuse them among prefix matches and to redact their
# values everywhere (see nightlab.redaction), whether or not they reach a run.
SECRET_NAME = re.compile(
    r"(API_?KEY|(^|_)KEY($|_)|TOKEN|SECRET|PASSWORD|PASSWD|(^|_)PASS($|_)|_PWD$|CREDENTIAL|PRIVATE_KEY"
    r"|AUTH|(^|_)PAT($|_)|COOKIE|SESSION_?ID)",
    re.I,
)
PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` equals a pattern, or starts with a pattern ``PREFIX*`` without its star."""
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def allowed(name: str, pass_env: Iterable[str] = ()) -> bool:
    """Whether the harness's variable ``name`` reaches a run (before ``[run] env`` and nightlab's own)."""
    if name_matches(name, pass_env):
        return True
    if name in ALLOWED_NAMES:
        return True
    return name.startswith(ALLOWED_PREFIXES) and not SECRET_NAME.search(name)


def filter_env(environ: Mapping[str, str], pass_env: Iterable[str] = ()) -> dict[str, str]:
    """The allowed part of ``environ`` (see the module docstring)."""
    pats = list(pass_env)
    return {k: v for k, v in environ.items() if allowed(k, pats)}


__all__ = ["ALLOWED_NAMES", "ALLOWED_PREFIXES", "SECRET_NAME", "allowed", "filter_env", "name_matches"]
