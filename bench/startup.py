"""Start-up time of the CLI: each read command as a fresh process, N times, min / median / max.

    python bench/startup.py [--runs 15] [--lab DIR] [--src OTHER_CHECKOUT/src]

Without ``--lab`` it builds a throwaway lab (the quickfit example, 3 experiments of the
search researcher) so that ``status``, ``log``, ``show``, ``diff`` and ``export`` read a real
ledger. Every command is run as ``python -m nightlab …`` with this checkout's ``src`` on
``PYTHONPATH`` (or ``--src``, to compare another checkout), after one warm-up run, and timed
from the outside: wall clock and CPU seconds (user + sys) of the whole process; on a shared,
loaded machine the CPU figure is the steadier one. For reference it also times
``python -c pass`` (the interpreter alone) and the heavy imports (``import sqlalchemy``,
``import optuna``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = [Path(__file__).resolve().parents[1] / "src"]  # [0] is replaced by --src

COMMANDS = [
    ["--version"],
    ["--help"],
    ["status"],
    ["log"],
    ["show", "1"],
    ["diff", "1"],
    ["export", "--format", "tsv"],
]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC[0]), "COLUMNS": "120"}
    env.pop("NIGHTLAB_DB", None)
    return env


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_once(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of one run of ``argv`` as a process."""
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return wall, cpu


def measure(argv: list[str], cwd: Path, runs: int) -> tuple[float, float, float, float]:
    """min, median, max wall seconds and median CPU seconds over ``runs`` runs after a warm-up."""
    time_once(argv, cwd)  # warm-up: file cache, .pyc
    runs_ = [time_once(argv, cwd) for _ in range(runs)]
    walls = [w for w, _ in runs_]
    return min(walls), statistics.median(walls), max(walls), statistics.median(c for _, c in runs_)


def make_lab(root: Path) -> Path:
    lab = root / "lab"
    subprocess.run([sys.executable, "-m", "nightlab", "demo", str(lab), "--experiments", "3", "--plain",
                    "--sandbox", "none"], env=_env(), check=True, stdout=subprocess.DEVNULL)
    return lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--lab", type=Path, default=None, help="an existing lab with a session (default: a demo)")
    ap.add_argument("--src", type=Path, default=None, help="the src folder of another checkout to time")
    args = ap.parse_args()
    if args.src:
        SRC[0] = args.src.resolve()
    with tempfile.TemporaryDirectory(prefix="nightlab-startup-") as tmp:
        lab = args.lab.resolve() if args.lab else make_lab(Path(tmp))
        rows = [("python -c pass", measure([sys.executable, "-c", "pass"], lab, args.runs))]
        for mod in ("sqlalchemy", "optuna"):
            rows.append((f"python -c 'import {mod}'", measure([sys.executable, "-c", f"import {mod}"], lab,
                                                              args.runs)))
        for cmd in COMMANDS:
            rows.append(("nightlab " + " ".join(cmd),
                         measure([sys.executable, "-m", "nightlab", *cmd], lab, args.runs)))
    load = os.getloadavg()
    print(f"{args.runs} runs each after one warm-up; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{os.cpu_count()} CPUs")
    print(f"src: {SRC[0]}")
    print("| command | wall median s | min | max | CPU median s |")
    print("|---|---:|---:|---:|---:|")
    for name, (lo, med, hi, cpu) in rows:
        print(f"| `{name}` | {med:.3f} | {lo:.3f} | {hi:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
