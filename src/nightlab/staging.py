"""A candidate's git work, done ahead of its run: guard the claimed paths, check the parent out in a
worktree, write the files (or apply the diff), stage, guard the changes, commit, guard the size.

:func:`stage` touches git and the disk only: nothing goes to the ledger or the audit log. The
scheduler calls it while the slot is still busy with the experiment before (pipelining), so that when
the slot frees the experiment starts with its commit made; :meth:`Pipeline.run_experiment` then
records the row, the guard events and the commit exactly as if it had done the work itself, in the
same order (an experiment without a staged object stages inline, at the same point).

What is *not* done ahead: the ref ``refs/nightlab/<tag>/<idx>`` (written once the run has spawned, or
when the experiment ends without a run; a candidate dropped before its row leaves an unreferenced commit,
garbage for git's gc) and the check of the protected files on disk (done right before the run, as always).
The row is written when the slot takes the candidate, with its commit, diff and run id in one transaction.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nightlab.guard import Guard, diff_paths
from nightlab.text import first_line
from nightlab.types import Candidate
from nightlab.workspace import ApplyError, Workspace

# how far staging got: each step's results are valid from that step on
PATHS, WORKTREE, CHANGES, COMMITTED = 1, 2, 3, 4


@dataclass(frozen=True)
class Staged:
    """What :func:`stage` did: ``step`` says how far it got; ``error`` (if any) stopped it there.

    ``worktree`` is None when no worktree is held (none made, or removed after an error).
    """

    step: int = 0
    paths_problem: str | None = None
    worktree: Path | None = None
    apply_error: str | None = None
    changed: tuple[str, ...] = ()
    changes_problem: str | None = None
    commit: str = ""
    canonical: str = ""
    size_problem: str | None = None
    timing: dict[str, float] = field(default_factory=dict)  # "guard", "worktree": seconds spent
    error: BaseException | None = None
    run_id: str = ""  # the run's id, committed to the ledger's runs (Pipeline.stage_ahead): none yet when ""

    def will_run(self, candidate: Candidate | None) -> bool:
        """Staged to the end without a problem: its run goes ahead unless the protected files, a human or a
        stop say otherwise."""
        made = candidate is None or (self.step >= COMMITTED and bool(self.commit) and bool(self.changed)
                                     and not self.changes_problem and self.apply_error is None)
        return made and self.error is None and self.worktree is not None and not self.size_problem

    def failed_before(self, step: int) -> bool:
        """True when an error stopped staging before ``step`` (the caller raises it there)."""
        return self.error is not None and self.step < step


def background() -> None:
    """For the staging thread: nice +10 for it and the git processes it starts (Linux's nice is per thread
    and a child inherits its creator's), so that staging takes the CPU the runs leave, not the CPU of the
    run just starting (measured: staged at nice 0, a 0.2 s run's start-up waited for the git processes)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def commit_message(tag: str, idx: int, candidate: Candidate) -> str:
    return f"nightlab {tag} #{idx}: {first_line(candidate.rationale)}\n\n{candidate.rationale}".strip()


def stage(ws: Workspace, guard: Guard, tag: str, idx: int, candidate: Candidate | None, parent: str) -> Staged:
    """Materialise and commit ``candidate`` (None: the baseline, a checkout of ``parent`` only) in the
    worktree ``.nightlab/worktrees/<tag>-<idx>``. Never raises: an error is handed back in ``error``, with
    the worktree removed, to be raised where the experiment would have raised it."""
    timing: dict[str, float] = {}
    got: dict[str, object] = {}
    step = 0

    def spent(name: str, since: float) -> float:
        now = time.monotonic()
        timing[name] = timing.get(name, 0.0) + now - since
        return now

    wt: Path | None = None
    try:
        if candidate is not None:
            claimed = list(candidate.files or {}) + (diff_paths(candidate.diff) if candidate.diff else [])
            if not claimed:
                return Staged(step=COMMITTED, timing=timing)  # nothing to do: the experiment is invalid
            tg = time.monotonic()
            got["paths_problem"] = guard.check_paths(claimed)
            spent("guard", tg)
            step = PATHS
            if got["paths_problem"]:
                return Staged(step=step, timing=timing, **got)  # type: ignore[arg-type]
        tw = time.monotonic()
        wt = ws.add_worktree(f"{tag}-{idx}", parent)
        spent("worktree", tw)
        got["worktree"], step = wt, WORKTREE
        if candidate is None:
            got["commit"] = parent
            return Staged(step=COMMITTED, timing=timing, **got)  # type: ignore[arg-type]
        tw = time.monotonic()
        try:
            if candidate.files:
                ws.write_files(wt, candidate.files)
            if candidate.diff:
                ws.apply_diff(wt, candidate.diff)
            staged = ws.stage(wt)  # git may refuse a path it will not track: the edit does not apply
        except ApplyError as e:
            spent("worktree", tw)
            got["apply_error"] = str(e)
            return Staged(step=CHANGES, timing=timing, **got)  # type: ignore[arg-type]
        tg = spent("worktree", tw)
        got["changed"] = tuple(c.path for c in staged.changes)
        got["changes_problem"] = guard.check_changes(staged.changes)
        tw = spent("guard", tg)
        step = CHANGES
        if got["changes_problem"] or not staged.changes:
            return Staged(step=step, timing=timing, **got)  # type: ignore[arg-type]
        commit, canonical = ws.commit_staged(wt, commit_message(tag, idx, candidate), staged)
        tg = spent("worktree", tw)
        got["size_problem"] = guard.check_size(staged.changes, canonical)
        spent("guard", tg)
        got.update(commit=commit, canonical=canonical)
        return Staged(step=COMMITTED, timing=timing, **got)  # type: ignore[arg-type]
    except BaseException as e:  # a harness error (git failed): no worktree is left behind
        if wt is not None:
            ws.remove_worktree(wt)
        got.pop("worktree", None)
        return Staged(step=step, timing=timing, error=e, **got)  # type: ignore[arg-type]
