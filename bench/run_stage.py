"""What ``sandbox.run`` adds to a command: its wall time against a bare ``subprocess.run`` of the same.

    python bench/run_stage.py [--mode none|bwrap] [--command "sleep 0.2"] [--repeats 15]

Alternates the two, ``--repeats`` times each, and prints both medians and their difference (the
process group, the capped log's pump thread, the wait for the exit, the sweep for stragglers).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nightlab import sandbox


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="none", choices=["none", "bwrap"])
    ap.add_argument("--command", default="sleep 0.2")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        policy = sandbox.SandboxPolicy(mode=args.mode, writable=(d,))
        bare, ours = [], []
        for i in range(args.repeats):
            t = time.monotonic()
            subprocess.run(args.command, shell=True, check=False)
            bare.append(time.monotonic() - t)
            t = time.monotonic()
            sandbox.run(args.command, cwd=d, env={"PATH": "/usr/bin:/bin"}, policy=policy, timeout_s=60,
                        log_path=d / "run.log", run_id=f"bench-{i}")
            ours.append(time.monotonic() - t)
    a, b = 1000 * statistics.median(bare), 1000 * statistics.median(ours)
    print(f"{args.mode} {args.command!r}: subprocess.run median {a:.1f} ms, sandbox.run median {b:.1f} ms, "
          f"difference {b - a:.1f} ms")


if __name__ == "__main__":
    main()
