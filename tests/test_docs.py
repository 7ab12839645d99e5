"""The README and docs carry figures and commands, never placeholders."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").glob("*/README.md"))]
PLACEHOLDER = re.compile(r"\b(?:[A-Z][A-Z0-9]*_)*TABLE\b|\bTODO\b|\bTBD\b|\bFIXME\b|\bXXX\b")


def test_no_placeholder_is_left_in_the_docs():
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in DOCS for n, line in enumerate(p.read_text().splitlines(), 1) if PLACEHOLDER.search(line)]
    assert not found, "placeholders left in the docs:\n" + "\n".join(found)


def test_the_placeholder_pattern_catches_what_it_should():
    for bad in ("OVERHEAD_TABLE", "see PARALLEL_TABLE below", "TODO: fill", "figures TBD"):
        assert PLACEHOLDER.search(bad), bad
    for good in ("| slots | exp/s |", "results.tsv", "a table of figures", "TODOS.md is not a word here"):
        assert not PLACEHOLDER.search(good), good
