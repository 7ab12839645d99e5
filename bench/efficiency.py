"""How much of the compute turns into gains: keep semantics, pruning, and nightlab vs raw Optuna.

Two parts (figures and commands in bench/README.md):

``labs``   quickfit and tinygpt (CPU, short per-run budget), N seeds of the search researcher,
           {old keep semantics ("rebase": a stale winner is discarded and its diff re-run on the
           new incumbent), new ones ("measured": keep.py)} x {pruning off, median pruner on}; each
           session stops once its runs used a fixed number of run-seconds. Reports the best metric at
           that budget (mean, sd), measured improvements discarded, rows lost to stale conflicts, and
           the run-seconds pruning saved. The old semantics are reached through
           ``Engine.keep_semantics = "rebase"``, kept only for this benchmark.
``optuna`` a Rosenbrock-4 lab (4 constants in [-2, 2], the run sleeps a fixed time to stand for a
           short training run) searched by nightlab (pipelining on, 1 slot, greedy) and by
           ``optuna.create_study().optimize()`` running the same script as a subprocess, same seeds,
           same TPE settings, the same starting point enqueued first. Sign test over seeds on the best
           value after k trials, and the best value each reaches within the same wall-clock time.
           ``--sampler gp``: Optuna's GPSampler on both sides (``[researcher] sampler = "gp"``), whose
           ~0.4 s proposals pipelining makes while the run before goes.

``replay`` pruning-off sessions' recorded runs (every row keeps each run's curve, status, run-seconds
           and ``pruned_at``) fed, in their order, through nightlab's real pruner with other
           ``[prune]`` settings: which runs each setting stops, and the run-seconds it would need to
           reach the session's best (the candidates stay the session's: the pruner's judgement alone).

    python bench/efficiency.py labs --seeds 5
    python bench/efficiency.py labs --labs tinygpt --seeds 3 --tinygpt-steps 50 --tinygpt-s 120 --semantics measured
    python bench/efficiency.py labs ... --arms on --tag p50 --prune-set percentile=50   # another pruner setting
    python bench/efficiency.py labs ... --arms off --ahead always --tag always   # proposals always made ahead
    python bench/efficiency.py replay bench-efficiency-labs.json --variant 'reference="completed"' --variant ''
    python bench/efficiency.py optuna --seeds 5 --trials 20 --sleep 1.0
    python bench/efficiency.py optuna --seeds 5 --trials 60 --sleep 1.0 --sampler gp

``--tinygpt-budget`` sets tinygpt's per-run training seconds (``[run] budget_s``; 1.5 by default,
which on a slow, loaded CPU is a handful of optimizer steps, fewer when the load rises: no learning
curve worth pruning on, and a metric that measures the machine's load). ``--tinygpt-steps N`` makes
each run train for N optimizer steps on one thread instead (``TINYGPT_STEPS``, ``TINYGPT_THREADS``,
read by train.py): the same work whatever the load; the model's size is then fixed (``TINYGPT_FIXED``,
``[researcher.space]``), so the search tunes the optimisation (learning rate, schedule, weight decay,
betas, dropout, clipping) and a run's cost does not depend on its point. It is still the real lab: train.py trains,
prints its progress lines every 5 % of the steps, and the protected evaluator scores the
checkpoint; the session budget stays in run-seconds. ``--semantics measured`` runs only the new
keep semantics (the pruning comparison is made within them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from nightlab import scheduler  # noqa: E402
from nightlab.engine import Engine, Reporter  # noqa: E402
from nightlab.scheduler import AHEAD_SHARE  # noqa: E402
from nightlab.types import Experiment, Session, Status  # noqa: E402

GIT_ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}


def git_lab(src: Path | None, dst: Path, files: dict[str, str] | None = None) -> Path:
    if src is not None:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".nightlab", "__pycache__", "data"))
    dst.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (dst / name).write_text(text)
    env = {**os.environ, **GIT_ENV}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "lab"]):
        subprocess.run(["git", *args], cwd=dst, env=env, check=True, capture_output=True)
    return dst


class Budget(Reporter):
    """Stops the session gracefully once the runs used ``run_s`` seconds, or at the wall-clock
    ``deadline`` (an epoch time; for a lease on a borrowed machine that must end with its rows written)."""

    def __init__(self, run_s: float, deadline: float | None = None) -> None:
        self.limit, self.used, self.deadline = run_s, 0.0, deadline
        self.engine: Engine | None = None
        self.stopped_by = ""

    def experiment_finished(self, exp: Experiment, session: Session) -> None:
        self.used += exp.run_s
        if self.engine is None or self.stopped_by:
            return
        if self.used >= self.limit:
            self.stopped_by = "run-seconds budget"
        elif self.deadline is not None and time.time() >= self.deadline:
            self.stopped_by = "wall-clock deadline"
        if self.stopped_by:
            self.engine.stop.graceful = self.stopped_by


# --------------------------------------------------------------------------- labs

LAB_SPECS = {
    # lab: (per-run budget, spec edits, prune section)
    "quickfit": ({}, '[prune]\npruner = "median"\nstartup_runs = 3\nwarmup_steps = 5\n'),
    "tinygpt": ({"budget_s = 60": "budget_s = 1.5", "[holdout]": "[holdout_off]",
                 'policy = "repeat"': 'policy = "greedy"'},
                '[prune]\npruner = "median"\nfigure = "train_bpb"\nstartup_runs = 2\nwarmup_steps = 25\n'
                'percentile = 75\n'),  # the worst quarter: bench/README.md, "The pruner's reference, measured"
}


# with --tinygpt-steps: the constants that set the model's size (and so a step's cost) stay as in train.py
TINYGPT_FIXED = ("SEQ_LEN", "N_LAYER", "N_HEAD", "HEAD_DIM", "MLP_RATIO", "BATCH_SIZE", "POS", "NORM", "MLP")


def lab_session(name: str, seed: int, semantics: str, prune_on: bool, budget: float, work: Path,
                run_budget: float | None = None, run_steps: int | None = None,
                prune_startup: int | None = None, prune_set: list[str] | None = None,
                deadline: float | None = None, ahead: str = "auto") -> dict[str, Any]:
    edits, prune = LAB_SPECS[name]
    sets = dict(item.split("=", 1) for item in (prune_set or []))
    if prune_startup is not None:
        sets["startup_runs"] = str(prune_startup)
    for key, value in sets.items():  # --prune-set KEY=VALUE: replaces or adds a [prune] line
        lines = [line for line in prune.split("\n") if line and line.split("=")[0].strip() != key.strip()]
        prune = "\n".join([*lines, f"{key.strip()} = {value.strip()}"]) + "\n"
    if run_budget is not None and name == "tinygpt":
        edits = {**edits, "budget_s = 60": f"budget_s = {run_budget:g}"}
    if run_steps and name == "tinygpt":  # a budget of steps, on one thread: train.py reads these ([run] env)
        edits = {**edits, 'command = "python train.py"\n': 'command = "python train.py"\n'
                 f'env = {{ TINYGPT_STEPS = "{run_steps}", TINYGPT_THREADS = "1" }}\n'}
    lab = work / f"{name}-{semantics}-{'p' if prune_on else 'n'}-{seed}-{time.time_ns()}"
    git_lab(ROOT / "examples" / name, lab)
    spec = (lab / "nightlab.toml").read_text()
    for a, b in edits.items():
        spec = spec.replace(a, b)
    spec = spec.replace("[holdout_off]\n", "").replace('command = "python holdout.py"\n', "") \
        .replace('metric = "holdout_bpb"\n', "").replace("max_divergence = 0.02\n", "")
    spec = spec.replace("[researcher]\nkind = \"search\"\nseed = 0", f"[researcher]\nkind = \"search\"\nseed = {seed}")
    spec = spec.replace("max_experiments = 20", "max_experiments = 0").replace("max_experiments = 50",
                                                                               "max_experiments = 0")
    if run_steps and name == "tinygpt":  # the model's size fixed: the search tunes the optimisation only
        spec += "\n[researcher.space]\n" + "".join(f"{k} = {{ fixed = true }}\n" for k in TINYGPT_FIXED)
    if prune_on:
        spec += "\n" + prune
    elif 'figure = "train_bpb"' in prune:  # pruning off, the same figure's curve stored (for `replay`)
        spec += '\n[prune]\npruner = "none"\nfigure = "train_bpb"\n'
    (lab / "nightlab.toml").write_text(spec)
    subprocess.run(["git", "commit", "-qam", "bench spec"], cwd=lab, env={**os.environ, **GIT_ENV}, check=True)
    rep = Budget(budget, deadline)
    scheduler.AHEAD_SHARE = 0.0 if ahead == "always" else AHEAD_SHARE  # --ahead always: the rule before 597a265
    eng = Engine(lab, tag="b", reporter=rep, sandbox_mode="none", max_experiments=0)
    rep.engine = eng
    eng.keep_semantics = semantics
    load0 = os.getloadavg()[0]
    uptime0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.time()
    eng.run()
    wall = time.time() - t0
    load1 = os.getloadavg()[0]
    exps = sorted(eng.ledger.experiments(eng.session.id), key=lambda e: e.finished_at or 0)
    eng.close()
    used, best, best_at_budget, inc = 0.0, math.inf, math.inf, math.inf
    improvements_discarded = 0
    reach: list[tuple[float, float]] = []  # (cumulative run-seconds, incumbent)
    for e in exps:
        if e.metric is not None and e.status is Status.DISCARD and e.metric < inc and "constraint" not in e.reason:
            improvements_discarded += 1  # measured better than the incumbent of its time, not kept
        used += e.run_s
        if e.status is Status.KEEP and e.metric is not None:
            inc = min(inc, float(e.evidence.get("estimate", e.metric)))
        reach.append((used, inc))
        if used <= budget:
            best_at_budget = inc
        best = inc
    return {
        "lab": name, "seed": seed, "semantics": semantics, "prune": prune_on, "experiments": len(exps) - 1,
        "run_s": round(used, 2), "wall_s": round(wall, 1), "best_at_budget": best_at_budget, "best": best,
        "improvements_discarded": improvements_discarded,
        "lost_to_conflicts": sum(1 for e in exps if "conflicts with the new incumbent" in e.reason),
        "stale": sum(1 for e in exps if e.evidence.get("stale")), "ahead": ahead,
        "pruned": sum(1 for e in exps if e.status is Status.PRUNED),
        "saved_s": round(sum(float(e.evidence.get("saved_s", 0.0)) for e in exps if e.status is Status.PRUNED), 2),
        "reach": reach, "load": [round(load0, 2), round(load1, 2)], "stopped_by": rep.stopped_by,
        "uptime": [uptime0, subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()],
        "prune_conf": prune if prune_on else "",
        # every run, in the order they finished: what the pruner saw and did (for `replay` and the analysis)
        "runs": [{"idx": e.idx, "status": e.status.value, "metric": e.metric, "run_s": round(e.run_s, 3),
                  "curve": e.evidence.get("curve", []), "pruned_at": e.evidence.get("pruned_at"),
                  "saved_s": e.evidence.get("saved_s")} for e in exps],
    }


def run_s_to_reach(reach: list[list[float]] | list[tuple[float, float]], target: float) -> float | None:
    for used, inc in reach:
        if inc <= target:
            return float(used)
    return None


def labs(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {(r["lab"], r["seed"], r["semantics"], r["prune"], r.get("tag", "")) for r in rows}
    deadline = time.time() + args.deadline_s if args.deadline_s else None
    with tempfile.TemporaryDirectory(prefix="nl-eff-") as tmp:
        for name in args.labs:
            budget = args.quickfit_s if name == "quickfit" else args.tinygpt_s
            for seed in range(args.seed_start, args.seed_start + args.seeds):
                for semantics in args.semantics:
                    for prune_on in (False, True):
                        if (name, seed, semantics, prune_on, args.tag) in done or \
                                ("on" if prune_on else "off") not in args.arms:
                            continue
                        r = lab_session(name, seed, semantics, prune_on, budget, Path(tmp),
                                        args.tinygpt_budget, args.tinygpt_steps, args.prune_startup, args.prune_set,
                                        deadline, args.ahead)
                        r.update(prune_startup=args.prune_startup, tag=args.tag)
                        if name == "tinygpt":
                            r.update(run_budget_s=args.tinygpt_budget, run_steps=args.tinygpt_steps)
                        rows.append(r)
                        out.write_text(json.dumps(rows))
                        print(f"{name} seed {seed} {semantics:8} prune {prune_on!s:5} best {r['best_at_budget']:.5g} "
                              f"runs {r['experiments']} run_s {r['run_s']} stale {r['stale']} "
                              f"lost {r['lost_to_conflicts']} "
                              f"discarded-better {r['improvements_discarded']} pruned {r['pruned']} "
                              f"saved {r['saved_s']}s load {r['load']} pruned at "
                              f"{[x['pruned_at'] for x in r['runs'] if x['pruned_at'] is not None]}", flush=True)
    summarize_labs(rows)


def summarize_labs(rows: list[dict[str, Any]]) -> None:
    print("\n| lab | keep semantics | pruning | best at budget (mean ± sd) | runs | measured improvements "
          "discarded | rows lost to stale conflicts | pruned | run-s saved |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in dict.fromkeys(r["lab"] for r in rows):
        for semantics in ("rebase", "measured"):
            for prune_on in (False, True):
                g = [r for r in rows if r["lab"] == name and r["semantics"] == semantics and r["prune"] == prune_on]
                if not g:
                    continue
                b = [r["best_at_budget"] for r in g]
                sd = statistics.stdev(b) if len(b) > 1 else 0.0
                print(f"| {name} | {'old (rebase)' if semantics == 'rebase' else 'new (measured)'} | "
                      f"{'on' if prune_on else 'off'} | {statistics.mean(b):.5g} ± {sd:.2g} | "
                      f"{statistics.mean(r['experiments'] for r in g):.1f} | "
                      f"{sum(r['improvements_discarded'] for r in g)} | {sum(r['lost_to_conflicts'] for r in g)} | "
                      f"{sum(r['pruned'] for r in g)} | {sum(r['saved_s'] for r in g):.1f} |")
        # run-seconds pruning needs to reach the best that no pruning reached at the full budget
        for tag in dict.fromkeys(r.get("tag", "") for r in rows if r["lab"] == name and r["prune"]):
            pruning_ratio(rows, name, tag)
        ahead_compare(rows, name)


def ahead_compare(rows: list[dict[str, Any]], name: str) -> None:
    """Pruning off, the measured semantics: nightlab's rule (``--ahead auto``) against proposals always made ahead
    (``--ahead always``), seed by seed: the best at budget, stale candidates, runs."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["lab"] == name and not r["prune"] and r["semantics"] == "measured":
            by.setdefault(r.get("ahead", "always"), {})[r["seed"]] = r  # rows from before the rule: always ahead
    seeds = sorted(set(by.get("auto", {})) & set(by.get("always", {})))
    if not seeds:
        return
    a, w = [by["auto"][s] for s in seeds], [by["always"][s] for s in seeds]
    better = sum(x["best_at_budget"] < y["best_at_budget"] for x, y in zip(a, w, strict=True))
    worse = sum(x["best_at_budget"] > y["best_at_budget"] for x, y in zip(a, w, strict=True))
    print(f"\n{name}, pruning off: proposals after the result when ahead saves < 1 % of a run (auto) vs always ahead, "
          f"{len(seeds)} seeds")
    print("| seed | best at budget, auto / always | stale candidates | runs | wall s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s, x, y in zip(seeds, a, w, strict=True):
        print(f"| {s} | {x['best_at_budget']:.5g} / {y['best_at_budget']:.5g} | {x['stale']} / {y['stale']} | "
              f"{x['experiments']} / {y['experiments']} | {x['wall_s']} / {y['wall_s']} |")
    ma, mw = (statistics.mean(r["best_at_budget"] for r in g) for g in (a, w))
    print(f"auto better in {better}, worse in {worse}, tie {len(seeds) - better - worse} "
          f"(sign test p = {sign_test(better, worse):.3g}); mean best {ma:.5g} vs {mw:.5g}")


def steps_to_reach(row: dict[str, Any], target: float) -> float | None:
    """Full runs' worth of training (each run's last progress step / a full run's) until the incumbent
    reached ``target``: the work, whatever the machine's load did to the seconds."""
    runs = row.get("runs") or []
    full = max((r["curve"][-1][0] for r in runs if r["curve"]), default=0)
    if not full:
        return None
    used, inc = 0.0, math.inf
    for r in runs:
        used += (r["curve"][-1][0] / full) if r["curve"] else 1.0
        if r["status"] == "keep" and r["metric"] is not None:
            inc = min(inc, r["metric"])
        if inc <= target:
            return used
    return None


def pruning_ratio(rows: list[dict[str, Any]], name: str, tag: str) -> None:
    """Per seed: the run-seconds (and the training work) pruning needs to reach the no-pruning best."""
    ratios, work, missed, lines = [], [], 0, []
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for seed in sorted({r["seed"] for r in rows if r["lab"] == name}):
        off = [r for r in rows if r["lab"] == name and r["seed"] == seed and r["semantics"] == "measured"
               and not r["prune"]]
        on = [r for r in rows if r["lab"] == name and r["seed"] == seed and r["semantics"] == "measured"
              and r["prune"] and r.get("tag", "") == tag]
        if not off or not on:
            continue
        a, b = off[-1], on[-1]
        pairs.append((a, b))
        t_off = run_s_to_reach(a["reach"], a["best_at_budget"])
        t_on = run_s_to_reach(b["reach"], a["best_at_budget"])
        w_off, w_on = steps_to_reach(a, a["best_at_budget"]), steps_to_reach(b, a["best_at_budget"])
        share = f"{t_on / t_off:.2f}" if t_on is not None and t_off else "not reached"
        if t_on is None or not t_off:
            missed += 1
        else:
            ratios.append(t_on / t_off)
        if w_on is not None and w_off:
            work.append(w_on / w_off)
        at = sorted(x["pruned_at"] for x in b.get("runs", []) if x.get("pruned_at") is not None)
        lines.append(f"| {seed} | {a['best_at_budget']:.4f} / {b['best_at_budget']:.4f} | "
                     f"{t_off if t_off is None else round(t_off, 1)} / "
                     f"{'—' if t_on is None else round(t_on, 1)} ({share}) | "
                     f"{w_off if w_off is None else round(w_off, 1)} / {w_on if w_on is None else round(w_on, 1)} | "
                     f"{a['experiments']} / {b['experiments']} | {b['pruned']} | {at} | "
                     f"{a.get('load', '?')} / {b.get('load', '?')} |")
    if not lines:
        return
    print(f"\n{name}, pruning {tag or 'on'}: " + (b.get("prune_conf", "").replace("\n", "; ").strip("; ")))
    print("| seed | best, pruning off / on | run-s to reach the no-pruning best, off / on (share) | full runs' "
          "worth of training to reach it, off / on | runs off / on | pruned | pruned at steps | load (1 min) "
          "at start, end: off / on |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    print("\n".join(lines))
    paired = [x for x in (same_candidates(off_row, on_row) for off_row, on_row in pairs) if x is not None]
    med = f"{statistics.median(ratios):.2f}" if ratios else "—"
    print(f"{name}: run-seconds with pruning to reach the no-pruning best (new semantics), as a share of the "
          f"no-pruning run-seconds: median {med} over {len(ratios)} seeds ({', '.join(f'{x:.2f}' for x in ratios)})"
          f"; not reached in {missed}" + (f"; training work: median {statistics.median(work):.2f}" if work else ""))
    if paired:  # both sessions made the same proposals: what pruning did to the same candidates
        shares = [on_s / off_s for off_s, on_s, _, _ in paired]
        print(f"{name}: sessions that proposed the same candidates with and without pruning: {len(paired)} of "
              f"{len(pairs)}; run-seconds for the runs both made, with pruning as a share of without: median "
              f"{statistics.median(shares):.3f} ({', '.join(f'{x:.3f}' for x in shares)}), all together "
              f"{sum(p[1] for p in paired) / sum(p[0] for p in paired):.3f}; runs pruned "
              f"{sum(p[2] for p in paired)}, of which the no-pruning session kept {sum(p[3] for p in paired)}")


def same_candidates(off: dict[str, Any], on: dict[str, Any]) -> tuple[float, float, int, int] | None:
    """When the pruning-on session's runs measured exactly what the pruning-off session's runs of the
    same number did (the seeded search proposed the same candidates; a pruned run has no metric), the
    run-seconds of the runs both made, off and on, the runs pruned, and how many of those the
    no-pruning session kept. None when the proposals differ (a pruned trial can change TPE's next one)."""
    a = {r["idx"]: r for r in off.get("runs") or []}
    b = {r["idx"]: r for r in on.get("runs") or []}
    both = sorted(set(a) & set(b))
    if not both or any(b[i]["metric"] is not None and (a[i]["metric"] is None or abs(b[i]["metric"] - a[i]["metric"])
                                                         > 1e-9) for i in both):
        return None
    pruned = [i for i in both if b[i]["status"] == "pruned"]
    return (sum(a[i]["run_s"] for i in both), sum(b[i]["run_s"] for i in both), len(pruned),
            sum(1 for i in pruned if a[i]["status"] == "keep"))


# --------------------------------------------------------------------------- replay

def replay_session(row: dict[str, Any], prune_lines: str, overhead: float) -> dict[str, Any]:
    """A pruning-off session's runs, in their order, through nightlab's real pruner (``Pruner``,
    ``Watch.feed``, ``Watch.finish``): which runs it would stop, at which step, and the run-seconds
    it would cost. A run stopped at step s of a full run's S costs ``run_s * (overhead + (1 -
    overhead) * s / S)`` (``overhead``: the share of a run spent outside training, start-up and the
    final evaluation). The candidates stay those of the session (the search does not react to the
    pruning here), so this isolates the pruner's judgement from the search's path."""
    import threading
    import tomllib

    from nightlab.prune import Pruner
    from nightlab.spec import PruneSpec
    from nightlab.types import Direction

    spec = PruneSpec(**tomllib.loads(prune_lines))
    figure = spec.figure or "val_loss"
    # as the engine builds it: with a [prune] figure of its own (tinygpt's train_bpb) the curve is not the metric
    pruner = Pruner(spec, figure, Direction.MINIMIZE, None if not spec.figure else "the lab's metric")
    full = max((c[-1][0] for c in (r["curve"] for r in row["runs"]) if c), default=1)
    used, inc, off_best = 0.0, math.inf, row["best"]
    out: dict[str, Any] = {"pruned_at": [], "winners_pruned": 0, "reach": None, "best": math.inf}
    off_inc = math.inf
    for r in row["runs"]:
        w = pruner.watch(None, threading.Event(), prunable=r["idx"] > 0)
        for step, value in r["curve"]:
            w.feed(f"nightlab: step={int(step)} {figure}={value}")
            if w.pruned_at is not None:
                break
        w.close()
        ok = r["status"] in ("keep", "discard") and r["metric"] is not None
        winner = ok and r["metric"] < off_inc
        off_inc = min(off_inc, r["metric"]) if winner else off_inc
        if w.pruned_at is not None:
            used += r["run_s"] * (overhead + (1 - overhead) * w.pruned_at / full)
            out["pruned_at"].append(w.pruned_at)
            out["winners_pruned"] += int(winner)
            w.finish(Status.PRUNED, None, r["run_s"])
        else:
            used += r["run_s"]
            if ok:
                inc = min(inc, r["metric"])
            w.finish(Status(r["status"]), r["metric"], r["run_s"])
        if out["reach"] is None and inc <= off_best:
            out["reach"] = used
    out["best"] = inc
    return out


def replay_cmd(args: argparse.Namespace) -> None:
    rows = [r for f in args.files for r in json.loads(Path(f).read_text())
            if not r["prune"] and r.get("runs") and r["lab"] == args.lab]
    base = LAB_SPECS[args.lab][1]
    print(f"{len(rows)} pruning-off {args.lab} sessions; a pruned run costs {args.overhead:.0%} of its run time "
          "plus its share of the steps")
    print("| [prune] settings | run-s to reach the no-pruning best, median share | not reached | runs pruned "
          "| winners pruned | steps pruned at (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for variant in args.variant:
        lines = base
        for item in (v for v in variant.split(";") if v.strip()):
            key, value = item.split("=", 1)
            lines = "\n".join([x for x in lines.split("\n") if x and x.split("=")[0].strip() != key.strip()]
                              + [f"{key.strip()} = {value.strip()}"]) + "\n"
        lines = lines.replace("[prune]\n", "")
        ratios, missed, pruned, winners, at = [], 0, 0, 0, []
        for row in rows:
            t_off = run_s_to_reach(row["reach"], row["best"])
            o = replay_session(row, lines, args.overhead)
            pruned, winners, at = pruned + len(o["pruned_at"]), winners + o["winners_pruned"], at + o["pruned_at"]
            if o["reach"] is None or not t_off:
                missed += 1
            else:
                ratios.append(o["reach"] / t_off)
        n = sum(len(r["runs"]) - 1 for r in rows)
        med = f"{statistics.median(ratios):.2f}" if ratios else "—"
        print(f"| `{variant or 'defaults'}` | {med} ({', '.join(f'{x:.2f}' for x in ratios)}) | {missed} | "
              f"{pruned} of {n} | {winners} | {statistics.median(at) if at else '—'} |")


# --------------------------------------------------------------------------- optuna

ROSEN = """\
import time
X1 = 0.0  # nightlab: -2.0..2.0
X2 = 0.0  # nightlab: -2.0..2.0
X3 = 0.0  # nightlab: -2.0..2.0
X4 = 0.0  # nightlab: -2.0..2.0
time.sleep(SLEEP)
xs = [X1, X2, X3, X4]
v = sum(100 * (xs[i + 1] - xs[i] ** 2) ** 2 + (1 - xs[i]) ** 2 for i in range(3))
print("---")
print(f"value: {v:.10g}")
"""

ROSEN_SPEC = """\
[files]
editable = ["target.py"]

[run]
command = "python target.py"
budget_s = 10
timeout_s = 60

[metric]
name = "value"
direction = "minimize"

[stop]
max_experiments = {trials}

[researcher]
kind = "search"
sampler = "{sampler}"
seed = {seed}
n_startup_trials = 10

[executor]
pipeline = true
"""


def nightlab_rosen(seed: int, trials: int, sleep: float, work: Path, sampler: str = "tpe") -> dict[str, Any]:
    lab = git_lab(None, work / f"rosen-{seed}", {"target.py": ROSEN.replace("SLEEP", repr(sleep)),
                                                  "nightlab.toml": ROSEN_SPEC.format(trials=trials, seed=seed,
                                                                                     sampler=sampler)})
    eng = Engine(lab, tag="r", sandbox_mode="none")
    t0 = time.time()
    eng.run()
    exps = sorted(eng.ledger.experiments(eng.session.id), key=lambda e: e.finished_at or 0)
    eng.close()
    best, curve = math.inf, []
    for e in exps:  # the incumbent after each evaluation (greedy keeps every measured improvement)
        if e.status is Status.KEEP and e.metric is not None:
            best = min(best, e.metric)
        if e.status.was_run():
            curve.append(((e.finished_at or t0) - t0, best))
    wall = time.time() - t0
    stages: dict[str, list[float]] = {}
    for e in exps:  # each experiment's seconds per stage (pipeline.py); propose overlaps the run before
        for k, v in (e.evidence.get("timing") or {}).items():
            stages.setdefault(k, []).append(float(v))
    return {"curve": curve, "wall_s": wall, "run_s": sum(e.run_s for e in exps),
            "stages_ms": {k: round(1000 * statistics.median(v), 1) for k, v in stages.items()}}


def optuna_rosen(seed: int, trials: int, sleep: float, work: Path, sampler: str = "tpe") -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = work / f"optuna-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "target.py"

    def objective(trial: optuna.Trial) -> float:
        values = {f"X{i}": trial.suggest_float(f"X{i}", -2.0, 2.0) for i in range(1, 5)}
        text = ROSEN.replace("SLEEP", repr(sleep))
        for k, v in values.items():
            text = text.replace(f"{k} = 0.0", f"{k} = {v!r}")
        script.write_text(text)
        t = time.time()
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
        run_s.append(time.time() - t)
        return float(out.split("value:")[1])

    run_s: list[float] = []

    made = (optuna.samplers.GPSampler(seed=seed, n_startup_trials=10) if sampler == "gp"
            else optuna.samplers.TPESampler(seed=seed, n_startup_trials=10))
    study = optuna.create_study(direction="minimize", sampler=made)
    study.enqueue_trial({f"X{i}": 0.0 for i in range(1, 5)})  # nightlab's baseline: the file's values
    t0 = time.time()
    best, curve = math.inf, []

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal best
        if trial.value is not None:
            best = min(best, trial.value)
        curve.append((time.time() - t0, best))

    study.optimize(objective, n_trials=trials + 1, callbacks=[record])
    return {"curve": curve, "wall_s": time.time() - t0, "run_s": sum(run_s)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p for wins vs losses (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def best_by_time(curve: list[list[float]], t: float) -> float:
    best = math.inf
    for at, v in curve:
        if at <= t:
            best = v
    return best


def optuna_cmd(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {r["seed"] for r in rows}
    if args.sampler == "gp":  # the one-time imports of GP's first proposal (~1-2 s) paid before either side runs
        import optuna._gp.gp  # noqa: F401  (torch)
        import scipy.optimize  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="nl-opt-") as tmp:
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            if seed in done:
                continue
            load0 = os.getloadavg()[0]
            n = nightlab_rosen(seed, args.trials, args.sleep, Path(tmp), args.sampler)
            o = optuna_rosen(seed, args.trials, args.sleep, Path(tmp), args.sampler)
            rows.append({"seed": seed, "nightlab": n, "optuna": o, "trials": args.trials, "sleep": args.sleep,
                         "sampler": args.sampler, "load": [round(load0, 2), round(os.getloadavg()[0], 2)]})
            out.write_text(json.dumps(rows))
            print(f"seed {seed}: nightlab best {n['curve'][-1][1]:.4g} in {n['wall_s']:.1f}s; "
                  f"optuna best {o['curve'][-1][1]:.4g} in {o['wall_s']:.1f}s", flush=True)
    summarize_optuna(rows)


def summarize_optuna(rows: list[dict[str, Any]]) -> None:
    trials = rows[0]["trials"]
    print(f"\n{len(rows)} seeds, {trials} trials after the shared starting point, runs sleep {rows[0]['sleep']}s, "
          f"sampler {rows[0].get('sampler', 'tpe')} on both sides")
    print("| comparison | nightlab better | worse | tie | sign test p | median nightlab / optuna |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in sorted({20, trials}):
        w = lo = t = 0
        ratios = []
        for r in rows:
            a, b = r["nightlab"]["curve"][min(k, len(r["nightlab"]["curve"]) - 1)][1], r["optuna"]["curve"][k][1]
            w, lo, t = w + (a < b), lo + (a > b), t + (a == b)
            ratios.append(a / b if b > 0 else math.nan)
        print(f"| best after {k} trials | {w} | {lo} | {t} | {sign_test(w, lo):.3g} | "
              f"{statistics.median(ratios):.3g} |")
    for frac in (0.5, 1.0):
        w = lo = t = 0
        ratios = []
        for r in rows:
            at = frac * min(r["optuna"]["wall_s"], r["nightlab"]["wall_s"])
            a, b = best_by_time(r["nightlab"]["curve"], at), best_by_time(r["optuna"]["curve"], at)
            w, lo, t = w + (a < b), lo + (a > b), t + (a == b)
            ratios.append(a / b if b > 0 and math.isfinite(a) else math.nan)
        print(f"| best within {int(frac * 100)}% of the shorter wall time | {w} | {lo} | {t} | "
              f"{sign_test(w, lo):.3g} | {statistics.median(ratios):.3g} |")
    nw = statistics.mean(r["nightlab"]["wall_s"] for r in rows)
    ow = statistics.mean(r["optuna"]["wall_s"] for r in rows)
    print(f"\nmean wall time for {trials + 1} evaluations: nightlab {nw:.1f}s "
          f"({3600 * (trials + 1) / nw:.0f} trials/hour), optuna {ow:.1f}s "
          f"({3600 * (trials + 1) / ow:.0f} trials/hour)")
    per_seed = [(3600 * (trials + 1) / r["nightlab"]["wall_s"], 3600 * (trials + 1) / r["optuna"]["wall_s"])
                for r in rows]
    ahead = sum(a > b for a, b in per_seed)
    print(f"trials/hour per seed, nightlab / optuna: {', '.join(f'{a:.0f}/{b:.0f}' for a, b in per_seed)}; "
          f"nightlab ahead in {ahead} of {len(rows)} (sign test p = {sign_test(ahead, len(rows) - ahead):.3g})")
    def gap(curve: list[list[float]]) -> float:  # steady state: the median time between two evaluations' ends
        ends = [t for t, _ in curve]
        return statistics.median(b - a for a, b in itertools.pairwise(ends))

    ng, og = (statistics.median(gap(r[k]["curve"]) for r in rows) for k in ("nightlab", "optuna"))
    print(f"steady state (median time between two evaluations' ends): nightlab {1000 * ng:.0f} ms "
          f"({3600 / ng:.0f}/hour), optuna {1000 * og:.0f} ms ({3600 / og:.0f}/hour)")
    if all("run_s" in r["nightlab"] for r in rows):
        nd = statistics.median(r["nightlab"]["run_s"] / r["nightlab"]["wall_s"] for r in rows)
        od = statistics.median(r["optuna"]["run_s"] / r["optuna"]["wall_s"] for r in rows)
        print(f"duty cycle (run seconds / wall seconds, median): nightlab {nd:.2f}, optuna {od:.2f}")
        stages = rows[-1]["nightlab"]["stages_ms"]
        print("nightlab's median ms per stage (last seed): " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    if "load" in rows[0]:
        print(f"load average (1 min) across seeds: {min(min(r['load']) for r in rows):.2f}–"
              f"{max(max(r['load']) for r in rows):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("labs")
    a.add_argument("--seeds", type=int, default=5)
    a.add_argument("--seed-start", type=int, default=0, help="the first seed (seeds run from it, --seeds of them)")
    a.add_argument("--deadline-s", type=float, default=None,
                   help="stop each session gracefully this many wall-clock seconds after the command started "
                        "(its row is still written, with stopped_by)")
    a.add_argument("--labs", nargs="+", default=["quickfit", "tinygpt"])
    a.add_argument("--quickfit-s", type=float, default=25.0, help="run-seconds per quickfit session")
    a.add_argument("--tinygpt-s", type=float, default=40.0, help="run-seconds per tinygpt session")
    a.add_argument("--tinygpt-budget", type=float, default=None,
                   help="tinygpt's per-run training seconds ([run] budget_s; default 1.5)")
    a.add_argument("--tinygpt-steps", type=int, default=None,
                   help="tinygpt trains for this many optimizer steps, on one thread, instead of a time budget")
    a.add_argument("--prune-startup", type=int, default=None,
                   help="the median pruner's startup_runs (default: 3 on quickfit, 2 on tinygpt)")
    a.add_argument("--semantics", nargs="+", choices=["rebase", "measured"], default=["rebase", "measured"],
                   help="keep semantics to run (default both)")
    a.add_argument("--prune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a [prune] line for the pruning-on sessions, e.g. --prune-set reference='\"reached\"'")
    a.add_argument("--arms", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="pruning off, on, or both (default)")
    a.add_argument("--tag", default="", help="a label for these rows (rows with another tag are not re-run)")
    a.add_argument("--ahead", choices=["auto", "always"], default="auto",
                   help="when the next proposal is made: auto (nightlab's rule: after the result when proposing "
                        "ahead saves under 1 %% of a run) or always ahead (the rule before it; give it its own --tag)")
    a.add_argument("--out", default="bench-efficiency-labs.json")
    b = sub.add_parser("optuna")
    b.add_argument("--seeds", type=int, default=20)
    b.add_argument("--trials", type=int, default=60)
    b.add_argument("--sleep", type=float, default=0.2)
    b.add_argument("--seed-start", type=int, default=0, help="the first seed (seeds run from it, --seeds of them)")
    b.add_argument("--sampler", choices=["tpe", "gp"], default="tpe",
                   help="the sampler on both sides: TPE (nightlab's default) or Optuna's GPSampler")
    b.add_argument("--out", default="bench-efficiency-optuna.json")
    r = sub.add_parser("replay", help="pruner settings replayed over recorded pruning-off sessions")
    r.add_argument("files", nargs="+")
    r.add_argument("--lab", default="tinygpt")
    r.add_argument("--overhead", type=float, default=0.3, help="share of a run outside its training steps")
    r.add_argument("--variant", action="append", default=[],
                   help="[prune] settings separated by ';', e.g. 'reference=\"completed\";percentile=50'")
    s = sub.add_parser("summary")
    s.add_argument("files", nargs="+")
    args = ap.parse_args()
    if args.cmd == "labs":
        labs(args)
    elif args.cmd == "optuna":
        optuna_cmd(args)
    elif args.cmd == "replay":
        replay_cmd(args)
    else:  # the files' rows together (e.g. one file per process of a parallel run), one summary per kind
        rows = [r for f in args.files for r in json.loads(Path(f).read_text())]
        optuna_rows = [r for r in rows if "nightlab" in r]
        if optuna_rows:
            summarize_optuna(optuna_rows)
        if len(optuna_rows) < len(rows):
            summarize_labs([r for r in rows if "nightlab" not in r])


if __name__ == "__main__":
    main()
