"""What the minimal file-system view costs: a bare ``sandbox.run`` of ``true``, three ways.

    python bench/sandbox_view.py [--n 200]

Prints the median and p95 wall time of ``sandbox.run("true")`` without a sandbox, under bwrap with
the whole host read-only (``host_root``, the old shape), and under bwrap with the minimal view
(system folders, chosen /etc entries, the toolchain, an empty $HOME), interleaved so that machine
load hits all three alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from nightlab import sandbox
from nightlab.sandbox import SandboxPolicy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    if sandbox.resolve_mode("auto") != "bwrap":
        raise SystemExit("bubblewrap is needed for this benchmark")
    wt = Path(tempfile.mkdtemp(prefix="nightlab-bench-", dir="/var/tmp"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.path.expanduser("~")}
    shapes = {
        "none": SandboxPolicy(mode="none"),
        "bwrap, host / read-only": SandboxPolicy(mode="bwrap", writable=(wt,), host_root=True),
        "bwrap, minimal view": SandboxPolicy(mode="bwrap", writable=(wt,)),
    }
    times: dict[str, list[float]] = {k: [] for k in shapes}
    try:
        for _ in range(args.n):
            for name, pol in shapes.items():
                t = time.perf_counter()
                r = sandbox.run("true", cwd=wt, env=env, policy=pol, timeout_s=30, log_path=wt.parent / "bench.log")
                times[name].append((time.perf_counter() - t) * 1000)
                assert r.exit_code == 0, (wt.parent / "bench.log").read_text()
    finally:
        shutil.rmtree(wt, ignore_errors=True)
    print(f"| shape | median ms | p95 ms |  (n = {args.n})")
    print("|---|---|---|")
    for name, ts in times.items():
        ts.sort()
        print(f"| {name} | {statistics.median(ts):.1f} | {ts[int(0.95 * (len(ts) - 1))]:.1f} |")


if __name__ == "__main__":
    main()
