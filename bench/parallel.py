"""Duty cycle and throughput of the executor (issue: many experiments at once).

    python bench/parallel.py [--quick] [--ray] [--throughput-only]

1. Duty cycle, sequential vs pipelined: a researcher that takes PROPOSE_S per proposal and runs
   of RUN_S (defaults 2 s and 6 s), N experiments on one slot. The sequential loop is
   autoresearch's (think, then run, then think...); nightlab pipelines: it proposes the next
   candidate while the current one runs. Duty cycle = busy slot-seconds / (slots x wall seconds).
2. Throughput with 1, 2, 4, 8 local slots of sleep-bound runs (SLEEP_S each, 3 per slot):
   experiments per second against the ideal N / SLEEP_S (--slots, --per-slot change the counts).
3. With --ray, the same through the Ray executor on a local cluster (ray.init(num_cpus=8)), and
   where a Ray run's time went (RemoteResult.timing, stored as the evidence's ray_timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local cluster on loopback

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = SRC + os.pathsep + os.environ.get("PYTHONPATH", "")  # for Ray's workers

from nightlab.engine import Engine  # noqa: E402
from nightlab.types import Candidate  # noqa: E402

SPEC = """\
[files]
editable = ["work.sh"]
[run]
command = "sh work.sh"
budget_s = 60
[metric]
name = "m"
[stop]
max_experiments = {n}
max_crashes_in_row = 0
[researcher]
kind = "scripted"
[sandbox]
mode = "auto"
[executor]
kind = "{kind}"
slots = {slots}
pipeline = {pipeline}
"""


class Thinker:
    """A researcher that thinks for ``seconds`` and proposes a (worse) change."""

    name = "thinker"

    def __init__(self, seconds: float, sleep_s: float) -> None:
        self.seconds, self.sleep_s = seconds, sleep_s

    def propose(self, ctx):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)
        return Candidate(parent=ctx.parent, rationale=f"try {ctx.idx}",
                         files={"work.sh": f"sleep {self.sleep_s}\necho ---\necho m: {100 + ctx.idx}\n"})

    def observe(self, e):  # type: ignore[no-untyped-def]
        pass

    def close(self) -> None:
        pass


def session(n: int, slots: int, pipeline: bool, propose_s: float, sleep_s: float, kind: str = "local") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp)
        (lab / "nightlab.toml").write_text(SPEC.format(n=n, slots=slots, pipeline=str(pipeline).lower(), kind=kind))
        (lab / "work.sh").write_text("echo ---\necho m: 1\n")  # the baseline is instant
        env = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
               "GIT_COMMITTER_EMAIL": "b@b", "PATH": "/usr/bin:/bin"}
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "lab"]):
            subprocess.run(cmd, cwd=lab, check=True, env=env)
        t_start = time.monotonic()
        eng = Engine(lab, tag="b", researcher=Thinker(propose_s, sleep_s))
        start = time.monotonic() - t_start  # Ray: the executor's warm-up of its slots' workers is in here
        t0 = time.monotonic()
        s = eng.run()
        wall = time.monotonic() - t0
        noise = eng.ledger.session_json(s.id)[1]
        exps = eng.ledger.experiments(s.id)[1:]
        eng.close()
        stages: dict[str, list[float]] = {}
        ray_parts: dict[str, list[float]] = {}
        for e in exps:
            for k, v in (e.evidence.get("timing") or {}).items():
                stages.setdefault(k, []).append(float(v))
            for k, v in (e.evidence.get("ray_timing") or {}).items():
                ray_parts.setdefault(k, []).append(float(v))
        return {"wall": wall, "n": len(exps), "duty": noise.get("executor", {}).get("duty_cycle", 0.0),
                "rate": len(exps) / noise.get("executor", {}).get("wall_s", wall),
                "stages": {k: statistics.median(v) for k, v in stages.items()},
                "run": stages.get("run", []), "ray": ray_parts, "start": start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs (0.5 s think, 1.5 s run)")
    ap.add_argument("--ray", action="store_true", help="also the Ray executor on a local cluster")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--throughput-only", action="store_true", help="skip the duty-cycle part")
    ap.add_argument("--per-slot", type=int, default=3, help="throughput: experiments per slot (default 3)")
    ap.add_argument("--slots", default="1,2,4,8", help="throughput: slot counts (default 1,2,4,8)")
    args = ap.parse_args()
    think, run = (0.5, 1.5) if args.quick else (2.0, 6.0)
    if not args.throughput_only:
        print(f"## duty cycle: researcher {think:g} s per proposal, runs of {run:g} s, {args.n} experiments, "
              "1 slot\n")
        print("| loop | wall s | duty cycle |\n|---|---|---|")
        for label, pipe in (("sequential (autoresearch-style)", False), ("pipelined (nightlab)", True)):
            r = session(args.n, 1, pipe, think, run)
            print(f"| {label} | {r['wall']:.1f} | {100 * r['duty']:.1f}% |")
    sleep_s = 1.0 if args.quick else 2.0
    kinds = ["local", "ray"] if args.ray else ["local"]
    if args.ray:
        import ray

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    for kind in kinds:
        print(f"\n## throughput, {kind} executor: sleep-bound runs of {sleep_s:g} s, {args.per_slot} per slot\n")
        print("| slots | experiments/s | ideal | ratio | median ms per stage (evidence timing, run excluded) |\n"
              "|---|---|---|---|---|")
        rows: list[tuple[int, dict]] = []
        for slots in [int(n) for n in args.slots.split(",")]:
            r = session(args.per_slot * slots, slots, True, 0.0, sleep_s, kind)
            ideal = slots / sleep_s
            st = " ".join(f"{k} {1000 * v:.0f}" for k, v in r["stages"].items() if k != "run")
            print(f"| {slots} | {r['rate']:.2f} | {ideal:.2f} | {r['rate'] / ideal:.2f} | {st} |")
            if kind == "ray":
                rows.append((slots, r))
        for i, (slots, r) in enumerate(rows):
            if i == 0:
                print(f"\n### where a Ray experiment's run stage went (ms, median / max over the slots' "
                      f"{args.per_slot} experiments each; sandbox = the command with bwrap's start)\n")
                print("| slots | engine start, before the loop (not in the ratio) | run stage | start (submit to task) "
                      "| setup (unpack) | sandbox | measure | home | imports on the path |\n"
                      "|---|---|---|---|---|---|---|---|---|")
            cells = [f"{1000 * statistics.median(v):.0f} / {1000 * max(v):.0f}" for v in
                     (r["run"], *(r["ray"].get(k, [0.0]) for k in ("start", "setup", "sandbox", "measure", "home")))]
            print(f"| {slots} | {1000 * r['start']:.0f} | {' | '.join(cells)} | "
                  f"{int(sum(r['ray'].get('import_on_path', [])))} |")


if __name__ == "__main__":
    main()
