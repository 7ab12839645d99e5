"""The guard: what a candidate may touch, checked before anything reaches disk and again after.

Three checks, each returning a problem ``"<rule> (<detail>)"`` (or ``None`` when the candidate
passes); the engine records a problem as ``rejected`` with reason ``policy: <rule> (<detail>)``
(rules: see :mod:`nightlab.permissions`):

- :meth:`Guard.check_paths` on the paths a candidate *claims* to touch (its ``files`` keys
  or the headers of its diff), before a byte is written;
- :meth:`Guard.check_changes` on what git reports the worktree *actually* changed, after
  the edit is applied and staged (catches symlinks, mode changes and anything a diff hid);
- :meth:`Guard.check_size` on the canonical diff git computed: ``[permissions]
  max_diff_bytes`` and ``max_new_files``.

Protected files (the spec's ``protected`` globs plus ``nightlab.toml`` and ``program.md``, the
``[evaluate]``/``[holdout]`` ``files``, and every lab file their commands name, e.g. ``evaluate.py``
in ``python evaluate.py``) are hashed at session start and verified in every worktree before every
run and every evaluation.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from nightlab.permissions import diff_violation, violation
from nightlab.spec import PROGRAM_FILE, SPEC_FILE, Spec, evaluator_files, matches
from nightlab.workspace import Change, Workspace

IMPLICITLY_PROTECTED = [SPEC_FILE, PROGRAM_FILE]
# sha256 -> size of every protected file hashed in this process: a digest fixes the content, so
# the size is known too, and a file of another size is "changed" without reading it (a run can
# leave a 1 TB sparse file where the evaluator was)
_SIZES: dict[str, int] = {}
_DIFF_PATH = re.compile(r"^(?:---|\+\+\+) (?:\"?[ab]/)?(.+?)\"?\t?$")
_GIT_HEADER = re.compile(r"^diff --git \"?a/(.+?)\"? \"?b/(.+?)\"?$")


def diff_paths(diff: str) -> list[str]:
    """Every path a unified diff names (headers and ---/+++ lines), ``/dev/null`` skipped."""
    out: list[str] = []
    for line in diff.splitlines():
        m = _GIT_HEADER.match(line)
        if m:
            out.extend([m.group(1), m.group(2)])
            continue
        if line.startswith(("--- ", "+++ ")):
            raw = line[4:].split("\t")[0].strip().strip('"')
            if raw == "/dev/null":
                continue
            if raw.startswith(("a/", "b/")):
                raw = raw[2:]
            out.append(raw)
        elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
            out.append(line.split(" ", 2)[2])
    return list(dict.fromkeys(out))


def path_problem(path: str) -> str | None:
    """Why a lab-relative path is unsafe, or None."""
    if not path or path.strip() != path:
        return f"{path!r}: empty or padded path"
    if "\\" in path or "\0" in path:
        return f"{path!r}: backslash or NUL in path"
    p = PurePosixPath(path)
    if p.is_absolute():
        return f"{path!r}: absolute path escapes the lab"
    if ".." in p.parts:
        return f"{path!r}: '..' escapes the lab"
    if p.parts and p.parts[0] in (".git", ".nightlab"):
        return f"{path!r}: nightlab's and git's own folders are off limits"
    # a `.git` file or folder deeper down makes a nested repository: `git add -A` of the worktree then
    # fails ("does not have a commit checked out") and would stop the session, or stages a gitlink
    if any(_git_alias(part) for part in p.parts):
        return f"{path!r}: a .git file or folder (a nested repository) is off limits"
    return None


def _git_alias(name: str) -> bool:
    """``.git`` in any case, or a name Windows or macOS file systems read as it (git's own rule):
    trailing dots or spaces, an NTFS stream (``.git::$INDEX_ALLOCATION``), the 8.3 name ``git~1``."""
    low = name.casefold()
    return low.rstrip(". ") == ".git" or low.startswith(".git:") or low == "git~1"


class Guard:
    def __init__(self, spec: Spec, workspace: Workspace) -> None:
        self.editable = list(spec.files.editable)
        # evaluator and holdout files (listed, or named by their commands) are protected too:
        # nobody edits them, they are hash-checked
        self.auto_protected = [f for f, _ in evaluator_files(spec, workspace.lab_dir)]
        self.protected = list(dict.fromkeys([*spec.files.protected, *IMPLICITLY_PROTECTED, *self.auto_protected]))
        self.permissions = spec.permissions
        self.ws = workspace

    def check_paths(self, paths: Iterable[str]) -> str | None:
        for path in paths:
            problem = path_problem(path)
            if problem:
                return violation("path", problem)
            if matches(path, self.protected):
                return violation("protected", f"{path} is a protected file")
            if not matches(path, self.editable):
                allowed = ", ".join(self.editable)
                return violation("editable", f"{path} is outside the editable files ({allowed})")
        return None

    def check_changes(self, changes: Iterable[Change]) -> str | None:
        for ch in changes:
            lab_path = self.ws.lab_path(ch.path)
            if lab_path is None:
                return violation("path", f"{ch.path}: outside the lab folder")
            if ch.new_mode == "120000":
                return violation("file_type", f"{lab_path}: symlinks are not allowed")
            if ch.new_mode == "160000":
                return violation("file_type", f"{lab_path}: submodules are not allowed")
            problem = self.check_paths([lab_path])
            if problem:
                return problem
        return None

    def check_size(self, changes: Iterable[Change], diff: str) -> str | None:
        """``max_diff_bytes`` on the canonical diff and ``max_new_files`` on the added paths."""
        added = [self.ws.lab_path(c.path) or c.path for c in changes if c.status == "A"]
        return diff_violation(diff, added, max_diff_bytes=self.permissions.max_diff_bytes,
                              max_new_files=self.permissions.max_new_files)

    # ------------------------------------------------------------------ protected hashes

    def protected_files(self, commit: str) -> list[str]:
        return [p for p in self.ws.ls_files(commit) if matches(p, self.protected)]

    def hash_protected(self, commit: str) -> dict[str, str]:
        """sha256 of every protected file in ``commit`` (lab-relative path -> hex)."""
        out: dict[str, str] = {}
        for p in self.protected_files(commit):
            data = self.ws.read_file(commit, p)
            out[p] = hashlib.sha256(data).hexdigest()
            _SIZES[out[p]] = len(data)
        return out

    @staticmethod
    def verify_protected(lab_root: Path, hashes: dict[str, str]) -> str | None:
        """Check the files on disk under ``lab_root`` against the session's hashes.

        Never follows a symlink (in the file or a folder above it), never blocks on a FIFO, never
        reads a file whose size differs from the hashed one.
        """
        for path, digest in hashes.items():
            if _replaced(lab_root, path):
                return violation("protected", f"{path}: protected file missing or replaced")
            try:
                fd = os.open(lab_root / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return violation("protected", f"{path}: protected file missing or replaced")
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return violation("protected", f"{path}: protected file missing or replaced")
                size = _SIZES.get(digest)
                if size is not None and st.st_size != size:
                    return violation("protected", f"{path}: protected file changed")
                h = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != digest:
                return violation("protected", f"{path}: protected file changed")
        return None


def _replaced(lab_root: Path, path: str) -> bool:
    """True when a folder on the way to ``path`` is not a real folder (a symlink, say)."""
    cur = lab_root
    for part in PurePosixPath(path).parts[:-1]:
        cur = cur / part
        try:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return True
        except OSError:
            return True
    return False
