"""Early stopping: read a run's progress lines live and stop it when an Optuna pruner says so.

The output contract's progress line (print it, flushed, whenever the run has a figure)::

    nightlab: step=120 val_bpb=1.234

One line per report: the literal ``nightlab:``, ``step=N`` (an integer, increasing), then one or
more ``name=value`` figures. The figure named like ``[metric] name`` (or ``[prune] figure``) is
the one pruned on and stored as the run's curve; the others are ignored, as are lines that do
not match (free-form log).
From autoresearch's ``train.py``: ``print(f"nightlab: step={step} val_bpb={val_bpb:.4f}", flush=True)``.

A :class:`Watch` runs a thread per run that tails the run's log *file on disk* (whoever writes it), so
it does not depend on how the sandbox captures output. Each new point is reported to an in-memory Optuna
study (one trial per run) and ``trial.should_prune()`` is asked; when it says yes, the watch sets its
``cancel`` event, which the sandbox treats like a stop request for that run alone. A run is judged at
its first :data:`MAX_REPORTS` points at most (the rest of its curve is stored, not judged), and each
judgement reads only the values added since the one before (:class:`Seen`): a progress line costs the
harness a time that grows with the number of finished runs, not with their curves' lengths
(bench/prune_cost.py). A run elsewhere (the Ray executor) has no log on this machine while it runs: its
watch is made without a log path and the executor hands it the lines with :meth:`Watch.feed` as they
arrive (``nightlab.executors.ray_executor``, "Progress and pruning"). Finished runs are told to the
study (COMPLETE with the final metric, PRUNED, or FAIL), so later runs are judged against earlier runs
*at the same step*; on resume :meth:`Pruner.replay` rebuilds the study from the curves stored in the
ledger (``evidence``: ``curve`` ``[[step, value], …]``, and for pruned runs ``pruned_at`` and
``saved_s``, the run seconds saved, estimated as the median run time of the completed runs minus the
pruned run's).

The median pruner is :class:`Percentile` (``[prune] reference = "all"``, the default: every earlier
run counts, a pruned one as worse than any value after the step it was stopped at; ``"reached"``: a
pruned run counts only at the steps it reached; ``"completed"``: Optuna's ``PercentilePruner``,
the completed runs only), at ``[prune] percentile`` (50: the median). It is wrapped in
:class:`WarmupFraction` (``[prune] warmup_fraction``, 0.25 by
default): Optuna's ``MedianPruner`` compares a run's best value so far with the median of the
*completed* runs at that step from the first report on (``n_warmup_steps = 0``), and asks again at
every step, so a run that hovers near the median is stopped at one of many checks; measured on
tinygpt (bench/README.md) it stopped 41 of 51 candidates. Not before a quarter of a full run is the
least that keeps it off initialisation noise whatever the step unit is.

Progress lines are advisory and untrusted: they can only stop a run early, never make it kept. A
finished run's curve is a reference for later runs, so a run could print a fake good curve, be
discarded on its trusted metric, and leave a bar that prunes honest runs: a reference value is
therefore clamped by trusted results (:meth:`Percentile._value`), the baseline's curve among them
(:class:`Tie`: the user's code ties the progress figure to the trusted metric, and shows how far above
its end a curve is at each step). With ``[prune] figure`` other than the metric and no baseline curve,
the median pruner stops nothing.
The baseline is watched (its curve is the first reference) but never pruned.
"""

from __future__ import annotations

import bisect
import math
import re
import statistics
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import TrialState, create_trial

from nightlab.types import Direction, Experiment, Status

# A step Optuna was already given is ignored with a warning; the watcher skips repeated steps itself, so
# the warning could only come from a resumed trial. Filtered once, here: ``warnings.catch_warnings`` around
# each report is not thread-safe (it swaps the process's filter list; two slots' watchers at once could
# leave a blanket "ignore" behind).
warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step")

if TYPE_CHECKING:
    from nightlab.spec import PruneSpec

PROGRESS = re.compile(r"^nightlab:\s+step=(\d+)((?:\s+[A-Za-z_][\w.\-/]*=\S+)+)\s*$")
MAX_POINTS = 1000  # a stored curve is thinned to at most this many points
# Points a run reports to the pruning study (and is judged at): Optuna's in-memory storage copies a trial's values
# at every report, so a run printing 10^5 lines would cost the harness minutes; past this the run goes on unjudged
# (its curve still stored, thinned). Every step of a 5-minute autoresearch run is well under it.
MAX_REPORTS = 10_000


class Seen:
    """Per trial, its last step and its best value so far (NaN skipped), read incrementally: a trial's
    values only grow, newest last, so each call reads only the values added since the one before (the
    judged run's own curve and the finished runs' last steps are asked at every report)."""

    def __init__(self, maximize: bool) -> None:
        self.maximize = maximize
        self._by: dict[int, tuple[int, int | None, float | None]] = {}

    def __call__(self, t: optuna.trial.FrozenTrial) -> tuple[int | None, float | None]:
        values = t.intermediate_values
        n, last, best = self._by.get(t.number, (0, None, None))
        if len(values) == n:
            return last, best
        if len(values) < n:  # a trial made again (not by nightlab): read it whole
            n, last, best = 0, None, None
        items = reversed(values.items())
        for _ in range(len(values) - n):
            step, v = next(items)
            last = step if last is None else max(last, step)
            if not math.isnan(v):
                best = v if best is None else (max(best, v) if self.maximize else min(best, v))
        self._by[t.number] = (len(values), last, best)
        return last, best


class Tie:
    """What the baseline's run (the user's code, watched, never pruned) says about curves, the one
    trusted tie between progress lines and the metric: ``offset``, its last progress value minus its
    trusted metric, and at each step it reported, how far that value was from its last one."""

    def __init__(self) -> None:
        self.offset: float | None = None
        self.steps: list[int] = []
        self.gaps: list[float] = []

    def set(self, values: dict[int, float], metric: float) -> None:
        last = values[max(values)] if values else math.nan
        if not math.isfinite(last - metric):
            return  # its last value (or the metric) is not a number: no tie
        finite = {s: v for s, v in values.items() if math.isfinite(v)}
        self.offset = last - metric
        self.steps = sorted(finite)
        self.gaps = [finite[s] - last for s in self.steps]

    def gap(self, step: int, maximize: bool) -> float:
        """How far (worse) the baseline was from its last value at ``step`` (its nearest report at or
        before it); 0 where it was better, or without a curve."""
        if not self.steps:
            return 0.0
        g = self.gaps[max(0, bisect.bisect_right(self.steps, step) - 1)]
        return min(0.0, g) if maximize else max(0.0, g)


def parse_progress(line: str) -> tuple[int, dict[str, float]] | None:
    """``(step, {name: value})`` for a progress line, None for anything else."""
    m = PROGRESS.match(line.strip())
    if not m:
        return None
    figures: dict[str, float] = {}
    for item in m.group(2).split():
        name, _, text = item.partition("=")
        try:
            figures[name] = float(text)
        except ValueError:
            continue
    return (int(m.group(1)), figures) if figures else None


def thin(curve: list[list[float]], limit: int = MAX_POINTS) -> list[list[float]]:
    """At most ``limit`` points, evenly spread, the last one kept."""
    if len(curve) <= limit:
        return curve
    step = len(curve) / (limit - 1)
    return [curve[int(i * step)] for i in range(limit - 1)] + [curve[-1]]


class WarmupFraction(optuna.pruners.BasePruner):
    """Never prune before ``fraction`` of a full run, nor after ``finish`` of it; in between ask ``inner``.

    A full run's length is the last step of the longest curve among the completed runs (the
    baseline is one), so the window is in the run's own units (epochs, optimizer steps, per cent)
    without the user knowing them; before any run completed, nothing is pruned (with a warm-up).
    Unlike a fixed ``n_warmup_steps`` (Optuna's default 0: prune from the first report, where a
    curve is mostly initialisation noise and a slower learning-rate warm-up or schedule looks
    worst), it holds whatever the step unit is. Past ``finish`` (``[prune] finish_fraction``, 0.9)
    a run is let finish: stopping it would save at most the rest of the run and throw away a
    nearly complete measurement (measured on tinygpt: a run pruned at 95 % of its steps)."""

    def __init__(self, inner: optuna.pruners.BasePruner, fraction: float, finish: float = 1.0) -> None:
        self.inner = inner
        self.fraction = fraction
        self.finish = finish
        self.seen: Seen | None = None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self.seen is None:
            self.seen = Seen(study.direction is optuna.study.StudyDirection.MAXIMIZE)
        step = self.seen(trial)[0]
        if step is None:
            return False
        if self.fraction > 0 or self.finish < 1:
            lasts = (self.seen(t)[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            full = max((last for last in lasts if last is not None), default=None)
            if full is None and self.fraction > 0:
                return False
            if full is not None and not self.fraction * full <= step < self.finish * full:
                return False
        return self.inner.prune(study, trial)


class Percentile(optuna.pruners.BasePruner):
    """Prune a run whose best value so far is worse than ``percentile`` of the other finished runs'
    values at this step, where the finished runs are the completed *and the pruned* ones.

    Optuna's ``MedianPruner``/``PercentilePruner`` compare with the completed trials only
    (``optuna/pruners/_percentile.py``: ``study.get_trials(states=(TrialState.COMPLETE,))``). Once
    pruning works, the completed runs are the baseline and the survivors, the best curves of the
    night, so the bar climbs towards the incumbent's curve and nearly every new run is stopped
    (bench/README.md: 41 of 51 on tinygpt). Here a pruned run counts at the steps it reached
    (``reference = "reached"``), and with ``reference = "all"`` also at the later steps, as worse
    than any value: it was stopped for being worse than the bar, so the bar at every step is the
    ``percentile`` of all the runs judged so far (on synthetic curves in random order the median
    stopped 45-65 % of the runs, Optuna's reference 85-93 %: tests/test_prune_reference.py). The bar
    is the nearest reference value on the lenient side, not an interpolation (a value may be
    infinite). Not before ``startup_runs`` runs completed, nor before step ``warmup_steps``; a step no
    other run reached prunes nothing; a run with only NaN values so far is pruned (diverged)."""

    def __init__(self, percentile: float, startup_runs: int, warmup_steps: int, reference: str,
                 anchored: bool = False, tie: Tie | None = None) -> None:
        self.percentile = percentile
        self.startup_runs = startup_runs
        self.warmup_steps = warmup_steps
        self.reference = reference
        self.anchored = anchored  # the progress figure is the metric: a completed run's trusted value anchors it
        self.tie = tie or Tie()  # the baseline's curve and metric (set by Pruner when the baseline finished)
        self.seen: Seen | None = None

    def _value(self, t: optuna.trial.FrozenTrial, step: int, maximize: bool, cap: float | None,
               offset: float | None = None, last: int | None = None) -> float:
        """Trial ``t``'s value at ``step`` as a reference, no better than what the run is known to reach.

        Progress lines are the run's word. A run can print a curve far better than it is, then be
        discarded on its trusted metric; as a reference that curve would set the bar and prune honest
        runs. So a reference value is clamped (made worse, never better):

        - a completed run's, to be no better than ``cap``: the worst value at this step of the completed
          runs whose trusted final metric is better than its own. A run that finished worse than the
          baseline is no better than the baseline's curve (the user's code, watched, never pruned), so fake
          curves need runs that truly beat every run before them; honest curves that cross only make the
          bar more lenient;
        - also no better than its own trusted final value, plus, at this step, the baseline's distance from
          its own last value (``gap``; :class:`Tie`): a run that truly improved but printed a fake curve
          (0.0 throughout, or its final value from the first step) is where a baseline-shaped curve ending
          at its metric would be. The final value is the metric plus ``offset``, the baseline's last progress
          value minus its metric (when the progress figure is the metric, only where that is worse). An
          honest curve that learns no faster than the baseline is not changed; one that does only makes
          the bar more lenient;
        - a pruned run's, no better than its value where it was stopped (it was judged worse than the bar
          there; the median pruner judges the best value so far, so this is defence in depth).

        ``offset``: what a completed run's trusted value is moved by to bound its curve at ``step`` (the
        final value's offset plus the baseline's gap there; None: no bound from it); ``last``: its last step.
        """
        v = t.intermediate_values[step]
        bounds = [] if cap is None else [cap]
        if t.state is TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            if offset is not None:
                bounds.append(t.value + offset)
        elif t.state is TrialState.PRUNED:
            bounds.append(t.intermediate_values[last if last is not None else max(t.intermediate_values)])
        for b in bounds:
            if not math.isnan(b):
                v = min(v, b) if maximize else max(v, b)
        return v

    @staticmethod
    def _caps(finished: list[optuna.trial.FrozenTrial], step: int, maximize: bool) -> dict[int, float]:
        """For each completed run with a value at ``step``: the worst value there among the completed runs
        that finished better (by the trusted metric); the best-finishing run has none."""
        done = [t for t in finished if t.state is TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value) and step in t.intermediate_values
                and not math.isnan(t.intermediate_values[step])]
        done.sort(key=lambda t: -float(t.value or 0.0) if maximize else float(t.value or 0.0))  # values checked
        caps: dict[int, float] = {}
        worst: float | None = None
        for t in done:
            if worst is not None:
                caps[t.number] = worst
            v = t.intermediate_values[step]
            worst = v if worst is None else (min(worst, v) if maximize else max(worst, v))
        return caps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        maximize = study.direction is optuna.study.StudyDirection.MAXIMIZE
        if self.seen is None:
            self.seen = Seen(maximize)
        step, mine = self.seen(trial)
        if step is None or step < self.warmup_steps:
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if sum(t.state is TrialState.COMPLETE for t in finished) < max(1, self.startup_runs):
            return False
        if not self.anchored and self.tie.offset is None:
            return False  # another figure than the metric, and no baseline curve ties them: no trusted bar
        offset = self.tie.offset or 0.0
        if self.anchored:  # never looser than the run's own trusted value
            offset = min(0.0, offset) if maximize else max(0.0, offset)
        offset += self.tie.gap(step, maximize)
        worst = -math.inf if maximize else math.inf
        others: list[float] = []
        caps = self._caps(finished, step, maximize)
        for t in finished:
            if t.number == trial.number:
                continue
            last = self.seen(t)[0] if t.state is TrialState.PRUNED else None
            if step in t.intermediate_values:
                if not math.isnan(t.intermediate_values[step]):
                    others.append(self._value(t, step, maximize, caps.get(t.number), offset, last))
            elif self.reference == "all" and last is not None and last < step:
                others.append(worst)  # stopped before this step for being worse than the bar
        if not others:
            return False
        if mine is None:  # only NaN so far: diverged
            return True
        bar = float(np.percentile(others, 100 - self.percentile if maximize else self.percentile,
                                  method="lower" if maximize else "higher"))
        return mine < bar if maximize else mine > bar


def make_pruner(spec: PruneSpec, anchored: bool = False, tie: Tie | None = None) -> optuna.pruners.BasePruner | None:
    """The pruner ``spec`` names; ``anchored``: the progress figure is the metric; ``tie``: the baseline's
    (see :meth:`Percentile._value`)."""
    pruner = _pruner(spec, anchored, tie)
    if pruner is not None and spec.pruner == "median" and (spec.warmup_fraction > 0 or spec.finish_fraction < 1):
        return WarmupFraction(pruner, spec.warmup_fraction, spec.finish_fraction)
    return pruner


def _pruner(spec: PruneSpec, anchored: bool = False, tie: Tie | None = None) -> optuna.pruners.BasePruner | None:
    if spec.pruner == "median" and spec.reference != "completed":
        return Percentile(spec.percentile, spec.startup_runs, spec.warmup_steps, spec.reference,
                          anchored=anchored, tie=tie)
    if spec.pruner == "median":
        return optuna.pruners.PercentilePruner(spec.percentile, n_startup_trials=spec.startup_runs,
                                               n_warmup_steps=spec.warmup_steps)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_resource,
                                                      reduction_factor=spec.reduction_factor)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_resource,
                                              max_resource=spec.max_resource or "auto",
                                              reduction_factor=spec.reduction_factor)
    if spec.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=spec.lower, upper=spec.upper, n_warmup_steps=spec.warmup_steps)
    return None


class Pruner:
    """The session's pruning study. Thread-safe: one :class:`Watch` per slot reports into it."""

    def __init__(self, spec: PruneSpec, metric: str, direction: Direction, metric_name: str | None = None) -> None:
        """``metric``: the progress figure pruned on; ``metric_name``: ``[metric] name`` (None: the same)."""
        self.spec = spec
        self.metric = metric
        self.enabled = spec.pruner != "none"
        self.lock = threading.Lock()
        self.full_runs_s: list[float] = []  # run seconds of runs that went to their end
        if optuna.logging.get_verbosity() < optuna.logging.WARNING:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tie = Tie()
        anchored = metric_name in (None, metric)
        self.study = optuna.create_study(direction=direction.value, pruner=make_pruner(spec, anchored, self.tie)
                                         or optuna.pruners.NopPruner(),
                                         sampler=optuna.samplers.RandomSampler(seed=0))

    def replay(self, history: Iterable[Experiment]) -> None:
        """Rebuild the study from the curves of recorded experiments (on start and on resume)."""
        if not self.enabled:  # nothing reads the study: no trial per experiment kept in memory
            return
        for e in history:
            curve = e.evidence.get("curve") if isinstance(e.evidence, dict) else None
            if not curve:
                continue
            try:
                values = {int(s): float(v) for s, v in curve}
            except (TypeError, ValueError):
                continue
            if e.status is Status.PRUNED:
                trial = create_trial(state=TrialState.PRUNED, intermediate_values=values)
            elif e.metric is not None and math.isfinite(e.metric):
                trial = create_trial(state=TrialState.COMPLETE, value=e.metric, intermediate_values=values)
                self.full_runs_s.append(e.run_s)
                if e.evidence.get("policy") == "baseline":
                    self.baseline(values, e.metric)
            else:
                continue
            with self.lock:
                self.study.add_trial(trial)

    def baseline(self, values: dict[int, float], metric: float) -> None:
        """The baseline finished with ``metric`` (trusted) after reporting ``values``: the tie of later runs'
        curves to their metrics (:class:`Tie`)."""
        with self.lock:
            self.tie.set(values, metric)

    def saved_s(self, run_s: float, budget_s: float) -> float:
        """Run seconds a pruned run saved: the median full run's time minus its own (never negative)."""
        full = statistics.median(self.full_runs_s) if self.full_runs_s else budget_s
        return max(0.0, full - run_s)

    def watch(self, log_path: Path | None, stop: threading.Event, prunable: bool) -> Watch:
        return Watch(self, log_path, stop, prunable)


class Watch:
    """Tails one run's log (or is fed its lines); reports progress; sets ``cancel`` when the run should stop.

    ``cancel`` is also set when the session's ``stop`` event is, so the sandbox needs one event.
    With ``log_path=None`` the lines come through :meth:`feed`, from one thread.
    """

    def __init__(self, pruner: Pruner, log_path: Path | None, stop: threading.Event, prunable: bool) -> None:
        self.pruner = pruner
        self.log_path = Path(log_path) if log_path is not None else None
        self.stop = stop
        self.prunable = prunable and pruner.enabled
        self.is_baseline = not prunable  # the user's code: its curve and metric tie the figure to the metric
        self.cancel = threading.Event()
        self.curve: list[list[float]] = []
        self.pruned_at: int | None = None
        self._steps: set[int] = set()
        self._pos = 0
        self._partial = b""
        self._done = threading.Event()
        self._told = False
        # without a pruner nothing reads the study: no trial is made (it would stay in memory for the session)
        self.trial: optuna.trial.Trial | None = None
        if pruner.enabled:
            with pruner.lock:
                self.trial = pruner.study.ask()
        self._thread = threading.Thread(target=self._run, name="nightlab-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            if self.stop.is_set():
                self.cancel.set()
            self._read()
            self._done.wait(self.pruner.spec.poll_s)

    def feed(self, line: str) -> None:
        """A progress line of a run that is not tailed here (``log_path=None``)."""
        if line.startswith("nightlab:"):
            self._line(line)

    def _read(self) -> None:
        if self.log_path is None:
            return
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                if size < self._pos:  # rewritten (a capped log): read it again from the start
                    self._pos, self._partial = 0, b""
                f.seek(self._pos)
                data = f.read(1 << 20)
        except OSError:
            return
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            if raw.startswith(b"nightlab:"):
                self._line(raw.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        parsed = parse_progress(line)
        if parsed is None:
            return
        step, figures = parsed
        value = figures.get(self.pruner.metric)
        if value is None or self.pruned_at is not None:
            return
        if len(self._steps) >= MAX_REPORTS:  # judged enough: the rest is stored (thinned), not reported
            if step > self.curve[-1][0]:
                self._keep(step, value)
            return
        if step in self._steps:
            return
        self._steps.add(step)
        self._keep(step, value)
        if self.trial is None:
            return
        with self.pruner.lock:
            self.trial.report(value if math.isfinite(value) else math.nan, step)
            prune = self.prunable and not self._done.is_set() and self.trial.should_prune()
        if prune:
            self.pruned_at = step
            self.cancel.set()

    def _keep(self, step: int, value: float) -> None:
        self.curve.append([step, value])
        if len(self.curve) > 2 * MAX_POINTS:
            self.curve = thin(self.curve, MAX_POINTS)

    def close(self) -> None:
        """Stop the thread and read what the run wrote last (never prunes after the run ended)."""
        self._done.set()
        self._thread.join()
        self._read()
        if self._partial.startswith(b"nightlab:"):
            self._line(self._partial.decode("utf-8", "replace"))
            self._partial = b""

    def finish(self, status: Status, metric: float | None, run_s: float) -> dict[str, Any]:
        """Tell the study how the run ended; returns the evidence to store (curve, pruned_at)."""
        if self._told:
            return {}
        self._told = True
        out: dict[str, Any] = {"curve": thin(self.curve)} if self.curve else {}
        if self.trial is None:
            return out
        base = False
        with self.pruner.lock:
            if status is Status.PRUNED:
                self.pruner.study.tell(self.trial, state=TrialState.PRUNED)
                out["pruned_at"] = self.pruned_at
            elif metric is not None and math.isfinite(metric) and status in (Status.KEEP, Status.DISCARD):
                self.pruner.study.tell(self.trial, metric)
                self.pruner.full_runs_s.append(run_s)
                base = self.is_baseline and status is Status.KEEP
            else:
                self.pruner.study.tell(self.trial, state=TrialState.FAIL)
        if base and metric is not None:
            self.pruner.baseline({int(step): value for step, value in self.curve}, metric)
        return out


def savings(pruned: list[Experiment]) -> tuple[int, float]:
    """``(runs pruned, run seconds they saved)`` from the ledger's pruned experiments."""
    saved = 0.0
    for e in pruned:
        v = e.evidence.get("saved_s") if isinstance(e.evidence, dict) else None
        if isinstance(v, int | float) and math.isfinite(v):
            saved += float(v)
    return len(pruned), saved
