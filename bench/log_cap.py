"""What the capped run log costs: ``sandbox.run`` with its pipe + pump thread, against a plain file.

    python bench/log_cap.py [--runs 200] [--mb 100] [--baseline-src /path/to/old/checkout/src]

For each tree (this one, and with ``--baseline-src`` an older nightlab whose runs wrote straight
to a file), in a fresh process, unsandboxed (``mode = "none"``, so bwrap's own start-up does not
hide the difference):

- ``true`` run ``--runs`` times: median and p95 wall per run (the fixed cost of the pump thread);
- a run that writes ``--mb`` MB of 100-byte lines, 3 times: median wall, throughput, and the size of
  the log file left on disk (the cap is 20 MB by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, statistics, sys, tempfile, time
from pathlib import Path
from nightlab import sandbox
runs, mb = int(sys.argv[1]), int(sys.argv[2])
pol = sandbox.SandboxPolicy(mode="none")
env = {"PATH": os.environ["PATH"]}
out = {}
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sandbox.run("true", cwd=tmp, env=env, policy=pol, timeout_s=60, log_path=tmp / "run.log")
        walls.append(time.perf_counter() - t0)
    walls.sort()
    out["true_median_ms"] = 1000 * statistics.median(walls)
    out["true_p95_ms"] = 1000 * walls[int(0.95 * (len(walls) - 1))]
    cmd = f"head -c {mb * 1000000} /dev/zero | tr '\\0' 'a' | fold -w 99; echo ---; echo score: 1"
    big = []
    for _ in range(3):
        t0 = time.perf_counter()
        sandbox.run(cmd, cwd=tmp, env=env, policy=pol, timeout_s=600, log_path=tmp / "big.log")
        big.append(time.perf_counter() - t0)
    out["flood_median_s"] = statistics.median(big)
    out["flood_mb_per_s"] = mb / statistics.median(big)
    out["flood_log_mb"] = (tmp / "big.log").stat().st_size / 1e6
print(json.dumps(out))
"""


def measure(src: str, runs: int, mb: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": src}
    p = subprocess.run([sys.executable, "-c", CHILD, str(runs), str(mb)], env=env, capture_output=True, text=True,
                       timeout=3600, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--baseline-src", default="", help="src/ of a nightlab whose logs were plain files")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    rows = [("capped (this tree)", measure(here, args.runs, args.mb))]
    if args.baseline_src:
        rows.append(("plain file (baseline)", measure(args.baseline_src, args.runs, args.mb)))
    load = os.getloadavg()
    print(f"log_cap: {args.runs} runs of `true`, 3 runs writing {args.mb} MB; unsandboxed; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f}")
    print("| log plumbing | `true` median ms | p95 ms | flood wall s | MB/s | log left on disk |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['true_median_ms']:.2f} | {r['true_p95_ms']:.2f} | {r['flood_median_s']:.2f} | "
              f"{r['flood_mb_per_s']:.0f} | {r['flood_log_mb']:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
