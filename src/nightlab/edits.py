"""Edits from a model's answer: SEARCH/REPLACE blocks or whole files, parsed and applied.

Pure functions, no disk: :func:`parse_edits` turns the text of an answer into a
:class:`ParsedEdits`; :func:`apply_edits` applies it to the incumbent's files and returns
the new full text of every changed file (what :attr:`Candidate.files` holds), or raises
:class:`EditError` naming the block that failed and why (the message is shown back to the
model once, see ``researchers/llm.py``).

The format (aider's)::

    path/to/file.py
    <<<<<<< SEARCH
    exact lines from the file
    =======
    new lines
    >>>>>>> REPLACE

or, for a small file, a whole new text: a line naming the file followed by a fenced block.

Tolerated drift (each seen in the wild):
- blocks inside a Markdown code fence (`````python`` … `````);
- the file line decorated: ``**train.py**``, ```train.py```, ``# train.py``, ``File: train.py``,
  ``train.py:``, or written on the opening fence itself (`````python train.py``);
- the file line missing: the previous block's file, else the only file, else the one file
  whose text contains the SEARCH text;
- 5 to 9 marker characters instead of 7, any case (``<<<<< search``), a trailing word after
  ``=======`` is not allowed (it would be ambiguous with code);
- whitespace-only mismatches, by this fuzzy rule: when the SEARCH text is not found exactly,
  lines are compared with trailing whitespace removed; failing that, with leading whitespace
  removed too, and then the REPLACE lines are re-indented by the difference in indentation
  between the first SEARCH line and the line it matched. A match must be unique.
- an empty SEARCH creates the file when it does not exist, and appends to it when it does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class EditError(Exception):
    """An edit does not apply; the message says which block and why, for the model to fix."""


@dataclass(frozen=True)
class Block:
    path: str  # "" when the answer named no file (resolved in apply_edits)
    search: str
    replace: str


@dataclass(frozen=True)
class ParsedEdits:
    rationale: str
    blocks: tuple[Block, ...] = ()
    whole: dict[str, str] = field(default_factory=dict)  # path -> full new text

    @property
    def empty(self) -> bool:
        return not self.blocks and not self.whole


_SEARCH = re.compile(r"^\s*<{5,9}\s*SEARCH\s*$", re.I)
_DIVIDER = re.compile(r"^\s*={5,9}\s*$")
_REPLACE = re.compile(r"^\s*>{5,9}\s*REPLACE\s*$", re.I)
_FENCE = re.compile(r"^\s*(?:`{3,}|~{3,})\s*(\S*)\s*(\S*)\s*$")
_DECOR = re.compile(r"^(?:#+\s*|//\s*)?(?:(?:file|path|filename)\s*:\s*)?[*`'\"]*(.+?)[*`'\":]*$", re.I)
_PATHLIKE = re.compile(r"[\w./-]*[\w-]\.[\w]+|[\w./-]+/[\w.-]+")


def _filename(line: str, known: list[str] | None) -> str | None:
    """The path a (possibly decorated) file line names, or None when it does not look like one."""
    s = line.strip()
    if not s or len(s) > 200:
        return None
    m = _DECOR.match(s)
    cand = m.group(1).strip() if m else s
    if known and cand in known:
        return cand
    return cand if _PATHLIKE.fullmatch(cand) else None


def _fence_name(line: str, known: list[str] | None) -> str:
    """A path written on an opening fence (```python train.py or ```train.py), else ""."""
    m = _FENCE.match(line)
    if not m:
        return ""
    for part in (m.group(2), m.group(1)):
        if part and ((known and part in known) or ("." in part and _PATHLIKE.fullmatch(part))):
            return part
    return ""


def _is_closing(line: str) -> bool:
    m = _FENCE.match(line)
    return bool(m) and not m.group(1) and not m.group(2)  # type: ignore[union-attr]


def parse_edits(text: str, known_files: list[str] | None = None) -> ParsedEdits:
    """Parse a model's answer. ``known_files`` (the editable paths) helps spot file lines.

    Raises :class:`EditError` only for a block that is started and not finished; an answer
    with no edit at all parses to an empty :class:`ParsedEdits`.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    blocks: list[Block] = []
    whole: dict[str, str] = {}
    prose: list[str] = []
    last_path = ""
    fence_path = ""
    in_fence = False
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if _SEARCH.match(line):
            path = ""
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            if j >= 0:
                if _FENCE.match(lines[j]):
                    path = _fence_name(lines[j], known_files)
                elif not _REPLACE.match(lines[j]):
                    path = _filename(lines[j], known_files) or ""
                    if path and prose and prose[-1].strip() == lines[j].strip():
                        prose.pop()
            path = path or fence_path or last_path
            search: list[str] = []
            i += 1
            while i < n and not _DIVIDER.match(lines[i]):
                search.append(lines[i])
                i += 1
            if i >= n:
                raise EditError("a SEARCH block has no ======= divider; write each block as SEARCH, "
                                "the old lines, =======, the new lines, REPLACE")
            replace: list[str] = []
            i += 1
            while i < n and not _REPLACE.match(lines[i]) and not _SEARCH.match(lines[i]):
                replace.append(lines[i])
                i += 1
            if i >= n or not _REPLACE.match(lines[i]):
                raise EditError("a SEARCH block has no >>>>>>> REPLACE line; end each block with it")
            last_path = path
            blocks.append(Block(path, "\n".join(search), "\n".join(replace)))
            i += 1
            continue
        if _FENCE.match(line):
            if in_fence:
                if _is_closing(line):
                    in_fence, fence_path = False, ""
                i += 1
                continue
            k = i + 1
            while k < n and not _is_closing(lines[k]) and not _SEARCH.match(lines[k]):
                k += 1
            if k < n and _SEARCH.match(lines[k]):
                in_fence, fence_path = True, _fence_name(line, known_files)
                i += 1
                continue
            # a fenced block without SEARCH: a whole file when a file is named on or above the fence
            name = _fence_name(line, known_files)
            if not name:
                j = i - 1
                while j >= 0 and not lines[j].strip():
                    j -= 1
                if j >= 0:
                    name = _filename(lines[j], known_files) or ""
                    if name and prose and prose[-1].strip() == lines[j].strip():
                        prose.pop()
            if name and k < n:
                whole[name] = "\n".join(lines[i + 1:k]) + "\n"
            i = k + 1
            continue
        if not in_fence:
            prose.append(line)
        i += 1
    rationale = re.sub(r"\n{3,}", "\n\n", "\n".join(prose).strip())
    if whole and blocks:
        whole = {}  # SEARCH/REPLACE wins; a fenced file beside blocks is usually an illustration
    return ParsedEdits(rationale=rationale[:4000], blocks=tuple(blocks), whole=whole)


# --------------------------------------------------------------------------- applying


def _find(text: str, search: str) -> tuple[int, int, int] | None:
    """(start, end, count) of ``search`` in ``text`` as whole lines (exact match), or None."""
    body = search[:-1] if search.endswith("\n") else search
    hits = [m.span() for m in re.finditer(r"(?m)^" + re.escape(body) + r"(?=\n|\Z)", text)]
    if not hits:
        return None
    return hits[0][0], hits[0][1], len(hits)


def _fuzzy(lines: list[str], search: list[str], strip_lead: bool) -> list[int]:
    """Start indices where ``search`` matches ``lines`` under the whitespace rule."""

    def norm(s: str) -> str:
        return s.strip() if strip_lead else s.rstrip()

    target = [norm(s) for s in search]
    while target and not target[-1]:
        target.pop()
    while target and not target[0]:
        target.pop(0)
    if not target:
        return []
    normed = [norm(s) for s in lines]
    m = len(target)
    return [i for i in range(len(lines) - m + 1) if normed[i:i + m] == target]


def _indent(s: str) -> str:
    return s[: len(s) - len(s.lstrip())]


def apply_block(text: str, block: Block) -> str:
    """Apply one block to a file's text; raise :class:`EditError` when it does not apply."""
    if not block.search.strip():
        if not text:
            return block.replace + ("\n" if not block.replace.endswith("\n") else "")
        return text + ("" if text.endswith("\n") else "\n") + block.replace + "\n"
    found = _find(text, block.search)
    if found:
        start, end, count = found
        if count > 1:
            raise EditError(f"{block.path}: the SEARCH text occurs {count} times; "
                            "include more surrounding lines so that it matches exactly once")
        return text[:start] + block.replace + text[end:]
    lines = text.split("\n")
    search_lines = block.search.split("\n")
    for strip_lead in (False, True):
        hits = _fuzzy(lines, search_lines, strip_lead)
        if len(hits) > 1:
            raise EditError(f"{block.path}: the SEARCH text matches {len(hits)} places "
                            "(ignoring whitespace); "
                            "include more surrounding lines")
        if len(hits) == 1:
            core = list(search_lines)
            while core and not core[-1].strip():
                core.pop()
            while core and not core[0].strip():
                core.pop(0)
            at = hits[0]
            new_lines = block.replace.split("\n")
            if strip_lead:
                have, want = _indent(core[0]), _indent(lines[at])
                new_lines = [_reindent(s, have, want) for s in new_lines]
            return "\n".join(lines[:at] + new_lines + lines[at + len(core):])
    raise EditError(f"{block.path}: the SEARCH text was not found. A SEARCH section must copy the "
                    "current lines of the file exactly (first line: "
                    f"{block.search.strip().splitlines()[0][:120]!r})")


def _reindent(line: str, have: str, want: str) -> str:
    if not line.strip():
        return line
    if have and line.startswith(have):
        return want + line[len(have):]
    if not have:
        return want + line
    return line


def apply_edits(files: dict[str, str], edits: ParsedEdits) -> dict[str, str]:
    """Apply parsed edits to ``files`` (path -> text); return path -> new text of changed files.

    Raises :class:`EditError` when there is no edit, a block's file cannot be determined, or a
    block does not apply. Blocks apply in order, each to the result of the ones before.
    """
    if edits.empty:
        raise EditError("the answer has no SEARCH/REPLACE block and no whole file")
    out: dict[str, str] = {}
    for path, text in edits.whole.items():
        out[path] = text
    for k, block in enumerate(edits.blocks, 1):
        path = block.path
        if not path:
            if len(files) == 1:
                path = next(iter(files))
            else:
                owners = [p for p, t in files.items() if block.search.strip() and block.search in t]
                if len(owners) != 1:
                    raise EditError(f"block {k} names no file; write the file's path on the line before "
                                    "<<<<<<< SEARCH")
                path = owners[0]
        current = out.get(path, files.get(path, ""))
        if path not in files and path not in out and block.search.strip():
            raise EditError(f"block {k}: {path} is not one of the files shown ({', '.join(sorted(files))}); "
                            "use an empty SEARCH section to create a new file")
        try:
            out[path] = apply_block(current, Block(path, block.search, block.replace))
        except EditError as e:
            raise EditError(f"block {k}: {e}") from None
    changed = {p: t for p, t in out.items() if files.get(p) != t}
    if not changed:
        raise EditError("the edits change nothing")
    return changed
