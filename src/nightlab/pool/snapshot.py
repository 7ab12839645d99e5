"""The sanitised snapshot of the pool head that workers start from, and its git bundle.

The snapshot is a parentless, deterministic commit (fixed author, committer and date; the message names the
pool head) whose tree is the LAB folder of the head (the bundle's root is the lab folder), without:

- ``.nightlab/`` (the host's ledger, audit log, keys),
- every file ``[holdout] files`` matches and every lab file ``[holdout] command`` names (the holdout never
  leaves the host),
- every path ``[sandbox] hide`` hides from runs and researchers,

and with ``nightlab.toml`` rewritten without its ``[holdout]`` and ``[notify]`` tables (notify targets are the
host's secrets). Having no parent, the bundle carries no older object: a holdout file committed in history
stays on the host too. The bundle holds ``refs/heads/pool`` (and ``HEAD`` pointing at it).

It is built in a throwaway bare repository that borrows the lab's objects (``objects/info/alternates``), so
the lab's repository gains no ref and no object.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from nightlab.errors import GitError, UsageError
from nightlab.spec import SPEC_FILE, Spec, command_files, matches
from nightlab.workspace import Workspace

BRANCH = "refs/heads/pool"
DROPPED_TABLES = ("holdout", "notify")
IDENTITY = {"GIT_AUTHOR_NAME": "nightlab pool", "GIT_AUTHOR_EMAIL": "pool@nightlab.invalid",
            "GIT_COMMITTER_NAME": "nightlab pool", "GIT_COMMITTER_EMAIL": "pool@nightlab.invalid",
            "GIT_AUTHOR_DATE": "2000-01-01T00:00:00 +0000", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00 +0000"}
_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_\-\"'.]+?)\s*\]\]?\s*(#.*)?$")


@dataclass(frozen=True)
class Snapshot:
    head: str  # the pool commit it shows
    commit: str  # the snapshot commit (what the worker checks out)
    bundle: Path
    excluded: tuple[str, ...]  # lab-relative paths left out


def sanitised_spec(text: str) -> str:
    """``nightlab.toml`` without its ``[holdout]`` and ``[notify]`` tables (and their sub-tables)."""
    out: list[str] = []
    dropping = False
    for line in text.splitlines(keepends=True):
        m = _HEADER.match(line)
        if m:
            top = m.group(1).strip("\"'").split(".")[0]
            dropping = top in DROPPED_TABLES
        if not dropping:
            out.append(line)
    result = "".join(out)
    data = tomllib.loads(result)
    left = [t for t in DROPPED_TABLES if t in data]
    if left:  # written inline (holdout = {...}) or as dotted keys: refuse rather than leak
        raise UsageError(f"{SPEC_FILE}: cannot remove [{left[0]}] for the pool's workers (it is not written as a "
                         f"[{left[0]}] table)", f"write it as a [{left[0]}] table of its own")
    return result


def excluded(spec: Spec, files: list[str], lab_dir: Path) -> list[str]:
    """The lab-relative paths of ``files`` that never leave the host."""
    holdout_cmd = set(command_files(spec.holdout.command, lab_dir))
    hide = [p.rstrip("/") for p in spec.sandbox.hide]
    out = []
    for f in files:
        if (f == ".nightlab" or f.startswith(".nightlab/") or f in holdout_cmd or matches(f, spec.holdout.files)
                or matches(f, hide) or any(f.startswith(h + "/") for h in hide)):
            out.append(f)
    return out


class Snapshots:
    """Bundles of the pool head, built once per head and cached under ``cache_dir``. Thread-safe."""

    def __init__(self, ws: Workspace, spec: Spec, cache_dir: Path) -> None:
        self.ws = ws
        self.spec = spec
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._done: dict[str, Snapshot] = {}

    def get(self, head: str) -> Snapshot:
        with self._lock:
            snap = self._done.get(head)
            if snap is None or not snap.bundle.exists():
                snap = build(self.ws, self.spec, head, self.cache_dir)
                self._done = {head: snap}  # only the newest head is served
                for old in self.cache_dir.glob("*.bundle"):
                    if old != snap.bundle:
                        old.unlink(missing_ok=True)
            return snap


def build(ws: Workspace, spec: Spec, head: str, out_dir: Path) -> Snapshot:
    """Build the snapshot of ``head`` and write its bundle into ``out_dir`` (``<head>.bundle``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ws.ls_files(head)
    drop = excluded(spec, files, ws.lab_dir)
    spec_text = sanitised_spec(ws.read_file(head, SPEC_FILE).decode("utf-8")) if SPEC_FILE in files else None
    with tempfile.TemporaryDirectory(prefix="nightlab-snapshot-", dir=out_dir) as tmp:
        repo = Path(tmp) / "repo"  # not bare: update-index wants a work tree (an empty one, never read)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(IDENTITY)
        env["GIT_INDEX_FILE"] = str(Path(tmp) / "index")
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        env["GIT_CONFIG_GLOBAL"] = os.devnull

        def git(*args: str, input: bytes | None = None) -> str:
            proc = subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "-c", "gc.auto=0", *args],
                                  cwd=repo if repo.exists() else tmp, env=env, input=input, capture_output=True)
            if proc.returncode != 0:
                raise GitError(f"git {' '.join(args[:2])} failed while building the pool snapshot: "
                               f"{proc.stderr.decode('utf-8', 'replace').strip()[:500]}")
            return proc.stdout.decode("utf-8", "surrogateescape").strip()

        git("init", "-q", str(repo))
        (repo / ".git" / "objects" / "info" / "alternates").write_text(str(ws.git_dir / "objects") + "\n")
        tree_ish = f"{head}:{ws.lab_rel}" if ws.lab_rel else f"{head}^{{tree}}"
        git("read-tree", tree_ish)
        if drop:
            git("update-index", "--force-remove", "-z", "--stdin",
                input=b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in drop))
        if spec_text is not None:
            blob = git("hash-object", "-w", "--stdin", input=spec_text.encode())
            git("update-index", "--cacheinfo", f"100644,{blob},{SPEC_FILE}")
        tree = git("write-tree")
        commit = git("commit-tree", tree, "-m", f"nightlab pool snapshot of {head}\n\nnightlab-pool-head: {head}\n")
        git("update-ref", BRANCH, commit)
        git("symbolic-ref", "HEAD", BRANCH)
        tmp_bundle = Path(tmp) / "out.bundle"
        git("bundle", "create", "-q", str(tmp_bundle), "HEAD", BRANCH)
        bundle = out_dir / f"{head}.bundle"
        shutil.move(tmp_bundle, bundle)
    return Snapshot(head=head, commit=commit, bundle=bundle, excluded=tuple(drop))


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
