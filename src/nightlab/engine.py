"""The research loop (DESIGN.md, "The flow"): :class:`Engine`, one session of research on one lab.

The engine is split by concern, each part a class the next one extends:

- ``nightlab.runtime``: the state every part shares, the environment of runs, approvals;
- ``nightlab.pipeline``: one experiment, propose -> guard -> materialise -> run -> measure -> decide -> record;
- ``nightlab.session``: the session lifecycle, open/reconcile/lock, recover, stop rules, run, close;
- ``nightlab.scheduler``: slots, pipelining, prefetch, requeue (the loop);
- this module: the constructor, and the public names the CLI, tests and benches import.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nightlab import keep, notify, prune, sandbox
from nightlab.errors import SandboxError, UsageError
from nightlab.events import EventSink, FanOut, Locked, NullSink
from nightlab.guard import Guard
from nightlab.ledger import Ledger
from nightlab.pipeline import REBASE
from nightlab.policy import make_policy
from nightlab.researchers import Researcher
from nightlab.researchers import create as create_researcher
from nightlab.runtime import Reporter, StopState
from nightlab.scheduler import Scheduler
from nightlab.session import ANCHOR_KINDS, default_tag, machine_info
from nightlab.spec import Spec, load_spec
from nightlab.types import Candidate, Direction
from nightlab.verifier import Verifier
from nightlab.workspace import Workspace


class Engine(Scheduler):
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
        build_researcher: bool = True,
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
        # the researcher is built before anything of the session exists (the ledger, Ray's slots, the session row,
        # its branch): one that cannot work (a missing package or API key) fails with exit 2 and leaves nothing
        # behind. Commands that open an engine without running one (verify, calibrate) pass build_researcher=False.
        built = create_researcher(self.spec, self.lab_dir) if researcher is None and build_researcher else None
        self.ws = Workspace(self.lab_dir)
        self.ws.ensure_state_dir()
        self.ledger = Ledger.for_lab(self.lab_dir, db_url)
        self.reporter = reporter or Reporter()
        self.autonomy = autonomy or self.spec.autonomy.level
        if self.autonomy not in ("auto", "approve-keep", "review"):
            raise UsageError(f"unknown autonomy level {self.autonomy!r}", "use auto, approve-keep or review")
        self.audit = self._open_audit()
        self.notifier = notify.for_spec(self.spec, self.lab_dir)
        # the audit log serialises its own appends and fsyncs outside its lock; the other sinks share one lock
        others = [s for s in (events, self.notifier) if s is not None]
        rest: list[EventSink] = [Locked(others[0] if len(others) == 1 else FanOut(*others))] if others else []
        sinks: list[EventSink] = [*([self.audit] if self.audit is not None else []), *rest]
        self.events: EventSink = (sinks[0] if len(sinks) == 1 else FanOut(*sinks)) if sinks else NullSink()
        self.guard = Guard(self.spec, self.ws)
        self.policy = make_policy(self.spec.accept)
        self.verifier = Verifier(self)
        self.stop = StopState()
        self.sandbox_mode = sandbox.resolve_mode(sandbox_mode or self.spec.sandbox.mode)
        if self.spec.run.setup_sandbox:  # [run] setup_sandbox: the setup gets the runs' sandbox and network
            self.setup_sandbox = "network" if self.spec.permissions.run_network else "offline"
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
                                   self.spec.metric.direction, self.spec.metric.name)
        self._closing = False  # the loop is closing: proposals in progress should give up
        self.ray: Any = None
        self._researcher_built: Researcher | None = built
        try:
            self._start(tag, resume, allow_dirty, rebaseline, check_lab)
        except BaseException:
            if self._researcher_built is not None:
                with contextlib.suppress(Exception):
                    self._researcher_built.close()
            raise

    def _start(self, tag: str | None, resume: bool, allow_dirty: bool, rebaseline: bool, check_lab: bool) -> None:
        """The rest of :meth:`__init__`: Ray's slots, then the session (opened, or created with its branch)."""
        if self.spec.executor.kind == "ray":
            from nightlab.executors.ray_executor import RayExecutor

            ex = self.spec.executor
            self.ray = RayExecutor(address=ex.address or None, num_cpus=ex.num_cpus, num_gpus=ex.num_gpus,
                                   resources=dict(ex.resources), max_retries=ex.max_retries)
            # the wait for slots the cluster cannot place lasts unschedulable_s: say so before and after
            self.reporter.message(f"Ray: starting {ex.slots} slot(s) ({self.ray.request()} each); waiting up to "
                                  f"{self.ray.unschedulable_s:g} s for the cluster to place them")
            self.ray.started = self.ray.start(ex.slots)
            self.reporter.message(self.ray.placement_message())
            self.events.emit("ray.slots", **self.ray.placement)
        self.allow_dirty = allow_dirty
        self.rebaseline = rebaseline
        self.check_lab = check_lab  # False: resume a session as stored, without comparing it with the lab
        self.epoch = 0  # the idx of the session's latest (re-)baseline: history before it is not replayed,
        # the stop rules count from it
        self.session = self._open_session(tag, resume)
        self.resumed = resume
        self.protected_hashes = self.guard.hash_protected(self.session.base_commit)
        self._started = time.monotonic()


def improvement_pct(baseline: float | None, best: float | None, direction: Any) -> float | None:
    return Direction(direction).improvement_pct(best, baseline)


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


__all__ = ["ANCHOR_KINDS", "REBASE", "Engine", "Reporter", "SandboxError", "StopState", "default_tag",
           "improvement_pct", "install_signal_handlers", "machine_info"]
