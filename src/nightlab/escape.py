"""Store what a run controls without failing: file names and text, backslash-escaped.

A run (or a researcher) can create file names that are not UTF-8 (``b"\\xff\\xfe.py"``) and print
bytes that are not UTF-8, or NUL. Python hands such names around as ``str`` holding lone surrogates
(``os.fsdecode``'s ``surrogateescape``), which SQLite, PostgreSQL and UTF-8 files refuse; PostgreSQL
also refuses NUL in text. :func:`text` makes any such value storable, and every text column of the
ledger and every string of the audit log goes through it:

- valid UTF-8 without NUL passes unchanged (the common case costs one ``isascii`` check);
- each byte that is not UTF-8 becomes ``\\xNN`` (``b"\\xff\\xfe.py"`` is stored as the 10
  characters ``\\xff\\xfe.py``), NUL becomes ``\\x00``, and a lone surrogate that did not come
  from a byte becomes ``\\uNNNN`` (Python's ``backslashreplace`` rendering).

Each byte maps to its own escape, so nothing is dropped or merged (unlike U+FFFD replacement);
the one ambiguity is with text that itself contains a literal ``\\xNN``. The exact bytes stay
where they came from: the log file in ``.nightlab/artifacts/`` and the commit in git.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00\ud800-\udfff]")


def _one(m: re.Match[str]) -> str:
    c = ord(m.group())
    if c == 0:
        return "\\x00"
    if 0xDC80 <= c <= 0xDCFF:  # a byte that was not UTF-8, carried by surrogateescape
        return f"\\x{c - 0xDC00:02x}"
    return f"\\u{c:04x}"


def text(value: str | bytes) -> str:
    """``value`` as text any database and UTF-8 file accepts (see the module docstring)."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "surrogateescape")
    if value.isascii() and "\0" not in value:
        return value
    return _UNSAFE.sub(_one, value)


def deep(value: object) -> object:
    """:func:`text` applied to every string (keys too) inside dicts, lists and tuples."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {text(k) if isinstance(k, str) else k: deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [deep(v) for v in value]
    return value
