"""The lab against a session: uncommitted files, and what changed since the session started.

Two questions asked when ``nightlab run`` opens a session (README, "Resume after a fix"):

- :func:`dirty_files`: which editable, protected or spec files have uncommitted changes. A run
  uses commits, never the working tree, so such changes would be silently half-used; the
  engine refuses them unless ``--allow-dirty`` snapshots the working tree into a commit.
- :func:`compare`: on ``--resume``, what changed between the session's stored spec and base
  commit and the lab's current ones. A change is *harmless* when it cannot alter what a run
  measures (stop rules, the researcher, acceptance, autonomy, executor, audit, the candidate
  permissions), *material* otherwise (the metric, the run/setup/evaluate/holdout commands, the
  files, the sandbox, the code at HEAD).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from nightlab.guard import Guard
from nightlab.spec import PROGRAM_FILE, SPEC_FILE, Spec, matches
from nightlab.workspace import Workspace

HARMLESS_SECTIONS = frozenset({"lab", "stop", "researcher", "accept", "autonomy", "executor", "audit", "permissions",
                               "pool"})
MATERIAL_KEYS = frozenset({"permissions.run_network"})  # run network changes what a run can do


@dataclass(frozen=True)
class SpecChange:
    key: str  # "section.key"
    old: Any
    new: Any

    @property
    def material(self) -> bool:
        return self.key.split(".", 1)[0] not in HARMLESS_SECTIONS or self.key in MATERIAL_KEYS

    def __str__(self) -> str:
        section, _, key = self.key.partition(".")
        return f"[{section}] {key}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class Changes:
    """The difference between a session as stored and the lab now."""

    spec: tuple[SpecChange, ...]
    old_base: str
    new_base: str
    files: tuple[str, ...]  # lab-relative (or repo-relative outside the lab) paths that differ
    on_session_branch: bool  # the new commit lies between the session's base and its incumbent

    @property
    def head_moved(self) -> bool:
        """The code differs (not just the commit id), and not because HEAD is on the session's branch."""
        return bool(self.files) and not self.on_session_branch

    @property
    def code_moved(self) -> bool:
        """HEAD moved and more than the spec file and program.md changed with it."""
        return self.head_moved and not set(self.files) <= {SPEC_FILE, PROGRAM_FILE}

    @property
    def material(self) -> list[str]:
        """Material changes, one line each (empty: the session may continue as it is)."""
        out = [str(c) for c in self.spec if c.material]
        if self.code_moved:
            out.append(f"HEAD moved from {self.old_base[:10]} to {self.new_base[:10]} (changed: {_files(self.files)})")
        return out

    @property
    def harmless(self) -> list[str]:
        out = [str(c) for c in self.spec if not c.material]
        if self.head_moved and not self.code_moved:
            out.append(f"HEAD moved from {self.old_base[:10]} to {self.new_base[:10]} (changed: {_files(self.files)})")
        return out

    @property
    def summary(self) -> str:
        return "; ".join(self.material + self.harmless) or "nothing"


def _files(files: tuple[str, ...], n: int = 8) -> str:
    return ", ".join(files[:n]) + (f" (+{len(files) - n} more)" if len(files) > n else "")


def _show(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:59] + "…"


def _flat(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, body in spec.items():
        if isinstance(body, dict):
            for key, value in body.items():
                out[f"{section}.{key}"] = value
        else:
            out[section] = body
    return out


def spec_changes(old_json: str, new: dict[str, Any]) -> tuple[SpecChange, ...]:
    """Key by key, what differs between a stored spec (its JSON) and the current one (a dump)."""
    try:
        old = json.loads(old_json) if old_json else {}
    except ValueError:
        old = {}
    a, b = _flat(old if isinstance(old, dict) else {}), _flat(new)
    # a key that the stored spec lacks (an older nightlab wrote it) and that is now at its default is no
    # change: a new key's default keeps the behaviour that nightlab had before it existed
    defaults = _defaults()
    return tuple(SpecChange(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
                 and not (k not in a and k in defaults and b.get(k) == defaults[k]))


def _defaults() -> dict[str, Any]:
    """``section.key`` -> the default of every spec key that has one, as the spec's JSON dump writes it."""
    out: dict[str, Any] = {}
    for section, field in Spec.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for key, f in model.model_fields.items():
            if not f.is_required():
                out[f"{section}.{key}"] = to_jsonable_python(f.get_default(call_default_factory=True))
    return out


def compare(ws: Workspace, *, spec_json: str, spec_now: dict[str, Any], base: str, incumbent: str,
            commit: str) -> Changes:
    """What differs between a session (stored spec, base, incumbent) and the lab (spec now, ``commit``)."""
    files: tuple[str, ...] = ()
    on_branch = False
    if commit != base:
        files = tuple(ws.lab_path(p) or p for p in ws.changed_between(base, commit))
        on_branch = ws.is_ancestor(base, commit) and ws.is_ancestor(commit, incumbent)
    return Changes(spec=spec_changes(spec_json, spec_now), old_base=base, new_base=commit, files=files,
                   on_session_branch=on_branch)


def dirty_files(ws: Workspace, guard: Guard) -> list[str]:
    """Lab-relative editable, protected or spec files whose working copy differs from HEAD."""
    out = []
    for path in ws.uncommitted():
        lab_path = ws.lab_path(path)
        if lab_path is not None and (matches(lab_path, guard.editable) or matches(lab_path, guard.protected)):
            out.append(lab_path)
    return out
