"""Constraints visible in the code: ``assert`` statements over the searched constants.

autoresearch's ``train.py`` says::

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0

A search that proposes ``DEVICE_BATCH_SIZE = 384`` wastes a run on an AssertionError. This
module finds such asserts (anywhere in the file: module level, ``if __name__`` blocks,
functions) and evaluates them for a proposed assignment *before* it is run, with literal
arithmetic only (:func:`nightlab.constants.evaluate`, never ``eval``). Names resolve to:
the proposed values, the file's other module-level constants, single assignments anywhere in
the file (``tokens_per_fwdbwd`` above), and ``from module import NAME`` of a module-level
constant of a sibling ``module.py`` (``MAX_SEQ_LEN`` from ``prepare.py``).

An assert is used only when it depends on a searched constant, can be evaluated, and holds
for the current values (so it is a real constraint, not a runtime check). Anything it cannot
evaluate (calls, attributes, unknown names) is left alone: the run will tell.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from nightlab.constants import Constant, Unknown, Value, _leaves, evaluate


@dataclass(frozen=True)
class Check:
    file: str
    line: int
    text: str  # the assert as written, e.g. "assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0"
    test: ast.expr = field(repr=False, compare=False)
    uses: frozenset[str] = frozenset()  # searched constant names (of ``file``) it depends on
    modulo: frozenset[str] = frozenset()  # those that appear under a ``%`` (divisibility)


class _Env(Mapping[str, Any]):
    """Lazy names of one file: proposed values, module constants, aliases, imported constants."""

    def __init__(self, fixed: dict[str, Any], aliases: dict[str, ast.expr], values: Mapping[str, Value]) -> None:
        self.fixed, self.aliases, self.proposed = fixed, aliases, values
        self._busy: set[str] = set()

    def __getitem__(self, name: str) -> Any:
        if name in self.proposed:
            return self.proposed[name]
        if name in self.fixed:
            return self.fixed[name]
        if name in self.aliases and name not in self._busy:
            self._busy.add(name)
            try:
                return evaluate(self.aliases[name], self)
            except Unknown:
                raise KeyError(name) from None
            finally:
                self._busy.discard(name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        try:
            self[str(name)]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter({*self.proposed, *self.fixed, *self.aliases})

    def __len__(self) -> int:
        return len({*self.proposed, *self.fixed, *self.aliases})


@dataclass
class _FileInfo:
    fixed: dict[str, Any]
    aliases: dict[str, ast.expr]
    checks: list[tuple[int, str, ast.expr]]


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _info(source: str, read_module: Callable[[str], str | None]) -> _FileInfo | None:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    fixed: dict[str, Any] = {lf.name: lf.value for lf in _leaves(source) if lf.name == lf.site}
    counts: dict[str, int] = {}
    aliases: dict[str, ast.expr] = {}
    checks: list[tuple[int, str, ast.expr]] = []
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            counts[name] = counts.get(name, 0) + 1
            aliases[name] = node.value
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            text = read_module(node.module)
            if text is None:
                continue
            theirs = {lf.name: lf.value for lf in _leaves(text) if lf.name == lf.site}
            for alias in node.names:
                if alias.name in theirs:
                    fixed.setdefault(alias.asname or alias.name, theirs[alias.name])
        elif isinstance(node, ast.Assert):
            text = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else "assert"
            checks.append((node.lineno, text, node.test))
    aliases = {k: v for k, v in aliases.items() if counts[k] == 1 and k not in fixed}
    return _FileInfo(fixed, aliases, checks)


def _depends(node: ast.AST, aliases: dict[str, ast.expr], seen: set[str] | None = None) -> set[str]:
    """Names ``node`` reads, through aliases."""
    seen = set() if seen is None else seen
    out: set[str] = set()
    for name in _names(node):
        out.add(name)
        if name in aliases and name not in seen:
            seen.add(name)
            out |= _depends(aliases[name], aliases, seen)
    return out


def _under_mod(node: ast.AST, aliases: dict[str, ast.expr]) -> set[str]:
    out: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Mod):
            out |= _depends(sub, aliases)
    return out


class Checks:
    """The usable asserts of a set of files, for a set of searched constants."""

    def __init__(self, checks: list[Check], infos: dict[str, _FileInfo]) -> None:
        self.checks = checks
        self._infos = infos

    def __bool__(self) -> bool:
        return bool(self.checks)

    def violations(self, values: Mapping[tuple[str, str], Value]) -> list[str]:
        """The asserts that ``values`` ((file, constant name) -> proposed value) would break."""
        out: list[str] = []
        for c in self.checks:
            info = self._infos[c.file]
            mine = {name: v for (file, name), v in values.items() if file == c.file and "[" not in name}
            try:
                ok = evaluate(c.test, _Env(info.fixed, info.aliases, mine))
            except Unknown:
                continue
            if not ok:
                out.append(f"{c.file}:{c.line}: {c.text}")
        return out

    def modulo_names(self) -> set[tuple[str, str]]:
        """(file, name) of the searched constants that take part in a divisibility assert."""
        return {(c.file, n) for c in self.checks for n in c.modulo}


def find_checks(files: Mapping[str, str], params: list[Constant],
                read_module: Callable[[str], str | None] = lambda name: None) -> Checks:
    """The asserts of ``files`` that constrain ``params`` and hold for the current values."""
    checks: list[Check] = []
    infos: dict[str, _FileInfo] = {}
    for path, text in sorted(files.items()):
        names = {c.name for c in params if c.file == path and "[" not in c.name}
        if not path.endswith(".py") or not names:
            continue
        info = _info(text, read_module)
        if info is None:
            continue
        infos[path] = info
        for line, src, test in info.checks:
            uses = _depends(test, info.aliases) & names
            if not uses:
                continue
            try:
                holds = evaluate(test, _Env(info.fixed, info.aliases, {}))
            except Unknown:
                continue
            if holds is True:
                checks.append(Check(path, line, src, test, frozenset(uses),
                                    frozenset(_under_mod(test, info.aliases) & names)))
    return Checks(checks, infos)
