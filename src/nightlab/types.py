"""The words of nightlab as frozen dataclasses (see DESIGN.md, "Words").

Everything that crosses a component boundary inside nightlab is one of these. They are
never mutated: a component that learns more returns a new value (``dataclasses.replace``).
Versioned pydantic models live only at the edges (the spec file, exports).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

# the stages of one experiment, in order: each one's seconds go to its evidence under "timing" (pipeline.py)
STAGES = ("propose", "guard", "worktree", "run", "measure", "decide", "record", "cleanup")


class Status(enum.StrEnum):
    """The one status an experiment has. Stored as its string value in the ledger."""

    RUNNING = "running"  # proposed and materialised; the run or its measurement is in flight
    KEEP = "keep"  # verified better: the session branch advanced to its commit
    DISCARD = "discard"  # measured, not better
    CRASH = "crash"  # non-zero exit, no metric, NaN/inf metric
    TIMEOUT = "timeout"  # killed at the hard timeout
    INVALID = "invalid"  # the edit did not apply, or changed nothing
    REJECTED = "rejected"  # refused by the guard or a policy before running
    INTERRUPTED = "interrupted"  # the harness stopped (Ctrl-C, or died and was resumed)
    LOST = "lost"  # a remote executor could not run it to a result (workers died, retries exhausted)
    PRUNED = "pruned"  # stopped early: its progress curve was judged hopeless by the [prune] pruner

    def is_finished(self) -> bool:
        return self is not Status.RUNNING

    def was_run(self) -> bool:
        """True when the experiment's command actually ran to a result."""
        return self in (Status.KEEP, Status.DISCARD, Status.CRASH, Status.TIMEOUT)

    def is_failure(self) -> bool:
        """Counts toward ``max_crashes_in_row``."""
        return self in (Status.CRASH, Status.TIMEOUT, Status.LOST)

    def was_stopped_early(self) -> bool:
        """True when the harness ended the run on purpose before its end (a pruned run: it ran, partly)."""
        return self is Status.PRUNED

    def consumed_compute(self) -> bool:
        """True when the run command used the slot (to its end or until it was stopped)."""
        return self.was_run() or self is Status.PRUNED


class Direction(enum.StrEnum):
    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a < b if self is Direction.MINIMIZE else a > b

    def improvement(self, new: float, old: float) -> float:
        """Positive when ``new`` improves on ``old``, in metric units."""
        return old - new if self is Direction.MINIMIZE else new - old

    def improvement_pct(self, best: float | None, baseline: float | None) -> float | None:
        """``best``'s improvement on ``baseline`` in percent of |baseline|; None when it has no finite value."""
        if baseline is None or best is None or baseline == 0 or not math.isfinite(baseline):
            return None
        pct = 100.0 * self.improvement(best, baseline) / abs(baseline)
        return pct if math.isfinite(pct) else None  # 1e308 - (-1e308) overflows: no "+inf%"


@dataclass(frozen=True)
class Usage:
    """What proposing a candidate cost."""

    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.tokens_in + other.tokens_in,
            self.tokens_out + other.tokens_out,
            self.tokens_cached + other.tokens_cached,
            self.cost_usd + other.cost_usd,
            self.seconds + other.seconds,
        )


@dataclass(frozen=True)
class Candidate:
    """A proposed change against ``parent`` (a commit sha).

    A researcher gives either ``files`` (repo-relative path -> new full text) or ``diff``
    (a unified diff with ``a/``/``b/`` prefixes, as ``git diff`` writes it). nightlab
    materialises it in a worktree and records the canonical diff that git computes.
    ``params`` holds structured choices (the search researcher's constant values) so a
    resumed researcher can learn from history. ``artifacts`` (file name -> text: the prompt,
    the response, an agent's transcript) are written by the engine to
    ``.nightlab/artifacts/<session tag>/<experiment number>/``. ``error`` says why a candidate carries no edit
    (it becomes the ``invalid`` experiment's reason).
    """

    parent: str
    rationale: str
    files: dict[str, str] | None = None
    diff: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    researcher: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class RunResult:
    """What the sandbox reports about one command."""

    exit_code: int | None  # None when killed at the timeout
    timed_out: bool
    wall_s: float
    log_path: str
    sandbox: str  # "bwrap" or "none"
    command: str = ""
    interrupted: bool = False  # killed because the harness was asked to stop

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.exit_code == 0


@dataclass(frozen=True)
class Measurement:
    """The metric of one run and its secondary figures. ``metric`` is None on failure."""

    metric: float | None
    secondary: dict[str, float] = field(default_factory=dict)
    trust: str = "inline"  # "inline" (the run printed it) or "evaluator" (protected code computed it)
    error: str = ""  # why there is no metric
    warnings: tuple[str, ...] = ()  # a duplicate key, an absurd value: stored in evidence["warnings"]

    @property
    def valid(self) -> bool:
        return self.metric is not None and math.isfinite(self.metric)


@dataclass(frozen=True)
class Verdict:
    """An acceptance policy's answer, with the evidence it rests on."""

    keep: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """One row of the ledger's experiments table, as read back."""

    id: int
    session_id: int
    idx: int  # 0 is the baseline
    status: Status
    parent_commit: str
    commit: str | None
    metric: float | None
    secondary: dict[str, float]
    trust: str
    description: str
    reason: str
    log_tail: str
    seed: int
    started_at: float
    finished_at: float | None
    propose_s: float
    run_s: float
    overhead_s: float
    exit_code: int | None
    evidence: dict[str, Any]
    # candidate
    researcher: str
    rationale: str
    diff: str
    params: dict[str, Any]
    usage: Usage
    pid: int | None = None
    pid_start: int | None = None  # start time of ``pid`` (tells a live run from a reused pid)
    worktree: str = ""


@dataclass(frozen=True)
class Session:
    id: int
    tag: str
    branch: str
    base_commit: str
    incumbent_commit: str
    incumbent_metric: float | None
    baseline_metric: float | None
    metric_name: str
    direction: Direction
    status: str  # "running", "stopped", "finished", "failed"
    stop_reason: str
    sandbox: str
    created_at: float
    updated_at: float
    spec_hash: str
    lab_path: str
    machine: dict[str, Any]
    researcher: str
