"""The audit log as the dashboard shows it: the chain's verification and the newest entries.

The log (``<lab>/.nightlab/audit.jsonl``, JSON lines with seq, time, kind, prev_hash, hash,
experiment, data) and its verifier (``nightlab.audit.verify(path)``) belong to the audit
module; when that module is not installed the page says so instead of failing. Entries
are read backwards from the end of the file, so a long log costs only the page shown.
Verification is cached per (size, mtime) of the file.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUDIT_FILE = Path(".nightlab") / "audit.jsonl"


@dataclass(frozen=True)
class AuditStatus:
    available: bool  # the audit module can be imported
    exists: bool  # the log file exists
    ok: bool | None = None
    count: int | None = None
    first_bad_seq: int | None = None
    reason: str = ""
    path: str = ""
    entries: list[dict[str, Any]] = field(default_factory=list)
    page: int = 0
    has_more: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_cache: dict[tuple[str, int, int], tuple[bool | None, int | None, int | None, str]] = {}
_lock = threading.Lock()


def _verify(path: Path) -> tuple[bool | None, int | None, int | None, str]:
    try:
        audit = importlib.import_module("nightlab.audit")
    except ImportError:
        return None, None, None, "audit log not available"
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _cache:
            return _cache[key]
    try:
        r = audit.verify(path)
        out = (bool(r.ok), getattr(r, "count", None), getattr(r, "first_bad_seq", None),
               str(getattr(r, "reason", "")))
    except Exception as e:  # a verifier failure is shown, not raised: the page must still answer
        out = (False, None, None, f"verification failed: {type(e).__name__}: {e}")
    with _lock:
        _cache.clear()
        _cache[key] = out
    return out


def tail_lines(path: Path, skip: int, n: int, block: int = 65536) -> tuple[list[str], bool]:
    """Lines ``skip .. skip+n`` counted from the end of the file; and whether older ones exist."""
    want = skip + n + 1
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        buf = b""
        while pos > 0 and buf.count(b"\n") <= want:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
    parts = buf.split(b"\n")
    if pos > 0:
        parts = parts[1:]  # the first part may be a line cut in the middle
    lines = [ln for ln in parts if ln.strip()]
    newest_first = lines[::-1]
    chunk = newest_first[skip:skip + n]
    return [ln.decode("utf-8", "replace") for ln in chunk], len(newest_first) > skip + n


def audit_status(lab_dir: Path | None, page: int = 0, per_page: int = 100) -> AuditStatus:
    try:
        importlib.import_module("nightlab.audit")
        available = True
    except ImportError:
        available = False
    if lab_dir is None:
        return AuditStatus(available, False, reason="no lab folder given (start with --lab)")
    path = Path(lab_dir) / AUDIT_FILE
    if not path.exists():
        reason = "" if available else "audit log not available"
        return AuditStatus(available, False, reason=reason or "no audit log yet", path=str(path))
    ok, count, bad, reason = _verify(path) if available else (None, None, None, "audit log not available")
    raw, more = tail_lines(path, page * per_page, per_page)
    entries = []
    for line in raw:
        try:
            e = json.loads(line)
        except ValueError:
            e = {"kind": "(unreadable line)", "data": line[:200]}
        entries.append(e if isinstance(e, dict) else {"data": e})
    return AuditStatus(available, True, ok, count, bad, reason, str(path), entries, page, more)
