"""The search researcher scans the editable files for constants once per incumbent, not per proposal."""

from __future__ import annotations

from typing import Any

import pytest
from tests.test_search import context, experiment

from nightlab import space
from nightlab.researchers import search
from nightlab.researchers.search import Options, SearchResearcher
from nightlab.types import Status

LAB = "X = 0.1     # nightlab: 0..1\nY = 0.5     # nightlab: 0..1\n"


def test_proposals_on_the_same_files_reuse_the_scan_and_new_files_are_scanned(monkeypatch: pytest.MonkeyPatch):
    scans: list[dict[str, str]] = []

    def counted(spec: Any, files: dict[str, str], lab_dir: Any) -> space.Space:
        scans.append(dict(files))
        return space.search_space(spec, files, lab_dir)

    monkeypatch.setattr(search, "search_space", counted)
    r = SearchResearcher(Options(seed=0))
    files = {"train.py": LAB}
    history = (experiment(0, Status.KEEP, 1.0),)
    first = r.propose(context(files, 1, history, 1.0))
    second = r.propose(context(files, 2, history, 1.0))
    assert len(scans) == 1  # the same incumbent's files: scanned once
    assert first.params != second.params
    kept = {"train.py": first.files["train.py"]}  # a keep: the incumbent's files change
    third = r.propose(context(kept, 3, history, 0.5))
    assert len(scans) == 2 and scans[-1] == kept
    # the proposal is written against the new incumbent's text, not the old one's
    assert third.files and all(line in kept["train.py"] or line.startswith(("X =", "Y ="))
                               for line in third.files["train.py"].splitlines())
