"""Text for one line of a terminal, a table cell or a commit subject: never cut silently.

``clip`` cuts at a separator where one is near, and always marks the cut with ``…`` — a
description cut mid-number without a mark reads as a different number. ``one_line`` folds
a multi-line message (a git error, a log tail) into one line. ``printable`` makes text a run or a
researcher wrote safe to print on a terminal.
"""

from __future__ import annotations

import re

ELLIPSIS = "…"
# C0 controls but tab and newline, DEL, C1 controls: ESC sequences move the cursor (and can redraw a
# table printed above as "keep"), set the title or write the clipboard (OSC 52); CR overwrites a line
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every terminal control character but tab and newline shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def clip(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters; a cut ends with ``…``, at a separator when one is near."""
    if len(text) <= limit:
        return text
    if limit <= 1:
        return ELLIPSIS[:limit]
    cut = text[: limit - 1]
    for sep in (", ", "; ", " "):
        at = cut.rfind(sep)
        if at >= max(1, (limit * 3) // 4):
            cut = cut[:at]
            break
    return cut.rstrip(" ,;:") + ELLIPSIS


def one_line(text: str, sep: str = " | ") -> str:
    """The lines of ``text`` joined by ``sep`` (blank lines dropped, tabs as spaces)."""
    return sep.join(ln.strip() for ln in text.replace("\t", " ").splitlines() if ln.strip())


def first_line(text: str, limit: int = 200) -> str:
    """The first non-blank line of ``text``, clipped to ``limit``."""
    for ln in (text or "").splitlines():
        if ln.strip():
            return clip(ln.strip(), limit)
    return ""
