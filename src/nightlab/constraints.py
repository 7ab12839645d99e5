"""``[metric] constraints``: limits a kept run must respect, whatever its metric.

Each constraint is one string ``FIGURE OP NUMBER``::

    [metric]
    secondary = ["peak_vram_mb", "train_seconds"]
    constraints = ["peak_vram_mb <= 40000", "train_seconds <= 330"]

``FIGURE`` is the metric's name, one of ``[metric] secondary``, or ``run_s`` (the run's wall
time as the harness measured it); ``OP`` is one of ``<= < >= > == !=``; ``NUMBER`` a decimal
or scientific literal. The string is parsed with a regular expression, never evaluated. A
measured candidate that breaks one (or does not report the figure) is ``discard`` with reason
``constraint: …`` before the acceptance policy sees it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

_FORM = re.compile(
    r"^\s*([A-Za-z_][\w.\-/]*)\s*(<=|>=|==|!=|<|>)\s*([+-]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*$"
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq, "!=": operator.ne,
}
RUN_S = "run_s"  # the built-in figure: the run's wall time, measured by the harness


@dataclass(frozen=True)
class Constraint:
    figure: str
    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.figure} {self.op} {self.bound:g}"

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and _OPS[self.op](value, self.bound)


def parse(text: str) -> Constraint:
    """One constraint; ValueError (naming the expected form) when ``text`` is not one."""
    m = _FORM.match(text)
    if not m:
        raise ValueError(f"constraint {text!r} is not 'FIGURE OP NUMBER' (OP one of <= < >= > == !=), "
                         "e.g. \"peak_vram_mb <= 40000\"")
    bound = float(m.group(3).replace("_", ""))
    if not math.isfinite(bound):
        raise ValueError(f"constraint {text!r}: the bound must be a finite number")
    return Constraint(m.group(1), m.group(2), bound)


def parse_all(texts: Iterable[str], known: Iterable[str]) -> list[Constraint]:
    """Every constraint, checked against the figures a run can report; ValueError on the first bad one."""
    names = set(known) | {RUN_S}
    out = []
    for text in texts:
        c = parse(text)
        if c.figure not in names:
            raise ValueError(f"constraint {text!r} names {c.figure!r}, which is not a recorded figure "
                             f"(known: {', '.join(sorted(names))}); add it to [metric] secondary")
        out.append(c)
    return out


def broken(constraints: Iterable[Constraint], figures: Mapping[str, float | None]) -> str:
    """The reason text for the first constraint ``figures`` break ("" when all hold)."""
    for c in constraints:
        value = figures.get(c.figure)
        if value is None:
            return f"constraint: {c} (the run did not report {c.figure})"
        if not c.holds(float(value)):
            return f"constraint: {c} (got {value:.6g})"
    return ""
