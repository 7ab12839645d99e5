"""Circle packing evaluator (protected): checks ``packing.json`` strictly and scores it.

Valid means: exactly 26 circles; every centre and radius a finite real number (not a bool,
not a string); every radius >= 0; every circle inside the unit square; no two circles
overlapping. Each inequality is allowed a slack of TOL = 1e-9 and no more.

On a valid packing: prints the summary block (``---`` then ``sum_radii: ...`` and friends)
and exits 0. On an invalid one: prints ``invalid packing: <reason>`` and exits 1, so the
experiment is recorded as a crash with the reason in its log.

Usage: ``python evaluate.py [packing.json]``. Pure Python; imports nothing from the lab.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

N = 26
TOL = 1e-9


class Invalid(Exception):
    """The packing breaks a rule; the message says which and where."""


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Invalid(f"{what} is {v!r}, not a number")
    f = float(v)
    if not math.isfinite(f):
        raise Invalid(f"{what} is {v!r}, not finite")
    return f


def load(path: Path) -> tuple[list[tuple[float, float]], list[float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Invalid(f"{path} does not exist (pack.py must write it)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"{path} is not valid JSON: {e}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("centers"), list)
        or not isinstance(data.get("radii"), list)
    ):
        raise Invalid('expected a JSON object {"centers": [[x, y], ...], "radii": [r, ...]}')
    centers_raw, radii_raw = data["centers"], data["radii"]
    if len(centers_raw) != N or len(radii_raw) != N:
        raise Invalid(f"expected {N} circles, got {len(centers_raw)} centers and {len(radii_raw)} radii")
    centers: list[tuple[float, float]] = []
    radii: list[float] = []
    for i, (c, r) in enumerate(zip(centers_raw, radii_raw, strict=True)):
        if not isinstance(c, list) or len(c) != 2:
            raise Invalid(f"center {i} is {c!r}, not [x, y]")
        centers.append((_number(c[0], f"center {i} x"), _number(c[1], f"center {i} y")))
        radius = _number(r, f"radius {i}")
        if radius < 0:
            raise Invalid(f"radius {i} is negative ({radius!r})")
        radii.append(radius)
    return centers, radii


def check(centers: list[tuple[float, float]], radii: list[float]) -> float:
    """The smallest slack of any constraint (>= -TOL on a valid packing); raises Invalid otherwise."""
    slack = math.inf
    for i, ((x, y), r) in enumerate(zip(centers, radii, strict=True)):
        for name, s in (("left", x - r), ("bottom", y - r), ("right", 1.0 - x - r), ("top", 1.0 - y - r)):
            if s < -TOL:
                raise Invalid(f"circle {i} (x={x!r}, y={y!r}, r={r!r}) crosses the {name} side by {-s:.3g}")
            slack = min(slack, s)
    for i in range(N):
        (xi, yi), ri = centers[i], radii[i]
        for j in range(i + 1, N):
            (xj, yj), rj = centers[j], radii[j]
            s = math.hypot(xi - xj, yi - yj) - (ri + rj)
            if s < -TOL:
                raise Invalid(f"circles {i} and {j} overlap by {-s:.3g}")
            slack = min(slack, s)
    return slack


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path("packing.json")
    try:
        centers, radii = load(path)
        slack = check(centers, radii)
    except Invalid as e:
        print(f"invalid packing: {e}")
        print(f"invalid packing: {e}", file=sys.stderr)
        return 1
    print("---")
    print(f"sum_radii:   {math.fsum(radii):.12f}")
    print(f"num_circles: {N}")
    print(f"min_radius:  {min(radii):.12f}")
    print(f"min_slack:   {slack:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
