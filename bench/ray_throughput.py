"""Throughput of the Ray executor with 1, 2, 4, 8 concurrent slots of sleep-bound runs.

    python bench/ray_throughput.py [--slots 1,2,4,8] [--rounds 3] [--sleep 2] [--sandbox auto|none]

Starts a local Ray cluster with 8 logical CPUs (``ray.init(num_cpus=8)``: logical CPUs are fine for
sleep-bound work on a 2-core machine), builds a tiny git repo and its ``git archive``, starts the
slots' actors (``RayExecutor(slots=8)``, as the engine does), then for each slot count N runs N
threads that each call ``RayExecutor.run`` ``rounds`` times on the job ``sleep S; echo ---; echo m: 1``
(each job: archive shipped, unpacked, sandboxed run, measured, log back). Reports experiments/second
and the ratio to the ideal N / S.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local cluster on loopback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (sys.path[0], os.environ.get("PYTHONPATH", "")) if p)

from nightlab.executors.ray_executor import RayExecutor, RemoteJob, RemoteResult


def archive(root: Path) -> bytes:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x.invalid",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x.invalid"}
    (root / "lab").mkdir(parents=True)
    (root / "lab" / "train.py").write_text("print('hi')\n" * 200)
    (root / "README.md").write_text("bench\n" * 100)
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "b"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, env=env)
    return subprocess.run(["git", "-C", str(root), "archive", "--format=tar", "HEAD"], check=True, env=env,
                          capture_output=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3, help="experiments per slot")
    ap.add_argument("--sleep", type=float, default=2.0)
    ap.add_argument("--sandbox", default="auto")
    args = ap.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="nl-bench-ray-"))
    tar = archive(tmp / "repo")

    def job(key: str, command: str) -> RemoteJob:
        return RemoteJob(key=key, archive=tar, lab_rel="lab", command=command,
                         env={"PATH": os.environ["PATH"]}, timeout_s=60, kill_grace_s=1,
                         sandbox_mode=args.sandbox, network=False, memory_mb=0, metric={"name": "m"},
                         data_dir=None)

    import ray

    t0 = time.monotonic()
    ray.init(num_cpus=max(slots), include_dashboard=False, log_to_driver=False)
    up = time.monotonic() - t0
    t0 = time.monotonic()
    ex = RayExecutor(slots=max(slots))  # the slots' actors, started as the engine starts them
    print(f"ray {ray.__version__}: local cluster up in {up:.1f} s, {ex.started} slots in "
          f"{time.monotonic() - t0:.1f} s; archive {len(tar)} bytes; sandbox {args.sandbox}")
    print(f"{'slots':>5} {'runs':>5} {'wall_s':>7} {'exp/s':>7} {'ideal':>7} {'ratio':>6} {'lost':>5}")
    cmd = f"sleep {args.sleep:g}; echo ---; echo m: 1"
    try:
        for n in slots:
            results: list[object] = []
            lock = threading.Lock()

            def slot(s: int, n: int = n, results: list[object] = results,
                     lock: threading.Lock = lock) -> None:
                for r in range(args.rounds):
                    res = ex.run(job(f"b{n}/{s}/{r}", cmd), log_path=tmp / f"n{n}" / f"{s}-{r}.log")
                    with lock:
                        results.append(res)

            threads = [threading.Thread(target=slot, args=(s,)) for s in range(n)]
            t = time.monotonic()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.monotonic() - t
            ok = [r for r in results if isinstance(r, RemoteResult) and r.measurement.metric == 1.0]
            rate = len(results) / wall
            ideal = n / args.sleep
            print(f"{n:>5} {len(results):>5} {wall:>7.2f} {rate:>7.3f} {ideal:>7.3f} {rate / ideal:>6.3f} "
                  f"{len(results) - len(ok):>5}")
    finally:
        ex.shutdown()
        ray.shutdown()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
