"""The search researcher: Optuna over the tunable constants of the editable files. No LLM.

nightlab's default and its honest baseline: whatever an LLM researcher achieves should be
compared with what plain black-box search over the same constants achieves in the same
number of experiments. From ``nightlab.toml``::

    [researcher]
    kind = "search"
    sampler = "tpe"          # "tpe" | "random" | "cmaes" (cmaes needs `pip install cmaes`)
    seed = 0
    params = []              # only these constants (NAME or file:NAME); empty = all found
    exclude = []             # never these
    n_startup_trials = 5     # TPE's random warm-up

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
incumbent's), an experiment with a pending trial by ``tell`` (value for keep/discard, FAIL
for everything else), an experiment without one (replayed history after a restart) by
``add_trial`` from its params, when they cover the whole search space and lie inside it.
Observations that arrive before the first ``propose`` are held until the space is known.
``observe`` never raises.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
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

if TYPE_CHECKING:
    from nightlab.researchers import Context
    from nightlab.spec import Spec

log = logging.getLogger(__name__)

MAX_ASKS = 20  # asks that may repeat the incumbent before a random perturbation is used


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sampler: Literal["tpe", "random", "cmaes"] = "tpe"
    seed: int | None = 0
    params: list[str] = []
    exclude: list[str] = []
    n_startup_trials: int = 5


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


def _sampler(options: Options) -> optuna.samplers.BaseSampler:
    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=options.seed)
    if options.sampler == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise UsageError(
                "[researcher] sampler = 'cmaes' needs the cmaes package, which is not installed",
                "pip install cmaes (or use sampler = 'tpe')",
            )
        return optuna.samplers.CmaEsSampler(
            seed=options.seed, n_startup_trials=options.n_startup_trials, warn_independent_sampling=False
        )
    return optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=options.n_startup_trials)


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
        _sampler(options)  # fail early on a sampler that cannot work

    # ------------------------------------------------------------------ space

    def _scan(self, ctx: Context) -> dict[str, Constant]:
        """Param name -> constant: the lab's search space (:func:`nightlab.space.search_space`)."""
        self.lab_space = search_space(ctx.spec, ctx.files, ctx.lab_dir)
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
        self.space = _widen(self._select(self._scan(ctx), ctx.files), (*ctx.history, *self._backlog))
        self.distributions = {k: _distribution(c) for k, c in self.space.items()}
        self._first_values = {k: c.value for k, c in self.space.items()}
        if optuna.logging.get_verbosity() < optuna.logging.WARNING:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(direction=ctx.direction.value, sampler=_sampler(self.options))
        backlog, self._backlog = self._backlog, []
        self._baseline_is_first = not any(
            e.status is Status.KEEP and e.idx != 0 for e in (*ctx.history, *backlog)
        )
        for e in backlog:
            self.observe(e)
        return self.study

    # ------------------------------------------------------------------ propose

    def propose(self, ctx: Context) -> Candidate:
        study = self.study or self._start(ctx)
        current = {k: c for k, c in self._scan(ctx).items() if k in self.space}
        incumbent = {k: c.value for k, c in current.items()}
        values: dict[str, Value] | None = None
        repeats = 0
        for _ in range(self.max_asks * 10):
            if repeats >= self.max_asks:
                break
            trial = study.ask(self.distributions)
            asked = {k: _written(v, self.space[k]) for k, v in trial.params.items()}
            broken = self.violations({**incumbent, **asked})
            if broken:  # the code's own assert would fail: never run it, and tell the sampler
                study.tell(trial, state=TrialState.FAIL)
                log.info("search: skipped a candidate that breaks %s", broken[0])
                continue
            repeats += 1
            if any(asked[k] != incumbent.get(k) for k in asked):
                self.pending[ctx.idx] = trial
                values = asked
                break
            # the incumbent again: its value is known, so the sampler learns from it at no cost
            if ctx.incumbent_metric is not None and math.isfinite(ctx.incumbent_metric):
                study.tell(trial, ctx.incumbent_metric)
            else:
                study.tell(trial, state=TrialState.FAIL)
        if values is None:
            values = self._perturb(incumbent, ctx.idx)
            log.info(
                "search: %d asks repeated the incumbent; perturbing one constant at random", self.max_asks
            )
        return self._candidate(ctx, current, values)

    def _perturb(self, incumbent: dict[str, Value], idx: int) -> dict[str, Value]:
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
            if new != incumbent[key] and c.contains(new) and not self.violations({**values, key: new}):
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
        if trial is not None:
            if ok:
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        elif e.idx == 0:
            if ok and self._baseline_is_first:
                self._add(self._first_values, value)
        elif e.params:
            params = {k: e.params[k] for k in self.distributions if k in e.params}
            if len(params) < len(self.distributions) or not all(
                self.space[k].contains(v) for k, v in params.items()
            ):
                log.info("search: experiment %s's params do not fit the search space; skipped", e.idx)
            else:
                self._add(params, value if ok else None)

    def _add(self, params: dict[str, Any], value: float | None) -> None:
        assert self.study is not None
        trial = create_trial(
            params=params,
            distributions=self.distributions,
            value=value,
            state=TrialState.COMPLETE if value is not None else TrialState.FAIL,
        )
        self.study.add_trial(trial)

    def close(self) -> None:
        self.pending.clear()


def create(options: Options, spec: Spec, lab_dir: Path) -> SearchResearcher:
    return SearchResearcher(options)
