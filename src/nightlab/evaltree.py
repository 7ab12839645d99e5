"""The clean tree a protected evaluator (or the holdout command) runs in.

Nothing a run wrote can be imported or executed by the evaluator, because the evaluator never sees
the run's worktree. :func:`build` makes a fresh folder under ``.nightlab/eval/`` holding:

- ``tree/`` (the evaluator's working directory): the lab's non-editable files as of the session's
  trusted commit and the candidate's committed editable files — both read from git objects, never
  from the worktree — plus the run's declared outputs (``[evaluate] outputs``), copied as regular
  files. Holdout files are left out of the evaluator's tree; ``[sandbox] hide`` files out of both,
  unless they are also ``[evaluate] files`` (hidden from runs, read by the evaluator).
- ``trusted/``: the non-editable files again (hard links to the same bytes); the evaluator's ``PYTHONPATH``
  (``$NIGHTLAB_TRUSTED_DIR``). With ``PYTHONSAFEPATH=1`` the working directory is not on
  ``sys.path``, so ``import x`` finds the lab's trusted helpers, then the standard library and
  site-packages, never a committed editable module or an output. An evaluator should not import
  the candidate's code at all (its module-level code would run in the trusted process); tinygpt's
  rebuilds the model from the protected model.py and a weights-only checkpoint.

Outputs are rejected (:class:`OutputRejected`, recorded as a ``crash`` with the reason) when one is
a symlink (or lies under a symlinked folder), a folder where a file is expected, a FIFO, socket or
device, a hard link (it may share its inode with a protected or holdout file), would replace a
committed file, or when together they exceed ``max_bytes``. Files are opened with
``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``, so a FIFO can never block the harness.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nightlab import globs
from nightlab.errors import GitError
from nightlab.workspace import Workspace, wipe

CHUNK = 1 << 20
MAX_OUTPUT_FILES = 10_000  # a run that leaves more output files than this is not evaluated
MAX_OUTPUT_DEPTH = 32  # folders above an output (a run can nest thousands: copying would recurse)
# outputs are data, never code an interpreter could pick up (a Python without PYTHONSAFEPATH
# puts the working directory first on sys.path)
IMPORTABLE = (".py", ".pyc", ".pyo", ".pyw", ".pth", ".so", ".pyd")


def shown(rel: str) -> str:
    """A run-chosen path as printable, storable text (bytes that are not UTF-8 become escapes)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class OutputRejected(Exception):
    """A declared output the evaluator may not see; the message says which and why."""


@dataclass(frozen=True)
class CleanTree:
    root: Path  # the temporary folder (remove with :func:`remove`)
    lab: Path  # the working directory: trusted + committed editable files + outputs
    trusted: Path  # PYTHONPATH: the non-editable files only
    outputs: tuple[str, ...]  # the outputs copied (lab-relative)
    output_bytes: int


def _tree(ws: Workspace, commit: str) -> list[tuple[str, str, str]]:
    """(mode, blob id, lab-relative path) of the regular files of ``commit`` in the lab folder."""
    args = ["ls-tree", "-r", "-z", commit]
    if ws.lab_rel:
        args += ["--", ws.lab_rel]
    out: list[tuple[str, str, str]] = []
    for rec in ws.git(*args).split("\0"):
        if not rec:
            continue
        meta, _, path = rec.partition("\t")
        mode, kind, oid = meta.split()
        lab_path = ws.lab_path(path)
        if kind == "blob" and mode in ("100644", "100755") and lab_path is not None:
            out.append((mode, oid, lab_path))
    return out


def _write_blobs(ws: Workspace, files: list[tuple[str, Path]]) -> None:
    """Write blob ``oid`` to ``path`` for each pair, streamed from one ``git cat-file --batch`` (raw
    content: no filters, no attributes; nothing held in memory but one chunk)."""
    if not files:
        return
    with tempfile.TemporaryFile() as ids:
        ids.write("".join(f"{oid}\n" for oid, _ in files).encode())
        ids.seek(0)
        proc = subprocess.Popen(["git", "cat-file", "--batch"], cwd=ws.lab_dir, env=ws._env, stdin=ids,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            for oid, path in files:
                header = proc.stdout.readline().split()
                if len(header) != 3 or header[1] != b"blob":
                    raise GitError(f"git cat-file: unexpected answer for {oid}: {b' '.join(header)[:100]!r}")
                left = int(header[2])
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as out:
                    while left:
                        chunk = proc.stdout.read(min(CHUNK, left))
                        if not chunk:
                            raise GitError(f"git cat-file: {oid} cut short")
                        out.write(chunk)
                        left -= len(chunk)
                proc.stdout.read(1)  # the newline after each object
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()


def build(ws: Workspace, *, trusted_commit: str, commit: str, editable: list[str], protected: list[str],
          exclude: Iterable[str], run_root: Path | None, outputs: Iterable[str], max_bytes: int,
          parent: Path, hide: Iterable[str] = (), keep: Iterable[str] = ()) -> CleanTree:
    """A clean tree for ``commit`` (see the module docstring); raises :class:`OutputRejected`.

    Files matching ``editable`` and not ``protected`` come from ``commit``; every other file from
    ``trusted_commit``. Files matching ``exclude``, or ``hide`` but not ``keep``, from neither.
    """
    drop, hidden, keep = list(exclude), list(hide), list(keep)

    def excluded(p: str) -> bool:
        return globs.match(p, drop) or (globs.match(p, hidden) and not globs.match(p, keep))

    def mutable(p: str) -> bool:
        return globs.match(p, editable) and not globs.match(p, protected)

    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="eval-", dir=parent))
    lab, trusted = root / "tree", root / "trusted"
    lab.mkdir()
    trusted.mkdir()
    try:
        base = [(m, o, p) for m, o, p in _tree(ws, trusted_commit)
                if not mutable(p) and not excluded(p)]
        mine = [(m, o, p) for m, o, p in _tree(ws, commit) if mutable(p) and not excluded(p)]
        _write_blobs(ws, [(oid, lab / path) for _, oid, path in base + mine])
        for _, _, path in base:
            (trusted / path).parent.mkdir(parents=True, exist_ok=True)
            os.link(lab / path, trusted / path)  # the same trusted bytes, stored once
        committed = {path for _, _, path in base + mine}
        forbidden = [*protected, *drop, *hidden]
        copied, total = _copy_outputs(run_root, list(outputs), lab, committed, forbidden, max_bytes)
        return CleanTree(root, lab, trusted, tuple(copied), total)
    except BaseException:
        remove(root)
        raise


def _copy_outputs(run_root: Path | None, patterns: list[str], lab: Path, committed: set[str],
                  forbidden: list[str], max_bytes: int) -> tuple[list[str], int]:
    if run_root is None or not patterns:
        return [], 0
    total = 0
    copied: list[str] = []
    for rel in globs.blocked(run_root, patterns):
        raise OutputRejected(f"{shown(rel)} is a symlink where [evaluate] outputs expects a folder")
    found = globs.expand(run_root, patterns, dirs=True)
    if len(found) > MAX_OUTPUT_FILES:
        raise OutputRejected(f"the run left {len(found)} outputs (more than {MAX_OUTPUT_FILES})")
    # a folder a pattern names literally is an error (``outputs = ["ckpt.pt"]`` and the run made a folder);
    # a folder a wildcard reaches (``out/**``, ``out/*``) is skipped: the files in it are listed on their own
    literal = {"/".join(globs.segments(p)) for p in patterns if not p.endswith("/") and not globs.is_magic(p)}
    for rel in found:
        try:
            if rel not in literal and stat.S_ISDIR(os.lstat(run_root / rel).st_mode):
                continue
            total = _check_and_copy(run_root, rel, lab, committed, forbidden, total, max_bytes)
        except OSError as e:  # vanished, name too long, disk full: the outputs cannot be evaluated
            raise OutputRejected(f"{shown(rel)} cannot be copied: {e.strerror or e}") from None
        copied.append(rel)
    return copied, total


def _check_and_copy(run_root: Path, rel: str, lab: Path, committed: set[str], forbidden: list[str],
                    total: int, max_bytes: int) -> int:
    src = run_root / rel
    st = os.lstat(src)
    mode = st.st_mode
    name = shown(rel)
    if stat.S_ISLNK(mode):
        raise OutputRejected(f"{name} is a symlink; outputs must be regular files")
    if stat.S_ISDIR(mode):
        raise OutputRejected(f"{name} is a folder where [evaluate] outputs expects a file")
    if not stat.S_ISREG(mode):
        raise OutputRejected(f"{name} is not a regular file ({_kind(mode)}); outputs must be regular files")
    if rel.count("/") > MAX_OUTPUT_DEPTH:
        raise OutputRejected(f"{name[:200]} lies more than {MAX_OUTPUT_DEPTH} folders deep")
    if rel.lower().endswith(IMPORTABLE):
        raise OutputRejected(f"{name} is a Python module or extension; outputs are data (commit code as "
                             "editable files)")
    if st.st_nlink > 1:
        raise OutputRejected(f"{name} is a hard link ({st.st_nlink} names); outputs must be plain files")
    if rel in committed or any(str(a) in committed for a in PurePosixPath(rel).parents):
        raise OutputRejected(f"{name} would replace a committed file of the lab")
    if globs.match(rel, forbidden):
        raise OutputRejected(f"{name} is a protected, holdout or hidden path, not an output")
    return _copy_one(src, lab / rel, st, total, max_bytes, name)


def _copy_one(src: Path, dest: Path, st: os.stat_result, total: int, max_bytes: int, rel: str) -> int:
    too_big = OutputRejected(f"the outputs exceed [evaluate] max_output_mb ({max_bytes / 2**20:g} MB) at {rel}")
    if total + st.st_size > max_bytes:
        raise too_big
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OutputRejected(f"{rel} cannot be opened: {e.strerror or e}") from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise OutputRejected(f"{rel} changed while it was being copied")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as out:
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise too_big
                out.write(chunk)
    except OSError as e:
        raise OutputRejected(f"{rel} cannot be copied: {e.strerror or e}") from None
    finally:
        os.close(fd)
    os.chmod(dest, 0o444)
    return total


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def remove(root: Path) -> None:
    wipe(root)  # never recursive: nothing in a clean tree can make its removal fail


def session_dir(ws: Workspace, tag: str) -> Path:
    """Where a session's clean trees are made: ``.nightlab/eval/<tag>/`` (one folder per session, so a
    resume removes what a killed harness left without touching another session's live trees)."""
    return ws.state_dir / "eval" / tag


def remove_stale(ws: Workspace, tag: str) -> list[Path]:
    """The clean trees a killed harness left for session ``tag`` (call once its processes are dead)."""
    folder = session_dir(ws, tag)
    if not folder.is_dir() or folder.is_symlink():
        return []
    stale = sorted(p for p in folder.iterdir() if p.name.startswith("eval-"))
    for p in stale:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            remove(p)
    return stale


__all__ = ["CleanTree", "OutputRejected", "build", "remove", "remove_stale", "session_dir"]
