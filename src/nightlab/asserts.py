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
for the current values (so it is a real constraint, not a runtime check). One exception: in
``X % (K * U) == 0`` a factor ``U`` that cannot be read (it comes from a call, or a module that is
not there) is taken as it is now, which the working baseline shows to be fine: a proposal is
kept when ``X / K`` stays a whole multiple of its current value (conservative: it may refuse a
point that would have worked, never allows one that breaks). Anything else it cannot evaluate
(calls, attributes, unknown names) is left alone: the run will tell.
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
    # ``X % (K * U) == 0`` with a factor U nightlab cannot read: (X, the known factors K, X and K now).
    # Kept when X/K stays a whole multiple of its current value, which keeps U's divisibility.
    relative: tuple[ast.expr, tuple[ast.expr, ...], int, int] | None = field(default=None, repr=False,
                                                                             compare=False)


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
            env = _Env(info.fixed, info.aliases, mine)
            try:
                if c.relative is None:
                    ok = bool(evaluate(c.test, env))
                else:
                    x_node, known, x0, k0 = c.relative
                    x, k = evaluate(x_node, env), _product(known, env)
                    ok = isinstance(x, int) and isinstance(k, int) and x * k != 0 and (x * k0) % (x0 * k) == 0
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
            modulo = frozenset(_under_mod(test, info.aliases) & names)
            try:
                holds = evaluate(test, _Env(info.fixed, info.aliases, {}))
            except Unknown:
                relative = _relative(test, info, names)
                if relative is not None:
                    checks.append(Check(path, line, src, test, frozenset(uses), modulo, relative))
                continue
            if holds is True:
                checks.append(Check(path, line, src, test, frozenset(uses), modulo))
    return Checks(checks, infos)


def _product(nodes: tuple[ast.expr, ...], env: Mapping[str, Any]) -> Any:
    out: Any = 1
    for n in nodes:
        out = out * evaluate(n, env)
    return out


def _factors(node: ast.expr, aliases: dict[str, ast.expr], depth: int = 0) -> list[ast.expr]:
    if isinstance(node, ast.Name) and node.id in aliases and depth < 8:
        return _factors(aliases[node.id], aliases, depth + 1)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _factors(node.left, aliases, depth) + _factors(node.right, aliases, depth)
    return [node]


def _relative(test: ast.expr, info: _FileInfo, names: set[str]
              ) -> tuple[ast.expr, tuple[ast.expr, ...], int, int] | None:
    """``X % Y == 0`` where Y has a factor that cannot be read (imported from code nightlab cannot
    evaluate): the known part, so a change can be checked against the current, working values."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        mod = test.operand
    elif (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
          and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == 0):
        mod = test.left
    else:
        return None
    if not (isinstance(mod, ast.BinOp) and isinstance(mod.op, ast.Mod)):
        return None
    env = _Env(info.fixed, info.aliases, {})
    known: list[ast.expr] = []
    unknown = False
    for f in _factors(mod.right, info.aliases):
        try:
            evaluate(f, env)
            known.append(f)
        except Unknown:
            if _depends(f, info.aliases) & names:
                return None  # an unreadable factor that moves with the search: cannot reason about it
            unknown = True
    try:
        x0, k0 = evaluate(mod.left, env), _product(tuple(known), env)
    except Unknown:
        return None
    if not unknown or not isinstance(x0, int) or not isinstance(k0, int) or x0 * k0 == 0:
        return None
    return mod.left, tuple(known), x0, k0
