"""Do crashes teach the search researcher where not to go? (issue 12, item 5)

    python bench/crashes.py [--seeds 10] [--n 40] [--modes fail worst infeasible] [--sampler tpe]

Drives the real ``search`` researcher on the nanoGPT-layout fixture ``tests/spacelabs.py:NANO_TRAIN``
(14 searched constants; the run crashes with "CUDA out of memory" whenever
``batch_size * block_size * n_layer`` exceeds the baseline's, i.e. in a large part of the space)
through a tiny in-process engine: propose, execute the candidate's ``train.py`` (in-process, an
exception is a crash), greedy keep, observe. For each ``[researcher] crashes`` mode and seed:
crashes in the session and in its second half, and the best loss after N experiments. The mode is
the only difference between rows; the seeds are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.spacelabs import NANO_TRAIN  # noqa: E402

from nightlab.researchers import Context  # noqa: E402
from nightlab.researchers.search import Options, SearchResearcher  # noqa: E402
from nightlab.spec import Spec  # noqa: E402
from nightlab.types import Direction, Experiment, Status, Usage  # noqa: E402

SPEC = Spec.model_validate({"files": {"editable": ["train.py"]}, "run": {"command": "python train.py"},
                            "metric": {"name": "loss", "direction": "minimize"}, "researcher": {"kind": "search"}})


def run(text: str) -> float | None:
    """The candidate's train.py, executed; its printed loss, or None when it raised (a crash)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(text, "train.py", "exec"), {"__name__": "__main__"})
    except Exception:
        return None
    line = [x for x in out.getvalue().splitlines() if x.startswith("loss:")]
    return float(line[-1].split(":")[1]) if line else None


def experiment(idx: int, status: Status, metric: float | None, params: dict[str, Any]) -> Experiment:
    return Experiment(
        id=idx + 1, session_id=1, idx=idx, status=status, parent_commit="p", commit=None, metric=metric,
        secondary={}, trust="inline", description="", reason="", log_tail="", seed=0, started_at=0.0,
        finished_at=1.0, propose_s=0.0, run_s=0.0, overhead_s=0.0, exit_code=0 if metric is not None else 1,
        evidence={}, researcher="search", rationale="", diff="", params=dict(params), usage=Usage(),
    )  # fmt: skip


def session(mode: str, seed: int, n: int, sampler: str = "tpe") -> dict[str, Any]:
    r = SearchResearcher(Options(seed=seed, crashes=mode, sampler=sampler))  # type: ignore[arg-type]
    files = {"train.py": NANO_TRAIN}
    best = run(NANO_TRAIN)
    assert best is not None
    history: tuple[Experiment, ...] = (experiment(0, Status.KEEP, best, {}),)
    r.observe(history[0])
    crashed: list[bool] = []
    for idx in range(1, n + 1):
        ctx = Context(spec=SPEC, lab_dir=Path("/nonexistent"), program="", parent=f"c{idx}", files=dict(files),
                      history=history, metric_name="loss", direction=Direction.MINIMIZE, incumbent_metric=best,
                      baseline_metric=None, idx=idx)  # fmt: skip
        cand = r.propose(ctx)
        merged = {**files, **(cand.files or {})}
        value = run(merged["train.py"])
        if value is None or not math.isfinite(value):
            e = experiment(idx, Status.CRASH, None, cand.params)
        elif value < best:
            e, best, files = experiment(idx, Status.KEEP, value, cand.params), value, merged
        else:
            e = experiment(idx, Status.DISCARD, value, cand.params)
        crashed.append(e.status is Status.CRASH)
        r.observe(e)
        history = (*history, e)
    return {"crashes": sum(crashed), "second_half": sum(crashed[n // 2:]), "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["fail", "worst", "infeasible"])
    ap.add_argument("--sampler", default="tpe")
    a = ap.parse_args()
    rows = {m: [session(m, s, a.n, a.sampler) for s in range(a.seeds)] for m in a.modes}
    base = rows[a.modes[0]]
    print(f"| crashes = | crashes / session (1st half, 2nd half) | best loss after {a.n}: median [min, max] "
          f"| seeds better / worse than `{a.modes[0]}` |")
    print("|---|---|---|---|")
    for m, rs in rows.items():
        c = [x["crashes"] for x in rs]
        h2 = [x["second_half"] for x in rs]
        b = [x["best"] for x in rs]
        better = sum(x["best"] < y["best"] for x, y in zip(rs, base, strict=True))
        worse = sum(x["best"] > y["best"] for x, y in zip(rs, base, strict=True))
        print(f"| `{m}` | {statistics.mean(c):.1f} ({statistics.mean(c) - statistics.mean(h2):.1f}, "
              f"{statistics.mean(h2):.1f}) | {statistics.median(b):.4f} [{min(b):.4f}, {max(b):.4f}] "
              f"| {better} / {worse} |")


if __name__ == "__main__":
    main()
