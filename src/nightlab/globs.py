"""The one glob matcher for every path pattern in ``nightlab.toml``.

``[files] editable/protected``, ``[sandbox] hide``, ``[evaluate] files/outputs`` and
``[holdout] files`` all go through :func:`match` (is this lab-relative path covered?) and
:func:`expand` (which paths under a folder are covered?), so a pattern never means one thing
for "protect" and another for "hide" (Python 3.11's ``Path.glob("dir/**")`` yields folders
only; ``fnmatch``'s ``*`` crosses ``/``; ``PurePath.match`` anchors at the right).

Semantics (a pattern is a relative POSIX path, matched against the whole lab-relative path):

- ``*`` matches any run of characters within one path segment (never ``/``), dot files included;
  ``?`` one character but ``/``; ``[abc]``/``[!abc]`` a character class.
- ``**`` as a whole segment matches zero or more segments: ``**/x`` is ``x`` at any depth
  (``x``, ``a/x``, ``a/b/x``); ``a/**/b`` is ``a/b``, ``a/c/b``, ...; a trailing ``dir/**`` is
  everything under ``dir`` at any depth (not ``dir`` itself). ``**`` inside a segment acts as ``*``.
- A pattern that matches a folder covers everything inside it (``data`` covers ``data/a/b.csv``).
- A trailing ``/`` means ``/**``. No pattern matches ``.git/...`` or ``.nightlab/...``.
- So ``*.py`` is the top-level ``.py`` files only; ``**/*.py`` is every ``.py`` file.

:func:`expand` walks the folder without following symlinks: a symlink is reported as itself (the
caller decides what a symlink means), never as the folder or file it points to.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path, PurePosixPath

SKIPPED = (".git", ".nightlab")
_MAGIC = re.compile(r"[*?\[]")


def problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a lab glob (empty, absolute, ``..``, backslash), or None."""
    if not pattern or pattern.strip() != pattern:
        return "it is empty or has leading/trailing spaces"
    if "\\" in pattern or "\0" in pattern:
        return "it contains a backslash or NUL (use / between folders)"
    p = PurePosixPath(pattern)
    if p.is_absolute():
        return "it is absolute (patterns are relative to the lab folder)"
    if ".." in p.parts:
        return "it contains '..' (patterns cannot leave the lab folder)"
    return None


def segments(pattern: str) -> list[str]:
    """``pattern``'s path segments (a trailing ``/`` reads as ``/**``; empty and ``.`` segments dropped)."""
    if pattern.endswith("/"):
        pattern += "**"
    return [s for s in pattern.split("/") if s not in ("", ".")]


def is_magic(pattern: str) -> bool:
    """Whether ``pattern`` holds a glob character (``*``, ``?``, ``[``)."""
    return _MAGIC.search(pattern) is not None


def _segment_regex(seg: str) -> str:
    out: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        if c == "*":
            while i + 1 < n and seg[i + 1] == "*":
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and seg[j] in "!^":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal '['
                out.append(re.escape(c))
            else:
                body = seg[i + 1:j]
                neg = body[:1] in ("!", "^")
                body = body[1:] if neg else body
                body = body.replace("\\", "\\\\")
                out.append(f"(?!/)[{'^' if neg else ''}{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@lru_cache(maxsize=1024)
def compile_glob(pattern: str, *, cover: bool = True) -> re.Pattern[str]:
    """The anchored regular expression of ``pattern`` (see the module docstring).

    ``cover=False``: the path itself only, not what lies inside a folder it names.
    """
    segs = segments(pattern)
    parts: list[str] = []
    for k, seg in enumerate(segs):
        last = k == len(segs) - 1
        if seg == "**":
            parts.append("(?:[^/]+/)*[^/]+" if last else "(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(seg) + ("" if last else "/"))
    inside = "(?:/.+)?" if cover and segs and segs[-1] != "**" else ""
    return re.compile("".join(parts) + inside + r"\Z", re.DOTALL)


def _skipped(path: str) -> bool:
    head = path.split("/", 1)[0]
    return head in SKIPPED


def match(path: str, patterns: Iterable[str]) -> bool:
    """True when the lab-relative POSIX ``path`` matches one of ``patterns``."""
    path = path.strip("/")
    if not path or _skipped(path):
        return False
    return any(compile_glob(p).match(path) for p in patterns)


def literal_base(pattern: str) -> str:
    """The leading segments of ``pattern`` that hold no glob character ("" when it starts with one)."""
    out: list[str] = []
    for seg in segments(pattern):
        if _MAGIC.search(seg):
            break
        out.append(seg)
    return "/".join(out)


def expand(root: Path, patterns: Iterable[str], *, dirs: bool = False) -> list[str]:
    """Lab-relative paths under ``root`` that match a pattern, sorted; symlinks are never followed.

    Every non-folder entry (regular file, symlink, FIFO, socket, device) that matches is listed.
    With ``dirs``, a folder that a pattern names itself (not only through ``**``) is listed too (a
    folder where that pattern expects a file), but not the folders inside it.
    ``.git`` and ``.nightlab`` are never entered.
    """
    pats = [p for p in dict.fromkeys(patterns) if problem(p) is None]
    if not pats:
        return []
    regs = [(compile_glob(p), compile_glob(p, cover=False)) for p in pats]
    found: set[str] = set()
    starts = {literal_base(p) for p in pats}
    # walk each literal base once (drop bases inside another base)
    for base in sorted(starts, key=len):
        if any(b != base and (b == "" or base.startswith(b + "/")) for b in starts if len(b) < len(base)):
            continue
        _walk(root, base, regs, dirs, found)
    return sorted(found)


_Regs = list[tuple[re.Pattern[str], re.Pattern[str]]]


def _walk(root: Path, base: str, regs: _Regs, dirs: bool, found: set[str]) -> None:
    for rel, st in _entries(root, base):
        _consider(rel, st, regs, dirs, found)


def _entries(root: Path, base: str) -> Iterator[tuple[str, os.stat_result]]:
    """``base`` (when it is not "") and every entry below it, symlinks not followed."""
    if base and _skipped(base):
        return
    start = root / base if base else root
    try:
        st = os.lstat(start)
    except OSError:
        return
    if base:
        yield base, st
    if not stat.S_ISDIR(st.st_mode):
        return
    stack = [(start, base)]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if not rel and entry.name in SKIPPED:
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield child, est
            if stat.S_ISDIR(est.st_mode):
                stack.append((Path(entry.path), child))


def _folder_regexes(pattern: str) -> list[re.Pattern[str]]:
    """Regexes of the folders a match of ``pattern`` would lie in."""
    segs = segments(pattern)
    out: list[re.Pattern[str]] = []
    for d in range(1, len(segs)):
        if segs[d - 1] == "**":
            out.append(compile_glob("/".join(segs[:d - 1]) or "**"))  # anything at or under that folder
            break
        out.append(compile_glob("/".join(segs[:d]), cover=False))
    return out


def blocked(root: Path, patterns: Iterable[str]) -> list[str]:
    """Symlinks under ``root`` where a pattern expects a folder on the way to its matches: ``out``
    when ``out/*.json`` is wanted and ``out -> /etc`` (:func:`expand` never follows them)."""
    pats = [p for p in dict.fromkeys(patterns) if problem(p) is None]
    regs = [rx for p in pats for rx in _folder_regexes(p)]
    if not regs:
        return []
    found: set[str] = set()
    for p in pats:
        parts = literal_base(p).split("/") if literal_base(p) else []
        for k in range(1, len(parts) + 1):  # the literal folders first: their entries are not walked
            rel = "/".join(parts[:k])
            try:
                st = os.lstat(root / rel)
            except OSError:
                break
            if stat.S_ISLNK(st.st_mode):
                found.add(rel)
            if not stat.S_ISDIR(st.st_mode):
                break
        for rel, st in _entries(root, literal_base(p)):
            if stat.S_ISLNK(st.st_mode) and any(rx.match(rel) for rx in regs):
                found.add(rel)
    return sorted(found)


def _consider(rel: str, st: os.stat_result, regs: _Regs, dirs: bool, found: set[str]) -> None:
    is_dir = stat.S_ISDIR(st.st_mode)
    for rx, exact in regs:
        if (exact if is_dir else rx).match(rel) and (not is_dir or (dirs and not _inside_found(rel, found))):
            found.add(rel)
            return


def _inside_found(rel: str, found: set[str]) -> bool:
    parts = rel.split("/")
    return any("/".join(parts[:k]) in found for k in range(1, len(parts)))


def cover(root: Path, patterns: Iterable[str]) -> list[str]:
    """The fewest lab paths to hide so that nothing ``patterns`` match under ``root`` stays visible:
    each matched folder whole (``dir/**`` hides ``dir``), and the matched files outside them."""
    pats = list(patterns)
    folders: set[str] = set()
    for p in pats:
        segs = segments(p)
        if segs and segs[-1] == "**" and problem(p) is None:
            base = "/".join(segs[:-1])
            if base and not _MAGIC.search(base) and (root / base).is_dir() and not (root / base).is_symlink():
                folders.add(base)
    for rel in expand(root, pats, dirs=True):
        if (root / rel).is_dir() and not (root / rel).is_symlink():
            folders.add(rel)
    top = {f for f in folders if not _inside_found(f, folders)}
    out = set(top)
    for rel in expand(root, pats):
        if not _inside_found(rel, top):
            out.add(rel)
    return sorted(out)


__all__ = ["blocked", "compile_glob", "cover", "expand", "literal_base", "match", "problem"]
