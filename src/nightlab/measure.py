"""Measurement: read the metric from the run's output contract, never from free-form logs.

Two sources (``[metric] source``):

- ``summary`` (default, karpathy/autoresearch's contract): the run prints a line ``---``
  followed by ``key: value`` lines. The *last* such block in the log counts.
- ``json``: the run writes a flat JSON object to ``[metric] file`` (relative to the lab
  folder of its worktree). The file must stay inside the worktree and be under 1 MiB.

A missing metric, a non-number, NaN or inf is a failed measurement (``metric=None`` with the
reason in ``error``); the engine records the experiment as ``crash``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from nightlab.spec import MetricSpec
from nightlab.types import Measurement

_KV = re.compile(r"^\s*([A-Za-z_][\w.\-/]*)\s*:\s*(\S.*?)\s*$")
_MAX_LOG_BYTES = 4 * 1024 * 1024
_MAX_JSON_BYTES = 1024 * 1024


def parse_summary(text: str) -> dict[str, str]:
    """``key: value`` lines after the last line that is exactly ``---``."""
    lines = text.splitlines()
    start = None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip() == "---":
            start = i
            break
    if start is None:
        return {}
    out: dict[str, str] = {}
    for line in lines[start + 1 :]:
        m = _KV.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.split()[0])
        except (ValueError, IndexError):
            return None
    return None


def read_log(log_path: Path) -> str:
    with open(log_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _MAX_LOG_BYTES))
        return f.read().decode("utf-8", errors="replace")


def _read_json(lab_root: Path, name: str) -> dict[str, object] | str:
    path = (lab_root / name)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return f"the run wrote no {name}"
    root = lab_root.resolve()
    if root not in resolved.parents:
        return f"{name} resolves outside the worktree"
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        return f"cannot open {name}: {e.strerror}"
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_JSON_BYTES + 1)
    if len(data) > _MAX_JSON_BYTES:
        return f"{name} is larger than 1 MiB"
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{name} is not valid JSON: {e}"
    if not isinstance(obj, dict):
        return f"{name} must hold a JSON object"
    return obj


def measure(metric: MetricSpec, log_path: Path, lab_root: Path, *, trust: str = "inline") -> Measurement:
    """Read the metric and the secondary figures of one run."""
    values: dict[str, object]
    if metric.source == "json":
        got = _read_json(lab_root, metric.file)
        if isinstance(got, str):
            return Measurement(None, trust=trust, error=got)
        values = got
        where = metric.file
    else:
        try:
            values = dict(parse_summary(read_log(log_path)))
        except OSError as e:
            return Measurement(None, trust=trust, error=f"cannot read the log: {e}")
        where = "the summary block (a '---' line, then 'key: value' lines)"
    secondary: dict[str, float] = {}
    for key in metric.secondary:
        num = _number(values.get(key))
        if num is not None and math.isfinite(num):
            secondary[key] = num
    if metric.name not in values:
        return Measurement(None, secondary, trust, f"no '{metric.name}' in {where}")
    value = _number(values[metric.name])
    if value is None:
        return Measurement(None, secondary, trust, f"'{metric.name}' is not a number: {values[metric.name]!r}")
    if not math.isfinite(value):
        return Measurement(None, secondary, trust, f"'{metric.name}' is {value}")
    return Measurement(value, secondary, trust)
