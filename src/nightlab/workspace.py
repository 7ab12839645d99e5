"""The only code that touches git: worktrees per experiment, commits, the session branch.

Rules this module keeps:
- the session branch ``nightlab/<tag>`` only moves forward, by compare-and-swap
  (``git update-ref <ref> <new> <old>``), to a commit the policy verified;
- every materialised candidate is committed *before* its run and kept under
  ``refs/nightlab/<tag>/<idx>``, so discarded ideas stay inspectable and replayable;
- after a run, git is never invoked inside the experiment's worktree (the run could have
  rewritten its ``.git`` pointer); the worktree is removed from the outside;
- every worktree is a new, empty folder checked out fresh: nothing a previous run left (ignored
  files, nested ``.git`` dirs, read-only dirs, symlinks) survives into the next experiment;
- worktree *registrations* (``.git/worktrees/<id>``) are reused: one is made (``git worktree add``,
  serialised) the first time no free one is at hand, locked so that ``git worktree prune`` keeps it,
  and re-pointed at each new folder from the outside (``git --git-dir=<admin> --work-tree=<folder>``),
  without a lock the slots share; :meth:`Workspace.drop_registrations` removes them when the session
  ends, and :meth:`Workspace.remove_stale_worktrees` after a kill;
- hooks never run (``core.hooksPath=/dev/null``), and commits carry a fixed identity.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from nightlab import escape
from nightlab.errors import GitError, UsageError

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "nightlab",
    "GIT_AUTHOR_EMAIL": "nightlab@localhost",
    "GIT_COMMITTER_NAME": "nightlab",
    "GIT_COMMITTER_EMAIL": "nightlab@localhost",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_OPTIONAL_LOCKS": "0",
}
_GIT_CFG = ["-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false", "-c", "core.fsmonitor=false"]
# what `git add` says of a path it refuses to track (git's verify_path; an embedded repository)
_REFUSED_PATHS = ("error: invalid path ", "does not have a commit checked out")
# the lock text of a reusable registration (git writes "initializing" while it makes one)
POOL_LOCK = "nightlab: reused for experiment worktrees"


class ApplyError(Exception):
    """A candidate's edit did not apply (the experiment becomes ``invalid``)."""


@dataclass(frozen=True)
class Change:
    """One path changed by a staged candidate, as ``git diff --raw`` reports it."""

    status: str  # A, M, D, T, R...
    path: str  # repo-relative
    new_mode: str  # e.g. 100644, 100755, 120000 (symlink), 160000 (submodule), 000000 (deleted)
    old_path: str = ""


@dataclass(frozen=True)
class Staged:
    """What :meth:`Workspace.stage` staged: the changes and the canonical diff against HEAD."""

    changes: list[Change]
    diff: str


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def wipe(path: Path) -> None:
    """Remove ``path`` and all it holds without following links and without recursion. A link or a
    file is unlinked; read-only folders are made writable first (as non-root).

    A run controls what its worktree holds: folders nested thousands deep (``shutil.rmtree`` recurses
    and raised RecursionError out of the experiment, on Python 3.11, which stopped the session and
    every ``--resume``; their paths also outgrow PATH_MAX), read-only folders, symlinks. So each
    folder below the top is moved up into ``path`` under a fresh name before it is emptied: every
    call works on one name relative to an open folder, and one folder is open at a time.
    """
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
        return
    try:
        top = os.open(path, _DIR)
    except OSError:
        return
    work = [""]  # folders to empty, relative to ``top`` ("" is the top itself)
    tried: set[str] = set()
    moved = 0
    try:
        while work:
            rel = work[-1]
            tried.add(rel)
            try:
                fd = os.open(rel, _DIR, dir_fd=top) if rel else os.dup(top)
            except OSError:
                work.pop()
                continue
            more = False
            try:
                if os.fstat(fd).st_mode & 0o700 != 0o700:
                    os.fchmod(fd, 0o700)
                with os.scandir(fd) as it:
                    entries = list(it)
                for e in entries:
                    try:
                        if not e.is_dir(follow_symlinks=False):
                            os.unlink(e.name, dir_fd=fd)
                            continue
                        if e.stat(follow_symlinks=False).st_mode & 0o700 != 0o700:
                            os.chmod(e.name, 0o700, dir_fd=fd)  # a folder (lstat said so), not a link
                        child = e.name if not rel else f"{rel}/{e.name}"
                        if rel:  # up into the top, under a fresh name: paths stay short
                            moved += 1
                            with contextlib.suppress(OSError):
                                os.rename(e.name, f".nightlab-wipe-{moved}", src_dir_fd=fd, dst_dir_fd=top)
                                child = f".nightlab-wipe-{moved}"
                        if child not in tried:
                            work.append(child)
                            more = True
                    except OSError:
                        continue
            except OSError:
                pass
            finally:
                os.close(fd)
            if not more:  # emptied (or as empty as it gets): remove it
                work.pop()
                if rel:
                    with contextlib.suppress(OSError):
                        os.rmdir(rel, dir_fd=top)
    finally:
        os.close(top)
    with contextlib.suppress(OSError):
        path.rmdir()


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_GIT_ENV)
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(k, None)
    return env


class Workspace:
    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = Path(lab_dir).resolve()
        self._env = _env()
        try:
            top = self._run(["rev-parse", "--show-toplevel"], cwd=self.lab_dir).strip()
        except GitError:
            raise UsageError(
                f"{self.lab_dir} is not inside a git repository",
                "run `git init && git add -A && git commit -m init` there first",
            ) from None
        self.repo_root = Path(top).resolve()
        rel = self.lab_dir.relative_to(self.repo_root).as_posix()
        self.lab_rel = "" if rel == "." else rel
        self.state_dir = self.lab_dir / ".nightlab"
        self.worktrees_dir = self.state_dir / "worktrees"
        self.git_dir = Path(self._run(["rev-parse", "--path-format=absolute", "--git-common-dir"]).strip())
        # `git worktree add/prune` touch shared state in .git/worktrees: one at a time per process (measured:
        # two concurrent adds fail, "failed to read .git/worktrees/X/commondir", git reads the half-made one)
        self._worktree_lock = threading.RLock()
        # reusable registrations (admin dirs under .git/worktrees): free ones, and the one each worktree holds
        self._pool_lock = threading.Lock()
        self._free: list[Path] = []
        self._held: dict[Path, Path] = {}

    # ------------------------------------------------------------------ plumbing

    def _run(self, args: list[str], *, cwd: Path | None = None, input: str | None = None,
             check: bool = True) -> str:
        # bytes in and out: a file name or a diff line that is not UTF-8 travels as surrogateescape
        # (what os.fsdecode gives, so the path still names the file); storing it escapes it
        proc = subprocess.run(
            ["git", *_GIT_CFG, *args],
            cwd=cwd or self.lab_dir,
            env=self._env,
            input=None if input is None else input.encode("utf-8", "surrogateescape"),
            capture_output=True,
        )
        if check and proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "backslashreplace").strip()
            raise GitError(f"git {' '.join(args[:3])} failed: {err[:500]}")
        return proc.stdout.decode("utf-8", "surrogateescape")

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return self._run(list(args), cwd=cwd)

    def repo_path(self, lab_path: str) -> str:
        """Lab-relative path -> repo-relative path."""
        return f"{self.lab_rel}/{lab_path}" if self.lab_rel else lab_path

    def lab_path(self, repo_path: str) -> str | None:
        """Repo-relative path -> lab-relative path, or None when outside the lab."""
        if not self.lab_rel:
            return repo_path
        prefix = self.lab_rel + "/"
        return repo_path[len(prefix):] if repo_path.startswith(prefix) else None

    def ensure_state_dir(self) -> None:
        """Create ``.nightlab/`` and keep it out of git (via ``info/exclude``, not .gitignore)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        exclude = self.git_dir / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        if ".nightlab/" not in text.split("\n"):
            with exclude.open("a") as f:
                f.write(("" if text.endswith("\n") or not text else "\n") + ".nightlab/\n")

    # ------------------------------------------------------------------ refs

    def head(self) -> str:
        try:
            return self._run(["rev-parse", "--verify", "HEAD^{commit}"]).strip()
        except GitError:
            raise UsageError(
                f"the git repository at {self.repo_root} has no commits",
                "commit your lab first: git add -A && git commit -m 'lab'",
            ) from None

    def resolve(self, ref: str) -> str | None:
        out = self._run(["rev-parse", "--verify", "--quiet", ref + "^{commit}"], check=False).strip()
        return out or None

    def create_branch(self, branch: str, commit: str) -> None:
        # the empty old value makes update-ref refuse when the branch already exists
        self._run(["update-ref", f"refs/heads/{branch}", commit, ""])

    def advance_branch(self, branch: str, new: str, old: str) -> None:
        """Compare-and-swap: move ``branch`` from ``old`` to ``new`` or fail loudly."""
        try:
            self._run(["update-ref", f"refs/heads/{branch}", new, old])
        except GitError as e:
            raise GitError(
                f"the branch {branch} moved under nightlab (expected {old[:10]}): {e.message}",
                "do not commit to a nightlab/* branch while a session runs; resume with --resume",
            ) from None

    def is_ancestor(self, a: str, b: str) -> bool:
        return subprocess.run(
            ["git", "merge-base", "--is-ancestor", a, b], cwd=self.lab_dir, env=self._env,
            capture_output=True,
        ).returncode == 0

    def keep_ref(self, tag: str, idx: int, commit: str) -> None:
        self._run(["update-ref", f"refs/nightlab/{tag}/{idx}", commit])

    # ------------------------------------------------------------------ reading commits

    def ls_files(self, commit: str) -> list[str]:
        """Repo-relative paths of the files in ``commit`` under the lab folder, lab-relative."""
        args = ["ls-tree", "-r", "-z", "--name-only", commit]
        if self.lab_rel:
            args += ["--", self.lab_rel]
        out = self._run(args)
        paths = [p for p in out.split("\0") if p]
        return [lp for p in paths if (lp := self.lab_path(p)) is not None]

    def read_file(self, commit: str, lab_path: str) -> bytes:
        proc = subprocess.run(
            ["git", "cat-file", "blob", f"{commit}:{self.repo_path(lab_path)}"],
            cwd=self.lab_dir, env=self._env, capture_output=True,
        )
        if proc.returncode != 0:
            raise GitError(f"cannot read {lab_path} at {commit[:10]}: "
                           f"{proc.stderr.decode('utf-8', 'backslashreplace')[:200]}")
        return proc.stdout

    def diff(self, a: str, b: str) -> str:
        return self._run(["diff", "--no-color", "--no-ext-diff", a, b])

    # ------------------------------------------------------------------ worktrees

    def add_worktree(self, name: str, commit: str) -> Path:
        """A fresh folder ``.nightlab/worktrees/<name>`` holding ``commit``, a git worktree of the lab's repo.

        The folder is new and empty before the checkout (a leftover of that name is wiped first). Its
        registration is a free one of this workspace's pool, re-pointed at the folder, or else a new
        one (``git worktree add --no-checkout --lock``, under the lock the slots share: the only step
        that is serialised). The checkout itself is one git launch with an explicit ``--git-dir``:
        slots check out at once.
        """
        path = self.worktrees_dir / name
        if path.exists() or path.is_symlink():
            self.remove_worktree(path)
        with self._pool_lock:
            admin = self._free.pop() if self._free else None
        if admin is not None and not (admin / "commondir").is_file():
            admin = None  # removed under us (`git worktree remove --force --force`): make another
        try:
            if admin is None:
                admin = self._new_registration(path, commit)
            else:
                path.mkdir(parents=True)  # fails if anything made it since: never a used folder
                self._point(admin, path)
            (admin / "index").unlink(missing_ok=True)  # the checkout writes every file anew
            self._run([f"--git-dir={admin}", f"--work-tree={path}", "checkout", "--detach", "--force", "--quiet",
                       commit], cwd=path)
        except BaseException:
            wipe(path)
            if admin is not None:
                self._release(admin)
            raise
        with self._pool_lock:
            self._held[path] = admin
        return path

    def _new_registration(self, path: Path, commit: str) -> Path:
        """Make a locked registration for the new folder ``path`` (created by git); returns its admin dir."""
        with self._worktree_lock:
            self.worktrees_dir.mkdir(parents=True, exist_ok=True)
            self._run(["worktree", "add", "--detach", "--no-checkout", "--lock", "--reason", POOL_LOCK,
                       str(path), commit])
        # written by git a moment ago, before any run: "gitdir: <admin>"
        pointer = (path / ".git").read_text(encoding="utf-8", errors="surrogateescape").strip()
        if not pointer.startswith("gitdir: "):
            raise GitError(f"git worktree add wrote an unexpected {path / '.git'}: {pointer[:200]!r}")
        admin = Path(pointer[len("gitdir: "):])
        return admin if admin.is_absolute() else (path / admin).resolve()

    @staticmethod
    def _point(admin: Path, path: Path) -> None:
        """Point registration ``admin`` at the new folder ``path`` and back (what ``git worktree repair``
        writes: ``<path>/.git`` naming the admin dir, ``<admin>/gitdir`` naming ``<path>/.git``)."""
        (path / ".git").write_text(f"gitdir: {admin}\n", encoding="utf-8", errors="surrogateescape")
        tmp = admin / "gitdir.nightlab-tmp"
        tmp.write_text(f"{path / '.git'}\n", encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, admin / "gitdir")

    def _release(self, admin: Path) -> None:
        with self._pool_lock:
            if admin not in self._free:
                self._free.append(admin)

    def drop_registrations(self) -> int:
        """Remove the free registrations of the pool (when the session ends); returns how many."""
        with self._worktree_lock, self._pool_lock:
            dropped = list(self._free)
            self._free.clear()
            for admin in dropped:
                shutil.rmtree(admin, ignore_errors=True)
        return len(dropped)

    def _git_dir_of(self, worktree: Path) -> list[str]:
        """``--git-dir``/``--work-tree`` for git calls on a worktree this workspace checked out (none for
        another folder: git finds its repository from the folder, before a run only)."""
        with self._pool_lock:
            admin = self._held.get(worktree)
        return [] if admin is None else [f"--git-dir={admin}", f"--work-tree={worktree}"]

    def remove_worktree(self, path: Path) -> None:
        """Remove from outside: never runs git inside ``path``, never reads what the run could write.

        A worktree of the pool: the folder is wiped and its registration goes back to the pool (it is
        re-pointed at the next folder before any use). Another folder: its registration
        ``.git/worktrees/<name>`` is removed directly when its ``gitdir`` file (written by git, outside
        the worktree) names this worktree -- what ``git worktree prune`` would do for it, without a git
        launch that scans every registration under the lock the slots share; otherwise (another name, a
        half-written registration) ``git worktree prune`` runs as before.
        """
        with self._pool_lock:
            held = self._held.pop(path, None)
        if path.exists() or path.is_symlink():
            wipe(path)
        if held is not None:
            self._release(held)
            return
        admin = self.git_dir / "worktrees" / path.name
        with self._worktree_lock:
            try:
                ours = (admin / "gitdir").read_text().strip() == str(path / ".git") and not (admin / "locked").exists()
            except OSError:
                ours = False
            if ours and not path.exists():
                shutil.rmtree(admin, ignore_errors=True)
            if not ours or admin.exists():
                self._run(["worktree", "prune"], check=False)

    def remove_stale_worktrees(self, prefix: str) -> list[Path]:
        """Remove the worktrees a killed harness left: folders under ``.nightlab/worktrees`` whose
        name starts with ``prefix`` and their registrations in ``.git/worktrees``.

        A kill inside ``git worktree add`` leaves the registration locked (a ``locked`` file saying
        "initializing"), which ``git worktree prune`` skips forever: such locks are removed first,
        but only on nightlab's own registrations (pointing into ``.nightlab/worktrees`` under
        ``prefix``, or, when git died before writing ``gitdir``, named ``prefix…`` and locked by
        git's "initializing" or an empty lock). Returns the folders removed.
        """
        removed = []
        with self._worktree_lock:
            for admin, target in self._own_registrations(prefix):
                (admin / "locked").unlink(missing_ok=True)
                if target is not None and target.exists() and target not in removed:
                    wipe(target)
                    removed.append(target)
            if self.worktrees_dir.exists():
                for p in sorted(self.worktrees_dir.iterdir()):
                    if not p.name.startswith(prefix):
                        continue
                    folder = p.is_dir() and not p.is_symlink()
                    wipe(p)  # a folder, or a file next to them (an agent's prompt and log)
                    if folder and p not in removed:
                        removed.append(p)
            self._run(["worktree", "prune"], check=False)  # unlocked, without a folder or gitdir: gone
        return removed

    def _own_registrations(self, prefix: str) -> list[tuple[Path, Path | None]]:
        """``(admin dir, worktree folder or None)`` of nightlab's registrations named ``prefix…``."""
        admin_root = self.git_dir / "worktrees"
        if not admin_root.is_dir():
            return []
        mine = os.path.realpath(self.worktrees_dir)
        out: list[tuple[Path, Path | None]] = []
        for admin in sorted(admin_root.iterdir()):
            if not admin.is_dir():
                continue
            try:
                gitdir = (admin / "gitdir").read_text(encoding="utf-8", errors="surrogateescape").strip()
            except OSError:
                gitdir = ""
            if gitdir and os.path.exists(gitdir):
                target = Path(os.path.realpath(os.path.dirname(gitdir)))
                if str(target.parent) == mine and target.name.startswith(prefix):
                    out.append((admin, Path(self.worktrees_dir / target.name)))
                continue
            try:
                locked = (admin / "locked").read_text(errors="replace").strip()
            except OSError:
                locked = ""
            # git writes `locked` before `gitdir`: killed in between, it holds "initializing" (or
            # nothing, killed inside that write), and `gitdir` is missing, empty or cut short (it names
            # no file); a user's locked worktree has a complete gitdir
            # a registration of the pool between two worktrees names a folder that is gone, locked with POOL_LOCK
            if admin.name.startswith(prefix) and locked in ("", "initializing", POOL_LOCK):
                out.append((admin, None))
        return out

    def lab_in(self, worktree: Path) -> Path:
        return worktree / self.lab_rel if self.lab_rel else worktree

    # ------------------------------------------------------------------ candidates

    def write_files(self, worktree: Path, files: dict[str, str]) -> None:
        """Write lab-relative files into the worktree; refuses anything resolving outside it."""
        root = worktree.resolve()
        for lab_path, text in files.items():
            target = self.lab_in(worktree) / lab_path
            parent = target.parent.resolve()
            if parent != root and root not in parent.parents:
                raise ApplyError(f"{lab_path}: resolves outside the worktree")
            if target.is_symlink():
                raise ApplyError(f"{lab_path}: is a symlink in the worktree")
            try:
                data = text.encode("utf-8", "surrogateescape")  # bytes a researcher read as surrogates
            except UnicodeEncodeError as e:
                raise ApplyError(f"{escape.text(lab_path)}: text not writable as UTF-8 ({e.reason})") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def apply_diff(self, worktree: Path, diff: str) -> None:
        if not diff.endswith("\n"):
            diff += "\n"
        try:
            data = diff.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as e:
            raise ApplyError(f"the diff cannot be written as UTF-8 ({e.reason})") from None
        args = ["apply", "--whitespace=nowarn", "--recount"]
        if self.lab_rel:
            args.append(f"--directory={self.lab_rel}")
        proc = subprocess.run(
            ["git", *_GIT_CFG, *args, "-"], cwd=worktree, env=self._env,
            input=data, capture_output=True,
        )
        if proc.returncode != 0:
            raise ApplyError(proc.stderr.decode("utf-8", "backslashreplace").strip()[:2000] or "git apply failed")

    def stage(self, worktree: Path) -> Staged:
        """Stage everything in the worktree; report what changed against HEAD and the canonical diff.

        Two git launches: ``add -A``, then one ``diff --cached --raw -p -z`` whose raw part (NUL-separated,
        names as they are) lists the changes and whose patch part is byte for byte what ``git diff
        --cached`` prints (the patch's headers do not depend on ``-z``). The patch follows the repo's
        ``diff.renames``, as it always did; a rename or copy in the raw part is reported as the delete
        and the add it is made of (what ``--no-renames`` would list), so the guard sees every path.
        """
        at = self._git_dir_of(worktree)
        try:
            self._run([*at, "add", "-A"], cwd=worktree)
        except GitError as e:
            # a path git will not track (`x/git~1/..`, `x/.git./..`, a nested repository): the candidate's
            # edit does not apply; any other failure is the harness's
            if any(why in e.message for why in _REFUSED_PATHS):
                raise ApplyError(e.message.split(": ", 1)[-1]) from None
            raise
        out = self._run([*at, "diff", "--cached", "--raw", "-p", "-z", "--no-color", "--no-ext-diff", "HEAD"],
                        cwd=worktree)
        changes: list[Change] = []
        pos = 0
        while out.startswith(":", pos):  # ":<modes> <shas> <status>\0<path>\0[<path>\0]", then "\0", the patch
            end = out.index("\0", pos)
            parts = out[pos + 1:end].split()
            status = parts[4][0]
            paths = []
            for _ in range(2 if status in "RC" else 1):
                nxt = out.index("\0", end + 1)
                paths.append(out[end + 1:nxt])
                end = nxt
            pos = end + 1
            if status == "R":
                changes.append(Change(status="D", path=paths[0], new_mode="000000"))
            if status in "RC":
                changes.append(Change(status="A", path=paths[1], new_mode=parts[1]))
            else:
                changes.append(Change(status=status, path=paths[0], new_mode=parts[1]))
        if out.startswith("\0", pos):
            pos += 1
        return Staged(changes=changes, diff=out[pos:])

    def commit_staged(self, worktree: Path, message: str, staged: Staged) -> tuple[str, str]:
        """Commit what :meth:`stage` staged; return (sha, canonical diff against the parent).

        One launch: ``git commit`` without the ``git maintenance run --auto`` it would start after each
        commit (:meth:`maintain` runs it once, when the session ends); the new HEAD is read from the
        registration, written by git a moment ago, before any run.
        """
        at = self._git_dir_of(worktree)
        self._run([*at, "-c", "maintenance.auto=false", "commit", "-q", "--no-verify", "--allow-empty-message",
                   "-m", escape.text(message)], cwd=worktree)
        sha = ""
        if at:
            with self._pool_lock:
                admin = self._held[worktree]
            sha = (admin / "HEAD").read_text(encoding="ascii", errors="replace").strip()
        if not _is_sha(sha):
            sha = self._run([*at, "rev-parse", "HEAD"], cwd=worktree).strip()
        return sha, staged.diff

    def maintain(self) -> None:
        """``git maintenance run --auto``: what each ``git commit`` would have started (a gc once enough
        loose objects piled up), once per session instead."""
        self._run(["maintenance", "run", "--auto", "--quiet"], check=False)

    # ------------------------------------------------------------------ the user's working tree

    def uncommitted(self) -> list[str]:
        """Repo-relative paths under the lab folder that differ from HEAD: staged, unstaged, or
        untracked and not ignored (``git status``; nothing is written)."""
        out = self._run(["status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames", "--", "."])
        return sorted({entry[3:] for entry in out.split("\0") if len(entry) > 3})

    def changed_between(self, a: str, b: str) -> list[str]:
        """Repo-relative paths that differ between commits ``a`` and ``b``."""
        out = self._run(["diff", "--name-only", "-z", "--no-renames", a, b, "--"])
        return sorted(p for p in out.split("\0") if p)

    def snapshot(self, message: str) -> str:
        """A commit of the working tree as ``git add -A`` would stage it, on top of HEAD.

        Made with a private index (``GIT_INDEX_FILE``), ``write-tree`` and ``commit-tree``: the
        user's index, HEAD and branches are not touched. Ignored files (and ``.nightlab/``) stay out.
        """
        import tempfile

        head = self.head()
        with tempfile.TemporaryDirectory(prefix="nightlab-index-") as tmp:
            env = {**self._env, "GIT_INDEX_FILE": str(Path(tmp) / "index")}

            def git(*args: str) -> str:
                proc = subprocess.run(["git", *_GIT_CFG, *args], cwd=self.repo_root, env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise GitError(f"git {' '.join(args[:2])} failed: {proc.stderr.strip()[:500]}")
                return proc.stdout.strip()

            git("read-tree", head)
            git("add", "-A", "--", ".")
            tree = git("write-tree")
            return git("commit-tree", tree, "-p", head, "-m", message)
