"""The session lifecycle: open (new, or resumed and reconciled with the lab), lock, recover, the
stop rules, run, close.

The ledger is the source of truth; git follows it. Each state change is one ledger transaction,
written *before* the matching git move, so that a harness killed at any point is recovered by
:meth:`SessionLifecycle.recover` on ``--resume``: orphaned experiments are marked ``interrupted``
(their process tree killed, their worktree removed) and the branch is fast-forwarded to the
ledger's incumbent if the kill fell between the two writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nightlab import approvals, evaltree, sandbox
from nightlab import researchers as researchers_mod
from nightlab import resume as lab_state
from nightlab.audit import AuditLog, Signer, ledger_head, store_head
from nightlab.errors import NightlabError, UsageError
from nightlab.history import History
from nightlab.pipeline import Pipeline
from nightlab.runtime import _first_line
from nightlab.types import Experiment, Session, Status, Usage


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5).stdout
            info["gpus"] = [ln.strip() for ln in out.splitlines() if ln.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# The engine's audit records are grouped (audit.AuditLog, flush_after): written at once (a SIGKILL loses
# none), fsynced and anchored in the ledger (count and head) together, before emit returns, at each of
# these kinds -- session events, approvals and setup -- at the end of every experiment (the pipeline
# flushes after its cleanup, outside the keep lock, so slots do not queue behind an fsync), and otherwise
# at most FLUSH_AFTER_S after they were written, so a harness killed during a wait that lasts (a
# proposal, a run, an evaluation) leaves no unanchored tail, and a fast experiment costs one fsync and
# one anchor (docs/security.md, "Durability").
ANCHOR_KINDS = frozenset({"session.start", "session.resume", "session.stop", "approval.request",
                          "approval.answer", "recover", "checkpoint", "setup.run"})
FLUSH_AFTER_S = 0.1



class Tally:
    """Counters of the stop rules over a growing history (experiments after ``epoch``)."""

    def __init__(self, history: Sequence[Experiment], epoch: int) -> None:
        self.history, self.epoch, self.seen = history, epoch, 0
        self.tried = self.violations = self.since_keep = self.failures_in_row = 0
        self.last_idx = -1
        self.usage = Usage()  # of every experiment in the history (the epoch's or not: all were paid for)

    def catch_up(self) -> None:
        h = self.history
        for e in h.iter_from(self.seen) if isinstance(h, History) else h[self.seen:]:
            self.usage = self.usage + e.usage
            if e.idx <= self.epoch:
                continue
            self.tried += 1
            self.last_idx = e.idx
            self.since_keep = 0 if e.status is Status.KEEP else self.since_keep + 1
            self.failures_in_row = self.failures_in_row + 1 if e.status.is_failure() else 0
            if e.status is Status.REJECTED and e.reason.startswith("policy: "):
                self.violations += 1
        self.seen = len(self.history)


def default_tag() -> str:
    return time.strftime("%b%d").lower()


class SessionLifecycle(Pipeline):
    """Open, reconcile, lock, recover, run, stop and close one session."""

    def _open_audit(self) -> AuditLog | None:
        """The lab's audit log (``[audit]``), anchored in the ledger after every decision and session event."""
        if not self.spec.audit.enabled:
            return None
        signer = Signer.load_or_create(self.ws.state_dir / "keys") if self.spec.audit.sign else None
        ledger = self.ledger
        # anchored: no session continues a log that lost records the ledger counted
        return AuditLog(self.ws.state_dir / "audit.jsonl", checkpoint_every=self.spec.audit.checkpoint_every,
                        signer=signer, anchor=lambda log_id, n, head: store_head(ledger, log_id, n, head),
                        anchor_kinds=ANCHOR_KINDS, anchored=lambda log_id: ledger_head(ledger, log_id),
                        flush_after=FLUSH_AFTER_S)

    # ------------------------------------------------------------------ session

    def _open_session(self, tag: str | None, resume: bool) -> Session:
        """A new session at the lab's HEAD, or the session to resume, reconciled with the lab as it is now
        (README, "Resume after a fix")."""
        if self.rebaseline and not resume:
            raise UsageError("--rebaseline only applies to --resume",
                             "a new session always starts with a baseline: drop --rebaseline")
        if resume:
            session = self.ledger.get_session(tag) if tag else self.ledger.latest_session()
            if session is None:
                what = f"session '{tag}'" if tag else "any session"
                raise UsageError(f"cannot resume: no {what} in {self.ledger.shown}",
                                 "start one with `nightlab run` (without --resume)")
            self.epoch = self._epoch(self.ledger.session_json(session.id)[1])
            return session  # reconciled with the lab by run() (see _reconcile)
        tag = tag or default_tag()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", tag):
            raise UsageError(f"tag {tag!r} is not usable as a branch name",
                             "use letters, digits, '.', '_' and '-' (e.g. --tag nov23)")
        if self.ledger.get_session(tag) is not None:
            raise UsageError(f"session '{tag}' already exists",
                             f"continue it with `nightlab run --resume --tag {tag}`, or pick a new --tag")
        branch = f"nightlab/{tag}"
        if self.ws.resolve(f"refs/heads/{branch}"):
            raise UsageError(f"the branch {branch} already exists but the ledger has no session '{tag}'",
                             f"pick a new --tag, or delete the branch: git branch -D {branch}")
        base = self._base_commit or self._lab_commit(tag)  # a given base (compare's arms) is a commit already
        session = self.ledger.create_session(
            tag=tag, branch=branch, base_commit=base, metric_name=self.spec.metric.name,
            direction=self.spec.metric.direction, sandbox=self.sandbox_mode, spec_hash=self.spec.digest(),
            spec_json=self.spec.model_dump_json(), lab_path=str(self.lab_dir), machine=machine_info(),
            researcher=self._researcher_name(),
        )
        self.ws.create_branch(branch, base)
        return self.ledger.update_session(session.id, incumbent_commit=base)

    def _lock_session(self) -> int:
        """Hold an exclusive ``flock`` on ``.nightlab/session-<tag>.lock`` while the session runs, so a
        second harness on it (a ``--resume`` while it still runs) is refused before :meth:`recover`
        kills its runs. The kernel drops the lock when the holder dies, SIGKILL included; the fd is
        close-on-exec, so runs and git children never inherit it."""
        path = self.ws.state_dir / f"session-{self.session.tag}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(f"session '{self.session.tag}' is running in another nightlab process"
                             + (f" (pid {holder})" if holder else ""),
                             f"let it finish, or stop it first (Ctrl-C there, or touch {self.stop_file})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _other_sessions_running(self) -> bool:
        """Whether another session's harness may be running in this lab: a ``session-<tag>.lock`` of
        another tag names a live process (read only; taking the lock to test it could refuse that harness)."""
        for path in self.ws.state_dir.glob("session-*.lock"):
            if path.name == f"session-{self.session.tag}.lock":
                continue
            try:
                pid = int(path.read_text(errors="replace").strip() or 0)
            except (OSError, ValueError):
                continue
            if pid > 0 and pid != os.getpid():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                except PermissionError:
                    pass
                return True
        return False

    @staticmethod
    def _epoch(extra: dict[str, Any]) -> int:
        """The idx of the session's latest successful baseline, else of its latest re-baseline, else 0."""
        rebases = [r for r in extra.get("rebaselines") or [] if isinstance(r, dict)]
        moved_at = int(rebases[-1].get("at_idx") or 0) if rebases else 0
        return int(extra.get("baseline_idx") or moved_at)

    def _researcher_name(self) -> str:
        return self._researcher_override.name if self._researcher_override else self.spec.researcher.kind

    def _lab_commit(self, tag: str) -> str:
        """The commit a session starts from: HEAD, or with ``allow_dirty`` a snapshot of the working tree.

        Uncommitted changes to editable, protected or spec files are refused otherwise: runs use
        commits, so they would be ignored while an uncommitted nightlab.toml is read — half-used."""
        dirty = lab_state.dirty_files(self.ws, self.guard)
        if not dirty:
            return self.ws.head()
        shown = ", ".join(dirty[:10]) + (f" (+{len(dirty) - 10} more)" if len(dirty) > 10 else "")
        if not self.allow_dirty:
            raise UsageError(
                f"uncommitted changes in {shown}: runs use commits, so they would not be used as you see them",
                "commit them (git add -A && git commit -m '...'), or `nightlab run --allow-dirty` to snapshot the "
                "working tree into the session's first commit (your index and HEAD stay as they are)")
        commit = self.ws.snapshot(f"nightlab {tag}: snapshot of the working tree (--allow-dirty)\n\n"
                                  f"uncommitted: {', '.join(dirty)}")
        self.reporter.message(f"--allow-dirty: the working tree ({shown}) is snapshot {commit[:10]}")
        return commit

    def _reconcile(self, session: Session, commit: str) -> Session:
        """Resume ``session`` at the lab's ``commit`` and current spec: continue, re-baseline or refuse.

        - the baseline never succeeded and something material changed: the session moves to
          ``commit`` and the current spec (metric name and direction follow); its baseline runs there;
        - ``--rebaseline``: the same, after keeps (earlier experiments stay in the ledger; the
          branch moves to ``commit``, old keeps stay under refs/nightlab/<tag>/<n>);
        - only harmless changes (stop rules, researcher, autonomy, ...): continue, with the new spec;
        - material changes (metric, commands, files, sandbox, the code at HEAD): refuse, exit 2.
        """
        spec_json, extra = self.ledger.session_json(session.id)
        changes = lab_state.compare(self.ws, spec_json=spec_json,
                                    spec_now=self.spec.model_dump(mode="json"), base=session.base_commit,
                                    incumbent=session.incumbent_commit, commit=commit)
        baseline_ok = session.baseline_metric is not None
        if self.rebaseline or (not baseline_ok and changes.material):
            why = "--rebaseline" if self.rebaseline else "the baseline never succeeded"
            return self._rebase(session, commit, changes, why, extra)
        if changes.material:
            raise UsageError(
                f"session '{session.tag}' changed since it started: " + "; ".join(changes.material)
                + ". Its kept experiments were measured under the old setting, so it cannot simply continue",
                f"start a new session from here: `nightlab run --tag {session.tag}-2`; or re-measure the baseline "
                f"at {commit[:10]} and continue this one: `nightlab run --resume --tag {session.tag} --rebaseline`; "
                f"or undo the change (git diff {session.base_commit[:10]} {commit[:10]})")
        if changes.spec or changes.head_moved:
            self.reporter.message(f"resuming '{session.tag}' with harmless changes: {changes.summary}")
            session = self.ledger.update_session(session.id, spec_hash=self.spec.digest(),
                                                 spec_json=self.spec.model_dump_json(),
                                                 researcher=self._researcher_name())
        return session

    def _rebase(self, session: Session, commit: str, changes: lab_state.Changes, why: str,
                extra: dict[str, Any]) -> Session:
        """Move the session to ``commit`` and the current spec; its baseline runs again there."""
        idx = self.ledger.next_idx(session.id)
        record: dict[str, Any] = {"at_idx": idx, "from": session.base_commit, "to": commit, "why": why,
                                  "time": time.time(), "changes": changes.material + changes.harmless,
                                  "metric_from": session.metric_name, "metric_to": self.spec.metric.name}
        rebases = [*(extra.get("rebaselines") or []), record]
        self.reporter.message(f"{why}: session '{session.tag}' re-baselines at {commit[:10]} from #{idx} "
                              f"(was {session.base_commit[:10]}; changed: {changes.summary})")
        head = self.ws.resolve(f"refs/heads/{session.branch}")
        updated = self.ledger.update_session(
            session.id, base_commit=commit, incumbent_commit=commit, incumbent_metric=None, baseline_metric=None,
            metric_name=self.spec.metric.name, direction=self.spec.metric.direction, sandbox=self.sandbox_mode,
            spec_hash=self.spec.digest(), spec_json=self.spec.model_dump_json(), researcher=self._researcher_name(),
            noise={"rebaselines": rebases},  # the noise floor and holdout figures were the old baseline's
        )
        if head is None:
            self.ws.create_branch(session.branch, commit)
        elif head != commit:
            self.ws.advance_branch(session.branch, commit, head)
        self.epoch = idx
        self.events.emit("session.rebaseline", tag=session.tag, **record)
        return updated

    def recover(self) -> list[Experiment]:
        """Clean up after a harness that died: orphans, stale worktrees, a lagging branch.

        Processes first: every process on this machine tagged with one of the session's run ids
        (``NIGHTLAB_RUN_ID``, recorded in the ledger before each spawn) is killed with its
        descendants, whatever became of its parent (``setsid``, double forks, a ``bwrap`` whose
        harness died before ``--die-with-parent`` took hold), then each orphaned experiment's
        recorded pid (if it still is the process that started then). Only then are worktrees removed.
        """
        recovered = []
        run_ids = {r["run_id"] for r in self.ledger.runs(self.session.id)}
        tagged = sandbox.kill_tagged(run_ids) if run_ids else {}
        for exp in self.ledger.orphaned(self.session.id):
            killed = False
            if exp.pid:
                killed = sandbox.kill_orphan(exp.pid, exp.pid_start)
            killed = killed or (exp.pid in tagged)
            self.events.emit("recover", experiment=exp.idx, pid=exp.pid, killed=killed)
            recovered.append(self.ledger.finish_experiment(
                exp.id, status=Status.INTERRUPTED,
                reason="orphaned: the harness stopped without finishing it" + (" (run killed)" if killed else ""),
                finished_at=time.time(),
            ))
        survivors = sandbox.find_tagged(run_ids) if run_ids else {}
        if tagged or survivors:
            self.events.emit("recover", processes_killed=sorted(tagged), survivors=sorted(survivors))
            self.reporter.message(f"killed {len(tagged)} process(es) left by runs of the stopped harness")
        if survivors:
            pids = " ".join(str(p) for p in sorted(survivors))
            raise NightlabError(f"processes of this session's earlier runs could not be killed: {pids}",
                                f"kill them (kill -9 {pids}; as their owner or root), then --resume again")
        stale = approvals.cancel_stale(self.ledger, self.session.id, "the session stopped while it waited")
        if stale:
            self.events.emit("recover", approvals_cancelled=stale)
        removed = self.ws.remove_stale_worktrees(f"{self.session.tag}-")
        if not self._other_sessions_running():  # an agent's scratch worktree named before it carried the tag
            removed += self.ws.remove_stale_worktrees("agent-")
        if removed:
            self.reporter.message(f"removed {len(removed)} stale worktree(s)")
        trees = evaltree.remove_stale(self.ws, self.session.tag)
        if trees:
            self.events.emit("recover", eval_trees_removed=len(trees))
        # the ledger decides the incumbent; bring the branch to it
        head = self.ws.resolve(f"refs/heads/{self.session.branch}")
        inc = self.session.incumbent_commit
        if head is None:
            self.ws.create_branch(self.session.branch, inc)
        elif head != inc:
            if self.ws.is_ancestor(head, inc):
                self.ws.advance_branch(self.session.branch, inc, head)
                self.reporter.message(f"fast-forwarded {self.session.branch} to the ledger's incumbent")
            else:
                raise UsageError(
                    f"the branch {self.session.branch} ({head[:10]}) does not lead to the ledger's "
                    f"incumbent ({inc[:10]})",
                    f"reset it: git update-ref refs/heads/{self.session.branch} {inc}",
                )
        self.session = self.ledger.update_session(self.session.id, status="running", stop_reason="")
        return recovered

    # ------------------------------------------------------------------ stop rules

    def stop_reason(self, history: Sequence[Experiment]) -> str:
        st = self.spec.stop
        if self.stop.cancel.is_set():
            return self.stop.cancel_reason or "interrupted"
        if self.stop.graceful:
            return self.stop.graceful
        if self.stop_file.exists():
            # consumed once, remembered for every waiter: an approval wait on another thread polls
            # _stop_requested(), which would no longer see the file and wait forever
            self.stop_file.unlink(missing_ok=True)
            self.stop.graceful = self.stop.graceful or "STOP file"
            return "STOP file"
        t = self.tally(history)
        if st.max_experiments and t.tried >= st.max_experiments:
            return f"max_experiments ({st.max_experiments}) reached"
        if st.max_cost_usd or st.max_tokens:
            used = t.usage + self.ledger.spend_totals(self.session.id)
            if st.max_cost_usd and used.cost_usd >= st.max_cost_usd:
                return f"max_cost_usd ({st.max_cost_usd:g}) reached: ${used.cost_usd:.4f} spent"
            if st.max_tokens and used.tokens_in + used.tokens_out >= st.max_tokens:
                return f"max_tokens ({st.max_tokens}) reached: {used.tokens_in + used.tokens_out} tokens used"
        if st.max_hours and time.monotonic() - self._started >= st.max_hours * 3600:
            return f"max_hours ({st.max_hours:g}) reached"
        if st.patience:
            since = t.since_keep
            if since >= st.patience:
                return f"patience: {since} experiments without a keep"
        if st.max_policy_violations:
            n = t.violations
            if n >= st.max_policy_violations:
                return f"max_policy_violations: {n} candidates broke [permissions]"
        if st.max_crashes_in_row:
            row = t.failures_in_row
            if row >= 4 * st.max_crashes_in_row:
                return f"max_crashes_in_row: {row} crashes or timeouts in a row; the researcher finds nothing that runs"
            if row - self._crashes_checked >= st.max_crashes_in_row:
                if self.ray is not None or not self._incumbent_runs(row, t.last_idx):
                    return f"max_crashes_in_row: {row} crashes or timeouts in a row" + (
                        "" if self.ray is not None else ", and the incumbent fails too: the lab is broken")
                self._crashes_checked = row  # the candidates crashed, not the lab: go on
            elif row == 0:
                self._crashes_checked = 0
        return ""

    def tally(self, history: Sequence[Experiment]) -> Tally:
        """The stop rules' counters over ``history`` since the epoch, kept up to date incrementally: the
        history only grows (appended by the loop), so each call counts only what was appended since the
        last one. A new list (a resume, a rebaseline) starts the count again."""
        t: Tally | None = getattr(self, "_tally", None)
        if t is None or t.history is not history or t.epoch != self.epoch or t.seen > len(history):
            t = Tally(history, self.epoch)
            self._tally = t
        t.catch_up()
        return t

    def _incumbent_runs(self, row: int, after: int) -> bool:
        """Health check after a crash streak: re-run the incumbent once (not an experiment). True when it
        still yields its metric: the crashes were the candidates' (the researcher has been told), not a
        broken lab (data gone, GPU lost, disk full)."""
        errors = Counter(_first_line(next((ln for ln in reversed(e.log_tail.splitlines()) if ln.strip()), "?"), 120)
                         for e in reversed(self.ledger.experiments(self.session.id, limit=row, order="desc")))
        self.reporter.message(f"{row} crashes in a row ({'; '.join(f'{n} x {t}' for t, n in errors.most_common(2))})"
                              ": re-running the incumbent to tell a broken lab from bad candidates")
        wt = self.ws.add_worktree(f"{self.session.tag}-health-{after}", self.session.incumbent_commit)
        try:
            lab_root = self.ws.lab_in(wt)
            log_path = self.artifacts_dir / f"health-{self.session.tag}-{after}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            res = sandbox.run(self.spec.run.command, cwd=lab_root, env=self.run_env(self.spec.run.seed, -1),
                              policy=self.sandbox_policy(wt), timeout_s=self.spec.run.hard_timeout_s,
                              log_path=log_path, kill_grace_s=self.spec.run.kill_grace_s, cancel=self.stop.cancel)
            m, tampered = self.verifier.measure(wt, lab_root, self.session.incumbent_commit, log_path,
                                                self.spec.run.seed, -1, res.exit_code == 0, tag="-health")
            ok = res.ok and not tampered and m.valid
        finally:
            self.ws.remove_worktree(wt)
        self.events.emit("health.check", crashes_in_row=row, ok=ok, log=str(log_path))
        self.reporter.message("the incumbent still runs: going on" if ok else "the incumbent fails too")
        return ok

    # ------------------------------------------------------------------ run and close

    def run(self) -> Session:
        """Run the session until a stop rule fires. Returns the final session row."""
        lock = self._lock_session()  # before the try: a refused second harness must not close the session
        try:
            if self.resumed:
                if self.check_lab:
                    self.session = self._reconcile(self.session, self._lab_commit(self.session.tag))
                    self.protected_hashes = self.guard.hash_protected(self.session.base_commit)
                self.recover()
            self.reporter.session_started(self.session, self.spec, self.resumed)
            if msg := self.verifier.start_message():
                self.reporter.message(msg)
            self.events.emit("session.resume" if self.resumed else "session.start", tag=self.session.tag,
                             branch=self.session.branch, base_commit=self.session.base_commit,
                             spec_sha256=self.session.spec_hash, sandbox=self.sandbox_mode,
                             researcher=self.session.researcher, autonomy=self.autonomy,
                             permissions=self.spec.permissions.model_dump(mode="json"))
            if self.sandbox_mode == "none":
                self.reporter.message("WARNING: bubblewrap (bwrap) not found: runs are NOT sandboxed "
                                      "(no network or filesystem isolation). Install it: apt-get install bubblewrap")
                if self.spec.holdout.command:
                    self.reporter.message("WARNING: sandbox = none: holdout files are NOT hidden from runs")
            self.researcher = (self._researcher_override or self._researcher_built
                               or researchers_mod.create(self.spec, self.lab_dir))
            # the history since the latest (re-)baseline: what was measured under this base and spec (its
            # rows stay in the ledger, read in pages: nightlab.history)
            history = History.load(self.ledger, self.session.id, self.epoch)
            self.pruner.replay(history)
            if self.resumed:
                self._restore_requeue()  # combinations of stale winners a stop or a kill left unrun
            for e in history:
                self.researcher.observe(e)
            if self.session.baseline_metric is None:  # no baseline has succeeded (since the latest rebase)
                self.run_setup()
                if self.stop.cancel.is_set():
                    return self._close("stopped", self.stop.cancel_reason or "interrupted")
                # the baseline is experiment 0 (or the next index, when an earlier baseline failed)
                base = self.run_experiment(self.ledger.next_idx(self.session.id), None)
                history.append(base)
                self.researcher.observe(base)
                self.reporter.experiment_finished(base, self.session)
                if base.status is Status.INTERRUPTED:
                    return self._close("stopped", self.stop.cancel_reason or "interrupted")
                if base.status is Status.KEEP and base.idx:  # after failed or moved baselines
                    self.epoch = base.idx
                    extra = self.ledger.session_json(self.session.id)[1]
                    self.session = self.ledger.update_session(self.session.id,
                                                              noise={**extra, "baseline_idx": base.idx})
                if base.status is not Status.KEEP:
                    self._close("failed", f"the baseline failed ({base.status.value}: {base.reason})")
                    raise NightlabError(
                        f"the unmodified baseline failed: {base.status.value}: {base.reason}\n{base.log_tail[-1500:]}",
                        f"make the run command work by hand first; see `nightlab show {base.idx}`, then --resume",
                    )
            elif self.spec.run.setup:
                self.run_setup()
            if self.verifier.needs_calibration():  # the policy needs the noise floor
                self.verifier.calibrate()
            return self._loop(history)
        except NightlabError as e:
            if self.session.status == "running":
                self._close("failed", str(e.message)[:500])
            raise
        except BaseException:
            if self.session.status == "running":
                self._close("stopped", "harness error")
            raise
        finally:
            if self.researcher is not None:
                with contextlib.suppress(Exception):  # closing must not mask the real outcome
                    self.researcher.close()
            with contextlib.suppress(Exception):
                self.ws.drop_registrations()  # the worktrees' reusable registrations (all free by now)
                self.ws.maintain()  # the `git maintenance run --auto` its commits did not start
            os.close(lock)  # last: a --resume waiting on it finds nothing of this harness left

    def _loop(self, history: History) -> Session:
        """The scheduler (nightlab.scheduler) runs the experiments after the baseline."""
        raise NotImplementedError

    def _close(self, status: str, reason: str) -> Session:
        self.session = self.ledger.update_session(self.session.id, status=status, stop_reason=reason)
        self.events.emit("session.stop", status=status, reason=reason, incumbent=self.session.incumbent_commit,
                         incumbent_metric=self.session.incumbent_metric)
        self.reporter.session_stopped(self.session)
        return self.session

    def close(self) -> None:
        if self.researcher is None and self._researcher_built is not None:  # built, never run (run() closes its own)
            with contextlib.suppress(Exception):
                self._researcher_built.close()
        if self.notifier is not None:
            self.notifier.close()  # waits (bounded) so that "session stopped" goes out before we exit
        if self.ray is not None:
            self.ray.shutdown()
        if self.audit is not None:
            self.audit.close()
        self.ledger.close()
