"""What every part of the engine shares: its state, the environment of runs, and the waits on humans.

:class:`Runtime` declares the attributes :class:`nightlab.engine.Engine` sets up, and the services the
pipeline, the session lifecycle and the scheduler all use: run ids (recorded before each spawn), the
environment and sandbox policy of a run, the setup command, approvals, whether a stop was requested.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightlab import approvals, keep, redaction, runenv, sandbox
from nightlab.audit import AuditLog
from nightlab.context import SECRET_ENV
from nightlab.errors import NightlabError, UsageError
from nightlab.events import EventSink
from nightlab.guard import Guard
from nightlab.ledger import Ledger
from nightlab.notify import Notifier
from nightlab.policy import AcceptancePolicy
from nightlab.prune import Pruner
from nightlab.researchers import Researcher
from nightlab.spec import Spec
from nightlab.text import first_line
from nightlab.types import Candidate, Experiment, Session
from nightlab.verifier import Verifier
from nightlab.workspace import Workspace


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


def _first_line(text: str, limit: int = 200) -> str:
    return first_line(text, limit)  # clipped with an ellipsis, never mid-number without one


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


class Runtime:
    """The engine's state (set by :class:`nightlab.engine.Engine`) and the services its parts share."""

    keep_semantics: str
    lab_dir: Path
    spec: Spec
    ws: Workspace
    ledger: Ledger
    reporter: Reporter
    autonomy: str
    audit: AuditLog | None
    notifier: Notifier | None
    events: EventSink
    guard: Guard
    policy: AcceptancePolicy
    verifier: Verifier
    stop: StopState
    sandbox_mode: str
    data_dir: Path
    artifacts_dir: Path
    stop_file: Path
    researcher: Researcher | None
    pruner: Pruner
    ray: Any
    allow_dirty: bool
    rebaseline: bool
    check_lab: bool
    epoch: int
    session: Session
    resumed: bool
    protected_hashes: dict[str, str]
    _researcher_override: Researcher | None
    _researcher_built: Researcher | None  # built in Engine.__init__, before the session
    _program: str | None
    _base_commit: str | None
    _tls: threading.local
    # None: the setup command runs unsandboxed (the lab's operator wrote it). A pool worker runs a host's
    # setup in the runs' sandbox: "offline" (no network) or "network" (the worker's --setup-network); so
    # does a lab with [run] setup_sandbox = true (network as [permissions] run_network)
    setup_sandbox: str | None = None
    _keep_lock: threading.Lock
    _requeue: list[Candidate | keep.Requeued]
    _crashes_checked: int
    _closing: bool
    _started: float

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
        self.events.emit("setup.run", command=self.spec.run.setup, sandbox=self.setup_sandbox or "none")
        env = self.verifier.setup_env(self.run_env(self.spec.run.seed, -1))
        policy = sandbox.SandboxPolicy(mode="none") if self.setup_sandbox is None else self.setup_policy()
        res = sandbox.run(self.spec.run.setup, cwd=self.lab_dir, env=env, policy=policy,
                          timeout_s=max(3600.0, self.spec.run.hard_timeout_s), log_path=log,
                          cancel=self.stop.cancel, run_id=self.new_run("setup"))
        if not res.ok:
            why = "timed out" if res.timed_out else f"exited with {res.exit_code}"
            raise NightlabError(f"the setup command {self.spec.run.setup!r} {why}; its log: {log}\n"
                                + sandbox.tail(log, 15), "fix the setup command, then resume with --resume")

    def setup_policy(self) -> sandbox.SandboxPolicy:
        """The sandbox of a setup command nightlab does not trust (a pool host's, or any lab's with ``[run]
        setup_sandbox``): the runs' view, the lab
        folder read-only, only the data dir (``$NIGHTLAB_DATA_DIR``) writable, ``.nightlab`` and ``.git`` hidden.
        (A writable lab folder would let setup swap a ``[sandbox] readonly`` path for a symlink to ``~/.ssh``,
        which the next runs would get bound in.)"""
        hidden = [self.ws.state_dir, self.ws.repo_root / ".git", self.ws.git_dir]
        return sandbox.SandboxPolicy(
            mode=self.sandbox_mode, network=self.setup_sandbox == "network", writable=(self.data_dir,),
            readonly=(self.lab_dir, *self.readonly_data()), hidden=tuple(dict.fromkeys(hidden)),
            memory_mb=self.spec.run.memory_mb, max_log_bytes=self.spec.run.max_log_bytes)

    def exp_dir(self, idx: int) -> Path:
        """Where experiment ``idx`` of this session keeps its files: ``artifacts/<tag>/<idx>/``."""
        return self.artifacts_dir / self.session.tag / str(idx)

    # ------------------------------------------------------------------ stop requests and humans

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
