"""What the evaluator's clean tree costs per evaluation (nightlab.evaltree.build).

A real git repo with ``--files`` committed files (code-sized, 2 KB each) and a worktree whose run
left one output of ``--output-mb`` MB; builds and removes the clean tree ``--repeats`` times and
prints the median and p95 wall time. Usage::

    python bench/eval_tree.py [--files 50] [--output-mb 1 16 256] [--repeats 20]
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

from nightlab import evaltree
from nightlab.workspace import Workspace

GIT = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]


def setup(root: Path, n_files: int) -> tuple[Workspace, str, Path]:
    lab = root / "lab"
    lab.mkdir()
    for i in range(n_files):
        (lab / f"mod{i}.py").write_text(f"X = {i}\n" + "# padding\n" * 200)
    (lab / "train.py").write_text("print('train')\n")
    subprocess.run([*GIT, "init", "-q", "-b", "main"], cwd=lab, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=lab, check=True)
    subprocess.run([*GIT, "commit", "-qm", "lab"], cwd=lab, check=True)
    ws = Workspace(lab)
    ws.ensure_state_dir()
    head = ws.head()
    wt = ws.add_worktree("bench", head)
    return ws, head, wt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--output-mb", type=float, nargs="+", default=[1.0, 16.0, 256.0])
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    print(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); {a.files} committed files")
    print("| output MB | median ms | p95 ms |\n|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".bench-evaltree-") as tmp:
        ws, head, wt = setup(Path(tmp), a.files)
        for mb in a.output_mb:
            (wt / "ckpt.pt").write_bytes(os.urandom(int(mb * 2**20)))
            times: list[float] = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                tree = evaltree.build(ws, trusted_commit=head, commit=head, editable=["train.py"], protected=[],
                                      exclude=[], run_root=wt, outputs=["ckpt.pt"], max_bytes=2**40,
                                      parent=ws.state_dir / "eval")
                evaltree.remove(tree.root)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
            print(f"| {mb:g} | {statistics.median(times):.1f} | {p95:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
