"""Measurement: read the metric from the run's output contract, never from free-form logs.

Two sources (``[metric] source``):

- ``summary`` (default, karpathy/autoresearch's contract): the run prints a line ``---``
  followed by ``key: value`` lines. The *last* such block in the log counts; only the last
  4 MiB of the log are read.
- ``json``: the run writes a JSON object to ``[metric] file`` (relative to the lab folder of its
  worktree); its top-level keys are the figures.

A value is a number when it is a plain decimal (``0.5``, ``-3``, ``1e-4``; in JSON, a number).
Everything else is a failed measurement (``metric=None`` with the reason in ``error``), which the
engine records as ``crash`` of that experiment; nothing the run wrote can raise out of here:

- a missing metric, a non-number, NaN, ``Infinity``, a number too large for a float;
- a metric file that is not a regular file (a FIFO, socket, device, directory), is reached through
  a symlink anywhere in its path, is over 1 MiB, is not UTF-8, is not a JSON object, nests deeper
  than 64 levels, or is not JSON at all. The file is opened with ``O_NOFOLLOW | O_NONBLOCK`` only
  after ``lstat`` says it is regular, and ``fstat`` must agree: a FIFO never blocks the harness.

Warnings (kept with the measurement, stored in the experiment's ``evidence.warnings``, shown by
``nightlab show`` and flagged by ``nightlab log``): a key given twice (the last value counts, as
before) and an *absurd* metric (:func:`sanity`), which is refused. In what the evaluator or the holdout
check printed, the metric or a secondary figure given twice with different values is refused (their
output may echo text the run controls).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import stat
from pathlib import Path

from nightlab.escape import text as _safe
from nightlab.spec import MetricSpec
from nightlab.types import Measurement

_KV = re.compile(r"^\s*([A-Za-z_][\w.\-/]*)\s*:\s*(\S.*?)\s*$")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
MAX_LOG_BYTES = 4 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_STEP = {0x5B: 1, 0x7B: 1, 0x5D: -1, 0x7D: -1}
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class MetricFileError(Exception):
    """The metric file cannot be used; the message says why (it becomes the crash reason)."""


# --------------------------------------------------------------------------- the summary block


def parse_summary(text: str) -> dict[str, str]:
    """``key: value`` lines after the last line that is exactly ``---`` (the last value of a key)."""
    return dict(summary_pairs(text))


def summary_pairs(text: str, *, every_block: bool = False) -> list[tuple[str, str]]:
    """Every ``key: value`` line of the last block, in order, duplicates included (``every_block``: of
    every block, from the first ``---`` line on)."""
    lines = text.splitlines()
    start = None
    order = range(len(lines)) if every_block else range(len(lines) - 1, -1, -1)
    for i in order:
        if lines[i].strip() == "---":
            start = i
            break
    if start is None:
        return []
    out: list[tuple[str, str]] = []
    for line in lines[start + 1:]:
        m = _KV.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def number(value: object) -> float | None:
    """A finite float from a JSON number or a decimal string's first word, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        words = value.split(maxsplit=1)
        if not words or len(words[0]) > 400 or not _NUMBER.fullmatch(words[0]):
            return None
        value = words[0]
    elif not isinstance(value, int | float):
        return None
    try:
        num = float(value)
    except (OverflowError, ValueError):
        return None
    return num if math.isfinite(num) else None


def read_log(log_path: Path, max_bytes: int = MAX_LOG_BYTES) -> str:
    """The last ``max_bytes`` of a log, decoded (bytes that are not UTF-8 as ``\\xNN``).

    Raises OSError when it cannot be read or is not a regular file.
    """
    fd = os.open(log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{log_path.name} is not a regular file")
        f.seek(max(0, st.st_size - max_bytes))
        data = f.read(max_bytes)
    return data.decode("utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------- the JSON file


def read_regular(root: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of ``root/name``, a regular file reached without symlinks, at most ``max_bytes``.

    Walks the path one component at a time with ``O_NOFOLLOW``; checks each with ``lstat``
    before opening it and ``fstat`` after, so no FIFO, socket or device is ever opened for
    reading and nothing blocks. Raises :class:`MetricFileError`.
    """
    parts = [p for p in Path(name).parts if p not in ("", ".")]
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise MetricFileError(f"{name}: must be a path inside the lab folder")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MetricFileError(f"cannot open the lab folder: {e.strerror}") from None
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            shown = "/".join(parts[:i + 1])
            try:
                st = os.stat(part, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                raise MetricFileError(f"the run wrote no {name}") from None
            except OSError as e:
                raise MetricFileError(f"cannot read {shown}: {e.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise MetricFileError(f"{shown} is a symlink; the metric file must be a regular file")
            want = stat.S_ISREG if last else stat.S_ISDIR
            if not want(st.st_mode):
                kind = _kind(st.st_mode)
                raise MetricFileError(f"{shown} is {kind}, not a {'regular file' if last else 'directory'}")
            if last and st.st_size > max_bytes:
                raise MetricFileError(f"{name} is larger than {max_bytes} bytes ({st.st_size})")
            try:
                fd = os.open(part, flags | (0 if last else os.O_DIRECTORY), dir_fd=dfd)
            except OSError as e:
                raise MetricFileError(f"cannot open {shown}: {e.strerror}") from None
            st2 = os.fstat(fd)
            if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not want(st2.st_mode):
                os.close(fd)
                raise MetricFileError(f"{shown} changed while it was opened")
            os.close(dfd)
            dfd = fd
        with os.fdopen(dfd, "rb") as f:
            dfd = -1
            data = f.read(max_bytes + 1)
    finally:
        if dfd >= 0:
            os.close(dfd)
    if len(data) > max_bytes:
        raise MetricFileError(f"{name} is larger than {max_bytes} bytes")
    return data


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return word
    return "a special file"


def _depth(data: bytes) -> int:
    """Deepest ``[``/``{`` nesting (C-speed scans). Brackets inside strings count only when the
    quick bound, which counts them, is over the limit; then strings are cut out and it is redone."""
    top = _bracket_depth(data.translate(None, _NOT_BRACKET))
    if top <= MAX_JSON_DEPTH:
        return top
    return _bracket_depth(_STRING.sub(b"", data).translate(None, _NOT_BRACKET))


def _bracket_depth(brackets: bytes) -> int:
    """Nesting depth of a string of brackets: one linear pass (~50 ns a bracket), at most 1 MiB."""
    if len(brackets) <= MAX_JSON_DEPTH:
        return len(brackets)  # an upper bound is enough below the limit
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def parse_json_metrics(data: bytes, name: str = "the metric file") -> tuple[dict[str, object], list[str]]:
    """The top-level object of a metric file and its warnings. Raises :class:`MetricFileError`.

    Integers are read as floats (a 5,000-digit integer is ``inf``, then refused as a metric), the
    literals ``NaN``/``Infinity`` are accepted by the parser and refused as metrics, a UTF-8 BOM
    is skipped, and duplicate top-level keys give a warning (the last value counts).
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MetricFileError(f"{name} is not valid UTF-8 (byte {e.start})") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise MetricFileError(f"{name} nests deeper than {MAX_JSON_DEPTH} levels")
    last: list[list[str]] = [[]]

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        dups: list[str] = []
        for k, v in items:
            if k in out:
                dups.append(k)
            out[k] = v
        last[0] = dups  # the outermost object is finished last
        return out

    try:
        obj = json.loads(text, parse_int=float, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise MetricFileError(f"{name} is not valid JSON: {_safe(str(e))[:200]}") from None
    if not isinstance(obj, dict):
        raise MetricFileError(f"{name} must hold a JSON object, not {type(obj).__name__}")
    warnings = [f"duplicate key {_safe(k)[:80]!r} in {name}: the last value counts"
                for k in dict.fromkeys(last[0])]
    return obj, _few(warnings)


def _few(warnings: list[str], n: int = 5) -> list[str]:
    """At most ``n`` warnings stored (a run can repeat 100,000 keys), and how many were left out."""
    return warnings if len(warnings) <= n else [*warnings[:n], f"... and {len(warnings) - n} more"]


# --------------------------------------------------------------------------- measure


def measure(metric: MetricSpec, log_path: Path, lab_root: Path, *, trust: str = "inline") -> Measurement:
    """Read the metric and the secondary figures of one run. Never raises for what the run wrote."""
    try:
        return _measure(metric, log_path, lab_root, trust)
    except Exception as e:  # a bug here must not stop the night: the experiment crashes instead
        return Measurement(None, trust=trust, error=f"cannot read the metric: {type(e).__name__}: "
                                                    f"{_safe(str(e))[:200]}")


def _measure(metric: MetricSpec, log_path: Path, lab_root: Path, trust: str) -> Measurement:
    if metric.source == "json":
        try:
            data = read_regular(lab_root, metric.file, MAX_JSON_BYTES)
        except MetricFileError as e:
            return Measurement(None, trust=trust, error=str(e))
        return measure_json_bytes(metric, data, trust)
    try:
        text = read_log(log_path)
    except OSError as e:
        return Measurement(None, trust=trust, error=f"cannot read the log: {_safe(str(e))}")
    return measure_summary_text(metric, text, trust)


def measure_json_bytes(metric: MetricSpec, data: bytes, trust: str = "inline") -> Measurement:
    """The measurement from a metric file's bytes (what :func:`measure` does once it read them)."""
    try:
        values, warnings = parse_json_metrics(data, metric.file or "the metric file")
    except MetricFileError as e:
        return Measurement(None, trust=trust, error=str(e))
    return _from_values(metric, values, warnings, metric.file or "the metric file", trust)


# measurements made by trusted code (its output must be unambiguous, see measure_summary_text)
TRUSTED = ("evaluator", "verifier")


def measure_summary_text(metric: MetricSpec, text: str, trust: str = "inline") -> Measurement:
    """The measurement from a log's text (what :func:`measure` does once it read the log's end)."""
    pairs = summary_pairs(text)
    counts: dict[str, list[str]] = {}
    for k, v in pairs:
        counts.setdefault(k, []).append(v)
    warnings = [f"duplicate key {k[:80]!r} in the summary block: the last value counts "
                f"({', '.join(_safe(v)[:40] for v in vs[:5])})" for k, vs in counts.items() if len(vs) > 1]
    if trust in TRUSTED:
        # the evaluator and the holdout check are trusted code, but what they print may carry text the run
        # controls (a sample, a name from the checkpoint): a figure printed twice with two values, in one
        # block or in two (echoed text can start a block of its own with a '---' line), is ambiguous, and
        # "the last counts" would let such text decide it. Refused; equal repeats are fine.
        seen: dict[str, list[str]] = {}
        for k, v in summary_pairs(text, every_block=True):
            seen.setdefault(k, []).append(v)
        for key in (metric.name, *metric.secondary):
            vals = seen.get(key, [])
            if len({v.strip() for v in vals}) > 1:
                shown = ", ".join(_safe(v)[:40] for v in vals[:5])
                return Measurement(None, {}, trust, f"the {trust} printed {key!r} {len(vals)} times with different "
                                   f"values ({shown}): ambiguous, refused", tuple(_few(warnings)))
    return _from_values(metric, dict(pairs), _few(warnings),
                        "the summary block (a '---' line, then 'key: value' lines)", trust)


def _from_values(metric: MetricSpec, values: dict[str, object], warnings: list[str], where: str,
                 trust: str) -> Measurement:
    secondary: dict[str, float] = {}
    for key in metric.secondary:
        num = number(values.get(key))
        if num is not None:
            secondary[key] = num
    w = tuple(warnings)
    if metric.name not in values:
        return Measurement(None, secondary, trust, f"no '{metric.name}' in {where}", w)
    raw = values[metric.name]
    value = number(raw)
    if value is None:
        full = repr(raw)
        shown = _safe(full[:60]) + (f"… ({len(full)} characters)" if len(full) > 60 else "")
        return Measurement(None, secondary, trust, f"'{metric.name}' is not a finite number: {shown}", w)
    return Measurement(value, secondary, trust, "", w)


def sanity(m: Measurement, metric: MetricSpec, baseline: float | None) -> Measurement:
    """Refuse an absurd metric: ``|value| > [metric] max_abs``, or further from the baseline than
    ``[metric] max_ratio`` times the baseline's magnitude (0 turns either check off).

    An absurd value is not kept and never becomes the incumbent: the measurement fails (the
    experiment is a ``crash``) and the value is kept in a warning, so it stays visible.
    """
    if m.metric is None:
        return m
    v = m.metric
    why = ""
    if metric.max_abs and abs(v) > metric.max_abs:
        why = f"|{metric.name}| = {abs(v):.6g} is over [metric] max_abs = {metric.max_abs:g}"
    elif (metric.max_ratio and baseline is not None and baseline != 0 and math.isfinite(baseline)
          and abs(v - baseline) > metric.max_ratio * abs(baseline)):
        why = (f"{metric.name} = {v:.6g} is more than [metric] max_ratio = {metric.max_ratio:g} times "
               f"the baseline's magnitude away from the baseline {baseline:.6g}")
    if not why:
        return m
    msg = f"absurd metric refused: {why}"
    return dataclasses.replace(m, metric=None, error=msg, warnings=(*m.warnings, f"{msg} (value {v!r})"))
