"""The research loop (DESIGN.md, "The flow").

    propose -> guard -> materialise -> run -> measure -> decide -> keep/discard -> record -> observe

The ledger is the source of truth; git follows it. Each state change is one ledger
transaction, written *before* the matching git move, so that a harness killed at any
point is recovered by :meth:`Engine.recover` on ``--resume``: orphaned experiments are
marked ``interrupted`` (their process tree killed, their worktree removed) and the branch
is fast-forwarded to the ledger's incumbent if the kill fell between the two writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nightlab import approvals, constraints, escape, keep, notify, prune, redaction, runenv, sandbox
from nightlab import researchers as researchers_mod
from nightlab import resume as lab_state
from nightlab.audit import AuditLog, Signer, ledger_head, store_head
from nightlab.context import SECRET_ENV
from nightlab.errors import NightlabError, SandboxError, UsageError
from nightlab.events import EventSink, FanOut, Locked, NullSink
from nightlab.guard import Guard, diff_paths
from nightlab.ledger import Ledger
from nightlab.permissions import rule_of
from nightlab.policy import make_policy
from nightlab.researchers import Context, Researcher
from nightlab.spec import PROGRAM_FILE, Spec, load_spec, matches
from nightlab.text import first_line
from nightlab.types import Candidate, Experiment, Measurement, RunResult, Session, Status
from nightlab.verifier import Verifier
from nightlab.workspace import ApplyError, Workspace


class Reporter:
    """What the engine tells the outside world. The console implements it; tests may too."""

    def session_started(self, session: Session, spec: Spec, resumed: bool) -> None: ...
    def message(self, text: str) -> None: ...
    def experiment_started(self, idx: int, description: str, budget_s: float) -> None: ...
    def experiment_finished(self, exp: Experiment, session: Session) -> None: ...
    def session_stopped(self, session: Session) -> None: ...


@dataclass
class StopState:
    """Why the loop should stop, set from signal handlers or the STOP file."""

    graceful: str = ""  # stop after the experiment in flight
    cancel: threading.Event = field(default_factory=threading.Event)  # kill the run in flight now
    cancel_reason: str = ""

    def interrupt(self, reason: str) -> None:
        self.cancel_reason = reason
        self.cancel.set()


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


# Audit records after which the ledger stores the log's count and head (each costs a ledger write):
# the decisions and session events, and the start of every wait that can last (a proposal, an
# experiment, a run, setup), so a harness killed mid-wait leaves no unanchored tail; one killed in
# between leaves the few records of a window of milliseconds (docs/security.md).
ANCHOR_KINDS = frozenset({"decision", "session.start", "session.resume", "session.stop", "approval.request",
                          "approval.answer", "recover", "policy.violation", "checkpoint",
                          "researcher.request", "candidate", "git.commit", "sandbox.start", "sandbox.exit",
                          "setup.run"})


REBASE = "rebase"  # the researcher name of a requeued combination of a stale candidate's change


def _raw(text: str) -> bytes:
    """The bytes git gave (its output is decoded with surrogateescape: names and lines not UTF-8)."""
    return text.encode("utf-8", "surrogateescape")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def default_tag() -> str:
    return time.strftime("%b%d").lower()


def _first_line(text: str, limit: int = 200) -> str:
    return first_line(text, limit)  # clipped with an ellipsis, never mid-number without one


class Engine:
    """One session of research on one lab. Not thread-safe: one engine per process."""

    keep_semantics = "measured"  # "rebase": the old semantics, reachable only for bench/efficiency.py

    def __init__(
        self,
        lab_dir: Path | str,
        *,
        tag: str | None = None,
        resume: bool = False,
        db_url: str | None = None,
        reporter: Reporter | None = None,
        researcher: Researcher | None = None,
        spec: Spec | None = None,
        max_experiments: int | None = None,
        sandbox_mode: str | None = None,
        events: EventSink | None = None,
        executor: dict[str, Any] | None = None,
        autonomy: str | None = None,
        program: str | None = None,
        base_commit: str | None = None,
        allow_dirty: bool = False,
        rebaseline: bool = False,
        check_lab: bool = True,
    ) -> None:
        self.lab_dir = Path(lab_dir).resolve()
        self.spec = spec or load_spec(self.lab_dir)
        if max_experiments is not None:
            self.spec = self.spec.model_copy(
                update={"stop": self.spec.stop.model_copy(update={"max_experiments": max_experiments})}
            )
        if executor:
            try:
                self.spec = self.spec.model_copy(update={"executor": self.spec.executor.model_validate(
                    {**self.spec.executor.model_dump(), **executor})})
            except ValueError as e:
                raise UsageError(f"bad executor option: {e}", "see `nightlab run --help`") from None
        if self.spec.executor.kind == "ray" and (self.spec.evaluate.command or self.spec.holdout.command):
            raise UsageError("the ray executor does not run [evaluate] or [holdout] commands yet",
                             "use [executor] kind = \"local\" (with slots) for labs with a protected evaluator")
        from nightlab.space import validate as validate_space

        validate_space(self.spec, self.lab_dir)  # every # nightlab: comment and [researcher.space], up front
        self.ws = Workspace(self.lab_dir)
        self.ws.ensure_state_dir()
        self.ledger = Ledger.for_lab(self.lab_dir, db_url)
        self.reporter = reporter or Reporter()
        self.autonomy = autonomy or self.spec.autonomy.level
        if self.autonomy not in ("auto", "approve-keep", "review"):
            raise UsageError(f"unknown autonomy level {self.autonomy!r}", "use auto, approve-keep or review")
        self.audit = self._open_audit()
        self.notifier = notify.for_spec(self.spec, self.lab_dir)
        sinks = [s for s in (self.audit, events, self.notifier) if s is not None]
        self.events: EventSink = Locked(sinks[0] if len(sinks) == 1 else FanOut(*sinks)) if sinks else NullSink()
        self.guard = Guard(self.spec, self.ws)
        self.policy = make_policy(self.spec.accept)
        self.verifier = Verifier(self)
        self.stop = StopState()
        self.sandbox_mode = sandbox.resolve_mode(sandbox_mode or self.spec.sandbox.mode)
        self.data_dir = self.ws.state_dir / "data"
        self.artifacts_dir = self.ws.state_dir / "artifacts"
        self.stop_file = self.ws.state_dir / "STOP"
        self._researcher_override = researcher
        self._program = program  # a program.md text instead of the lab's file (an arm of `nightlab compare`)
        self._base_commit = base_commit  # a new session starts here instead of HEAD
        self.researcher: Researcher | None = None
        self._tls = threading.local()  # which slot the current thread runs (GPU pinning)
        self._keep_lock = threading.Lock()  # one keep decision at a time, against the current incumbent
        self._requeue: list[Candidate | keep.Requeued] = []  # combinations of stale changes (keep.py)
        self._crashes_checked = 0  # crashes of the current streak already cleared by a health check
        self.pruner = prune.Pruner(self.spec.prune, self.spec.prune.figure or self.spec.metric.name,
                                   self.spec.metric.direction)
        self._closing = False  # the loop is closing: proposals in progress should give up
        self.ray: Any = None
        if self.spec.executor.kind == "ray":
            from nightlab.executors.ray_executor import RayExecutor

            ex = self.spec.executor
            self.ray = RayExecutor(address=ex.address or None, num_cpus=ex.num_cpus, num_gpus=ex.num_gpus,
                                   resources=dict(ex.resources), max_retries=ex.max_retries)
        self.allow_dirty = allow_dirty
        self.rebaseline = rebaseline
        self.check_lab = check_lab  # False: resume a session as stored, without comparing it with the lab
        self.epoch = 0  # the idx of the session's latest (re-)baseline: history before it is not replayed,
        # the stop rules count from it
        self.session = self._open_session(tag, resume)
        self.resumed = resume
        self.protected_hashes = self.guard.hash_protected(self.session.base_commit)
        self._started = time.monotonic()

    def _open_audit(self) -> AuditLog | None:
        """The lab's audit log (``[audit]``), anchored in the ledger after every decision and session event."""
        if not self.spec.audit.enabled:
            return None
        signer = Signer.load_or_create(self.ws.state_dir / "keys") if self.spec.audit.sign else None
        ledger = self.ledger
        # anchored: no session continues a log that lost records the ledger counted
        return AuditLog(self.ws.state_dir / "audit.jsonl", checkpoint_every=self.spec.audit.checkpoint_every,
                        signer=signer, anchor=lambda log_id, n, head: store_head(ledger, log_id, n, head),
                        anchor_kinds=ANCHOR_KINDS, anchored=lambda log_id: ledger_head(ledger, log_id))

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
        if removed:
            self.reporter.message(f"removed {len(removed)} stale worktree(s)")
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

    # ------------------------------------------------------------------ environment

    def new_run(self, kind: str, idx: int | None = None) -> str:
        """A fresh run id for ``sandbox.run(run_id=...)``, committed to the ledger *before* the spawn,
        so that :meth:`recover` finds the run's processes by their ``NIGHTLAB_RUN_ID`` tag."""
        exp = None if idx is None or idx < 0 else idx
        run_id = f"{self.session.tag[:64]}.{'' if exp is None else exp}.{kind[:32]}.{secrets.token_hex(8)}"
        self.ledger.record_run(self.session.id, run_id, kind[:32], exp)
        return run_id

    def run_env(self, seed: int, idx: int) -> dict[str, str]:
        """The environment of a run, evaluator, holdout check or setup: an allowlist (nightlab.runenv)
        of nightlab's own, ``[run] pass_env``, ``[run] env``, then the ``NIGHTLAB_*`` run variables."""
        env = runenv.filter_env(os.environ, self.spec.run.pass_env)
        if not env.get("VIRTUAL_ENV"):
            # make `python` in a run command mean the interpreter nightlab runs under
            env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update(self.spec.run.env)
        env.update({
            "NIGHTLAB_BUDGET_S": f"{self.spec.run.budget_s:g}",
            "NIGHTLAB_SEED": str(seed),
            "NIGHTLAB_DATA_DIR": str(self.data_dir),
            "NIGHTLAB_EXPERIMENT": str(idx),
            "NIGHTLAB_TAG": self.session.tag,
            "PYTHONUNBUFFERED": "1",
        })
        ex = self.spec.executor
        slot = getattr(self._tls, "slot", 0)
        env["NIGHTLAB_SLOT"] = str(slot)
        if ex.gpus_per_slot:
            gpus = ex.gpus or list(range(ex.slots * ex.gpus_per_slot))
            mine = gpus[slot * ex.gpus_per_slot:(slot + 1) * ex.gpus_per_slot]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in mine)
        return env

    @property
    def redactions(self) -> list[tuple[str, str]]:
        """What is redacted from every log tail and reason the ledger stores (nightlab.redaction):
        secret-named values, values of the variables runs do not get, secret-named ``[run] env``.
        Computed once, from the environment nightlab started with."""
        if "_redactions" not in self.__dict__:
            passed = runenv.filter_env(os.environ, self.spec.run.pass_env)
            extra = [v for k, v in self.spec.run.env.items() if SECRET_ENV.search(k)]
            self.__dict__["_redactions"] = redaction.env_secrets(os.environ, passed=passed, extra=extra)
        return list(self.__dict__["_redactions"])

    def _redacted(self, **fields: Any) -> dict[str, Any]:
        """Ledger fields with :attr:`redactions` applied: ``reason``, ``log_tail``, ``evidence``."""
        return {k: redaction.redact_data(v, self.redactions) if k in ("reason", "log_tail", "evidence") else v
                for k, v in fields.items()}

    def readonly_data(self) -> list[Path]:
        """``[sandbox] readonly``: host paths runs may read (``~`` expands; relative: from the lab)."""
        out = []
        for raw in self.spec.sandbox.readonly:
            p = Path(os.path.expanduser(raw))
            p = p if p.is_absolute() else self.lab_dir / p
            if not p.exists():
                raise UsageError(f"[sandbox] readonly: {raw} ({p}) does not exist",
                                 "create it (run the lab's data preparation first), or remove it from "
                                 "[sandbox] readonly in nightlab.toml")
            out.append(p)
        return out

    def sandbox_policy(self, worktree: Path) -> sandbox.SandboxPolicy:
        hidden = [self.ws.state_dir, self.ws.repo_root / ".git", self.ws.git_dir]
        hidden += self.verifier.hidden_paths(self.ws.lab_in(worktree))  # holdout files and [sandbox] hide
        readonly = [worktree / ".git"]
        if self.data_dir.exists():
            readonly.append(self.data_dir)
        readonly += self.readonly_data()  # [sandbox] readonly
        return sandbox.SandboxPolicy(
            mode=self.sandbox_mode, network=self.spec.permissions.run_network, writable=(worktree,),
            readonly=tuple(readonly), hidden=tuple(dict.fromkeys(hidden)), memory_mb=self.spec.run.memory_mb,
            max_log_bytes=self.spec.run.max_log_bytes,
        )

    def run_setup(self) -> None:
        if not self.spec.run.setup:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.artifacts_dir / f"setup-{self.session.tag}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.reporter.message(f"setup: {self.spec.run.setup}")
        self.events.emit("setup.run", command=self.spec.run.setup, sandbox="none")
        env = self.verifier.setup_env(self.run_env(self.spec.run.seed, -1))
        policy = sandbox.SandboxPolicy(mode="none")
        res = sandbox.run(self.spec.run.setup, cwd=self.lab_dir, env=env, policy=policy,
                          timeout_s=max(3600.0, self.spec.run.hard_timeout_s), log_path=log,
                          cancel=self.stop.cancel, run_id=self.new_run("setup"))
        if not res.ok:
            why = "timed out" if res.timed_out else f"exited with {res.exit_code}"
            raise NightlabError(f"the setup command {self.spec.run.setup!r} {why}; its log: {log}\n"
                                + sandbox.tail(log, 15), "fix the setup command, then resume with --resume")

    # ------------------------------------------------------------------ one experiment

    def _context(self, idx: int, history: list[Experiment]) -> Context:
        parent = self.session.incumbent_commit
        files: dict[str, str] = {}
        all_files = self.ws.ls_files(parent)
        for p in all_files:
            if (matches(p, self.spec.files.editable) and not matches(p, self.guard.protected)
                    and not matches(p, self.spec.sandbox.hide)):
                try:
                    files[p] = self.ws.read_file(parent, p).decode("utf-8")
                except UnicodeDecodeError:
                    continue
        program_path = self.lab_dir / PROGRAM_FILE
        program = self._program if self._program is not None else (
            program_path.read_text(encoding="utf-8") if program_path.exists() else "")
        return Context(
            spec=self.spec, lab_dir=self.lab_dir, program=program, parent=parent, files=files,
            history=tuple(history), metric_name=self.spec.metric.name, direction=self.spec.metric.direction,
            incumbent_metric=self.session.incumbent_metric, baseline_metric=self.session.baseline_metric, idx=idx,
            extra={"session": self.session.tag},
        )

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
        exp = self.ledger.finish_experiment(
            exp_id, status=status, metric=m.metric if m else None, secondary=m.secondary if m else {},
            trust=m.trust if m else "inline", **self._redacted(reason=reason, log_tail=log_tail), run_s=run_s,
            overhead_s=max(0.0, (time.monotonic() - t0) - run_s),
            exit_code=run.exit_code if run else None, finished_at=now, **self._redacted(**kw),
        )
        self.events.emit("decision", experiment=exp.idx, status=status.value, metric=exp.metric,
                         reason=reason, evidence=exp.evidence, commit=exp.commit)
        return exp

    def exp_dir(self, idx: int) -> Path:
        """Where experiment ``idx`` of this session keeps its files: ``artifacts/<tag>/<idx>/``."""
        return self.artifacts_dir / self.session.tag / str(idx)

    def _write_artifacts(self, idx: int, artifacts: dict[str, str]) -> None:
        """A candidate's artifacts (prompt, response, transcript) under artifacts/<tag>/<idx>/."""
        folder = self.exp_dir(idx)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in artifacts.items():
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".") or "artifact"
            (folder / safe).write_text(escape.text(text), encoding="utf-8")  # a transcript may hold any bytes

    def _run_remote(self, idx: int, exp_id: int, candidate: Candidate | None, commit: str, canonical: str,
                    wt: Path, lab_root: Path, t0: float, seed: int, log_path: Path) -> Experiment:
        """Run the committed experiment as a Ray task; the tree travels as a ``git archive`` tar."""
        from nightlab.executors.ray_executor import Lost, RemoteJob

        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=self.lab_dir,
                                 capture_output=True, check=True).stdout
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
        out = self.ray.run(job, log_path=log_path, cancel=self.stop.cancel)
        if isinstance(out, Lost):
            self.events.emit("sandbox.exit", experiment=idx, lost=True, reason=out.reason, attempts=out.attempts)
            return self._finish(exp_id, Status.LOST, t0, reason=f"lost after {out.attempts} attempt(s): {out.reason}",
                                evidence={"executor": "ray", "node": out.node, "attempts": out.attempts})
        res, m = out.run, self.verifier.sane(out.measurement)
        self.events.emit("sandbox.exit", experiment=idx, exit_code=res.exit_code, timed_out=res.timed_out,
                         interrupted=res.interrupted, wall_s=round(res.wall_s, 3), node=out.node,
                         attempts=out.attempts, log_sha256=_file_sha(Path(res.log_path)))
        where = {"executor": "ray", "node": out.node, "attempts": out.attempts}
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
        if candidate is None:
            exp = self._finish(exp_id, Status.KEEP, t0, res, m, reason="baseline", commit=commit,
                               incumbent=(commit, m.metric), evidence={"policy": "baseline", **where})
            self.session = self.ledger.update_session(self.session.id, baseline_metric=m.metric)
            return exp
        with self._keep_lock:
            return self._decide(idx, exp_id, candidate, commit, canonical, wt, lab_root, t0, res, m, where)

    def _kept_metric(self, commit: str) -> float | None:
        """The metric the ledger holds for a kept commit (its estimate, when a policy made one)."""
        for e in self.ledger.experiments(self.session.id, status=Status.KEEP):
            if e.commit == commit:
                return float(e.evidence.get("estimate", e.metric)) if e.metric is not None else None
        return None

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

    def _started_run(self, exp_id: int, pid: int) -> None:
        """The run's process exists: pin it to its slot's CPUs, record it for crash recovery."""
        self._pin(pid)
        self.ledger.update_experiment(exp_id, pid=pid, pid_start=sandbox.proc_start_time(pid))

    def run_experiment(self, idx: int, candidate: Candidate | None, propose_s: float = 0.0,
                       slot: int = 0) -> Experiment:
        """Materialise, run, measure and decide one experiment. ``candidate=None`` is the baseline.

        Thread-safe with respect to other experiments: several slots call it at once. Keep
        decisions are serialised and made against the incumbent of *their* time; a candidate whose
        parent is no longer the incumbent (stale) is judged against the current incumbent, and if
        it wins its measured tree is kept on top of it (keep.py; README, "Concurrency semantics").
        """
        self._tls.slot = slot
        self._tls.watch = None
        t0 = time.monotonic()
        parent = candidate.parent if candidate else self.session.incumbent_commit
        seed = self.spec.run.seed
        desc = _first_line(candidate.rationale) if candidate else "baseline"
        name = f"{self.session.tag}-{idx}"
        wt_path = self.ws.worktrees_dir / name
        exp_id = self.ledger.start_experiment(
            self.session.id, idx=idx, parent_commit=parent, seed=seed, candidate=candidate,
            description=desc, propose_s=propose_s, worktree=str(wt_path),
        )
        if candidate is not None and candidate.artifacts:
            self._write_artifacts(idx, candidate.artifacts)
        self.reporter.experiment_started(idx, desc, self.spec.run.budget_s)
        if candidate is not None:
            self.events.emit("candidate", experiment=idx, parent=parent, researcher=candidate.researcher,
                             rationale=candidate.rationale, files=sorted(candidate.files or {}),
                             diff_sha256=_sha(candidate.diff or ""), params=candidate.params)
        # 1. guard the claimed paths before anything touches disk
        if candidate is not None:
            claimed = list(candidate.files or {}) + (diff_paths(candidate.diff) if candidate.diff else [])
            if not claimed:
                return self._finish(exp_id, Status.INVALID, t0,
                                    reason=candidate.error or "the candidate changes nothing")
            problem = self.guard.check_paths(claimed)
            self.events.emit("guard", experiment=idx, stage="paths", ok=problem is None, reason=problem or "")
            if problem:
                return self._violation(exp_id, idx, t0, problem)
        wt = self.ws.add_worktree(name, parent)
        try:
            commit, canonical = parent, ""
            if candidate is not None:
                # 2. materialise and check what git says actually changed
                try:
                    if candidate.files:
                        self.ws.write_files(wt, candidate.files)
                    if candidate.diff:
                        self.ws.apply_diff(wt, candidate.diff)
                except ApplyError as e:
                    if candidate.researcher == REBASE:
                        return self._finish(exp_id, Status.DISCARD, t0,
                                            reason=f"stale: conflicts with the new incumbent: {e}")
                    return self._finish(exp_id, Status.INVALID, t0, reason=f"edit did not apply: {e}")
                changes = self.ws.stage(wt)
                problem = self.guard.check_changes(changes)
                self.events.emit("guard", experiment=idx, stage="changes", ok=problem is None, reason=problem or "",
                                 changed=[c.path for c in changes])
                if problem:
                    return self._violation(exp_id, idx, t0, problem)
                if not changes:
                    return self._finish(exp_id, Status.INVALID, t0, reason="the candidate changes nothing")
                msg = f"nightlab {self.session.tag} #{idx}: {desc}\n\n{candidate.rationale}".strip()
                commit, canonical = self.ws.commit_staged(wt, msg)
                problem = self.guard.check_size(changes, canonical)
                stored = self._stored_diff(canonical, problem)
                self.ledger.update_experiment(exp_id, commit=commit, diff=stored)
                self.ws.keep_ref(self.session.tag, idx, commit)
                self.events.emit("git.commit", experiment=idx, commit=commit, parent=parent,
                                 diff_sha256=_sha(canonical), diff_bytes=len(_raw(canonical)))
                self.events.emit("guard", experiment=idx, stage="size", ok=problem is None,
                                 reason=problem or "")
                if problem:
                    return self._violation(exp_id, idx, t0, problem)
            lab_root = self.ws.lab_in(wt)
            # 3. protected files must be exactly what the session started with
            problem = Guard.verify_protected(lab_root, self.protected_hashes)
            self.events.emit("guard", experiment=idx, stage="protected", ok=problem is None, reason=problem or "",
                             files=len(self.protected_hashes))
            if problem:
                return self._violation(exp_id, idx, t0, problem)
            if candidate is not None and self.autonomy == "review":
                answer, why = self._await_human(idx, "run", canonical, candidate.rationale)
                if answer == "rejected":
                    return self._finish(exp_id, Status.REJECTED, t0, reason=f"human: {why or 'rejected'}")
                if answer != "approved":
                    return self._finish(exp_id, Status.INTERRUPTED, t0, reason=f"interrupted: {why}")
            # 4. run
            log_path = self.exp_dir(idx) / "run.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if candidate is not None:
                (log_path.parent / "candidate.diff").write_bytes(_raw(canonical))
            policy = self.sandbox_policy(wt)
            self.events.emit("sandbox.start", experiment=idx, command=self.spec.run.command, cwd=str(lab_root),
                             mode=policy.mode, network=policy.network, hidden=[str(h) for h in policy.hidden],
                             timeout_s=self.spec.run.hard_timeout_s, memory_mb=policy.memory_mb)
            if self.ray is not None:
                return self._run_remote(idx, exp_id, candidate, commit, canonical, wt, lab_root, t0, seed,
                                        log_path)
            watch = self.pruner.watch(log_path, self.stop.cancel, prunable=candidate is not None)
            self._tls.watch = watch
            try:
                res = sandbox.run(
                    self.spec.run.command, cwd=lab_root, env=self.run_env(seed, idx), policy=policy,
                    timeout_s=self.spec.run.hard_timeout_s, log_path=log_path,
                    kill_grace_s=self.spec.run.kill_grace_s, on_start=lambda pid: self._started_run(exp_id, pid),
                    cancel=watch.cancel, run_id=self.new_run("run", idx),
                )
            finally:
                watch.close()
            self.events.emit("sandbox.exit", experiment=idx, exit_code=res.exit_code, timed_out=res.timed_out,
                             interrupted=res.interrupted, wall_s=round(res.wall_s, 3),
                             log_sha256=_file_sha(Path(res.log_path)))
            if res.interrupted and watch.pruned_at is not None and not self.stop.cancel.is_set():
                last = watch.curve[-1][1] if watch.curve else math.nan
                return self._finish(exp_id, Status.PRUNED, t0, res, reason=(
                    f"pruned at step {watch.pruned_at}: {self.pruner.metric}={last:.6g} judged hopeless by the "
                    f"{self.spec.prune.pruner} pruner against earlier runs at that step"))
            if res.interrupted:
                return self._finish(exp_id, Status.INTERRUPTED, t0, res,
                                    reason=f"interrupted: {self.stop.cancel_reason or 'stop requested'}")
            # 5. measure and decide
            if res.timed_out:
                return self._finish(exp_id, Status.TIMEOUT, t0, res,
                                    reason=f"killed at the {self.spec.run.hard_timeout_s:g}s timeout")
            m, tampered = self.verifier.measure(wt, lab_root, commit, log_path, seed, idx, res.exit_code == 0)
            self.events.emit("measurement", experiment=idx, metric=m.metric, secondary=m.secondary,
                             trust=m.trust, error=m.error)
            if tampered:
                return self._finish(exp_id, Status.REJECTED, t0, res, m, reason=tampered)
            if res.exit_code != 0:
                return self._finish(exp_id, Status.CRASH, t0, res, m, reason=f"exit code {res.exit_code}")
            if not m.valid:
                return self._finish(exp_id, Status.CRASH, t0, res, m, reason=m.error)
            assert m.metric is not None
            extras = self.verifier.evidence_extras(m, log_path)
            if candidate is None:
                exp = self._finish(exp_id, Status.KEEP, t0, res, m, reason="baseline", commit=commit,
                                   incumbent=(commit, m.metric), evidence={"policy": "baseline", **extras})
                self.session = self.ledger.update_session(self.session.id, baseline_metric=m.metric)
                self.verifier.after_keep(exp, wt, lab_root)
                return exp
            with self._keep_lock:
                return self._decide(idx, exp_id, candidate, commit, canonical, wt, lab_root, t0, res, m, extras)
        finally:
            self.ws.remove_worktree(wt)
            self.session = self.ledger.get_session(self.session.tag) or self.session

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
        self.ws.advance_branch(self.session.branch, commit, old)
        self.events.emit("git.advance", experiment=idx, branch=self.session.branch, old=old, new=commit)
        self.session = self.ledger.get_session(self.session.tag) or self.session
        self.verifier.after_keep(exp, wt, lab_root)
        return exp

    def _queue_combination(self, idx: int, candidate: Candidate, measured: str, onto: str, after: str) -> str:
        """Queue the stale candidate's change applied on ``onto`` (keep.py); says what happened."""
        tree = keep.combination(self.ws, candidate.parent, measured, onto, candidate.params)
        if tree is None:
            return "; its change does not combine with the incumbent (conflict, or nothing new): nothing queued"
        tip = keep.commit_tree(self.ws, tree, after, f"nightlab {self.session.tag}: combination with #{idx}")
        self._requeue.append(keep.Requeued(idx, f"combination with #{idx}: {candidate.rationale}", tip,
                                           dict(candidate.params)))
        self.events.emit("requeue", experiment=idx, tip=tip)
        return "; its change combined with the incumbent is queued as a new candidate"

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

    # ------------------------------------------------------------------ permissions and autonomy

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

    def _stop_requested(self) -> str:
        if self.stop.cancel.is_set():
            return self.stop.cancel_reason or "interrupted"
        if self.stop.graceful:
            return self.stop.graceful
        return "STOP file" if self.stop_file.exists() else ""

    def _await_human(self, idx: int, kind: str, diff: str, rationale: str) -> tuple[str, str]:
        """Queue an approval and wait for its answer: ``(approved|rejected|stopped, why)``.

        Polls the ledger every ``[autonomy] poll_s``; a stop request (SIGINT, SIGTERM, the
        STOP file) ends the wait and cancels the request; ``expire_h`` rejects it.
        """
        aid = approvals.request(self.ledger, self.session.id, idx, kind, diff, rationale)
        self.events.emit("approval.request", experiment=idx, approval=aid, approval_kind=kind, autonomy=self.autonomy,
                         diff_sha256=_sha(diff), rationale_sha256=_sha(rationale))
        what = "it runs" if kind == "run" else "the branch advances to it"
        self.reporter.message(f"#{idx} waits for a human before {what}: nightlab approve {idx}  or  "
                              f"nightlab reject {idx} --why '...'  (nightlab pending shows the diff)")
        t = time.monotonic()
        expire = self.spec.autonomy.expire_h * 3600 or None
        row = approvals.wait(self.ledger, aid, poll_s=self.spec.autonomy.poll_s, cancel=self.stop.cancel,
                             stop=lambda: bool(self._stop_requested()), timeout_s=expire)
        if row["status"] == "pending":
            stop = self._stop_requested()
            if stop:
                row = approvals.cancel(self.ledger, aid, f"the session stopped while waiting ({stop})") or \
                    approvals.get(self.ledger, aid) or row
            else:
                try:
                    why = f"no answer within {self.spec.autonomy.expire_h:g} h"
                    row = approvals.answer(self.ledger, aid, False, why, "nightlab (expire_h)")
                except UsageError:  # answered in the meantime
                    row = approvals.get(self.ledger, aid) or row
        self.events.emit("approval.answer", experiment=idx, approval=aid, approval_kind=kind, status=row["status"],
                         who=row["who"], why=row["why"], answered_at=row["answered_at"],
                         waited_s=round(time.monotonic() - t, 3))
        status = str(row["status"])
        if status == "cancelled":
            return "stopped", f"stopped while awaiting approval ({self._stop_requested() or 'stop'})"
        return status, str(row["why"] or "")

    # ------------------------------------------------------------------ stop rules

    def stop_reason(self, history: list[Experiment]) -> str:
        st = self.spec.stop
        if self.stop.cancel.is_set():
            return self.stop.cancel_reason or "interrupted"
        if self.stop.graceful:
            return self.stop.graceful
        if self.stop_file.exists():
            self.stop_file.unlink(missing_ok=True)
            return "STOP file"
        tried = [e for e in history if e.idx > self.epoch]
        if st.max_experiments and len(tried) >= st.max_experiments:
            return f"max_experiments ({st.max_experiments}) reached"
        if st.max_cost_usd or st.max_tokens:
            used = sum((e.usage for e in history), self.ledger.spend_totals(self.session.id))
            if st.max_cost_usd and used.cost_usd >= st.max_cost_usd:
                return f"max_cost_usd ({st.max_cost_usd:g}) reached: ${used.cost_usd:.4f} spent"
            if st.max_tokens and used.tokens_in + used.tokens_out >= st.max_tokens:
                return f"max_tokens ({st.max_tokens}) reached: {used.tokens_in + used.tokens_out} tokens used"
        if st.max_hours and time.monotonic() - self._started >= st.max_hours * 3600:
            return f"max_hours ({st.max_hours:g}) reached"
        if st.patience:
            since = 0
            for e in reversed(tried):
                if e.status is Status.KEEP:
                    break
                since += 1
            if since >= st.patience:
                return f"patience: {since} experiments without a keep"
        if st.max_policy_violations:
            n = sum(1 for e in tried if e.status is Status.REJECTED and e.reason.startswith("policy: "))
            if n >= st.max_policy_violations:
                return f"max_policy_violations: {n} candidates broke [permissions]"
        if st.max_crashes_in_row:
            row = 0
            for e in reversed(tried):
                if not e.status.is_failure():
                    break
                row += 1
            if row >= 4 * st.max_crashes_in_row:
                return f"max_crashes_in_row: {row} crashes or timeouts in a row; the researcher finds nothing that runs"
            if row - self._crashes_checked >= st.max_crashes_in_row:
                if self.ray is not None or not self._incumbent_runs(row, tried[-1].idx):
                    return f"max_crashes_in_row: {row} crashes or timeouts in a row" + (
                        "" if self.ray is not None else ", and the incumbent fails too: the lab is broken")
                self._crashes_checked = row  # the candidates crashed, not the lab: go on
            elif row == 0:
                self._crashes_checked = 0
        return ""

    def _incumbent_runs(self, row: int, after: int) -> bool:
        """Health check after a crash streak: re-run the incumbent once (not an experiment). True when it
        still yields its metric: the crashes were the candidates' (the researcher has been told), not a
        broken lab (data gone, GPU lost, disk full)."""
        errors = Counter(_first_line(next((ln for ln in reversed(e.log_tail.splitlines()) if ln.strip()), "?"), 120)
                         for e in self.ledger.experiments(self.session.id)[-row:])
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

    # ------------------------------------------------------------------ the loop

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
            self.researcher = self._researcher_override or researchers_mod.create(self.spec, self.lab_dir)
            # the history since the latest (re-)baseline: what was measured under this base and spec
            history = [e for e in self.ledger.experiments(self.session.id) if e.idx >= self.epoch]
            self.pruner.replay(history)
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
            os.close(lock)
            if self.researcher is not None:
                with contextlib.suppress(Exception):  # closing must not mask the real outcome
                    self.researcher.close()

    def _propose(self, idx: int, history: list[Experiment]) -> Candidate | None:
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
                return Candidate(parent=inc, rationale=item.rationale, files=files, params=dict(item.params),
                                 researcher=REBASE)
            # conflicts with (or adds nothing to) the incumbent of now: dropped before it gets a row
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
        cand = Candidate(**{**cand.__dict__, "parent": ctx.parent, "usage": replace(cand.usage, seconds=propose_s)
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

    def _prefetch(self) -> int:
        """``[researcher] prefetch``: proposals made ahead, concurrently (researchers that allow it only)."""
        n = getattr(self.researcher, "prefetch", 0)
        return int(n) if isinstance(n, int) and n > 0 and getattr(self.researcher, "concurrent", False) else 0

    def _loop(self, history: list[Experiment]) -> Session:
        """Keep ``[executor] slots`` experiments running, and the next proposal ready.

        With ``pipeline``, the next proposal is made while experiments run, so no slot waits for
        the researcher -- as long as proposing is quicker than running (measured: moving averages
        of both). When proposing takes longer, the proposal waits for the result in flight instead,
        so that it sees the current history (it would leave the slot idle either way).
        With ``[researcher] prefetch = N`` (researchers that allow concurrent proposals), up to N
        proposals are made at once, ahead of the runs, each on the history of its start.
        Stops when a stop rule fires, after the experiments in flight finish (a cancel makes them
        stop at once, ``interrupted``); proposals made for nothing are dropped, their usage recorded.
        """
        ex = self.spec.executor
        cap = self.spec.stop.max_experiments
        free = list(range(ex.slots))
        inflight: dict[Future[Experiment], int] = {}
        prepared: tuple[int, Candidate, float] | None = None
        next_idx = self.ledger.next_idx(self.session.id)
        invalid_row, reason, busy_s = 0, "", 0.0
        t_loop = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=ex.slots, thread_name_prefix="nightlab-slot")
        prefetch = self._prefetch()
        ppool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="nightlab-propose") if prefetch else None
        queue: deque[tuple[int, Future[tuple[Candidate | None, float]]]] = deque()
        est: dict[str, float] = {}  # moving averages: "propose", "run" seconds
        ahead_shown: bool | None = None

        def learn(what: str, seconds: float) -> None:
            est[what] = seconds if what not in est else 0.7 * est[what] + 0.3 * seconds

        def ahead_ok() -> bool:
            nonlocal ahead_shown
            if not ex.pipeline:
                return False
            ok = "propose" not in est or "run" not in est or est["propose"] <= est["run"]
            if ahead_shown is not None and ok != ahead_shown:
                how = "proposing ahead" if ok else "waiting for the result in flight before proposing"
                self.events.emit("scheduler", pipeline_ahead=ok, propose_s=round(est.get("propose", 0), 3),
                                 run_s=round(est.get("run", 0), 3))
                self.reporter.message(f"{how}: proposing takes {est.get('propose', 0):.1f}s, "
                                      f"running {est.get('run', 0):.1f}s")
            ahead_shown = ok
            return ok

        def timed(idx: int, hist: list[Experiment]) -> tuple[Candidate | None, float]:
            t0 = time.monotonic()
            return self._propose(idx, hist), time.monotonic() - t0

        for e in history:
            if e.idx > 0 and e.run_s > 0:  # candidates' runs (the baseline may be unlike them)
                learn("run", e.run_s)
        try:
            while True:
                if not reason:
                    reason = self.stop_reason(history)
                if reason and not inflight:
                    break
                tried = sum(1 for e in history if e.idx > self.epoch)
                budget = (cap - tried - len(inflight) - (prepared is not None) - len(queue)) if cap else 1
                if ppool is not None:
                    if not reason and budget > 0 and len(queue) < prefetch:
                        queue.append((next_idx, ppool.submit(timed, next_idx, list(history))))
                        next_idx += 1
                        continue
                    if not reason and prepared is None and queue and queue[0][1].done():
                        idx, pfut = queue.popleft()
                        cand, secs = pfut.result()
                        learn("propose", secs)
                        if cand is not None:
                            prepared = (idx, cand, secs)
                        continue
                elif not reason and prepared is None and budget > 0 and (free or ahead_ok()):
                    cand, secs = timed(next_idx, history)
                    learn("propose", secs)
                    if cand is not None:
                        prepared = (next_idx, cand, secs)
                        next_idx += 1
                    continue
                if not reason and prepared is not None and free:
                    slot = free.pop(0)
                    inflight[pool.submit(self.run_experiment, *prepared, slot=slot)] = slot
                    prepared = None
                    continue
                if not inflight and not queue:  # nothing to run and nothing running: the stop rules decide
                    reason = reason or self.stop_reason(history) or "nothing left to run"
                    continue
                waiting: list[Future[Any]] = [*inflight, *(f for _, f in queue)]
                done, _ = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in [f for f in inflight if f in done]:  # finished proposals are taken above
                    free.append(inflight.pop(fut))
                    exp = fut.result()
                    busy_s += exp.run_s
                    if exp.idx > 0 and exp.run_s > 0:
                        learn("run", exp.run_s)
                    history.append(exp)
                    self.researcher.observe(exp)  # type: ignore[union-attr]
                    self.reporter.experiment_finished(exp, self.session)
                    invalid_row = invalid_row + 1 if exp.status in (Status.INVALID, Status.REJECTED) else 0
                    if invalid_row >= 20 and not reason:
                        reason = f"{invalid_row} invalid or rejected candidates in a row"
                free.sort()
        except BaseException:
            self.stop.interrupt(self.stop.cancel_reason or "harness error")
            raise
        finally:
            self._closing = True  # proposals still in progress give up (their usage is recorded)
            pool.shutdown(wait=True)
            if ppool is not None:
                ppool.shutdown(wait=True)
            left = [(i, f.result()[0]) for i, f in queue if f.done() and f.exception() is None]
            if prepared is not None:
                left.append((prepared[0], prepared[1]))
            for i, c in left:
                if c is not None:
                    self._drop(i, c, reason or "stopped")
            self._closing = False
            wall = time.monotonic() - t_loop
            if wall > 0 and busy_s > 0:
                stats = {"slots": ex.slots, "pipeline": ex.pipeline, "wall_s": round(wall, 3),
                         "busy_s": round(busy_s, 3), "duty_cycle": round(busy_s / (ex.slots * wall), 4)}
                if est:
                    stats.update({f"{k}_s_avg": round(v, 3) for k, v in est.items()})
                self.verifier._save_noise(executor=stats)
                self.reporter.message(f"duty cycle {100 * stats['duty_cycle']:.1f}% over {ex.slots} slot(s)")
        status = "stopped" if self.stop.cancel.is_set() or self.stop.graceful or reason == "STOP file" \
            else "finished"
        return self._close(status, reason)

    def _close(self, status: str, reason: str) -> Session:
        self.session = self.ledger.update_session(self.session.id, status=status, stop_reason=reason)
        self.events.emit("session.stop", status=status, reason=reason, incumbent=self.session.incumbent_commit,
                         incumbent_metric=self.session.incumbent_metric)
        self.reporter.session_stopped(self.session)
        return self.session

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.close()  # waits (bounded) so that "session stopped" goes out before we exit
        if self.ray is not None:
            self.ray.shutdown()
        if self.audit is not None:
            self.audit.close()
        self.ledger.close()


def improvement_pct(baseline: float | None, best: float | None, direction: Any) -> float | None:
    if baseline is None or best is None or baseline == 0 or not math.isfinite(baseline):
        return None
    pct = 100.0 * direction.improvement(best, baseline) / abs(baseline)
    return pct if math.isfinite(pct) else None  # 1e308 - (-1e308) overflows: no "+inf%"


def install_signal_handlers(engine: Engine) -> Callable[[], None]:
    """SIGINT: kill the run in flight and stop (recorded ``interrupted``). SIGTERM: stop after it."""
    import signal

    def on_int(signum: int, frame: object) -> None:
        engine.stop.interrupt("interrupted (SIGINT)")

    def on_term(signum: int, frame: object) -> None:
        engine.stop.graceful = "stopped by SIGTERM"

    old_int = signal.signal(signal.SIGINT, on_int)
    old_term = signal.signal(signal.SIGTERM, on_term)

    def restore() -> None:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)

    return restore


__all__ = ["Engine", "Reporter", "SandboxError", "default_tag", "install_signal_handlers"]
