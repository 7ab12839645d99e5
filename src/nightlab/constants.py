"""Tunable constants in Python source: find them, give each a search range, rewrite their values.

The one constant finder of nightlab: the ``search`` and ``local`` researchers, ``nightlab space``
and ``nightlab init`` all read the search space from here. A *constant* is a module-level
assignment to a single name (UPPER_CASE or lowercase, nanoGPT-style) of::

    LEARNING_RATE = 3e-4          # a number: float
    n_layer = 12                  # a number: int (lowercase names too)
    WARMUP = -0.5                 # a unary minus is part of the literal
    N_HEAD: int = 4               # annotated assignments too
    TOTAL_BATCH_SIZE = 2**19      # literal arithmetic (+ - * / // % **), evaluated without eval()
    ADAM_BETAS = (0.8, 0.95)      # a tuple: each number is its own parameter, ADAM_BETAS[0], ADAM_BETAS[1]
    WINDOW_PATTERN = "SSSL"       # a string: categorical, searched once it has choices

Skipped: bools, ``None``, calls, names, anything inside functions, classes or ``if``/``for``/
``with``/``try`` blocks, multi-target (``A = B = 1``) assignments. Names the script changes as it
runs (assigned in a loop, ``step += 1``, ``global``) are listed as variables, never searched.
When a name is assigned more than once at module level, the last assignment (the one in effect)
counts.

Names that describe the machine, the seed, files or the data are found but not searched unless
a ``# nightlab:`` comment or ``[researcher.space]`` names them (see :data:`EXCLUDED`): a
hardware figure (``H100_BF16_PEAK_FLOPS``, ``device``, ``dtype``), a seed (``SEED``,
``seed``), paths and logging (``out_dir``, ``eval_interval``), what defines the data or its
evaluation (``vocab_size``, ``dataset``, ``TIME_BUDGET``). ``DEVICE_BATCH_SIZE`` is a batch
size and is searched.

The search range comes from ``[researcher.space]`` in ``nightlab.toml`` (it wins), else from
a trailing comment on the assignment's line::

    LR = 3e-4        # nightlab: 1e-5..1e-2 log     float range, log-uniform
    DEPTH = 8        # nightlab: 2..16              int range (int constant), linear
    BATCH = 64       # nightlab: choices 32,64,128  one of the listed values
    PATTERN = "SSSL" # nightlab: choices SSSL,SSLL,L
    SEED = 42        # nightlab: fixed              never searched (``skip`` works too)

A comment that mentions ``nightlab:`` but is not one of these forms raises
:class:`~nightlab.errors.SpecError` naming the file, line, constant and the expected form, as
does a range that does not contain the constant's current value.

Without either the default range is (``v`` is the current value):

====================  ==========================================  ===========
constant              range                                       scale
====================  ==========================================  ===========
float ``v > 0``       ``[v/10, v*10]``                            log
fraction ``0<v<1``    ``[v/10, 1-(1-v)/10]`` (betas, dropout, …)  log
float ``v < 0``       ``[v*10, v/10]`` (stays negative)           linear
float ``v == 0``      ``[0.0, 1.0]`` (fractions: ``[0.0, 0.5]``)  linear
int ``v >= 1``        ``[max(1, v//4), max(v*4, v+3)]``           log if ``v >= 8``, else linear
int ``v == 0``        ``[0, 8]``                                  linear
int ``v <= -1``       the mirror of ``-v``'s range                linear
``B**E``              choices ``B**(E-2)`` … ``B**(E+2)``         categorical
string                not searched until choices are given
====================  ==========================================  ===========

A *fraction* is a tuple element in (0, 1) or a name with beta, momentum, dropout, ratio, frac,
prob or ema in it. :func:`search_space` also narrows default int ranges that take part in a
divisibility assert (see :mod:`nightlab.asserts`) to powers of two.

Positions: ``line`` is 1-based; ``col``/``end_col`` are *character* offsets into that line
(``ast`` reports UTF-8 byte offsets; they are converted here). :func:`rewrite` replaces only
the value's characters (for a tuple, each element's) and leaves every other byte as it was;
``2**19`` stays a power when the new value is one. Nothing here imports optuna.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import math
import operator
import re
import tokenize
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from nightlab.errors import SpecError

Value = int | float | str

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_MARK = re.compile(r"nightlab\s*:(.*)$")
_NUM = r"[+-]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^({_NUM})\s*\.\.\s*({_NUM})(?:\s+(log|linear))?$")
_CHOICES = re.compile(r"^choices\s+(.+?)\s*,?$")
_POW = re.compile(r"^\s*(\d+)\s*\*\*\s*(\d+)\s*$")
_FORMS = (
    "'# nightlab: LOW..HIGH', '# nightlab: LOW..HIGH log', '# nightlab: choices A,B,C', "
    "'# nightlab: fixed' or '# nightlab: skip'"
)

#: Name globs (case-insensitive) found but not searched by default, with the reason shown.
EXCLUDED: tuple[tuple[str, str], ...] = (
    ("*peak_flops*", "hardware figure"), ("*flops*", "hardware figure"), ("device", "hardware"),
    ("device_type", "hardware"), ("*_device", "hardware"), ("dtype", "hardware"), ("*_dtype", "hardware"),
    ("ptdtype", "hardware"), ("backend", "hardware"), ("*num_gpus*", "hardware"), ("*world_size*", "hardware"),
    ("*_rank", "hardware"), ("rank", "hardware"),
    ("*seed*", "seed"),
    ("*_dir", "path"), ("*path*", "path"), ("*file*", "path"), ("init_from", "path"), ("wandb_*", "logging"),
    ("*interval*", "logging"), ("eval_iters", "evaluation"), ("*eval_tokens*", "evaluation"),
    ("*vocab*", "defines the data"), ("dataset", "defines the data"), ("*budget*", "defines the experiment"),
)
_FRACTION = re.compile(r"beta|momentum|dropout|ratio|frac|prob|ema", re.I)


def excluded(name: str) -> str:
    """Why ``name`` is not searched by default ('' when it is)."""
    low = name.lower()
    for pattern, why in EXCLUDED:
        if fnmatch.fnmatchcase(low, pattern):
            return why
    return ""


@dataclass(frozen=True)
class Constant:
    """One tunable constant and its search range. ``choices`` non-empty means categorical."""

    name: str  # NAME, or NAME[i] for an element of a tuple
    value: Value
    kind: str  # "int" | "float" | "str"
    low: float
    high: float
    log: bool
    explicit: bool  # the range came from a ``# nightlab:`` comment or [researcher.space]
    line: int  # 1-based line of the value
    col: int  # character offset of the value's first character
    end_col: int  # character offset just past the value
    file: str  # lab-relative path
    text: str = ""  # the value as written, e.g. "3e-4" or "2**19"
    choices: tuple[Value, ...] = ()
    source: str = "default"  # "default" | "comment" | "spec": where the range came from

    def contains(self, value: Any) -> bool:
        """True when ``value`` is a point of this constant's search space."""
        if self.choices:
            return not isinstance(value, bool) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        """The range as a ``# nightlab:`` comment would say it."""
        if self.choices:
            return "choices " + ",".join(str(c) for c in self.choices)
        return f"{format_value(self.low, self.kind)}..{format_value(self.high, self.kind)}" + (
            " log" if self.log else ""
        )


@dataclass(frozen=True)
class Entry:
    """A module-level assignment the finder saw: searched (``constant`` set) or not, and why."""

    name: str
    file: str
    line: int
    text: str
    value: Value
    kind: str
    constant: Constant | None
    reason: str = ""  # why it is not searched: "fixed", "seed", "hardware figure", ...


# --------------------------------------------------------------------------- safe arithmetic

_BIN: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


class Unknown(Exception):
    """An expression that literal arithmetic cannot evaluate."""


def evaluate(node: ast.expr, names: Mapping[str, Any] | None = None) -> Any:
    """Literal arithmetic, never ``eval``: numbers, strings, + - * / // % **, unary +/-, and the
    ``names`` given. Comparisons and ``and``/``or``/``not`` too (for asserts). Raises Unknown."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool | int | float | str):
            return node.value
        raise Unknown
    if isinstance(node, ast.Name):
        if names is not None and node.id in names:
            return names[node.id]
        raise Unknown
    if isinstance(node, ast.UnaryOp):
        v = evaluate(node.operand, names)
        if isinstance(node.op, ast.USub) and isinstance(v, int | float):
            return -v
        if isinstance(node.op, ast.UAdd) and isinstance(v, int | float):
            return +v
        if isinstance(node.op, ast.Not):
            return not v
        raise Unknown
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        a, b = evaluate(node.left, names), evaluate(node.right, names)
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b)):
            raise Unknown
        if isinstance(node.op, ast.Pow) and (abs(b) > 256 or abs(a) > 1e6):
            raise Unknown  # no 10**10**10
        try:
            out = _BIN[type(node.op)](a, b)
        except (ZeroDivisionError, OverflowError, ValueError):
            raise Unknown from None
        if isinstance(out, complex) or (isinstance(out, float) and not math.isfinite(out)):
            raise Unknown
        return out
    if isinstance(node, ast.BoolOp):
        vals = [evaluate(v, names) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, names)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = evaluate(right_node, names)
            fn = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
                  ast.Gt: operator.gt, ast.GtE: operator.ge}.get(type(op))
            if fn is None:
                raise Unknown
            try:
                if not fn(left, right):
                    return False
            except TypeError:
                raise Unknown from None
            left = right
        return True
    raise Unknown


# --------------------------------------------------------------------------- helpers


def _lines(source: str) -> list[str]:
    """Lines as ``ast`` counts them (``\\n``, ``\\r\\n``, ``\\r``), endings kept."""
    return _LINE.findall(source)


def _char_col(line: str, byte_col: int) -> int:
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (tokenize, so strings never fool it)."""
    out: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


def _num(text: str, kind: str) -> int | float:
    if kind == "int":
        f = float(text.replace("_", ""))
        if f != int(f):
            raise ValueError(text)
        return int(f)
    return float(text.replace("_", ""))


def _is_fraction(name: str, value: float) -> bool:
    return bool(_FRACTION.search(name)) or ("[" in name and 0 < value < 1)


def _default_range(value: int | float, kind: str, name: str = "") -> tuple[float, float, bool]:
    if kind == "float":
        v = float(value)
        if 0 < v < 1 and _is_fraction(name, v):
            return v / 10, min(v * 10, 1 - (1 - v) / 10), True
        if v > 0:
            return v / 10, v * 10, True
        if v < 0:
            return v * 10, v / 10, False
        return (0.0, 0.5, False) if _is_fraction(name, 0.5) else (0.0, 1.0, False)
    v = int(value)
    if v >= 1:
        return max(1, v // 4), max(v * 4, v + 3), v >= 8
    if v == 0:
        return 0, 8, False
    lo, hi, _ = _default_range(-v, "int")
    return -hi, -lo, False


def _pow_choices(text: str, value: int) -> tuple[int, ...]:
    m = _POW.match(text)
    if not m:
        return ()
    base, exp = int(m.group(1)), int(m.group(2))
    if base < 2 or base**exp != value:
        return ()
    return tuple(base**e for e in range(max(0, exp - 2), exp + 3))


def _choice(text: str, kind: str) -> Value:
    text = text.strip()
    if kind == "str":
        return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
    return _num(text, kind)


Parsed = tuple[float, float, bool, tuple[Value, ...]]


def parse_range(spec: str, value: Value, kind: str, where: str, forms: str = _FORMS) -> Parsed | None:
    """Parse ``LOW..HIGH [log]``, ``choices A,B``, ``fixed``/``skip``; None means fixed.

    Raises SpecError naming ``where`` on a bad form or a range without the current value.
    """
    spec = spec.strip()

    def bad(why: str) -> SpecError:
        return SpecError(f"{where}: {why}", f"write one of {forms}")

    if spec in ("fixed", "skip"):
        return None
    m = _RANGE.match(spec)
    if m and kind != "str":
        try:
            low, high = _num(m.group(1), kind), _num(m.group(2), kind)
        except ValueError:
            raise bad(f"an int constant needs whole-number bounds, got '{spec}'") from None
        return check_range(low, high, m.group(3) == "log", value, where, spec, forms)
    m = _CHOICES.match(spec)
    if m:
        try:
            choices = tuple(dict.fromkeys(_choice(c, kind) for c in m.group(1).split(",")))
        except ValueError:
            raise bad(f"an int constant needs whole-number choices, got '{spec}'") from None
        return check_choices(choices, value, kind, where, spec, forms)
    raise bad(f"cannot read '# nightlab: {spec}'" if forms == _FORMS else f"cannot read '{spec}'")


def check_range(low: float, high: float, log: bool, value: Value, where: str, spec: str,
                forms: str = _FORMS) -> Parsed:
    def bad(why: str) -> SpecError:
        return SpecError(f"{where}: {why}", f"write one of {forms}")

    if not low < high:
        raise bad(f"the range '{spec}' is empty (LOW must be below HIGH)")
    if log and low <= 0:
        raise bad(f"a log range needs LOW > 0, got '{spec}'")
    if isinstance(value, str) or not low <= value <= high:
        raise bad(f"the current value {value!r} lies outside the range '{spec}'")
    return float(low), float(high), log, ()


def check_choices(choices: tuple[Value, ...], value: Value, kind: str, where: str, spec: str,
                  forms: str = _FORMS) -> Parsed:
    def bad(why: str) -> SpecError:
        return SpecError(f"{where}: {why}", f"write one of {forms}")

    if len(choices) < 2:
        raise bad(f"choices need at least two values, got '{spec}'")
    if value not in choices:
        raise bad(f"the current value {value!r} is not one of '{spec}'")
    nums = [float(c) for c in choices if isinstance(c, int | float)]
    return (min(nums) if nums else 0.0), (max(nums) if nums else 0.0), False, choices


# --------------------------------------------------------------------------- the finder


@dataclass(frozen=True)
class _Site:
    name: str
    node: ast.expr
    stmt_line: int


def _sites(tree: ast.Module) -> dict[str, _Site]:
    found: dict[str, _Site] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            if len(stmt.targets) != 1:
                continue
            target, node = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None and stmt.simple:
            target, node = stmt.target, stmt.value
        else:
            continue
        if not isinstance(target, ast.Name) or not _NAME.match(target.id):
            continue
        found.pop(target.id, None)  # source order of the effective assignment
        found[target.id] = _Site(target.id, node, stmt.end_lineno or stmt.lineno)
    return found


def _targets(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Tuple | ast.List):
        return {n for el in node.elts for n in _targets(el)}
    if isinstance(node, ast.Starred):
        return _targets(node.value)
    return set()


def _variables(tree: ast.Module) -> set[str]:
    """Module-level names the script changes as it runs: assigned inside a loop, augmented
    (``step += 1``), a loop variable, or declared ``global`` in a function. Such a name (``step = 0``
    before the training loop) is a variable, not a constant. Assignments inside ``if`` blocks
    (``gradient_accumulation_steps //= world_size`` under ``if ddp:``) do not count."""
    out: set[str] = set()

    def visit(stmts: list[ast.stmt], in_loop: bool, top: bool = False) -> None:
        for st in stmts:
            if isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.update(n for g in ast.walk(st) if isinstance(g, ast.Global) for n in g.names)
                continue
            if isinstance(st, ast.AugAssign) and (in_loop or top):
                out.update(_targets(st.target))
            if in_loop and isinstance(st, ast.Assign):
                out.update(n for t in st.targets for n in _targets(t))
            if in_loop and isinstance(st, ast.AnnAssign):
                out.update(_targets(st.target))
            loop = in_loop or isinstance(st, ast.For | ast.AsyncFor | ast.While)
            if isinstance(st, ast.For | ast.AsyncFor):
                out.update(_targets(st.target))
            for _, value in ast.iter_fields(st):
                if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                    visit(value, loop)
                elif isinstance(value, list):
                    for item in value:  # except handlers, match cases
                        body = getattr(item, "body", None)
                        if isinstance(body, list):
                            visit(body, loop)

    visit(tree.body, False, top=True)
    return out


def _leaf(node: ast.expr) -> tuple[Value, str] | None:
    """(value, kind) of a number (literal arithmetic) or a string; None otherwise."""
    try:
        v = evaluate(node)
    except Unknown:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        return None
    return v, ("str" if isinstance(v, str) else "int" if isinstance(v, int) else "float")


@dataclass(frozen=True)
class _Leaf:
    name: str
    site: str  # the assigned name (differs from ``name`` for a tuple element)
    value: Value
    kind: str
    line: int
    col: int
    end_col: int
    text: str
    stmt_line: int
    variable: bool = False  # the script changes it as it runs (see _variables)


def _leaves(source: str) -> list[_Leaf]:
    """Every number or string value of a module-level assignment, with its position."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = _lines(source)
    variables = _variables(tree)
    out: list[_Leaf] = []
    for site in _sites(tree).values():
        node = site.node
        if isinstance(node, ast.Tuple):
            leaves = [(f"{site.name}[{i}]", el) for i, el in enumerate(node.elts)]
        else:
            leaves = [(site.name, node)]
        for name, el in leaves:
            got = _leaf(el)
            if got is None or el.end_lineno != el.lineno or el.end_col_offset is None:
                continue
            text_line = lines[el.lineno - 1]
            col, end_col = _char_col(text_line, el.col_offset), _char_col(text_line, el.end_col_offset)
            out.append(_Leaf(name, site.name, got[0], got[1], el.lineno, col, end_col, text_line[col:end_col],
                             site.stmt_line, site.name in variables))
    return out


def scan(source: str, file: str = "", overrides: Mapping[str, Any] | None = None) -> list[Entry]:
    """Every module-level constant of ``source`` in source order, searched or not (``reason``).

    ``overrides`` maps a name (``NAME`` or ``NAME[i]``; ``NAME`` covers all elements of a tuple)
    to its ``[researcher.space]`` entry (see :func:`apply_override`); it wins over the comment.
    A source that does not parse has no constants. Raises SpecError for a malformed
    ``# nightlab:`` comment (of a constant without an override).
    """
    overrides = overrides or {}
    comments = _comments(source)
    out: list[Entry] = []
    for lf in _leaves(source):
        name, value, kind = lf.name, lf.value, lf.kind
        mark = _MARK.search(comments.get(lf.stmt_line, ""))
        where = f"{file or '<source>'}:{lf.line}: constant {name}"
        base = Constant(name=name, value=value, kind=kind, low=0.0, high=0.0, log=False, explicit=False,
                        line=lf.line, col=lf.col, end_col=lf.end_col, file=file, text=lf.text)
        override = overrides.get(name, overrides.get(lf.site) if name != lf.site else None)
        const: Constant | None
        if override is not None:
            const = apply_override(base, override, f"[researcher.space] {name!r}")
            reason = "fixed in [researcher.space]" if const is None else ""
        elif mark:
            parsed = parse_range(mark.group(1), value, kind, where)
            const = None if parsed is None else _ranged(base, parsed, "comment")
            reason = "fixed by its # nightlab: comment" if const is None else ""
        elif lf.variable:
            const, reason = None, "a variable: the script changes it as it runs"
        elif excluded(name):
            const, reason = None, excluded(name)
        elif kind == "str":
            const, reason = None, "a string: give choices to search it"
        else:
            assert not isinstance(value, str)
            pow_choices = _pow_choices(lf.text, int(value)) if kind == "int" else ()
            if pow_choices:
                const = _ranged(base, (min(pow_choices), max(pow_choices), False, pow_choices), "default")
            else:
                const = _ranged(base, (*_default_range(value, kind, name), ()), "default")
            reason = ""
        out.append(Entry(name=name, file=file, line=lf.line, text=lf.text, value=value, kind=kind,
                         constant=const, reason=reason))
    return out


def _ranged(base: Constant, parsed: Parsed, source: str) -> Constant:
    low, high, log, choices = parsed
    return replace(base, low=float(low), high=float(high), log=log, choices=choices,
                   explicit=source != "default", source=source)


SPACE_FORMS = (
    "'LOW..HIGH', 'LOW..HIGH log', 'choices A,B,C', 'fixed', or a table "
    "{ range = [LOW, HIGH], log = true, int = true } / { choices = [A, B] } / { fixed = true }"
)


def apply_override(base: Constant, entry: Any, where: str) -> Constant | None:
    """``base`` with the range of a ``[researcher.space]`` entry; None when it is fixed.

    ``entry`` is a string in the comment grammar or an object/mapping with ``range``, ``log``,
    ``int``, ``choices``, ``fixed`` (see :class:`nightlab.spec.SpaceEntry`).
    """
    where = f"{where} ({base.file}:{base.line}, current value {base.text})"
    if isinstance(entry, str):
        parsed = parse_range(entry, base.value, base.kind, where, SPACE_FORMS)
        return None if parsed is None else _ranged(base, parsed, "spec")
    get = entry.get if isinstance(entry, Mapping) else (lambda k, d=None: getattr(entry, k, d))
    if get("fixed"):
        return None
    choices = get("choices")
    integer = bool(get("integer") or get("int"))
    if integer and base.kind == "float" and not isinstance(base.value, str):
        if base.value != int(base.value):
            raise SpecError(f"{where}: int = true, but the current value {base.text} is not whole",
                            "drop int = true, or make the value whole")
        base = replace(base, kind="int", value=int(base.value))
    if choices:
        spec = ",".join(str(c) for c in choices)
        vals = tuple(dict.fromkeys(choices))
        if base.kind != "str" and not all(isinstance(c, int | float) and not isinstance(c, bool) for c in vals):
            raise SpecError(f"{where}: choices of a number must be numbers, got [{spec}]", f"write {SPACE_FORMS}")
        if base.kind == "int":
            if any(c != int(c) for c in vals):
                raise SpecError(f"{where}: an int constant needs whole-number choices, got [{spec}]",
                                f"write {SPACE_FORMS}")
            vals = tuple(int(c) for c in vals)
        return _ranged(base, check_choices(vals, base.value, base.kind, where, spec, SPACE_FORMS), "spec")
    rng = get("range")
    if rng:
        if base.kind == "str":
            raise SpecError(f"{where}: a string constant takes choices, not a range", f"write {SPACE_FORMS}")
        low, high = rng
        if base.kind == "int" and (low != int(low) or high != int(high)):
            raise SpecError(f"{where}: an int constant needs whole-number bounds, got {list(rng)}",
                            f"write {SPACE_FORMS}")
        parsed = check_range(low, high, bool(get("log")), base.value, where, f"{low}..{high}", SPACE_FORMS)
        return _ranged(base, parsed, "spec")
    if get("log"):
        if base.kind == "str" or base.value <= 0:  # type: ignore[operator]
            raise SpecError(f"{where}: log = true needs a positive number", f"write {SPACE_FORMS}")
        low, high, _ = _default_range(base.value, base.kind, base.name)  # type: ignore[arg-type]
        return _ranged(base, (low, high, True, ()), "spec")
    if base.kind == "str":
        raise SpecError(f"{where}: a string constant needs choices to be searched", f"write {SPACE_FORMS}")
    low, high, log = _default_range(base.value, base.kind, base.name)  # type: ignore[arg-type]
    return _ranged(base, (low, high, log, ()), "spec")


def find_constants(source: str, file: str = "", overrides: Mapping[str, Any] | None = None) -> list[Constant]:
    """The searched constants of ``source``, in source order (see :func:`scan`)."""
    return [e.constant for e in scan(source, file, overrides) if e.constant is not None]


# --------------------------------------------------------------------------- writing


def format_value(value: Value, kind: str) -> str:
    """The literal to write: ints as ints; floats to 4 significant digits, always a float literal.

    ``1.0`` (never ``1``), ``0.0003``, ``1.2e-5`` (exponent without padding), ``-0.5``; strings
    quoted.
    """
    if kind == "str" or isinstance(value, str):
        return repr(str(value))
    if kind == "int":
        return str(int(value))
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"cannot write {v} as a Python literal")
    text = f"{v:.4g}"
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    elif "." not in text:
        text += ".0"
    return text


def written_as(text: str, kind: str, value: Value) -> str:
    """The text for ``value`` in place of ``text``: a power stays a power, a string keeps its quotes."""
    m = _POW.match(text)
    if m and kind == "int" and isinstance(value, int) and value > 0:
        base = int(m.group(1))
        exp = round(math.log(value, base)) if base > 1 else 0
        if base > 1 and base**exp == value:
            return f"{base}**{exp}"
    q = text[:1]
    if kind == "str" and q in ("'", '"') and "\\" not in str(value) and q not in str(value):
        return f"{q}{value}{q}"
    return format_value(value, kind)


def rewrite(source: str, values: Mapping[str, Value]) -> str:
    """``source`` with the named constants set to ``values``; every other byte unchanged.

    A value equal to the current one leaves its text as written. Names may be any constant of
    :func:`scan`, searched or not (``NAME[i]`` for a tuple element; the tuple's formatting
    stays). Raises KeyError for a name that is not a constant of ``source``.
    """
    leaves = {lf.name: lf for lf in _leaves(source)}
    missing = sorted(set(values) - set(leaves))
    if missing:
        raise KeyError(f"not a tunable constant of this source: {', '.join(missing)}")
    lines = _lines(source)
    # right to left within a line, so earlier columns stay valid (tuple elements share a line)
    for name in sorted(values, key=lambda n: (leaves[n].line, -leaves[n].col)):
        lf, value = leaves[name], values[name]
        if value == lf.value and isinstance(value, str) == isinstance(lf.value, str):
            continue
        line = lines[lf.line - 1]
        lines[lf.line - 1] = line[: lf.col] + written_as(lf.text, lf.kind, value) + line[lf.end_col :]
    return "".join(lines)
