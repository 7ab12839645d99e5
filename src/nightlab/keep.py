"""Keep semantics for stale candidates: a measured tree is never lost.

With several slots, or with pipelining, a candidate is often measured on a parent that is no
longer the incumbent when its result arrives (it is *stale*). The rules (README, "Concurrency
semantics"):

1. What was measured is the candidate's *tree*. The policy judges the measurement against the
   *current* incumbent (its metric, its samples; ``repeat`` re-runs the measured tree). If it
   wins, exactly the measured tree is kept, as a new commit whose parent is the current
   incumbent (``git commit-tree``), so the branch still only fast-forwards.
2. Its *change* (parent -> measured tree) may also be worth combining with what the incumbent
   gained meanwhile. When it applies cleanly on the incumbent it replaced (a three-way merge, or,
   for a candidate with ``params`` — the search researcher's full assignment of the constants —
   by rewriting those values), and the result is a tree nobody measured, that combination is
   queued as its own candidate (:class:`Requeued`). It is queued after a stale keep, and after a
   stale discard whose measurement beat its own parent.
3. A combination that conflicts is dropped before it gets a ledger row: no experiment is
   created for something that never ran.

Nothing here decides keep or discard; this module only moves trees around with git plumbing.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

from nightlab.constants import find_constants, rewrite
from nightlab.workspace import _GIT_CFG, Workspace


@dataclass(frozen=True)
class Requeued:
    """A combination waiting for a slot: the tree of ``tip``, relative to ``tip``'s parent.

    At proposal time it is replayed onto the incumbent of that time (:func:`replay`).
    """

    source_idx: int  # the stale experiment whose change it carries
    rationale: str
    tip: str  # a commit holding the combined tree; its parent is the incumbent it was made on
    params: dict[str, Any] = field(default_factory=dict)
    key: int = 0  # its row in the ledger's requeue table (requeue.py); 0: not persisted


def tree_of(ws: Workspace, commit: str) -> str:
    return ws.git("rev-parse", f"{commit}^{{tree}}").strip()


def commit_tree(ws: Workspace, tree: str, parent: str, message: str) -> str:
    """A commit of ``tree`` on top of ``parent`` (no worktree, no hooks)."""
    return ws.git("commit-tree", tree, "-p", parent, "-m", message).strip()


def merged_tree(ws: Workspace, onto: str, tip: str) -> str | None:
    """The three-way merge of ``tip`` into ``onto`` (base: their merge base); None on a conflict."""
    proc = subprocess.run(["git", *_GIT_CFG, "merge-tree", "--write-tree", "--no-messages", onto, tip],
                          cwd=ws.lab_dir, env=ws._env, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    out = proc.stdout.strip().splitlines()
    return out[0].strip() if out else None


def changed_paths(ws: Workspace, a: str, b: str) -> list[str]:
    """Lab-relative paths that differ between two tree-ishes."""
    out = ws.git("diff-tree", "-r", "--name-only", "--no-renames", "-z", a, b)
    return [lp for p in out.split("\0") if p and (lp := ws.lab_path(p)) is not None]


def _params_tree(ws: Workspace, onto: str, paths: list[str], params: dict[str, Any]) -> str | None:
    """``onto``'s tree with the constants of ``params`` rewritten in ``paths``; None when they do not fit."""
    texts: dict[str, str] = {}
    used: set[str] = set()
    for path in paths:
        if not path.endswith(".py"):
            return None  # the change is not only constants: let the merge decide
        try:
            text = ws.read_file(onto, path).decode("utf-8")
        except Exception:
            return None
        names = {c.name for c in find_constants(text, path)}
        values: dict[str, int | float] = {}
        for key, value in params.items():
            file, _, name = key.rpartition(":")
            if (not file or file == path) and name in names:
                values[name] = value
                used.add(key)
        try:
            texts[path] = rewrite(text, values) if values else text
        except Exception:  # a value the rewriter cannot write: fall back to the merge
            return None
    if not used:
        return None
    return _write_tree(ws, onto, texts)


def _write_tree(ws: Workspace, base: str, texts: dict[str, str]) -> str:
    """``base``'s tree with the lab-relative files of ``texts`` replaced (a private index file)."""
    import os
    import tempfile

    fd, index = tempfile.mkstemp(prefix="nightlab-index-")
    os.close(fd)
    os.unlink(index)
    env = {**ws._env, "GIT_INDEX_FILE": index}
    try:
        def git(*args: str, input: str | None = None) -> str:
            proc = subprocess.run(["git", *_GIT_CFG, *args], cwd=ws.lab_dir, env=env, input=input,
                                  capture_output=True, text=True, check=True)
            return proc.stdout

        git("read-tree", base)
        for path, text in texts.items():
            blob = git("hash-object", "-w", "--stdin", input=text).strip()
            mode = "100644"
            ls = git("ls-tree", base, "--", ws.repo_path(path)).split()
            if ls and ls[0] in ("100644", "100755"):
                mode = ls[0]
            git("update-index", "--add", "--cacheinfo", f"{mode},{blob},{ws.repo_path(path)}")
        return git("write-tree").strip()
    finally:
        if os.path.exists(index):
            os.unlink(index)


def combination(ws: Workspace, parent: str, measured: str, onto: str, params: dict[str, Any]) -> str | None:
    """The tree of the change ``parent -> measured`` applied on ``onto``, or None when it conflicts
    or adds nothing (equal to ``onto``'s or to the measured tree)."""
    paths = changed_paths(ws, parent, measured)
    tree = _params_tree(ws, onto, paths, params) if params else None
    if tree is None:
        tree = merged_tree(ws, onto, measured)
    if tree is None or tree in (tree_of(ws, onto), tree_of(ws, measured)):
        return None
    return tree


def replay(ws: Workspace, item: Requeued, incumbent: str) -> dict[str, str] | None:
    """The files (lab-relative path -> text) that turn ``incumbent`` into ``item``'s combination.

    When the incumbent moved since the item was queued, the combination is merged onto it; None
    when that conflicts, deletes a file, or changes nothing (the caller drops the item, unrecorded).
    """
    base = ws.git("rev-parse", f"{item.tip}^").strip()
    tree: str | None = tree_of(ws, item.tip)
    if base != incumbent:
        tree = merged_tree(ws, incumbent, item.tip)
    if tree is None or tree == tree_of(ws, incumbent):
        return None
    files: dict[str, str] = {}
    for path in changed_paths(ws, incumbent, tree):
        try:
            files[path] = ws.read_file(tree, path).decode("utf-8")
        except Exception:  # deleted or binary: not expressible as a files candidate
            return None
    return files or None
