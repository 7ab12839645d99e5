"""Tunable constants in Python source: find them, give each a search range, rewrite their values.

A *constant* is a module-level assignment of a number literal to an UPPER_CASE name::

    LEARNING_RATE = 3e-4          # found: float
    DEPTH = 8                     # found: int
    WARMUP = -0.5                 # found: float (a unary minus is part of the literal)
    N_HEAD: int = 4               # found: annotated assignments too
    USE_BIAS = True               # skipped: bools are not numbers here
    VOCAB = 2**10                 # skipped: an expression, not a literal
    NAME = "gpt"                  # skipped: not a number

Assignments inside functions, classes, ``if``/``for``/``with``/``try`` blocks are skipped, as are
multi-target (``A = B = 1``) and tuple assignments. When a name is assigned a literal more than
once at module level, the last assignment (the one in effect) is the constant.

The search range comes from a trailing comment on the assignment's line::

    LR = 3e-4        # nightlab: 1e-5..1e-2 log     float range, log-uniform
    DEPTH = 8        # nightlab: 2..16              int range (int constant), linear
    DROPOUT = 0.1    # nightlab: 0.0..0.5           float range, linear
    HEADS = 4        # nightlab: 1..64 log          int range, log-uniform
    BATCH = 64       # nightlab: choices 32,64,128  one of the listed values
    SEED = 42        # nightlab: fixed              never searched (``skip`` works too)

A comment that mentions ``nightlab:`` but is not one of these forms raises
:class:`~nightlab.errors.SpecError` naming the file, line, constant and the expected form, as
does a range that does not contain the constant's current value.

Without a comment the default range is (``v`` is the current value):

==================  ==========================================  ===========
constant            range                                       scale
==================  ==========================================  ===========
float ``v > 0``     ``[v/10, v*10]``                            log
float ``v < 0``     ``[v*10, v/10]`` (stays negative)           linear
float ``v == 0``    ``[0.0, 1.0]``                              linear
int ``v >= 1``      ``[max(1, v//4), max(v*4, v+3)]``           log if ``v >= 8``, else linear
int ``v == 0``      ``[0, 8]``                                  linear
int ``v <= -1``     the mirror of ``-v``'s range                linear
==================  ==========================================  ===========

Positions: ``line`` is 1-based; ``col``/``end_col`` are *character* offsets into that line
(``ast`` reports UTF-8 byte offsets; they are converted here). :func:`rewrite` replaces only
the literal's characters and leaves every other byte as it was. Nothing here imports optuna.
"""

from __future__ import annotations

import ast
import io
import math
import re
import tokenize
from dataclasses import dataclass

from nightlab.errors import SpecError

_NAME = re.compile(r"^_*[A-Z][A-Z0-9_]*$")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_MARK = re.compile(r"nightlab\s*:(.*)$")
_NUM = r"[+-]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^({_NUM})\s*\.\.\s*({_NUM})(?:\s+(log|linear))?$")
_CHOICES = re.compile(rf"^choices\s+({_NUM}(?:\s*,\s*{_NUM})*)\s*,?$")
_FORMS = (
    "'# nightlab: LOW..HIGH', '# nightlab: LOW..HIGH log', '# nightlab: choices A,B,C', "
    "'# nightlab: fixed' or '# nightlab: skip'"
)


@dataclass(frozen=True)
class Constant:
    """One tunable constant and its search range. ``choices`` non-empty means categorical."""

    name: str
    value: int | float
    kind: str  # "int" | "float"
    low: float
    high: float
    log: bool
    explicit: bool  # the range came from a ``# nightlab:`` comment
    line: int  # 1-based line of the value literal
    col: int  # character offset of the literal's first character
    end_col: int  # character offset just past the literal
    file: str  # lab-relative path
    text: str = ""  # the literal as written, e.g. "3e-4"
    choices: tuple[int | float, ...] = ()

    def contains(self, value: int | float) -> bool:
        """True when ``value`` is a point of this constant's search space."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.choices:
            return value in self.choices
        if self.kind == "int" and value != int(value):
            return False
        return self.low <= value <= self.high


def _lines(source: str) -> list[str]:
    """Lines as ``ast`` counts them (``\\n``, ``\\r\\n``, ``\\r``), endings kept."""
    return _LINE.findall(source)


def _char_col(line: str, byte_col: int) -> int:
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def _literal(node: ast.expr) -> int | float | None:
    """The number of an int/float literal, with an optional unary sign; None otherwise."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if not isinstance(node, ast.Constant) or isinstance(node.value, bool):
        return None
    if not isinstance(node.value, int | float):
        return None
    if isinstance(node.value, float) and not math.isfinite(node.value):
        return None
    return sign * node.value


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


def _default_range(value: int | float, kind: str) -> tuple[float, float, bool]:
    if kind == "float":
        v = float(value)
        if v > 0:
            return v / 10, v * 10, True
        if v < 0:
            return v * 10, v / 10, False
        return 0.0, 1.0, False
    v = int(value)
    if v >= 1:
        return max(1, v // 4), max(v * 4, v + 3), v >= 8
    if v == 0:
        return 0, 8, False
    lo, hi, _ = _default_range(-v, "int")
    return -hi, -lo, False


def _parse_mark(
    spec: str, value: int | float, kind: str, where: str
) -> tuple[float, float, bool, tuple[int | float, ...]] | None:
    """Parse what follows ``nightlab:``; None means fixed/skip. Raises SpecError on a bad form."""
    spec = spec.strip()

    def bad(why: str) -> SpecError:
        return SpecError(f"{where}: {why}", f"write one of {_FORMS}")

    if spec in ("fixed", "skip"):
        return None
    m = _RANGE.match(spec)
    if m:
        try:
            low, high = _num(m.group(1), kind), _num(m.group(2), kind)
        except ValueError:
            raise bad(f"an int constant needs whole-number bounds, got '{spec}'") from None
        log = m.group(3) == "log"
        if not low < high:
            raise bad(f"the range '{spec}' is empty (LOW must be below HIGH)")
        if log and low <= 0:
            raise bad(f"a log range needs LOW > 0, got '{spec}'")
        if not low <= value <= high:
            raise bad(f"the current value {value} lies outside the range '{spec}'")
        return float(low), float(high), log, ()
    m = _CHOICES.match(spec)
    if m:
        try:
            choices = tuple(dict.fromkeys(_num(c.strip(), kind) for c in m.group(1).split(",")))
        except ValueError:
            raise bad(f"an int constant needs whole-number choices, got '{spec}'") from None
        if len(choices) < 2:
            raise bad(f"choices need at least two values, got '{spec}'")
        if value not in choices:
            raise bad(f"the current value {value} is not one of '{spec}'")
        return float(min(choices)), float(max(choices)), False, choices
    raise bad(f"cannot read '# nightlab: {spec}'")


def find_constants(source: str, file: str = "") -> list[Constant]:
    """The tunable constants of ``source``, in source order; fixed/skipped ones are left out.

    A source that does not parse has no constants (the researcher will see the crash later).
    Raises :class:`SpecError` for a malformed ``# nightlab:`` comment.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = _lines(source)
    comments = _comments(source)
    found: dict[str, Constant | None] = {}
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
        value = _literal(node)
        if value is None or node.end_lineno != node.lineno or node.end_col_offset is None:
            continue
        kind = "int" if isinstance(value, int) else "float"
        text_line = lines[node.lineno - 1]
        col = _char_col(text_line, node.col_offset)
        end_col = _char_col(text_line, node.end_col_offset)
        where = f"{file or '<source>'}:{node.lineno}: constant {target.id}"
        comment = comments.get(stmt.end_lineno or node.lineno, "")
        mark = _MARK.search(comment)
        explicit = mark is not None
        if mark:
            parsed = _parse_mark(mark.group(1), value, kind, where)
            if parsed is None:
                found[target.id] = None
                continue
            low, high, log, choices = parsed
        else:
            low, high, log = _default_range(value, kind)
            choices = ()
        found.pop(target.id, None)  # keep source order of the effective assignment
        found[target.id] = Constant(
            name=target.id,
            value=value,
            kind=kind,
            low=float(low),
            high=float(high),
            log=log,
            explicit=explicit,
            line=node.lineno,
            col=col,
            end_col=end_col,
            file=file,
            text=text_line[col:end_col],
            choices=choices,
        )
    return [c for c in found.values() if c is not None]


def format_value(value: int | float, kind: str) -> str:
    """The literal to write: ints as ints; floats to 4 significant digits, always a float literal.

    ``1.0`` (never ``1``), ``0.0003``, ``1.2e-5`` (exponent without padding), ``-0.5``.
    """
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


def rewrite(source: str, values: dict[str, int | float]) -> str:
    """``source`` with the named constants set to ``values``; every other byte unchanged.

    A value numerically equal to the current one leaves its literal's text as written.
    Raises KeyError for a name that is not a tunable constant of ``source``.
    """
    consts = {c.name: c for c in find_constants(source)}
    missing = sorted(set(values) - set(consts))
    if missing:
        raise KeyError(f"not a tunable constant of this source: {', '.join(missing)}")
    lines = _lines(source)
    for name, value in values.items():
        c = consts[name]
        if value == c.value:
            continue
        line = lines[c.line - 1]
        lines[c.line - 1] = line[: c.col] + format_value(value, c.kind) + line[c.end_col :]
    return "".join(lines)
