"""Harness overhead per experiment: experiment wall time minus the run command's own time.

    python bench/overhead.py [--experiments 200] [--sandbox required|none]

Builds a throwaway lab in a temp folder whose run command exits at once (``cat score.txt``
prints the summary block), runs N experiments with a scripted researcher that alternates
improvements (keeps: commit + branch advance) and regressions (discards), and reports
two figures per experiment:

- start-to-start: the time from one experiment's start to the next one's, minus the run command's own
  time — what a user's night pays per experiment (worktree removal, polling for the exit, proposal and
  the bookkeeping between experiments included); this is the figure the README quotes;
- the ledger's ``overhead_s`` (worktree, apply, guard, commit, protected-file check, measurement,
  ledger writes), which stops its clock before the worktree is removed and so under-reports.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.types import Candidate

SPEC = """\
[files]
editable = ["score.txt"]
protected = ["protected.txt"]
[run]
command = "cat score.txt"
budget_s = 5
timeout_s = 30
[metric]
name = "score"
direction = "minimize"
[stop]
max_experiments = {n}
max_crashes_in_row = 0
[researcher]
kind = "scripted"
"""


def make_lab(tmp: str, n: int, score: int) -> Path:
    """A git repository holding the one-file lab above (also used by bench/scaling.py)."""
    lab = Path(tmp) / "lab"
    lab.mkdir()
    (lab / "nightlab.toml").write_text(SPEC.format(n=n))
    (lab / "score.txt").write_text(f"---\nscore: {score}\n")
    (lab / "protected.txt").write_text("do not touch\n")
    env = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b", "PATH": "/usr/bin:/bin"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "lab"]):
        subprocess.run(cmd, cwd=lab, check=True, env=env)
    return lab


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiments", type=int, default=200)
    ap.add_argument("--sandbox", default="required", choices=["required", "auto", "none"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lab = make_lab(tmp, args.experiments, 1000)

        def step(ctx):  # even experiments improve (keep), odd ones regress (discard)
            score = 1000 - ctx.idx if ctx.idx % 2 == 0 else 5000 + ctx.idx
            return Candidate(parent=ctx.parent, rationale=f"score {score}",
                             files={"score.txt": f"---\nscore: {score}\n"})

        eng = Engine(lab, tag="bench", researcher=ScriptedResearcher([step]), sandbox_mode=args.sandbox)
        t0 = time.monotonic()
        session = eng.run()
        wall = time.monotonic() - t0
        exps = eng.ledger.experiments(session.id)[1:]
        over = [e.overhead_s * 1000 for e in exps]
        s2s = [(b.started_at - a.started_at - a.run_s) * 1000 for a, b in itertools.pairwise(exps)]
        runs = [e.run_s * 1000 for e in exps]
        counts: dict[str, int] = {}
        for e in exps:
            counts[e.status.value] = counts.get(e.status.value, 0) + 1
        print(f"experiments: {len(exps)}  sandbox: {session.sandbox}  statuses: {counts}")
        print(f"start-to-start minus run (ms): median {statistics.median(s2s):.1f}  "
              f"p95 {pct(s2s, 0.95):.1f}  max {max(s2s):.1f}")
        print(f"ledger overhead_s (ms, under-reports): median {statistics.median(over):.1f}  "
              f"p95 {pct(over, 0.95):.1f}")
        print(f"run command itself (ms): median {statistics.median(runs):.1f}")
        stages: dict[str, list[float]] = {}
        for e in exps:
            for k, v in (e.evidence.get("timing") or {}).items():
                stages.setdefault(k, []).append(1000 * v)
        print("per-stage medians (ms): " + "  ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages.items()))
        print(f"total wall {wall:.1f}s, {len(exps) / wall:.1f} experiments/s")
        eng.close()


if __name__ == "__main__":
    main()
