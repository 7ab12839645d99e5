"""One experiment, top to bottom (DESIGN.md, "The flow").

    propose -> guard -> materialise -> run -> measure -> decide -> keep/discard -> record

:meth:`Pipeline.run_experiment` is thread-safe with respect to other experiments (slots); keep
decisions are serialised under ``_keep_lock``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from nightlab import constraints, escape, keep, prune, requeue, sandbox, staging
from nightlab.errors import NightlabError
from nightlab.guard import Guard, diff_paths
from nightlab.history import History
from nightlab.permissions import rule_of
from nightlab.researchers import Context
from nightlab.runtime import Runtime, _file_sha, _first_line, _raw, _sha
from nightlab.spec import PROGRAM_FILE, matches
from nightlab.types import Candidate, Experiment, Measurement, RunResult, Status

REBASE = "rebase"  # the researcher name of a requeued combination of a stale candidate's change


class Pipeline(Runtime):
    """One experiment: the researcher's proposal, then :meth:`run_experiment`."""

    # ------------------------------------------------------------------ propose

    def _propose(self, idx: int, history: Sequence[Experiment]) -> Candidate | None:
        """The next candidate: a requeued stale winner first, else the researcher's (None: dropped at a stop).

        The researcher sees ``Context.should_stop`` (Ctrl-C, SIGTERM, the STOP file, the loop closing)
        and may abandon the proposal; a proposal made or abandoned at a stop is not run, and its
        usage goes to the ledger's ``spend`` table.
        """
        assert self.researcher is not None
        while self._requeue:
            try:
                item = self._requeue.pop(0)
            except IndexError:  # another proposer thread (prefetch) took it
                break
            inc = self.session.incumbent_commit
            if isinstance(item, Candidate):  # keep_semantics = "rebase"
                return Candidate(**{**item.__dict__, "parent": inc})
            files = keep.replay(self.ws, item, inc)
            if files is not None:
                requeue.take(self.ledger, item, idx)
                return Candidate(parent=inc, rationale=item.rationale, files=files, params=dict(item.params),
                                 researcher=REBASE)
            # conflicts with (or adds nothing to) the incumbent of now: dropped before it gets a row
            requeue.drop(self.ledger, self.ws, self.session.tag, item)
            self.events.emit("requeue.drop", experiment=item.source_idx, tip=item.tip)
        ctx = replace(self._context(idx, history),
                      should_stop=lambda: self._closing or bool(self._stop_requested()))
        t0 = time.monotonic()
        self.events.emit("researcher.request", experiment=idx, researcher=self.session.researcher,
                         parent=ctx.parent)
        try:
            cand = self.researcher.propose(ctx)
        except NightlabError:
            raise
        except Exception as e:  # a researcher bug is an invalid candidate, not a dead night
            cand = Candidate(parent=ctx.parent, rationale=f"researcher error: {type(e).__name__}: {e}",
                             researcher=getattr(self.researcher, "name", "?"))
        propose_s = time.monotonic() - t0
        self.events.emit("researcher.response", experiment=idx, seconds=round(propose_s, 3),
                         rationale_sha256=_sha(cand.rationale), tokens_in=cand.usage.tokens_in,
                         tokens_out=cand.usage.tokens_out, cost_usd=cand.usage.cost_usd)
        # a candidate is based on the incumbent; a researcher that ``chooses_parent`` (the research pool's claim
        # feeder) may base it on an older commit of the session's branch, which makes it stale (keep.py)
        parent = ctx.parent
        if (getattr(self.researcher, "chooses_parent", False) is True and cand.parent and cand.parent != parent
                and self.ws.is_ancestor(cand.parent, parent)):
            parent = cand.parent
        cand = Candidate(**{**cand.__dict__, "parent": parent, "usage": replace(cand.usage, seconds=propose_s)
                            if not cand.usage.seconds else cand.usage})
        stop = "the loop closed" if self._closing else self._stop_requested()
        if stop:
            self._drop(idx, cand, stop)
            return None  # proposed but never run: its usage is in the ledger's spend table
        return cand

    def _drop(self, idx: int, cand: Candidate, why: str) -> None:
        """Record the usage of a proposal that will not run (whatever became of it, its tokens were spent)."""
        u = cand.usage
        self.events.emit("researcher.dropped", experiment=idx, why=why, tokens_in=u.tokens_in,
                         tokens_out=u.tokens_out, cost_usd=u.cost_usd)
        if u.tokens_in or u.tokens_out or u.cost_usd or u.seconds:
            self.ledger.record_spend(self.session.id, idx, cand.researcher or self.session.researcher, u,
                                     f"dropped at a stop: {why}")

    def _context(self, idx: int, history: Sequence[Experiment]) -> Context:
        parent = self.session.incumbent_commit
        files = self._editable_files(parent)
        program_path = self.lab_dir / PROGRAM_FILE
        program = self._program if self._program is not None else (
            program_path.read_text(encoding="utf-8") if program_path.exists() else "")
        return Context(
            spec=self.spec, lab_dir=self.lab_dir, program=program, parent=parent, files=files,
            history=history.view() if isinstance(history, History) else tuple(history),
            metric_name=self.spec.metric.name, direction=self.spec.metric.direction,
            incumbent_metric=self.session.incumbent_metric, baseline_metric=self.session.baseline_metric, idx=idx,
            extra={"session": self.session.tag},
        )

    def _editable_files(self, parent: str) -> dict[str, str]:
        """The editable files of commit ``parent`` as text, read from git once per incumbent (a commit
        never changes; two git launches saved on every proposal that shares the incumbent of the one before)."""
        cached: tuple[str, dict[str, str]] | None = getattr(self, "_files_of", None)
        if cached is not None and cached[0] == parent:
            return dict(cached[1])
        files: dict[str, str] = {}
        for p in self.ws.ls_files(parent):
            if (matches(p, self.spec.files.editable) and not matches(p, self.guard.protected)
                    and not matches(p, self.spec.sandbox.hide)):
                try:
                    files[p] = self.ws.read_file(parent, p).decode("utf-8")
                except UnicodeDecodeError:
                    continue
        self._files_of = (parent, files)
        return dict(files)

    # ------------------------------------------------------------------ guard, materialise, run, measure

    def run_experiment(self, idx: int, candidate: Candidate | None, propose_s: float = 0.0,
                       slot: int = 0, staged: Future[staging.Staged] | None = None,
                       release: Callable[[], threading.Event | None] | None = None,
                       spawned: threading.Event | None = None) -> Experiment:
        """Materialise, run, measure and decide one experiment. ``candidate=None`` is the baseline.

        Thread-safe with respect to other experiments: several slots call it at once. Keep
        decisions are serialised and made against the incumbent of *their* time; a candidate whose
        parent is no longer the incumbent (stale) is judged against the current incumbent, and if
        it wins its measured tree is kept on top of it (keep.py; README, "Concurrency semantics").

        Each stage's cost (seconds) goes to the experiment's evidence under ``timing``: propose,
        guard, worktree (add, materialise, commit), run, measure, decide (the keep lock's wait
        included), record (ledger rows and audit records), cleanup (the worktree's removal).

        ``staged``: the candidate's git work, started ahead by the scheduler (:meth:`stage_ahead`), waited
        for when not done; its guard and worktree seconds count under those stages as always.

        ``release``: called once the slot's machine is no longer needed (:meth:`_release`), so that the
        scheduler starts the slot's next run while this experiment's decision and records are written; it
        hands back an event to wait for before writing them: set once the next run has spawned (``spawned``
        of that run), so that the two do not queue for the ledger's lock on the path to the spawn.
        """
        self._tls.timing = {"propose": propose_s}
        self._tls.decide_t0 = None
        self._tls.release, self._tls.spawned = release, spawned
        try:
            exp = self._experiment(idx, candidate, propose_s, slot, staged)
        finally:
            self._tls.release = None
            self._spawned()
        timing = {k: round(v, 4) for k, v in self._tls.timing.items()}
        self._tls.timing = None
        # after cleanup: the whole cost is known. A keep's row may have gained the holdout check since
        # (verifier.after_keep), which the experiment handed back (to the researcher) must not carry
        stored = self.ledger.get_experiment(self.session.id, exp.idx) if exp.status is Status.KEEP else None
        self.ledger.update_experiment(exp.id, evidence={**(stored or exp).evidence, "timing": timing})
        if self.audit is not None:  # the experiment's records: one fsync and one anchor, outside every lock
            self.audit.flush()
        return replace(exp, evidence={**exp.evidence, "timing": timing})

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Add the time spent in the block to stage ``name`` of the experiment this thread runs."""
        t = time.monotonic()
        try:
            yield
        finally:
            self._spent(name, t)

    def _spent(self, name: str, since: float) -> float:
        """Add the time since ``since`` to stage ``name`` of this thread's experiment; returns now."""
        now = time.monotonic()
        timing: dict[str, float] | None = getattr(self._tls, "timing", None)
        if timing is not None:
            timing[name] = timing.get(name, 0.0) + now - since
        return now

    def stage_ahead(self, idx: int, candidate: Candidate) -> staging.Staged:
        """The git work of a prepared candidate, before a slot is free for it (staging.py), and its run id,
        committed to the ledger's ``runs`` (for crash recovery: the one record a spawn needs before it), when
        it will run; no experiment row, nothing in the audit log. One that never runs goes to :meth:`unstage`."""
        st = staging.stage(self.ws, self.guard, self.session.tag, idx, candidate, candidate.parent)
        if self.ray is None and st.will_run(candidate):
            st = replace(st, run_id=self.new_run("run", idx))
        return st

    def unstage(self, staged: Future[staging.Staged]) -> None:
        """A staged candidate that will not run: its worktree goes (its commit has no ref: git's garbage)."""
        with contextlib.suppress(Exception):
            st = staged.result()
            if st.worktree is not None:
                self.ws.remove_worktree(st.worktree)

    def _staged(self, idx: int, candidate: Candidate | None, parent: str,
                ahead: Future[staging.Staged] | None) -> staging.Staged:
        """The candidate's git work: the one staged ahead (waited for), or done now; its seconds are counted."""
        st = ahead.result() if ahead is not None else staging.stage(self.ws, self.guard, self.session.tag, idx,
                                                                     candidate, parent)
        timing: dict[str, float] | None = getattr(self._tls, "timing", None)
        if timing is not None:
            for k, v in st.timing.items():
                timing[k] = timing.get(k, 0.0) + v
        return st

    def _experiment(self, idx: int, candidate: Candidate | None, propose_s: float, slot: int,
                    staged: Future[staging.Staged] | None = None) -> Experiment:
        """:meth:`run_experiment` without the timing's write."""
        self._tls.slot = slot
        self._tls.watch = None
        t0 = time.monotonic()
        parent = candidate.parent if candidate else self.session.incumbent_commit
        seed = self.spec.run.seed
        desc = _first_line(candidate.rationale) if candidate else "baseline"
        name = f"{self.session.tag}-{idx}"
        wt_path = self.ws.worktrees_dir / name
        # 1.-2. the git work: done ahead by the scheduler (staging.py), or here; recorded below, in order
        st = self._staged(idx, candidate, parent, staged)
        made = candidate is not None and st.step >= staging.COMMITTED and st.error is None and bool(st.commit)
        stored = self._stored_diff(st.canonical, st.size_problem) if made else None
        got: list[int] = []  # the row's id, once written

        def row(pid: int | None = None) -> int:
            """The experiment's row, written on first need: before an ending without a run, or right after the
            spawn with the run's pid (what must precede the spawn for crash recovery is the run id, committed
            by then: staged ahead, or :meth:`new_run`). With its commit and diff: one transaction."""
            if not got:
                with self._stage("record"):
                    got.append(self.ledger.start_experiment(
                        self.session.id, idx=idx, parent_commit=parent, seed=seed, candidate=candidate,
                        description=desc, propose_s=propose_s, worktree=str(wt_path),
                        commit=st.commit if made else None, diff=stored,
                        pid=pid, pid_start=sandbox.proc_start_time(pid) if pid else None))
            elif pid is not None:
                self.ledger.update_experiment(got[0], pid=pid, pid_start=sandbox.proc_start_time(pid))
            return got[0]

        with self._stage("record"):  # the candidate's artifacts and audit record
            if candidate is not None and candidate.artifacts:
                self._write_artifacts(idx, candidate.artifacts)
            self.reporter.experiment_started(idx, desc, self.spec.run.budget_s)
            if candidate is not None:
                self.events.emit("candidate", experiment=idx, parent=parent, researcher=candidate.researcher,
                                 rationale=candidate.rationale, files=sorted(candidate.files or {}),
                                 diff_sha256=_sha(candidate.diff or ""), params=candidate.params)
        wt = st.worktree
        ref: list[str | None] = [None]  # the commit whose ref refs/nightlab/<tag>/<idx> is still to write
        try:
            if candidate is not None:
                claimed = list(candidate.files or {}) + (diff_paths(candidate.diff) if candidate.diff else [])
                if not claimed:
                    return self._finish(row(), Status.INVALID, t0,
                                        reason=candidate.error or "the candidate changes nothing")
                if st.failed_before(staging.PATHS):
                    raise st.error  # type: ignore[misc]
                problem = st.paths_problem
                self.events.emit("guard", experiment=idx, stage="paths", ok=problem is None, reason=problem or "")
                if problem:
                    return self._violation(row(), idx, t0, problem)
            if st.failed_before(staging.WORKTREE):
                raise st.error  # type: ignore[misc]
            assert wt is not None
            commit, canonical = parent, ""
            if candidate is not None:
                if st.apply_error is not None:
                    if candidate.researcher == REBASE:
                        return self._finish(row(), Status.DISCARD, t0,
                                            reason=f"stale: conflicts with the new incumbent: {st.apply_error}")
                    return self._finish(row(), Status.INVALID, t0, reason=f"edit did not apply: {st.apply_error}")
                if st.failed_before(staging.CHANGES):
                    raise st.error  # type: ignore[misc]
                problem = st.changes_problem
                self.events.emit("guard", experiment=idx, stage="changes", ok=problem is None, reason=problem or "",
                                 changed=list(st.changed))
                if problem:
                    return self._violation(row(), idx, t0, problem)
                if not st.changed:
                    return self._finish(row(), Status.INVALID, t0, reason="the candidate changes nothing")
                if st.failed_before(staging.COMMITTED):
                    raise st.error  # type: ignore[misc]
                commit, canonical, problem = st.commit, st.canonical, st.size_problem
                tw = time.monotonic()
                if self.ray is not None:  # a local run's ref is written once it has started, or in `finally`
                    self.ws.keep_ref(self.session.tag, idx, commit)
                else:
                    ref[0] = commit
                self.events.emit("git.commit", experiment=idx, commit=commit, parent=parent,
                                 diff_sha256=_sha(canonical), diff_bytes=len(_raw(canonical)))
                tg = self._spent("worktree", tw)
                self.events.emit("guard", experiment=idx, stage="size", ok=problem is None,
                                 reason=problem or "")
                self._spent("guard", tg)
                if problem:
                    return self._violation(row(), idx, t0, problem)
            lab_root = self.ws.lab_in(wt)
            # 3. protected files must be exactly what the session started with
            tg = time.monotonic()
            problem = Guard.verify_protected(lab_root, self.protected_hashes)
            self.events.emit("guard", experiment=idx, stage="protected", ok=problem is None, reason=problem or "",
                             files=len(self.protected_hashes))
            self._spent("guard", tg)
            if problem:
                return self._violation(row(), idx, t0, problem)
            if candidate is not None and self.autonomy == "review":
                self._spawned()  # no spawn soon: the experiment before may write its records now
                row()  # the approval queue shows the experiment's row
                answer, why = self._await_human(idx, "run", canonical, candidate.rationale)
                if answer == "rejected":
                    return self._finish(row(), Status.REJECTED, t0, reason=f"human: {why or 'rejected'}")
                if answer != "approved":
                    return self._finish(row(), Status.INTERRUPTED, t0, reason=f"interrupted: {why}")
            # 4. run
            tr = time.monotonic()
            log_path = self.exp_dir(idx) / "run.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if candidate is not None:
                (log_path.parent / "candidate.diff").write_bytes(_raw(canonical))
            policy = self.sandbox_policy(wt)
            self.events.emit("sandbox.start", experiment=idx, command=self.spec.run.command, cwd=str(lab_root),
                             mode=policy.mode, network=policy.network, hidden=[str(h) for h in policy.hidden],
                             timeout_s=self.spec.run.hard_timeout_s, memory_mb=policy.memory_mb)
            if self.ray is not None:
                return self._run_remote(idx, row(), candidate, commit, canonical, wt, lab_root, t0, seed,
                                        log_path)
            watch = self.pruner.watch(log_path, self.stop.cancel, prunable=candidate is not None)
            self._tls.watch = watch
            try:
                res = sandbox.run(
                    self.spec.run.command, cwd=lab_root, env=self.run_env(seed, idx), policy=policy,
                    timeout_s=self.spec.run.hard_timeout_s, log_path=log_path,
                    kill_grace_s=self.spec.run.kill_grace_s,
                    on_start=lambda pid: self._started_run(row, pid, idx, ref),
                    cancel=watch.cancel, run_id=st.run_id or self.new_run("run", idx),
                )
            finally:
                watch.close()
            exp_id = row()
            self.events.emit("sandbox.exit", experiment=idx, exit_code=res.exit_code, timed_out=res.timed_out,
                             interrupted=res.interrupted, wall_s=round(res.wall_s, 3),
                             log_sha256=_file_sha(Path(res.log_path)))
            self._spent("run", tr)
            if res.interrupted and watch.pruned_at is not None and not self.stop.cancel.is_set():
                return self._pruned(exp_id, t0, res, watch)
            if res.interrupted:
                return self._finish(exp_id, Status.INTERRUPTED, t0, res,
                                    reason=f"interrupted: {self.stop.cancel_reason or 'stop requested'}")
            # 5. measure and decide
            if res.timed_out:
                return self._finish(exp_id, Status.TIMEOUT, t0, res,
                                    reason=f"killed at the {self.spec.run.hard_timeout_s:g}s timeout")
            tm = time.monotonic()
            m, tampered = self.verifier.measure(wt, lab_root, commit, log_path, seed, idx, res.exit_code == 0)
            self.events.emit("measurement", experiment=idx, metric=m.metric, secondary=m.secondary,
                             trust=m.trust, error=m.error)
            self._spent("measure", tm)
            if not self.spec.holdout.command:  # a keep's holdout check runs on the slot's machine: it holds it
                self._release()
            if tampered:
                return self._finish(exp_id, Status.REJECTED, t0, res, m, reason=tampered)
            if res.exit_code != 0:
                return self._finish(exp_id, Status.CRASH, t0, res, m, reason=f"exit code {res.exit_code}")
            if not m.valid:
                return self._finish(exp_id, Status.CRASH, t0, res, m, reason=m.error)
            assert m.metric is not None
            extras = self.verifier.evidence_extras(m, log_path)
            self._tls.decide_t0 = time.monotonic()
            if candidate is None:
                exp = self._finish(exp_id, Status.KEEP, t0, res, m, reason="baseline", commit=commit,
                                   incumbent=(commit, m.metric), evidence={"policy": "baseline", **extras})
                self.session = self.ledger.update_session(self.session.id, baseline_metric=m.metric)
                with self._stage("measure"):  # the checks after a keep (holdout)
                    self.verifier.after_keep(exp, wt, lab_root)
                return exp
            with self._keep_lock:
                return self._decide(idx, exp_id, candidate, commit, canonical, wt, lab_root, t0, res, m, extras)
        except BaseException:
            if not got:  # a harness error before the row: the row stays `running`, for recover() to close
                row()
            raise
        finally:
            if ref[0] is not None:  # committed, never started (a guard, a human, a stop): every attempt has its ref
                self.ws.keep_ref(self.session.tag, idx, ref[0])
            if wt is not None:  # none made: the candidate claimed nothing, or a path the guard refused
                with self._stage("cleanup"):
                    self.ws.remove_worktree(wt)
                    self.session = self.ledger.get_session(self.session.tag) or self.session

    def _pruned(self, exp_id: int, t0: float, res: RunResult, watch: prune.Watch,
                evidence: dict[str, Any] | None = None) -> Experiment:
        last = watch.curve[-1][1] if watch.curve else math.nan
        return self._finish(exp_id, Status.PRUNED, t0, res, evidence=evidence or {}, reason=(
            f"pruned at step {watch.pruned_at}: {self.pruner.metric}={last:.6g} judged hopeless by the "
            f"{self.spec.prune.pruner} pruner against earlier runs at that step"))

    def _run_remote(self, idx: int, exp_id: int, candidate: Candidate | None, commit: str, canonical: str,
                    wt: Path, lab_root: Path, t0: float, seed: int, log_path: Path) -> Experiment:
        """Run the committed experiment as a Ray task; the tree travels as a ``git archive`` tar."""
        from nightlab.executors.ray_executor import Lost, RemoteJob

        ta = time.monotonic()
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=self.lab_dir,
                                 capture_output=True, check=True).stdout
        archive_s = self._spent("run", ta) - ta  # the tar is the run's way to the worker: part of its stage
        job = RemoteJob(
            key=f"{self.session.tag}/{idx}", archive=archive, lab_rel=self.ws.lab_rel,
            command=self.spec.run.command, env=self.run_env(seed, idx), timeout_s=self.spec.run.hard_timeout_s,
            kill_grace_s=self.spec.run.kill_grace_s,
            sandbox_mode=self.sandbox_mode, network=self.spec.sandbox.network, memory_mb=self.spec.run.memory_mb,
            metric=self.spec.metric.model_dump(mode="json"),
            data_dir=str(self.data_dir) if self.data_dir.exists() else None,
            hide=(*self.spec.sandbox.hide, *self.spec.holdout.files),
            max_log_bytes=self.spec.run.max_log_bytes,
        )
        self.events.emit("sandbox.start", experiment=idx, command=self.spec.run.command, executor="ray",
                         mode=self.sandbox_mode, network=self.spec.sandbox.network,
                         timeout_s=self.spec.run.hard_timeout_s, archive_sha256=hashlib.sha256(archive).hexdigest())
        # progress lines come home through Ray (ray_executor, "Progress and pruning"); the watch judges them
        watch = self.pruner.watch(None, self.stop.cancel, prunable=candidate is not None)
        self._tls.watch = watch
        try:
            with self._stage("run"):
                # a run still waiting for a free slot when the session stops never starts
                out = self.ray.run(job, log_path=log_path, cancel=watch.cancel, on_progress=watch.feed,
                                   stopping=lambda: bool(self.stop.graceful))
        finally:
            watch.close()
        if isinstance(out, Lost):
            self.events.emit("sandbox.exit", experiment=idx, lost=True, reason=out.reason, attempts=out.attempts)
            return self._finish(exp_id, Status.LOST, t0, reason=f"lost after {out.attempts} attempt(s): {out.reason}",
                                evidence={"executor": "ray", "node": out.node, "attempts": out.attempts,
                                          "ray_timing": {"archive": round(archive_s, 4)}})
        res, m = out.run, self.verifier.sane(out.measurement)
        if out.attempts == 0:
            self.events.emit("sandbox.exit", experiment=idx, interrupted=True, attempts=0, started=False)
            why = self.stop.cancel_reason or self.stop.graceful or "stop requested"
            return self._finish(exp_id, Status.INTERRUPTED, t0, reason=f"interrupted: stopped before its run ({why})",
                                evidence={"executor": "ray", "attempts": 0,
                                          "ray_timing": {"archive": round(archive_s, 4)}})
        self.events.emit("sandbox.exit", experiment=idx, exit_code=res.exit_code, timed_out=res.timed_out,
                         interrupted=res.interrupted, wall_s=round(res.wall_s, 3), node=out.node,
                         attempts=out.attempts, log_sha256=_file_sha(Path(res.log_path)))
        where = {"executor": "ray", "node": out.node, "attempts": out.attempts,
                 "ray_timing": {"archive": round(archive_s, 4), **out.timing}}
        if res.interrupted and watch.pruned_at is not None and not self.stop.cancel.is_set():
            return self._pruned(exp_id, t0, res, watch, where)
        if res.interrupted:
            return self._finish(exp_id, Status.INTERRUPTED, t0, res,
                                reason=f"interrupted: {self.stop.cancel_reason or 'stop requested'}")
        if res.timed_out:
            return self._finish(exp_id, Status.TIMEOUT, t0, res, evidence=where,
                                reason=f"killed at the {self.spec.run.hard_timeout_s:g}s timeout")
        self.events.emit("measurement", experiment=idx, metric=m.metric, secondary=m.secondary, trust=m.trust,
                         error=m.error)
        if res.exit_code != 0:
            return self._finish(exp_id, Status.CRASH, t0, res, m, reason=f"exit code {res.exit_code}", evidence=where)
        if not m.valid:
            return self._finish(exp_id, Status.CRASH, t0, res, m, reason=m.error, evidence=where)
        assert m.metric is not None
        self._tls.decide_t0 = time.monotonic()
        if candidate is None:
            exp = self._finish(exp_id, Status.KEEP, t0, res, m, reason="baseline", commit=commit,
                               incumbent=(commit, m.metric), evidence={"policy": "baseline", **where})
            self.session = self.ledger.update_session(self.session.id, baseline_metric=m.metric)
            return exp
        with self._keep_lock:
            return self._decide(idx, exp_id, candidate, commit, canonical, wt, lab_root, t0, res, m, where)

    # ------------------------------------------------------------------ decide

    def _decide(self, idx: int, exp_id: int, candidate: Candidate, commit: str, canonical: str, wt: Path,
                lab_root: Path, t0: float, res: RunResult, m: Measurement, extras: dict[str, Any]) -> Experiment:
        """Keep or discard a measured candidate. Called under ``_keep_lock``."""
        self.session = self.ledger.get_session(self.session.tag) or self.session
        assert m.metric is not None
        ms = self.spec.metric
        limits = constraints.parse_all(ms.constraints, [ms.name, *ms.secondary])
        broken = constraints.broken(limits, {**m.secondary, ms.name: m.metric, constraints.RUN_S: res.wall_s})
        if broken:
            return self._finish(exp_id, Status.DISCARD, t0, res, m, reason=broken,
                                evidence={"constraint": broken[len("constraint: "):], **extras})
        stale = candidate.parent != self.session.incumbent_commit
        if stale and self.keep_semantics == "rebase":
            return self._decide_rebase(idx, exp_id, candidate, canonical, t0, res, m, extras)
        verdict = self.policy.decide(m, self.verifier.incumbent_stats(), self.spec.metric.direction,
                                     self.verifier.remeasurer(commit, idx, exp_id))
        evidence = {**verdict.evidence, **extras}
        if stale:  # measured on an older incumbent, judged against the current one (keep.py)
            evidence.update(stale=True, measured_on=candidate.parent, measured_commit=commit)
        if not verdict.keep:
            status = Status.INTERRUPTED if self.stop.cancel.is_set() else Status.DISCARD
            reason = f"stale (measured on {candidate.parent[:10]}): {verdict.reason}" if stale else verdict.reason
            if stale and status is Status.DISCARD:
                parent_metric = self._kept_metric(candidate.parent)
                if parent_metric is not None and self.spec.metric.direction.better(m.metric, parent_metric):
                    reason += self._queue_combination(idx, candidate, commit, self.session.incumbent_commit,
                                                      self.session.incumbent_commit)
            return self._finish(exp_id, status, t0, res, m, reason=reason, evidence=evidence)
        if self.autonomy == "approve-keep":
            inc = self.session.incumbent_metric
            answer, why = self._await_human(idx, "keep", canonical, (
                f"{candidate.rationale}\n\n{self.spec.metric.name} = {m.metric:.6g} (incumbent "
                f"{'—' if inc is None else f'{inc:.6g}'}): {verdict.reason}"))
            if answer == "rejected":
                return self._finish(exp_id, Status.DISCARD, t0, res, m, evidence=evidence,
                                    reason=f"human rejected the keep: {why or 'no reason given'}")
            if answer != "approved":
                return self._finish(exp_id, Status.INTERRUPTED, t0, res, m, evidence=evidence,
                                    reason=f"interrupted: {why}")
        # 6. keep: ledger first, then the branch (recover() repairs a kill in between)
        old = self.session.incumbent_commit
        estimate = float(verdict.evidence.get("estimate", m.metric))
        reason = verdict.reason
        if stale:  # keep exactly the measured tree, on top of the incumbent: the branch fast-forwards
            commit = keep.commit_tree(self.ws, keep.tree_of(self.ws, commit), old,
                                      f"nightlab {self.session.tag} #{idx}: {_first_line(candidate.rationale)}\n\n"
                                      f"measured on {candidate.parent}; kept as measured on top of {old}")
            self.ws.keep_ref(self.session.tag, idx, commit)
            reason += f" (measured on {candidate.parent[:10]}; the measured tree is kept on the incumbent)"
            reason += self._queue_combination(idx, candidate, evidence["measured_commit"], old, commit)
        exp = self._finish(exp_id, Status.KEEP, t0, res, m, reason=reason, commit=commit,
                           evidence=evidence, incumbent=(commit, estimate))
        with self._stage("record"):
            self.ws.advance_branch(self.session.branch, commit, old)
            self.events.emit("git.advance", experiment=idx, branch=self.session.branch, old=old, new=commit)
            self.session = self.ledger.get_session(self.session.tag) or self.session
        with self._stage("measure"):  # the checks after a keep (holdout)
            self.verifier.after_keep(exp, wt, lab_root)
        return exp

    def _queue_combination(self, idx: int, candidate: Candidate, measured: str, onto: str, after: str) -> str:
        """Queue the stale candidate's change applied on ``onto`` (keep.py); says what happened."""
        tree = keep.combination(self.ws, candidate.parent, measured, onto, candidate.params)
        if tree is None:
            return "; its change does not combine with the incumbent (conflict, or nothing new): nothing queued"
        tip = keep.commit_tree(self.ws, tree, after, f"nightlab {self.session.tag}: combination with #{idx}")
        item = requeue.add(self.ledger, self.ws, self.session.id, self.session.tag, keep.Requeued(
            idx, f"combination with #{idx}: {candidate.rationale}", tip, dict(candidate.params)))
        self._requeue.append(item)  # persisted first: a kill from here on loses nothing (--resume restores it)
        self.events.emit("requeue", experiment=idx, tip=tip)
        return "; its change combined with the incumbent is queued as a new candidate"

    def _restore_requeue(self) -> None:
        """``--resume``: queue again the combinations a stop or a kill left unmeasured (requeue.py)."""
        items, dropped = requeue.restore(self.ledger, self.ws, self.session.id, self.session.tag, self.epoch)
        for item, why in dropped:
            self.events.emit("requeue.drop", experiment=item.source_idx, tip=item.tip, why=why)
        for item in items:
            self.events.emit("requeue.restore", experiment=item.source_idx, tip=item.tip)
        if items:
            self.reporter.message(f"{len(items)} queued combination(s) of stale winners restored")
        self._requeue[:0] = items

    def _decide_rebase(self, idx: int, exp_id: int, candidate: Candidate, canonical: str, t0: float,
                       res: RunResult, m: Measurement, extras: dict[str, Any]) -> Experiment:
        """The keep semantics before 0.2 (``keep_semantics = "rebase"``, kept for bench/efficiency.py):
        a stale winner is discarded and its diff requeued onto the new incumbent, to be re-measured."""
        assert m.metric is not None
        # measured on an older incumbent: if it beat that one (its parent), it is rebased onto the
        # new incumbent and re-measured there before it can be kept
        parent_metric = self._kept_metric(candidate.parent)
        if parent_metric is None or not self.spec.metric.direction.better(m.metric, parent_metric):
            return self._finish(exp_id, Status.DISCARD, t0, res, m, evidence={"stale": True, **extras},
                                reason=f"not better than its parent {candidate.parent[:10]} "
                                       f"({m.metric:.6g} vs {parent_metric})")
        self._requeue.append(Candidate(
            parent=self.session.incumbent_commit, rationale=f"rebase of #{idx}: {candidate.rationale}",
            diff=canonical, params=dict(candidate.params), researcher=REBASE))
        return self._finish(exp_id, Status.DISCARD, t0, res, m,
                            evidence={"stale": True, "candidate": m.metric, "parent_metric": parent_metric,
                                      **extras},
                            reason=f"stale: beat the incumbent, but its parent {candidate.parent[:10]} is no "
                                   "longer the incumbent; requeued, rebased onto the new incumbent, "
                                   "to be re-measured")

    def _kept_metric(self, commit: str) -> float | None:
        """The metric the ledger holds for a kept commit (its estimate, when a policy made one)."""
        e = self.ledger.kept(self.session.id, commit)
        return float(e.evidence.get("estimate", e.metric)) if e is not None and e.metric is not None else None

    # ------------------------------------------------------------------ record

    def _finish(self, exp_id: int, status: Status, t0: float, run: RunResult | None = None,
                m: Measurement | None = None, reason: str = "", **kw: Any) -> Experiment:
        now = time.time()
        run_s = run.wall_s if run else 0.0
        log_tail = sandbox.tail(Path(run.log_path), 50) if run else ""
        if m is not None and m.warnings:  # duplicate keys, absurd values: kept with the measurement
            kw["evidence"] = {**(kw.get("evidence") or {}), "warnings": list(m.warnings)}
        watch: prune.Watch | None = getattr(self._tls, "watch", None)
        if watch is not None:  # the run's progress curve (and, pruned, what it saved) goes with its evidence
            self._tls.watch = None
            extra = watch.finish(status, m.metric if m else None, run_s)
            if status is Status.PRUNED:
                extra["saved_s"] = round(self.pruner.saved_s(run_s, self.spec.run.budget_s), 3)
            if extra:
                kw["evidence"] = {**(kw.get("evidence") or {}), **extra}
        decide_t0 = getattr(self._tls, "decide_t0", None)
        if decide_t0 is not None:
            self._tls.decide_t0 = None
            self._spent("decide", decide_t0)
        t_rec = time.monotonic()
        exp = self.ledger.finish_experiment(
            exp_id, status=status, metric=m.metric if m else None, secondary=m.secondary if m else {},
            trust=m.trust if m else "inline", **self._redacted(reason=reason, log_tail=log_tail), run_s=run_s,
            overhead_s=max(0.0, (time.monotonic() - t0) - run_s),
            exit_code=run.exit_code if run else None, finished_at=now, **self._redacted(**kw),
        )
        self.events.emit("decision", experiment=exp.idx, status=status.value, metric=exp.metric,
                         reason=reason, evidence=exp.evidence, commit=exp.commit)
        self._spent("record", t_rec)
        return exp

    def _violation(self, exp_id: int, idx: int, t0: float, problem: str) -> Experiment:
        """Reject a candidate that broke a rule: ``rejected`` with reason ``policy: <rule> (<detail>)``."""
        reason = f"policy: {problem}"
        self.events.emit("policy.violation", experiment=idx, rule=rule_of(reason), detail=problem)
        return self._finish(exp_id, Status.REJECTED, t0, reason=reason)

    def _stored_diff(self, diff: str, problem: str | None) -> str:
        """The diff as the ledger keeps it: cut at ``max_diff_bytes`` when it broke that rule."""
        limit = self.spec.permissions.max_diff_bytes
        if problem is None or not limit or len(_raw(diff)) <= limit:
            return diff
        cut = _raw(diff)[:limit].decode("utf-8", "ignore")
        return cut + f"\n[nightlab: diff cut at {limit} of {len(_raw(diff))} bytes]\n"

    def _write_artifacts(self, idx: int, artifacts: dict[str, str]) -> None:
        """A candidate's artifacts (prompt, response, transcript) under artifacts/<tag>/<idx>/."""
        folder = self.exp_dir(idx)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in artifacts.items():
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".") or "artifact"
            (folder / safe).write_text(escape.text(text), encoding="utf-8")  # a transcript may hold any bytes

    def _pin(self, pid: int) -> None:
        """CPU affinity for a slot's run (``[executor] cpus_per_slot``); children inherit it."""
        n = self.spec.executor.cpus_per_slot
        if not n or not hasattr(os, "sched_setaffinity"):
            return
        cpus = sorted(os.sched_getaffinity(0))
        slot = getattr(self._tls, "slot", 0)
        mine = {cpus[(slot * n + i) % len(cpus)] for i in range(n)}
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, mine)

    def _release(self) -> None:
        """The run and its measurement are over: hand the slot back to the scheduler (once), which starts
        the slot's next run while this thread decides and records. What is left uses no GPU; it uses the
        ledger and git, as another slot's experiment does."""
        release = getattr(self._tls, "release", None)
        self._tls.release = None
        if release is not None and (quiet := release()) is not None:
            quiet.wait(timeout=2.0)  # the next run's spawn first; bounded, should it never come

    def _spawned(self) -> None:
        """This experiment's run has started, or never will: the experiment before it in the slot may write."""
        ev = getattr(self._tls, "spawned", None)
        self._tls.spawned = None
        if ev is not None:
            ev.set()

    def _started_run(self, row: Callable[[int | None], int], pid: int, idx: int, ref: list[str | None]) -> None:
        """The run's process exists: pin it to its slot's CPUs, record it for crash recovery, and give the
        candidate's commit its ref ``refs/nightlab/<tag>/<idx>`` -- after the spawn, not before it: until the
        run ends its worktree holds the commit, and the row names it (a crash in between loses no tree git
        still has; ``git gc`` keeps unreferenced objects for two weeks)."""
        self._pin(pid)
        self._spawned()
        row(pid)
        if ref[0] is not None:
            self.ws.keep_ref(self.session.tag, idx, ref[0])
            ref[0] = None
