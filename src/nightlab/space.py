"""The search space of a lab: the constants of its editable files, ``[researcher.space]``, the asserts.

One entry point for every reader: the ``search`` and ``local`` researchers
(:func:`search_space`), ``nightlab space`` and ``nightlab init`` (:func:`lab_space`), and the
engine, which validates the whole space at session start, before the baseline runs
(:func:`validate`). Parameter keys are ``NAME`` (``NAME[i]`` for a tuple element) when one
file has searched constants and ``file:NAME`` when several do.

``[researcher.space]`` keys are ``NAME``, ``NAME[i]`` or ``file:NAME``; a key that names no
constant of the editable ``.py`` files is a :class:`~nightlab.errors.SpecError` (exit 2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nightlab.asserts import Checks, find_checks
from nightlab.constants import Constant, Entry, Value, scan
from nightlab.errors import SpecError

if TYPE_CHECKING:
    from nightlab.spec import Spec

#: researchers that read the space (the others edit files freely)
READERS = ("search", "local")


@dataclass(frozen=True)
class Space:
    params: dict[str, Constant]  # key -> searched constant
    entries: tuple[Entry, ...]  # every constant found, searched or not
    checks: Checks
    qualified: bool = False  # several files have searched constants: keys are file:NAME

    def violations(self, values: Mapping[str, Value]) -> list[str]:
        """Asserts that the assignment ``values`` (param key -> value) would break."""
        by_const = {(c.file, c.name): c.value for c in self.params.values()}
        for key, v in values.items():
            c = self.params.get(key)
            if c is not None:
                by_const[(c.file, c.name)] = v
        return self.checks.violations(by_const)

    def key(self, c: Constant | Entry) -> str:
        return f"{c.file}:{c.name}" if self.qualified else c.name


def _read_module(lab_dir: Path | None) -> Callable[[str], str | None]:
    def read(module: str) -> str | None:
        if lab_dir is None or not module.replace(".", "").replace("_", "").isalnum():
            return None
        path = lab_dir / (module.replace(".", "/") + ".py")
        try:
            return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
        except OSError:
            return None

    return read


def _pow2_choices(c: Constant) -> tuple[int, ...]:
    v = int(c.value) if not isinstance(c.value, str) else 0
    if c.kind != "int" or c.choices or c.source != "default" or v < 2 or v & (v - 1):
        return ()
    e = int(math.log2(v))
    return tuple(2**k for k in range(max(0, e - 2), e + 3))


def search_space(spec: Spec, files: Mapping[str, str], lab_dir: Path | None = None) -> Space:
    """The space of ``files`` (lab-relative path -> text) under ``spec``; raises SpecError."""
    overrides = dict(spec.researcher.space)
    py = {p: t for p, t in sorted(files.items()) if p.endswith(".py")}
    entries: list[Entry] = []
    for path, text in py.items():
        mine = {k.split(":", 1)[1] if ":" in k else k: v for k, v in overrides.items()
                if ":" not in k or k.split(":", 1)[0] == path}
        entries += scan(text, path, mine)
    known = {e.name for e in entries} | {e.name.split("[")[0] for e in entries}
    known |= {f"{e.file}:{n}" for e in entries for n in (e.name, e.name.split("[")[0])}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        names = ", ".join(dict.fromkeys(e.name for e in entries)) or "(none)"
        raise SpecError(
            f"nightlab.toml: [researcher.space] {unknown[0]!r} is not a constant of the editable files "
            f"({', '.join(py) or 'no .py file'})",
            f"use one of the names found: {names} (module-level assignments of a number, tuple or string; "
            "`nightlab space` lists them), or remove the entry")
    params = [e.constant for e in entries if e.constant is not None]
    checks = find_checks(py, params, _read_module(lab_dir))
    narrowed = checks.modulo_names()
    params = [replace(c, choices=ch, low=float(min(ch)), high=float(max(ch)), log=False)
              if (c.file, c.name) in narrowed and (ch := _pow2_choices(c)) else c for c in params]
    space = Space({}, tuple(entries), checks, qualified=len({c.file for c in params}) > 1)
    return replace(space, params={space.key(c): c for c in params})


def editable_files(spec: Spec, lab_dir: Path) -> dict[str, str]:
    from nightlab.spec import match_files

    out: dict[str, str] = {}
    for rel in match_files(lab_dir, spec.files.editable):
        if rel.endswith(".py"):
            try:
                out[rel] = (lab_dir / rel).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
    return out


def lab_space(spec: Spec, lab_dir: Path, files: Mapping[str, str] | None = None) -> Space:
    """The space of the lab's editable files as they are on disk (or as given)."""
    return search_space(spec, editable_files(spec, lab_dir) if files is None else files, lab_dir)


def validate(spec: Spec, lab_dir: Path, files: Mapping[str, str] | None = None) -> Space | None:
    """Check the whole space at session start: every ``# nightlab:`` comment and every
    ``[researcher.space]`` entry. Raises SpecError; None when the researcher reads no space."""
    if spec.researcher.kind not in READERS and not spec.researcher.space:
        return None
    return lab_space(spec, lab_dir, files)


# --------------------------------------------------------------------------- display


def _fmt(v: Value, kind: str) -> str:
    from nightlab.constants import format_value

    try:
        return format_value(v, kind)
    except ValueError:
        return str(v)


def rows(space: Space) -> list[dict[str, Any]]:
    """One dict per constant found: key, file, line, value, searched, range, source/reason."""
    out: list[dict[str, Any]] = []
    for e in space.entries:
        c = e.constant
        key = space.key(e)
        if c is not None:
            c = space.params.get(key, c)
        out.append({
            "name": key, "file": e.file, "line": e.line, "value": e.value, "text": e.text, "kind": e.kind,
            "searched": c is not None, "range": c.describe() if c else "",
            "low": c.low if c and not c.choices else None, "high": c.high if c and not c.choices else None,
            "log": bool(c and c.log), "choices": list(c.choices) if c else [],
            "source": c.source if c else "", "reason": e.reason,
        })
    return out


def table(space: Space) -> str:
    """A plain-text table of the space, searched constants first."""
    rs = rows(space)
    if not rs:
        return "no constants found in the editable .py files"
    head = ("name", "value", "searched over", "from")
    body = [(r["name"], r["text"], r["range"] or "-", r["source"] or f"not searched: {r['reason']}")
            for r in sorted(rs, key=lambda r: not r["searched"])]
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(3)]
    lines = ["  ".join(str(x[i]).ljust(widths[i]) for i in range(3)) + "  " + str(x[3]) for x in (head, *body)]
    checks = [f"{c.file}:{c.line}: {c.text}" for c in space.checks.checks]
    if checks:
        lines += ["", "constraints respected (candidates that break them are never run):"]
        lines += [f"  {c}" for c in checks]
    return "\n".join(lines)


def to_json(space: Space) -> str:
    return json.dumps({"params": rows(space),
                       "constraints": [{"file": c.file, "line": c.line, "text": c.text}
                                       for c in space.checks.checks]}, indent=2)


def toml_block(space: Space, active: bool = False) -> str:
    """An editable ``[researcher.space]`` block; every line commented unless ``active`` (then the
    searched constants are written as entries and only the others are commented)."""
    lines = ["[researcher.space]    # the search space: `nightlab space` shows it; these win over "
             "# nightlab: comments"]
    for r in rows(space):
        key = r["name"]
        qkey = key if key.replace("_", "").isalnum() else json.dumps(key)
        if r["searched"]:
            if r["choices"]:
                val = "{ choices = [" + ", ".join(json.dumps(c) for c in r["choices"]) + "] }"
            else:
                lo, hi = (_fmt(r["low"], r["kind"]), _fmt(r["high"], r["kind"]))
                val = f"{{ range = [{lo}, {hi}]" + (", log = true" if r["log"] else "") + " }"
            lines.append(f"{'' if active else '# '}{qkey} = {val}    # now {r['text']}")
        else:
            lines.append(f'# {qkey} = "fixed"    # now {r["text"]}; not searched: {r["reason"]}')
    return "\n".join(lines) + "\n"
