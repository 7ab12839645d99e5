"""The search researcher: Optuna over the tunable constants of the editable files. No LLM.

nightlab's default and its honest baseline: whatever an LLM researcher achieves should be
compared with what plain black-box search over the same constants achieves in the same
number of experiments. From ``nightlab.toml``::

    [researcher]
    kind = "search"
    sampler = "tpe"          # "tpe" | "gp" | "random" | "cmaes" (gp: `pip install 'nightlab[gp]'`; cmaes: `pip install
                             # cmaes`)
    seed = 0
    params = []              # only these constants (NAME or file:NAME); empty = all found
    exclude = []             # never these
    n_startup_trials = 5     # TPE's random warm-up
    storage = ""             # optional Optuna RDB URL (study "nightlab-<tag>"), e.g. for Optuna Dashboard
    crashes = "infeasible"   # how a crash/timeout is told: "infeasible" | "worst" | "fail" (see below)

Constants and their ranges are found by :mod:`nightlab.space` (the one finder every
researcher shares: ``# nightlab:`` comments, ``[researcher.space]``, tuples, strings,
expressions) in the ``.py`` files of ``ctx.files`` at the first ``propose``; an asked point
that would break an ``assert`` of the code (:mod:`nightlab.asserts`) is told to the study as
failed and never run; the search space is then fixed for the whole life of
the researcher (Optuna needs consistent distributions). On resume the incumbent is usually
no longer the baseline, so default (not explicit) ranges are widened to cover every value in
the replayed history before the space is fixed. Parameter names are ``NAME`` when one
file has constants and ``file:NAME`` when several do; they are stored in ``Candidate.params``
(every searched value, changed or not) and read back on resume.

``observe`` feeds the study: the baseline (idx 0) as a trial with the incumbent's values
(only while no experiment has been kept, since the baseline's values are then the
incumbent's), an experiment with a pending trial by ``tell`` (value for keep/discard, a crash
as below, PRUNED for pruned, FAIL for everything else), an experiment without one (replayed history after a restart) by
``add_trial`` from its params, when they cover the whole search space and lie inside it.

Pruned runs. A pruned experiment is told as ``TrialState.PRUNED`` *with the points of its
progress curve* (``evidence["curve"]``, see :mod:`nightlab.prune`) as the trial's intermediate
values (``trial.report(value, step)``), live, on replay and in a persistent study alike. TPE ranks
completed trials first and then pruned ones by their last intermediate value, the later the step
the better (Optuna's ``_get_pruned_trial_score``): a run stopped at 25 % with a bad curve is ranked
below one stopped at 60 %, and when pruned trials fill TPE's "good" group (few completed runs) they
are ordered by what they showed, not alike. A pruned setting re-asked is told the same again.
Observations that arrive before the first ``propose`` are held until the space is known.
``observe`` never raises.

Crashes. A ``crash`` or ``timeout`` (the run's own failure, not the harness's) is a region to
avoid, and TPE ignores FAIL trials when it models, so it would keep sampling there (a batch size
that runs out of memory). With ``crashes = "infeasible"`` (default) it is told as a COMPLETE trial
valued at the worst metric so far whose stored constraint (system attribute ``constraints`` =
``[1.0]``) is violated: TPE puts infeasible trials with the bad ones. Optuna 5's TPE reads that
attribute itself; Optuna 4's only through a ``constraints_func`` (given it, reading the same
attribute), and it ranks a trial *without* the attribute as infeasible, so every trial added from
history carries ``[0.0]`` unless it crashed (``add_trial`` calls no ``after_trial`` to add it).
CI runs the search tests on both.
``"worst"`` tells only the worst value (also what ``infeasible`` does for CMA-ES, which reads no
constraints); ``"fail"`` is Optuna's default. ``sampler = "gp"`` takes ``infeasible`` as TPE does (it fits
a model of the constraint), and needs every completed trial to carry one: ``[0.0]`` when feasible.
Every crash trial carries the user attribute ``nightlab_crash``; replayed and persistent-study crashes are
told the same way, and a tried setting that crashed, asked again, is told as a crash again. Measured in
``bench/crashes.py``.

Memory. Every trial carries the user attribute ``nightlab_experiment`` (the experiment index).
A setting that was tried already (by any experiment of the session, replayed or not) is never
proposed again: the sampler is told the known outcome and asked again. On resume the sampler's
seed moves on by the number of replayed experiments, so the random warm-up does not restart at
its first point. TPE runs with ``constant_liar=True``: proposals still in flight (several
slots, or pipelining) are pending trials that the sampler treats as bad, so N slots do not get
N near-identical points. The scheduler proposes ahead only when waiting for the result costs at least
``ahead_share`` of a run: 1 %, 0 for random search (which needs no results). With ``storage`` the study
is ``nightlab-<tag>`` in that Optuna RDB, loaded if it exists; experiments already in it are not added twice,
and trials left RUNNING by a harness that died are marked failed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial
from pydantic import BaseModel, ConfigDict

from nightlab.constants import Constant, Value, format_value, rewrite, written_as
from nightlab.errors import UsageError
from nightlab.space import Space, search_space
from nightlab.types import Candidate, Experiment, Status

# constant_liar (and constraints_func) are flagged experimental by Optuna 4, and its GPSampler. Filtered once, at
# import: ``warnings.catch_warnings`` around each sampler's creation is not thread-safe (it swaps the process's
# filter list, and samplers are made while other threads run).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                        message=r"Argument ``(constant_liar|constraints_func)``|GPSampler is experimental")

if TYPE_CHECKING:
    from nightlab.researchers import Context
    from nightlab.spec import Spec

log = logging.getLogger(__name__)

MAX_ASKS = 20  # asks that may repeat the incumbent before a random perturbation is used


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sampler: Literal["tpe", "gp", "random", "cmaes"] = "tpe"
    seed: int | None = 0
    params: list[str] = []
    exclude: list[str] = []
    n_startup_trials: int = 5
    storage: str = ""
    crashes: Literal["infeasible", "worst", "fail"] = "infeasible"


def _distribution(c: Constant) -> BaseDistribution:
    if c.choices:
        return CategoricalDistribution(c.choices)
    if c.kind == "int":
        return IntDistribution(int(c.low), int(c.high), log=c.log)
    return FloatDistribution(c.low, c.high, log=c.log)


def _written(value: Any, c: Constant) -> Value:
    """The value as it will read back from the file: rounded by format_value, kept inside the range."""
    if c.choices:
        return value
    if c.kind == "int":
        return int(value)
    v = float(format_value(value, "float"))
    for digits in (6, 8, 10):
        if c.contains(v):
            break
        v = float(f"{float(value):.{digits}g}")
    return v if c.contains(v) else float(value)


_OPTUNA_READS_CONSTRAINTS = int(optuna.__version__.split(".")[0]) >= 5
CONSTRAINTS = "constraints"  # the system attribute both Optuna 4 and 5 read a trial's constraints from
CRASH = "nightlab_crash"  # user attribute of the trials that stand for a crashed experiment


def _stored_constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return list(trial.system_attrs.get(CONSTRAINTS, [0.0]))


def violation(trial: optuna.trial.FrozenTrial) -> float:
    """How much a trial violates its stored constraints (0: feasible), read from the system attribute
    both Optuna 4 and 5 read, so that it means the same with either."""
    return float(sum(v for v in trial.system_attrs.get(CONSTRAINTS) or () if v > 0))


def _crashed(status: Status) -> bool:
    """The run itself failed (exit code, no metric, timeout): its setting is a region to avoid.
    Harness-side failures (invalid edit, rejected, interrupted, lost) say nothing about it."""
    return status in (Status.CRASH, Status.TIMEOUT)


def _curve(e: Experiment) -> dict[int, float]:
    """A pruned experiment's progress curve (``evidence["curve"]``: ``[[step, value], …]``) as
    ``{step: value}``; unreadable points are left out, a non-finite value stays NaN (TPE ranks it last)."""
    raw = e.evidence.get("curve") if isinstance(e.evidence, dict) else None
    out: dict[int, float] = {}
    for point in raw if isinstance(raw, list) else ():
        try:
            step, value = int(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError):
            continue
        if step >= 0:
            out[step] = value if math.isfinite(value) else math.nan
    return out


def _sampler(options: Options, offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = None if options.seed is None else options.seed + offset
    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if options.sampler == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise UsageError(
                "[researcher] sampler = 'cmaes' needs the cmaes package, which is not installed",
                "pip install cmaes (or use sampler = 'tpe')",
            )
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=options.n_startup_trials, warn_independent_sampling=False
        )
    # Optuna 5 reads the stored constraints itself; Optuna 4 only with a constraints_func
    extra: dict[str, Any] = {} if _OPTUNA_READS_CONSTRAINTS else {"constraints_func": _stored_constraints}
    if options.sampler == "gp":
        # Optuna's Gaussian-process sampler: fewer runs to a good point than TPE on a few continuous constants, at
        # ~0.1-0.5 s of CPU per proposal (torch, scipy), which pipelining makes while the run before is going
        missing = [m for m in ("torch", "scipy") if importlib.util.find_spec(m) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise UsageError(
                f"[researcher] sampler = 'gp' needs {' and '.join(missing)}, which {verb} not installed",
                "pip install 'nightlab[gp]' (torch and scipy), or use sampler = 'tpe'",
            )
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=options.n_startup_trials, warn_independent_sampling=False, **extra
        )
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=options.n_startup_trials, constant_liar=True, **extra
    )


def _widen(space: dict[str, Constant], history: tuple[Experiment, ...]) -> dict[str, Constant]:
    """Default ranges stretched to cover the values of replayed history (a resumed session's
    incumbent is not the baseline, so its default ranges moved); explicit ranges never move."""
    out = dict(space)
    for e in history:
        for key, c in out.items():
            v = e.params.get(key)
            if c.explicit or c.choices or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if not math.isfinite(v) or (c.kind == "int" and v != int(v)) or (c.log and v <= 0):
                continue
            if not c.contains(v):
                out[key] = replace(c, low=min(c.low, float(v)), high=max(c.high, float(v)))
    return out


class SearchResearcher:
    """Proposes new values for the tunable constants; see the module docstring for the contract."""

    name = "search"
    max_asks = MAX_ASKS

    def __init__(self, options: Options) -> None:
        self.options = options
        self.study: optuna.Study | None = None
        self.space: dict[str, Constant] = {}  # param name -> the constant as first seen
        self.distributions: dict[str, BaseDistribution] = {}
        self.pending: dict[int, optuna.trial.Trial] = {}  # experiment idx -> its asked trial
        self._backlog: list[Experiment] = []
        self._baseline_is_first = True  # the baseline's values are those first seen (nothing kept before)
        self._first_values: dict[str, Value] = {}
        self.lab_space: Space | None = None
        self._scanned: tuple[Any, ...] = ()  # what lab_space was scanned from (spec, lab, files)
        self.tried: dict[tuple[tuple[str, Any], ...], float | None] = {}  # setting -> its value (None: failed)
        self.crashed: set[tuple[tuple[str, Any], ...]] = set()  # settings whose run crashed
        self.pruned: dict[tuple[tuple[str, Any], ...], dict[int, float]] = {}  # pruned setting -> its curve
        self._in_study: set[int] = set()  # experiment indices that already have a trial
        _sampler(options)  # fail early on a sampler that cannot work

    @property
    def ahead_share(self) -> float | None:
        """The scheduler proposes one result behind (pipelining) only when waiting for the result in flight would
        idle the slot for at least this share of a run (scheduler.py): random search needs no results, so it
        always proposes ahead; the others (None) take the scheduler's ``AHEAD_SHARE``, 1 %. (GP was tried at
        50 %: per trial no difference that 5-10 seeds of bench/efficiency.py could see, 6 % fewer trials per
        hour at 1 s runs.)"""
        return 0.0 if self.options.sampler == "random" else None

    def _make_sampler(self, offset: int) -> optuna.samplers.BaseSampler:
        return _sampler(self.options, offset)

    # ------------------------------------------------------------------ space

    def _scan(self, ctx: Context) -> dict[str, Constant]:
        """Param name -> constant: the lab's search space (:func:`nightlab.space.search_space`).

        Scanned once per incumbent: a proposal on the same files as the one before reuses the scan
        (23 ms on tinygpt's 7 KB train.py, more on larger files; every proposal used to pay it)."""
        key = (ctx.spec, str(ctx.lab_dir), tuple(sorted(ctx.files.items())))
        if self.lab_space is None or self._scanned != key:
            self.lab_space = search_space(ctx.spec, ctx.files, ctx.lab_dir)
            self._scanned = key
        return dict(self.lab_space.params)

    def violations(self, values: dict[str, Any]) -> list[str]:
        """Asserts in the code that ``values`` would break (see :mod:`nightlab.asserts`)."""
        return self.lab_space.violations(values) if self.lab_space is not None else []

    def _select(self, found: dict[str, Constant], files: dict[str, str]) -> dict[str, Constant]:
        if not found:
            scanned = sorted(p for p in files if p.endswith(".py")) or [
                "(no .py file among the editable files)"
            ]
            raise UsageError(
                f"the search researcher found no tunable constants in {', '.join(scanned)}",
                "make the knobs module-level assignments (e.g. LEARNING_RATE = 3e-4, optionally with "
                "'# nightlab: 1e-5..1e-2 log'), or declare ranges in [researcher.space]; `nightlab space` shows "
                "what was found and why it is not searched; or set [researcher] kind to another one",
            )

        def named(key: str, c: Constant, names: list[str]) -> bool:
            return key in names or c.name in names

        unknown = [
            n
            for n in self.options.params + self.options.exclude
            if not any(named(k, c, [n]) for k, c in found.items())
        ]
        if unknown:
            raise UsageError(
                f"[researcher] params/exclude name {', '.join(unknown)}, which are not tunable constants",
                f"use names among: {', '.join(found)}",
            )
        chosen = {
            k: c
            for k, c in found.items()
            if (not self.options.params or named(k, c, self.options.params))
            and not named(k, c, self.options.exclude)
        }
        if not chosen:
            raise UsageError(
                "[researcher] params/exclude leave no constant to search",
                f"search at least one of: {', '.join(found)}",
            )
        return chosen

    def _start(self, ctx: Context) -> optuna.Study:
        # read once (a resumed session's history comes from the ledger). On resume the engine replays the
        # ledger through observe() (the backlog) and ctx.history holds the same rows: each counts once
        seen = tuple({e.idx: e for e in (*ctx.history, *self._backlog)}.values())
        self.space = _widen(self._select(self._scan(ctx), ctx.files), seen)
        self.distributions = {k: _distribution(c) for k, c in self.space.items()}
        self._first_values = {k: c.value for k, c in self.space.items()}
        if optuna.logging.get_verbosity() < optuna.logging.WARNING:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        replayed = sum(1 for e in seen if e.idx > 0)
        self.study = self._open_study(ctx, self._make_sampler(replayed))
        backlog, self._backlog = self._backlog, []
        self._baseline_is_first = not any(e.status is Status.KEEP and e.idx != 0 for e in seen)
        for e in backlog:
            self.observe(e)
        return self.study

    def _open_study(self, ctx: Context, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        if not self.options.storage:
            return optuna.create_study(direction=ctx.direction.value, sampler=sampler)
        name = f"nightlab-{ctx.extra.get('session', 'session')}"
        try:
            study = optuna.create_study(direction=ctx.direction.value, sampler=sampler, study_name=name,
                                        storage=self.options.storage, load_if_exists=True)
        except Exception as e:
            raise UsageError(f"[researcher] storage = {self.options.storage!r}: cannot open the Optuna study "
                             f"{name}: {type(e).__name__}: {e}",
                             "give an Optuna RDB URL such as sqlite:///optuna.db or postgresql://…, "
                             "or remove the key") from None
        for t in study.get_trials(deepcopy=False):
            idx = t.user_attrs.get("nightlab_experiment")
            if t.state is TrialState.RUNNING:  # left by a harness that died: its experiment is replayed
                study.tell(t.number, state=TrialState.FAIL)
            elif isinstance(idx, int):
                self._in_study.add(idx)
                crash = bool(t.user_attrs.get(CRASH))
                written = {k: _written(v, self.space[k]) for k, v in t.params.items() if k in self.space}
                self._remember(written, t.value if t.state is TrialState.COMPLETE and not crash else None, crash)
                if t.state is TrialState.PRUNED:
                    self.pruned[self._key(written)] = dict(t.intermediate_values)
        return study

    @staticmethod
    def _key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """A hashable form of a setting (a tuple value read back from the ledger's JSON is a list)."""

        def freeze(v: Any) -> Any:
            return tuple(freeze(x) for x in v) if isinstance(v, list | tuple) else v

        return tuple(sorted((k, freeze(v)) for k, v in params.items()))

    def _tell_pruned(self, trial: optuna.trial.Trial, curve: dict[int, float]) -> None:
        """A pruned run: its curve's points as intermediate values, then PRUNED."""
        assert self.study is not None
        for step, value in sorted(curve.items()):
            trial.report(value, step)
        self.study.tell(trial, state=TrialState.PRUNED)

    def _remember(self, params: dict[str, Any], value: float | None, crash: bool = False) -> None:
        key = self._key(params)
        if key not in self.tried or value is not None:
            self.tried[key] = value
        if crash and value is None:
            self.crashed.add(key)

    # ------------------------------------------------------------------ crashes

    def _crash_outcome(self) -> tuple[TrialState, float | None, dict[str, Any]]:
        """How a crash is told to the study: (state, value, system attrs), by ``crashes``.

        ``infeasible`` (TPE): a completed trial that violates the constraint ``crash``; TPE puts
        infeasible trials with the bad ones, so it learns to avoid the region (a FAIL trial is
        invisible to its model). Its value is the worst measured so far, for readers of the study
        that ignore constraints. ``worst`` (and ``infeasible`` with a sampler that reads no
        constraints): a completed trial with the worst value measured so far. ``fail``: a failed
        trial (Optuna's default; TPE then never learns from it). Before any measured value,
        ``worst`` has nothing to tell and falls back to ``fail``."""
        mode = self.options.crashes
        if mode == "fail":
            return TrialState.FAIL, None, {}
        worst = self._worst()
        if mode == "infeasible" and self.options.sampler in ("tpe", "gp"):
            if worst is None:
                assert self.study is not None
                worst = math.inf if self.study.direction is optuna.study.StudyDirection.MINIMIZE else -math.inf
            return TrialState.COMPLETE, worst, {CONSTRAINTS: [1.0]}
        if worst is None:
            return TrialState.FAIL, None, {}
        return TrialState.COMPLETE, worst, {CONSTRAINTS: [0.0]} if self.options.sampler == "gp" else {}

    def _worst(self) -> float | None:
        assert self.study is not None
        values = [t.value for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if not t.user_attrs.get(CRASH) and t.value is not None and math.isfinite(t.value)]
        if not values:
            return None
        return max(values) if self.study.direction is optuna.study.StudyDirection.MINIMIZE else min(values)

    def _tell_value(self, trial: optuna.trial.Trial, value: float) -> None:
        """A measured value. GP models the constraints of *every* completed trial (Optuna 5 refuses a study
        where some carry them and others not): under it a feasible trial carries ``[0.0]``, as a replayed one
        does, and so does a crash told as merely the ``worst`` value (:meth:`_crash_outcome`)."""
        assert self.study is not None
        if self.options.sampler == "gp":
            self.study._storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS, [0.0])
        self.study.tell(trial, value)

    def _tell_crash(self, trial: optuna.trial.Trial) -> None:
        assert self.study is not None
        state, value, attrs = self._crash_outcome()
        trial.set_user_attr(CRASH, True)
        for k, v in attrs.items():  # Trial.set_constraint is Optuna 5 only; this form both read
            self.study._storage.set_trial_system_attr(trial._trial_id, k, v)
        if state is TrialState.COMPLETE:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=state)

    # ------------------------------------------------------------------ propose

    def propose(self, ctx: Context) -> Candidate:
        study = self.study or self._start(ctx)
        current = {k: c for k, c in self._scan(ctx).items() if k in self.space}
        incumbent = {k: c.value for k, c in current.items()}
        values: dict[str, Value] | None = None
        again: dict[str, Value] | None = None  # a tried setting, for a search space used up
        pending = {self._key({k: _written(v, self.space[k]) for k, v in t.params.items()})
                   for t in self.pending.values()}
        repeats = 0
        for _ in range(self.max_asks * 10):
            if repeats >= self.max_asks:
                break
            trial = study.ask(self.distributions)
            asked = {k: _written(v, self.space[k]) for k, v in trial.params.items()}
            broken = self.violations({**incumbent, **asked})
            if broken:  # the code's own assert would fail: never run it, and tell the sampler (as
                # FAIL: told as infeasible, these many never-run asks would end TPE's warm-up early
                # and fill its model of the good region with infeasible points)
                study.tell(trial, state=TrialState.FAIL)
                log.info("search: skipped a candidate that breaks %s", broken[0])
                continue
            repeats += 1
            key = self._key(asked)
            known = key in self.tried or key in pending
            if any(asked[k] != incumbent.get(k) for k in asked) and not known:
                trial.set_user_attr("nightlab_experiment", ctx.idx)
                self.pending[ctx.idx] = trial
                values = asked
                break
            if again is None and any(asked[k] != incumbent.get(k) for k in asked):
                again = asked
            # the incumbent or a setting tried before: its outcome is known (or in flight), so the
            # sampler learns it at no cost and is asked again
            value = self.tried.get(key) if key in self.tried else ctx.incumbent_metric if not known else None
            if key in self.crashed:
                self._tell_crash(trial)
            elif key in self.pruned and value is None:
                self._tell_pruned(trial, self.pruned[key])
            elif value is not None and math.isfinite(value):
                self._tell_value(trial, value)
            else:
                study.tell(trial, state=TrialState.FAIL)
        if values is None:
            values = self._perturb(incumbent, ctx.idx, fresh_only=True)
            log.info(
                "search: %d asks repeated tried settings; perturbing one constant at random", self.max_asks
            )
        if values == incumbent:  # every neighbour was tried: re-measure a tried setting rather than nothing
            values = again or self._perturb(incumbent, ctx.idx, fresh_only=False)
        return self._candidate(ctx, current, values)

    def _perturb(self, incumbent: dict[str, Value], idx: int, fresh_only: bool) -> dict[str, Value]:
        rng = random.Random(f"{self.options.seed}:{idx}")
        values = dict(incumbent)
        keys = sorted(k for k in self.space if k in incumbent)
        for _ in range(100 if keys else 0):
            key = rng.choice(keys)
            c = self.space[key]
            if c.choices:
                new: Value = rng.choice(c.choices)
            elif c.kind == "int":
                new = int(incumbent[key]) + rng.choice((-1, 1))
            else:
                new = _written(
                    math.exp(rng.uniform(math.log(c.low), math.log(c.high)))
                    if c.log
                    else rng.uniform(c.low, c.high),
                    c,
                )
            if new != incumbent[key] and c.contains(new) and not self.violations({**values, key: new}) and (
                not fresh_only or self._key({**values, key: new}) not in self.tried
            ):
                values[key] = new
                return values
        return values

    def _candidate(
        self, ctx: Context, current: dict[str, Constant], values: dict[str, Value]
    ) -> Candidate:
        changes: dict[str, dict[str, Value]] = {}
        notes: list[str] = []
        for key, value in values.items():
            c = current.get(key)
            if c is None:
                log.warning("search: constant %s is gone from the incumbent; not written", key)
                continue
            if value != c.value:
                changes.setdefault(c.file, {})[c.name] = value
                notes.append(f"{key} {c.text} -> {written_as(c.text, c.kind, value)}")
        files = {path: rewrite(ctx.files[path], vals) for path, vals in changes.items()}
        files = {path: text for path, text in files.items() if text != ctx.files[path]}
        return Candidate(
            parent=ctx.parent,
            rationale=f"search({self.options.sampler}): {', '.join(notes) or 'no change'}",
            files=files,
            params=dict(values),
            researcher=self.name,
        )

    # ------------------------------------------------------------------ observe

    def observe(self, experiment: Experiment) -> None:
        try:
            self._observe(experiment)
        except Exception as e:  # observe must never stop a session
            log.warning("search: could not learn from experiment %s: %s", experiment.idx, e)

    def _observe(self, e: Experiment) -> None:
        if self.study is None:
            self._backlog.append(e)
            return
        if not e.status.is_finished():
            return
        value = e.metric if e.metric is not None and math.isfinite(e.metric) else None
        ok = e.status in (Status.KEEP, Status.DISCARD) and value is not None
        trial = self.pending.pop(e.idx, None)
        crash = _crashed(e.status)
        curve = _curve(e) if e.status is Status.PRUNED else None
        if e.params:
            setting = {k: e.params[k] for k in self.distributions if k in e.params}
            self._remember(setting, value if ok else None, crash)
            if curve is not None:
                self.pruned[self._key(setting)] = curve
        if trial is not None:
            self._in_study.add(e.idx)
            if ok and value is not None:
                self._tell_value(trial, value)
            elif crash:
                self._tell_crash(trial)
            elif curve is not None:  # pruned: ranked below the completed runs, by what its curve showed
                self._tell_pruned(trial, curve)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        elif e.idx in self._in_study:
            return  # already in a persistent study (storage)
        elif e.idx == 0:
            if ok and self._baseline_is_first:
                self._add(self._first_values, value, 0)
                self._remember(self._first_values, value)
        elif e.params:
            params = {k: e.params[k] for k in self.distributions if k in e.params}
            if len(params) < len(self.distributions) or not all(
                self.space[k].contains(v) for k, v in params.items()
            ):
                log.info("search: experiment %s's params do not fit the search space; skipped", e.idx)
            else:
                self._add(params, value if ok else None, e.idx, crash=crash, curve=curve)

    def _add(self, params: dict[str, Any], value: float | None, idx: int, crash: bool = False,
             curve: dict[int, float] | None = None) -> None:
        """A replayed experiment as a finished trial, told the way ``observe`` tells a live one."""
        assert self.study is not None
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        if value is None and curve is not None:
            state = TrialState.PRUNED
        user_attrs: dict[str, Any] = {"nightlab_experiment": idx}
        # feasible unless a crash says otherwise: Optuna 4's TPE (constraints_func) warns about, and ranks
        # last, a trial without constraint values; add_trial never calls the sampler's after_trial to add them
        system_attrs: dict[str, Any] = {CONSTRAINTS: [0.0]}
        if crash and value is None:
            state, value, system_attrs = self._crash_outcome()
            user_attrs[CRASH] = True
        trial = create_trial(
            params=params,
            distributions=self.distributions,
            value=value,
            state=state,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
            intermediate_values=curve if state is TrialState.PRUNED else None,
        )
        self.study.add_trial(trial)
        self._in_study.add(idx)

    def close(self) -> None:
        self.pending.clear()


def create(options: Options, spec: Spec, lab_dir: Path) -> SearchResearcher:
    return SearchResearcher(options)
