"""``nightlab compare``: arms run against each other on equal terms, and a verdict with its evidence.

An **arm** is a variant of how the lab is researched: a ``program.md`` text, a researcher configuration,
or any spec override (``accept.policy``, ``prune.pruner``, ``executor.slots``, ...), or several at once.
Each arm × seed is its own session from the same starting commit, on its own branch
(``nightlab/<name>-<arm>-s<seed>``); seed ``s`` sets ``[run] seed`` and the researcher's ``seed`` to
``base + s`` in every arm, so arms are compared *paired* by seed. Sessions are interleaved in rounds of
``chunk`` experiments (arm order rotated each round), so that drift of the machine hits every arm alike, and
each session stops when its **budget** is spent: ``experiments``, ``run_s`` (seconds of runs), ``usd`` or
``tokens``. The comparison is stored in the ledger (tables ``comparisons`` and ``comparison_members``) and
resumable (``--resume``).

The verdict (:func:`analyse`) uses each arm's best metric reached *within the budget* (a session that
overshot its budget inside its last chunk is cut at the budget). Arms are compared pairwise with a paired
t-test over seeds (two-sided, Holm-corrected over the pairs); a **winner** is declared only when the best arm
beats every other arm at level ``alpha``. Otherwise the verdict says "no detectable difference at this
budget" and estimates the seeds a test at 80% power would need from the observed paired differences.
``nightlab sweep`` is a comparison of one knob's values with one seed.
"""

from __future__ import annotations

import json
import math
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.spec import SPEC_FILE, Spec, parse_spec
from nightlab.types import Direction, Experiment, Status

BudgetKind = Literal["experiments", "run_s", "usd", "tokens"]
BUDGET_KINDS: tuple[str, ...] = ("experiments", "run_s", "usd", "tokens")

_meta = sa.MetaData()
comparisons = sa.Table(
    "comparisons", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # running | finished | stopped
    sa.Column("base_commit", sa.String(64), nullable=False),
    sa.Column("config_json", sa.Text, nullable=False),  # arms, seeds, budget, chunk, alpha
    sa.Column("result_json", sa.Text, nullable=False, default="{}"),
    sqlite_autoincrement=True,
)
members = sa.Table(
    "comparison_members", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("comparison_id", sa.Integer, nullable=False),
    sa.Column("arm", sa.Text, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("tag", sa.String(200), nullable=False),
    sa.Column("done", sa.Integer, nullable=False, default=0),  # 1: its budget is spent (or it stopped)
    sa.Index("ix_comparison_members", "comparison_id", "arm", "seed", unique=True),
    sqlite_autoincrement=True,
)


def ensure_tables(ledger: Ledger) -> None:
    """The comparison tables (and evolve's lineage, registered on the same metadata) in the ledger."""
    ledger.ensure_tables(_meta)


# ---------------------------------------------------------------------------- arms and budgets


@dataclass(frozen=True)
class Arm:
    """One way of researching the lab: a ``program.md`` (path, relative to the lab) and spec overrides."""

    name: str
    program: str = ""  # a program.md variant; "" = the lab's own
    overrides: tuple[tuple[str, Any], ...] = ()  # ("researcher.temperature", 0.2), ...

    def describe(self) -> str:
        parts = ([f"program={self.program}"] if self.program else []) + [f"{k}={v}" for k, v in self.overrides]
        return ", ".join(parts) or "the lab as it is"


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_arm(text: str) -> Arm:
    """``NAME=ITEM[,ITEM...]``: an item ending in ``.md`` is the arm's program.md, any other is a spec override
    ``section.key=value`` (JSON values, else strings). ``NAME`` alone is the lab as it is."""
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_-]{0,31})(?:=(.*))?", text.strip(), re.S)
    if not m:
        raise UsageError(f"--arm {text!r}: expected NAME=program.md or NAME=section.key=value[,...]",
                         "e.g. --arm base=program.md --arm terse=variants/terse.md "
                         "--arm cold=researcher.temperature=0.2")
    name, rest = m.group(1), (m.group(2) or "").strip()
    program, overrides = "", []
    for item in [x.strip() for x in rest.split(",") if x.strip()]:
        if "=" not in item:
            if not item.endswith(".md"):
                raise UsageError(f"--arm {name}: {item!r} is neither a .md file nor section.key=value",
                                 "name a program.md variant (a .md file) or an override like accept.policy=repeat")
            if program:
                raise UsageError(f"--arm {name}: two program.md variants ({program}, {item})", "give one per arm")
            program = item
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[a-z_]+\.[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"--arm {name}: {key!r} is not section.key", "e.g. researcher.temperature=0.2")
        if key.split(".")[0] in ("files", "metric", "evaluate", "holdout", "lab"):
            raise UsageError(f"--arm {name}: [{key.split('.')[0]}] cannot differ between arms",
                             "arms must measure the same thing; vary the researcher, policy, pruning or executor")
        overrides.append((key, _value(raw.strip())))
    return Arm(name, program, tuple(overrides))


@dataclass(frozen=True)
class Budget:
    kind: BudgetKind
    amount: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        m = re.fullmatch(r"\s*([a-z_]+)\s*=\s*([0-9.eE+]+)\s*", text)
        if not m or m.group(1) not in BUDGET_KINDS:
            raise UsageError(f"--budget {text!r}: expected KIND=AMOUNT with KIND one of {', '.join(BUDGET_KINDS)}",
                             "e.g. --budget experiments=20 or --budget run_s=3600")
        try:
            amount = float(m.group(2))
        except ValueError:
            raise UsageError(f"--budget {text!r}: {m.group(2)!r} is not a number", "e.g. run_s=3600") from None
        if not amount > 0:
            raise UsageError(f"--budget {text!r}: the amount must be positive", "e.g. experiments=20")
        return cls(m.group(1), amount)  # type: ignore[arg-type]

    def spent(self, exps: Sequence[Experiment]) -> float:
        tried = [e for e in exps if e.idx > 0]
        if self.kind == "experiments":
            return float(len(tried))
        if self.kind == "run_s":
            return sum(e.run_s for e in tried)
        if self.kind == "usd":
            return sum(e.usage.cost_usd for e in tried)
        return float(sum(e.usage.tokens_in + e.usage.tokens_out for e in tried))

    def __str__(self) -> str:
        return f"{self.kind}={self.amount:g}"


def arm_spec(lab: Path, arm: Arm, seed: int) -> Spec:
    """The lab's spec with the arm's overrides and the seed applied (errors name the override)."""
    path = lab / SPEC_FILE
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for key, value in arm.overrides:
        section, k = key.split(".", 1)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise UsageError(f"--arm {arm.name}: [{section}] is not a table in {path}", "fix the override")
        table[k] = value
    from nightlab.researchers import _module, validate_options

    if seed:  # seed 0 is the lab exactly as configured; seed s shifts the run's and the researcher's seeds by s
        run = data.setdefault("run", {})
        run["seed"] = int(run.get("seed", 0)) + seed
        researcher = data.setdefault("researcher", {})
        if "seed" in _module(str(researcher.get("kind", "search"))).Options.model_fields:
            researcher["seed"] = int(researcher.get("seed") or 0) + seed
    spec = parse_spec(path, data)

    validate_options(path, spec.researcher)
    return spec


def arm_program(lab: Path, arm: Arm) -> str | None:
    if not arm.program:
        return None
    p = (lab / arm.program).resolve()
    if not p.is_file():
        raise UsageError(f"--arm {arm.name}: {arm.program} not found (looked in {lab})",
                         "give the program.md variant's path relative to the lab folder")
    return p.read_text(encoding="utf-8")


def session_tag(name: str, arm: str, seed: int, seedless: bool = False) -> str:
    """``<name>-<arm>-s<seed>`` (``<name>-<arm>`` for a one-seed sweep)."""
    raw = f"{name}-{arm}" if seedless else f"{name}-{arm}-s{seed}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:64]


# ---------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class SeedResult:
    seed: int
    tag: str
    best: float | None  # best kept metric within the budget
    baseline: float | None
    spent: float  # budget units spent (cut at the budget)
    experiments: int
    keeps: int
    crashes: int
    invalid: int
    run_s: float
    usd: float
    tokens: int
    curve: tuple[tuple[float, float], ...]  # (budget spent, best so far)


@dataclass(frozen=True)
class ArmResult:
    name: str
    describe: str
    seeds: tuple[SeedResult, ...]
    mean: float | None
    ci: tuple[float, float] | None
    gain_per_run_hour: float | None
    gain_per_usd: float | None
    keep_rate: float | None
    crash_rate: float | None
    invalid_rate: float | None
    tokens: int


@dataclass(frozen=True)
class PairTest:
    a: str
    b: str
    n: int
    mean_diff: float  # a better than b by this much (metric units; positive: a is better)
    p: float  # two-sided paired t-test
    p_holm: float


@dataclass(frozen=True)
class Report:
    name: str
    metric: str
    direction: str
    budget: str
    alpha: float
    arms: tuple[ArmResult, ...]
    pairs: tuple[PairTest, ...]
    winner: str | None
    verdict: str
    seeds_needed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_result(seed: int, tag: str, exps: Sequence[Experiment], budget: Budget, direction: Direction) -> SeedResult:
    """One session's figures, counted only up to where its budget was spent."""
    within: list[Experiment] = []
    spent = 0.0
    curve: list[tuple[float, float]] = []
    best: float | None = None
    for e in exps:
        if e.idx > 0:
            step = budget.spent([e])
            if spent + step > budget.amount + 1e-9 and within and any(x.idx > 0 for x in within):
                break
            spent += step
        within.append(e)
        if e.status is Status.KEEP and e.metric is not None and (best is None or direction.better(e.metric, best)):
            best = e.metric
        if best is not None:
            curve.append((spent, best))
    tried = [e for e in within if e.idx > 0]
    base = next((e.metric for e in within if e.idx == 0 and e.status is Status.KEEP), None)
    return SeedResult(
        seed, tag, best, base, spent, len(tried), sum(1 for e in tried if e.status is Status.KEEP),
        sum(1 for e in tried if e.status in (Status.CRASH, Status.TIMEOUT)),
        sum(1 for e in tried if e.status in (Status.INVALID, Status.REJECTED)),
        sum(e.run_s for e in within), sum(e.usage.cost_usd for e in within),
        sum(e.usage.tokens_in + e.usage.tokens_out for e in within), tuple(curve))


def _t_two_sided(ds: Sequence[float]) -> float:
    from nightlab import stats

    m, v = stats.mean_var(ds)
    if v <= 0:
        return 0.0 if m != 0 else 1.0
    t = m / math.sqrt(v / len(ds))
    return min(1.0, 2.0 * stats.t_sf(abs(t), len(ds) - 1))


def _holm(ps: list[float]) -> list[float]:
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out = [1.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def seeds_needed(diffs: Sequence[float], alpha: float, power: float = 0.8) -> int | None:
    """Seeds for a paired test at ``alpha`` (two-sided) to detect the observed mean difference with ``power``."""
    from statistics import NormalDist

    from nightlab import stats

    if len(diffs) < 2:
        return None
    m, v = stats.mean_var(diffs)
    if m == 0 or v <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return max(2, math.ceil((z * math.sqrt(v) / abs(m)) ** 2) + 1)


def analyse(name: str, metric: str, direction: Direction, budget: Budget, alpha: float,
            arm_results: dict[str, tuple[str, list[SeedResult]]]) -> Report:
    sign = 1 if direction is Direction.MAXIMIZE else -1
    arms: list[ArmResult] = []
    from nightlab import stats

    for arm, (desc, seeds) in arm_results.items():
        bests = [s.best for s in seeds if s.best is not None]
        mean = sum(bests) / len(bests) if bests else None
        ci = None
        if len(bests) >= 2:
            _, lo, hi = stats.mean_ci(bests)
            ci = (lo, hi)
        gains = [sign * (s.best - s.baseline) for s in seeds if s.best is not None and s.baseline is not None]
        hours = sum(s.run_s for s in seeds) / 3600
        usd = sum(s.usd for s in seeds)
        tried = sum(s.experiments for s in seeds)
        arms.append(ArmResult(
            arm, desc, tuple(seeds), mean, ci,
            sum(gains) / hours if gains and hours > 0 else None, sum(gains) / usd if gains and usd > 0 else None,
            sum(s.keeps for s in seeds) / tried if tried else None,
            sum(s.crashes for s in seeds) / tried if tried else None,
            sum(s.invalid for s in seeds) / tried if tried else None, sum(s.tokens for s in seeds)))
    # paired tests over the seeds both arms have a result for
    pairs: list[PairTest] = []
    diffs_of: dict[tuple[str, str], list[float]] = {}
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            pa = {s.seed: s.best for s in a.seeds if s.best is not None}
            pb = {s.seed: s.best for s in b.seeds if s.best is not None}
            ds = [sign * (pa[k] - pb[k]) for k in sorted(pa.keys() & pb.keys())]
            diffs_of[(a.name, b.name)] = ds
            if len(ds) >= 2:
                pairs.append(PairTest(a.name, b.name, len(ds), sum(ds) / len(ds), _t_two_sided(ds), 1.0))
    holm = _holm([p.p for p in pairs])
    pairs = [PairTest(p.a, p.b, p.n, p.mean_diff, p.p, h) for p, h in zip(pairs, holm, strict=True)]
    ranked = sorted((a for a in arms if a.mean is not None), key=lambda a: sign * a.mean, reverse=True)  # type: ignore[operator]
    winner, verdict, need = None, "", None
    n_seeds = max((len(a.seeds) for a in arms), default=0)
    if len(ranked) < 2:
        verdict = "not enough arms with a result to compare"
    elif n_seeds < 2:
        verdict = (f"{ranked[0].name} reached the best {metric} with one seed; a verdict needs at least two "
                   f"seeds per arm (--seeds)")
    else:
        top = ranked[0]
        against = [p for p in pairs if top.name in (p.a, p.b)]
        beats_all = len(against) == len(arms) - 1 and all(
            p.p_holm < alpha and (p.mean_diff > 0) == (p.a == top.name) for p in against)
        if beats_all:
            winner = top.name
            verdict = f"{top.name} is better than every other arm at level {alpha:g} (paired t-test, Holm-corrected)"
        else:
            runner = ranked[1]
            key = (top.name, runner.name) if (top.name, runner.name) in diffs_of else (runner.name, top.name)
            need = seeds_needed(diffs_of.get(key, []), alpha)
            verdict = (f"no detectable difference at this budget (best mean: {top.name}); "
                       + (f"about {need} seeds per arm would detect a difference this large at 80% power"
                          if need else "the observed difference is zero or has no spread to estimate seeds from"))
    return Report(name, metric, direction.value, str(budget), alpha, tuple(arms), tuple(pairs), winner, verdict,
                  need)


# ---------------------------------------------------------------------------- running


@dataclass
class Plan:
    name: str
    arms: list[Arm]
    seeds: int
    budget: Budget
    chunk: int = 5
    alpha: float = 0.05
    base_seed: int = 0
    seedless_tags: bool = False  # `nightlab sweep`: tags <name>-<arm>

    def config(self) -> dict[str, Any]:
        return {"arms": [{"name": a.name, "program": a.program, "overrides": [list(x) for x in a.overrides]}
                         for a in self.arms], "seeds": self.seeds, "budget": [self.budget.kind, self.budget.amount],
                "chunk": self.chunk, "alpha": self.alpha, "base_seed": self.base_seed,
                "seedless_tags": self.seedless_tags}

    @classmethod
    def from_config(cls, name: str, cfg: dict[str, Any]) -> Plan:
        arms = [Arm(a["name"], a.get("program", ""), tuple((k, v) for k, v in a.get("overrides", [])))
                for a in cfg["arms"]]
        return cls(name, arms, int(cfg["seeds"]), Budget(cfg["budget"][0], float(cfg["budget"][1])),
                   int(cfg.get("chunk", 5)), float(cfg.get("alpha", 0.05)), int(cfg.get("base_seed", 0)),
                   bool(cfg.get("seedless_tags", False)))


def run_compare(lab: Path, plan: Plan | None = None, *, name: str | None = None, resume: bool = False,
                db: str | None = None, sandbox: str | None = None,
                engine_factory: Callable[..., Any] | None = None, say: Callable[[str], None] = lambda s: None,
                stop: Callable[[], bool] = lambda: False) -> Report:
    """Run (or resume) the comparison; returns its report. ``engine_factory`` builds an Engine (tests inject
    researchers through it); ``stop()`` is polled between chunks (Ctrl-C, STOP file)."""
    from nightlab.engine import Engine
    from nightlab.workspace import Workspace

    lab = lab.resolve()
    ws = Workspace(lab)
    ws.ensure_state_dir()
    ledger = Ledger.for_lab(lab, db)
    try:
        ensure_tables(ledger)
        if resume:
            with ledger.transaction() as conn:
                row = conn.execute(sa.select(comparisons).where(comparisons.c.name == name)).mappings().first()
            if row is None:
                raise UsageError(f"no comparison '{name}' to resume", "start it without --resume")
            plan = Plan.from_config(str(name), json.loads(row["config_json"]))
            cid, base = int(row["id"]), str(row["base_commit"])
        else:
            assert plan is not None
            with ledger.transaction() as conn:
                if conn.execute(sa.select(comparisons.c.id).where(comparisons.c.name == plan.name)).first():
                    raise UsageError(f"comparison '{plan.name}' already exists",
                                     f"continue it with `nightlab compare --resume {plan.name}`, or pick a new --name")
            base = ws.head()
            for arm in plan.arms:  # every arm must be valid before anything runs
                arm_spec(lab, arm, 0)
                arm_program(lab, arm)
            now = time.time()
            cfg = plan.config()
            cfg["programs"] = {a.name: arm_program(lab, a) for a in plan.arms if a.program}  # the texts compared
            with ledger.transaction(write=True) as conn:
                conn.execute(sa.insert(comparisons).values(
                    name=plan.name, created_at=now, updated_at=now, status="running", base_commit=base,
                    config_json=json.dumps(cfg), result_json="{}"))
                cid = int(conn.execute(sa.select(comparisons.c.id).where(comparisons.c.name == plan.name)).scalar_one())
                for s in range(plan.seeds):
                    for arm in plan.arms:
                        tag = session_tag(plan.name, arm.name, s, plan.seedless_tags)
                        conn.execute(sa.insert(members).values(comparison_id=cid, arm=arm.name, seed=s, tag=tag,
                                                               done=0))
        assert plan is not None
        factory = engine_factory or Engine
        rnd = 0
        stopped = False
        while not stopped:
            with ledger.transaction() as conn:
                todo = [dict(r) for r in conn.execute(sa.select(members).where(
                    members.c.comparison_id == cid, members.c.done == 0).order_by(members.c.seed)).mappings()]
            if not todo:
                break
            # interleave: every seed's arms in a rotated order each round
            order = {a.name: i for i, a in enumerate(plan.arms)}
            todo.sort(key=lambda m: (m["seed"], (order[m["arm"]] + rnd) % len(plan.arms)))
            for m in todo:
                if stop():
                    stopped = True
                    break
                arm = next(a for a in plan.arms if a.name == m["arm"])
                state = _advance(lab, ledger, plan, arm, int(m["seed"]), str(m["tag"]), base, db, sandbox,
                                 factory, say)
                if state == "interrupted":
                    stopped = True
                    break
                if state == "done":
                    with ledger.transaction(write=True) as conn:
                        conn.execute(sa.update(members).where(members.c.id == m["id"]).values(done=1))
            rnd += 1
        report = report_for(ledger, cid)
        with ledger.transaction(write=True) as conn:
            conn.execute(sa.update(comparisons).where(comparisons.c.id == cid).values(
                status="stopped" if stopped else "finished", updated_at=time.time(),
                result_json=json.dumps(report.as_dict(), default=str)))
        return report
    finally:
        ledger.close()


def _advance(lab: Path, ledger: Ledger, plan: Plan, arm: Arm, seed: int, tag: str, base: str, db: str | None,
             sandbox: str | None, factory: Callable[..., Any], say: Callable[[str], None]) -> str:
    """Run one chunk of session ``tag``: "done" (budget spent, or it cannot go on), "more" or "interrupted"."""
    from nightlab.engine import install_signal_handlers

    session = ledger.get_session(tag)
    exps = ledger.experiments(session.id) if session else []
    spent = plan.budget.spent(exps)
    if spent >= plan.budget.amount:
        return "done"
    tried = sum(1 for e in exps if e.idx > 0)
    cap = tried + plan.chunk
    if plan.budget.kind == "experiments":
        cap = min(cap, int(plan.budget.amount))
    spec = arm_spec(lab, arm, plan.base_seed + seed)
    spec = spec.model_copy(update={"stop": spec.stop.model_copy(update={"max_experiments": cap})})
    say(f"{tag}: {plan.budget.kind} {spent:g}/{plan.budget.amount:g}, up to experiment {cap}")
    eng = factory(lab, tag=tag, resume=session is not None, db_url=db, spec=spec, sandbox_mode=sandbox,
                  program=arm_program(lab, arm), base_commit=base)
    restore = install_signal_handlers(eng)  # Ctrl-C: the experiment in flight is recorded interrupted
    try:
        s = eng.run()
        after = eng.ledger.experiments(s.id)
    finally:
        restore()
        eng.close()
    if s.stop_reason.startswith("interrupted"):
        return "interrupted"
    if s.status == "failed" or plan.budget.spent(after) >= plan.budget.amount:
        return "done"
    # stopped by its own stop rules (patience, crashes, ...) before the budget: it is done too
    return "done" if sum(1 for e in after if e.idx > 0) < cap else "more"


def report_for(ledger: Ledger, cid: int) -> Report:
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        row = conn.execute(sa.select(comparisons).where(comparisons.c.id == cid)).mappings().one()
        mem = [dict(r) for r in conn.execute(sa.select(members).where(members.c.comparison_id == cid)
                                             .order_by(members.c.seed)).mappings()]
    plan = Plan.from_config(str(row["name"]), json.loads(row["config_json"]))
    metric, direction = "", Direction.MINIMIZE
    results: dict[str, tuple[str, list[SeedResult]]] = {a.name: (a.describe(), []) for a in plan.arms}
    for m in mem:
        s = ledger.get_session(m["tag"])
        if s is None:
            continue
        metric, direction = s.metric_name, s.direction
        results[m["arm"]][1].append(seed_result(int(m["seed"]), s.tag, ledger.experiments(s.id), plan.budget,
                                                s.direction))
    return analyse(str(row["name"]), metric, direction, plan.budget, plan.alpha, results)


def load_report(ledger: Ledger, name: str) -> Report:
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        cid = conn.execute(sa.select(comparisons.c.id).where(comparisons.c.name == name)).scalar()
    if cid is None:
        raise UsageError(f"no comparison '{name}'", "list them with `nightlab compare --list`")
    return report_for(ledger, int(cid))


def list_comparisons(ledger: Ledger) -> list[dict[str, Any]]:
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        return [dict(r) for r in conn.execute(sa.select(
            comparisons.c.name, comparisons.c.status, comparisons.c.created_at, comparisons.c.config_json)
            .order_by(comparisons.c.id)).mappings()]
