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
  removed too (the REPLACE lines are then re-indented by the difference in indentation between
  the first SEARCH line and the line it matched); then with blank lines ignored; then with all
  whitespace inside lines ignored. Line endings never matter (CRLF files stay CRLF). A match
  must be unique at the first rule that finds one: several matches are an error that lists them.
- an empty SEARCH creates the file when it does not exist, and appends to it when it does.

A SEARCH text that is not found is answered with the closest lines of the file (difflib),
numbered, so the model can copy them on its retry.

**Structured edits.** Where the server accepts a JSON schema, the model answers
``{"rationale": str, "edits": [{"file": str, "old": str, "new": str}]}`` (:data:`EDITS_SCHEMA`);
:func:`edits_from_json` turns that into the same :class:`ParsedEdits` (``old`` is the SEARCH
text, so the same matching rules apply).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


def _find(text: str, search: str) -> list[tuple[int, int]]:
    """Spans of ``search`` in ``text`` as whole lines (exact match)."""
    body = search[:-1] if search.endswith("\n") else search
    return [m.span() for m in re.finditer(r"(?m)^" + re.escape(body) + r"(?=\n|\Z)", text)]


# the whitespace rules, tried in order: (name, line key, blank lines ignored, re-indent)
_LEVELS: tuple[tuple[str, Callable[[str], str], bool, bool], ...] = (
    ("trailing whitespace", str.rstrip, False, False),
    ("indentation", str.strip, False, True),
    ("indentation and blank lines", str.strip, True, True),
    ("all whitespace", lambda s: "".join(s.split()), True, True),
)


def _fuzzy(lines: list[str], search: list[str], key: Callable[[str], str],
           skip_blank: bool) -> list[tuple[int, int]]:
    """(first, end) line ranges of ``lines`` that match ``search`` under one whitespace rule."""
    target = [key(s) for s in search]
    if skip_blank:
        target = [t for t in target if t]
    while target and not target[-1]:
        target.pop()
    while target and not target[0]:
        target.pop(0)
    if not target:
        return []
    keyed = [(i, key(s)) for i, s in enumerate(lines)]
    if skip_blank:
        keyed = [(i, k) for i, k in keyed if k]
    ks = [k for _, k in keyed]
    m = len(target)
    return [(keyed[j][0], keyed[j + m - 1][0] + 1) for j in range(len(ks) - m + 1) if ks[j:j + m] == target]


def _indent(s: str) -> str:
    return s[: len(s) - len(s.lstrip())]


def closest_lines(text: str, search: str, context: int = 2, limit: int = 30) -> str:
    """The lines of ``text`` most like ``search`` (difflib), numbered, to show back to the model."""
    lines = text.split("\n")
    want = [s.strip() for s in search.strip("\n").split("\n")]
    m = max(1, len(want))
    if not any(s.strip() for s in lines):
        return "(the file is empty)"
    best, at = -1.0, 0
    joined = "\n".join(want)
    for i in range(max(1, len(lines) - m + 1)):
        window = "\n".join(s.strip() for s in lines[i:i + m])
        sm = difflib.SequenceMatcher(None, window, joined, autojunk=False)
        if sm.real_quick_ratio() <= best or sm.quick_ratio() <= best:
            continue
        r = sm.ratio()
        if r > best:
            best, at = r, i
    lo, hi = max(0, at - context), min(len(lines), at + m + context)
    shown = lines[lo:hi][:limit]
    width = len(str(hi))
    return "\n".join(f"{str(lo + k + 1).rjust(width)}| {s}" for k, s in enumerate(shown))


def _numbered_hits(text: str, starts: list[int], n: int) -> str:
    lines = text.split("\n")
    out = []
    for first in starts[:3]:
        seg = lines[first:first + max(1, n)]
        out.append("\n".join(f"{first + k + 1}| {s}" for k, s in enumerate(seg[:6])))
    return "\n---\n".join(out)


def apply_block(text: str, block: Block) -> str:
    """Apply one block to a file's text; raise :class:`EditError` when it does not apply.

    Line endings do not matter: a CRLF file is matched as LF and written back as CRLF.
    """
    if "\r\n" in text:
        out = apply_block(text.replace("\r\n", "\n"),
                          Block(block.path, block.search.replace("\r\n", "\n"),
                                block.replace.replace("\r\n", "\n")))
        return out.replace("\n", "\r\n")
    search_text = block.search.replace("\r\n", "\n")
    replace_text = block.replace.replace("\r\n", "\n")
    if not search_text.strip():
        if not text:
            return replace_text + ("\n" if not replace_text.endswith("\n") else "")
        return text + ("" if text.endswith("\n") else "\n") + replace_text + "\n"
    hits = _find(text, search_text)
    if len(hits) > 1:
        starts = [text.count("\n", 0, a) for a, _ in hits]
        raise EditError(f"{block.path}: the SEARCH text occurs {len(hits)} times (at lines "
                        f"{', '.join(str(s + 1) for s in starts[:6])}); include more surrounding lines "
                        "so that it matches exactly once. The places it matches:\n"
                        + _numbered_hits(text, starts, search_text.count("\n") + 1))
    if hits:
        start, end = hits[0]
        return text[:start] + replace_text + text[end:]
    lines = text.split("\n")
    search_lines = search_text.split("\n")
    for name, key, skip_blank, reindent in _LEVELS:
        spans = _fuzzy(lines, search_lines, key, skip_blank)
        if len(spans) > 1:
            raise EditError(f"{block.path}: the SEARCH text matches {len(spans)} places when {name} is "
                            f"ignored (at lines {', '.join(str(a + 1) for a, _ in spans[:6])}); include more "
                            "surrounding lines so that it matches exactly once. The places it matches:\n"
                            + _numbered_hits(text, [a for a, _ in spans], spans[0][1] - spans[0][0]))
        if len(spans) == 1:
            first, end = spans[0]
            new_lines = replace_text.split("\n")
            if reindent:
                core = [s for s in search_lines if s.strip()]
                have, want = _indent(core[0]), _indent(lines[first])
                if have != want:
                    new_lines = [_reindent(s, have, want) for s in new_lines]
            return "\n".join(lines[:first] + new_lines + lines[end:])
    first_line = search_text.strip().splitlines()[0][:120]
    raise EditError(f"{block.path}: the SEARCH text was not found (first line: {first_line!r}). A SEARCH "
                    "section must copy current lines of the file exactly. The closest lines of "
                    f"{block.path} are:\n{closest_lines(text, search_text)}")


def unique_lines(files: dict[str, str], limit: int = 600) -> list[str] | None:
    """The lines that occur exactly once in their file (blank ones left out), in file order; None
    when there are more than ``limit`` (a schema ``enum`` that large gets slow to compile).

    Lines with a double quote or a backslash are left out too: llama-cpp-python's schema-to-grammar
    converter (0.3.x) mis-escapes them in an ``enum``, and its server then crashes.
    """
    out: dict[str, None] = {}
    for path in sorted(files):
        lines = files[path].replace("\r\n", "\n").split("\n")
        counts: dict[str, int] = {}
        for ln in lines:
            counts[ln] = counts.get(ln, 0) + 1
        for ln in lines:
            if ln.strip() and counts[ln] == 1 and len(ln) <= 500 and '"' not in ln and "\\" not in ln:
                out[ln] = None
    return list(out) if len(out) <= limit else None


def edits_schema(files: list[str], old_lines: list[str] | None = None) -> dict[str, Any]:
    """The JSON schema of a structured answer; ``file`` is one of ``files`` when any are given.

    With ``old_lines`` (see :func:`unique_lines`), ``old`` must be one of them: under a server's
    grammar-constrained decoding (llama.cpp, vLLM) even a tiny model can then only name a line
    that exists, exactly once -- every edit applies (one line replaced by ``new``, which may be
    several lines).
    """
    file: dict[str, Any] = {"type": "string"}
    if files:
        file["enum"] = sorted(files)
    old: dict[str, Any] = {"type": "string"}
    if old_lines:
        old["enum"] = list(old_lines)
    return {
        "type": "object",
        "properties": {
            "rationale": {"type": "string"},
            "edits": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
                "type": "object",
                "properties": {"file": file, "old": old, "new": {"type": "string"}},
                "required": ["file", "old", "new"], "additionalProperties": False,
            }},
        },
        "required": ["rationale", "edits"], "additionalProperties": False,
    }


EDITS_SCHEMA = edits_schema([])


def edits_from_json(text: str, known_files: list[str] | None = None) -> ParsedEdits:
    """A structured answer (see :data:`EDITS_SCHEMA`) as :class:`ParsedEdits`.

    Tolerates a Markdown fence around the JSON and prose before it. Raises :class:`EditError`
    with the reason when the text is not such an object.
    """
    raw = text.strip()
    m = re.search(r"```(?:json)?\s*(\{.*\})\s*```", raw, re.S)
    if m:
        raw = m.group(1)
    elif "{" not in raw:
        raise EditError("the answer has no JSON object")
    elif not raw.startswith("{"):
        raw = raw[raw.index("{"):]
    try:
        data = json.loads(raw, strict=False)  # raw newlines and tabs inside strings: small models write them
    except json.JSONDecodeError as e:
        cut = " (the answer was cut off: raise max_tokens, or ask for a smaller change)" \
            if e.pos >= len(raw.rstrip()) - 1 else ""
        raise EditError(f"the answer is not valid JSON: {e.msg} at character {e.pos}{cut}") from None
    except (ValueError, RecursionError) as e:
        raise EditError(f"the answer is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(data, dict):
        raise EditError("the answer is not a JSON object with \"rationale\" and \"edits\"")
    edits = data.get("edits")
    if not isinstance(edits, list) or not edits:
        raise EditError("the JSON answer has no \"edits\" list: give at least one {\"file\", \"old\", "
                        "\"new\"} edit")
    blocks: list[Block] = []
    for k, item in enumerate(edits, 1):
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in ("file", "old", "new")):
            raise EditError(f"edit {k} must be an object with string fields \"file\", \"old\" and \"new\"")
        path = item["file"].strip()
        if known_files and path not in known_files:
            path = _filename(path, known_files) or path
        blocks.append(Block(path, item["old"], item["new"]))
    rationale = str(data.get("rationale") or "").strip()
    return ParsedEdits(rationale=rationale[:4000], blocks=tuple(blocks))


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
