"""The Ray executor on a real local Ray cluster (``ray.init(num_cpus=2)``, one per module).

Real git (``git archive`` of a real commit), real sandbox (bwrap where the job asks for it),
real worker processes: the worker-death test has the job SIGKILL its own Ray worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nightlab.errors import UsageError
from nightlab.executors.ray_executor import Lost, RayExecutor, RemoteJob, RemoteResult
from nightlab.types import Status

pytestmark = [
    pytest.mark.ray,
    # Ray's own import-time and shutdown noise, not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
METRIC = {"name": "score", "direction": "minimize", "source": "summary", "secondary": ["other"]}


def git_archive(root: Path, files: dict[str, str]) -> bytes:
    """Commit ``files`` in a fresh repo at ``root``; the ``git archive`` tar of that commit."""
    env = {**os.environ, **GIT_ENV}
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=env)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(root), "commit", "-qm", "exp"], check=True, env=env)
    return subprocess.run(["git", "-C", str(root), "archive", "--format=tar", "HEAD"], check=True,
                          env=env, capture_output=True).stdout


def job(tmp_path: Path, command: str, *, files: dict[str, str] | None = None, lab_rel: str = "lab",
        timeout_s: float = 20, mode: str = "auto", metric: dict[str, object] | None = None,
        data_dir: str | None = None, key: str = "t/1") -> RemoteJob:
    files = files or {f"{lab_rel or '.'}/train.py": "print('hi')\n"}
    env = {"PATH": os.environ["PATH"], "NIGHTLAB_SEED": "7"}
    return RemoteJob(key=key, archive=git_archive(tmp_path / "repo", files), lab_rel=lab_rel, command=command,
                     env=env, timeout_s=timeout_s, kill_grace_s=0.5, sandbox_mode=mode, network=False,
                     memory_mb=0, metric=metric or METRIC, data_dir=data_dir)


@pytest.fixture(scope="module")
def executor() -> Iterator[RayExecutor]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield RayExecutor(max_retries=1, unschedulable_s=2)
    finally:
        ray.shutdown()


def test_summary_metric_and_log_come_back(executor: RayExecutor, tmp_path: Path) -> None:
    files = {"lab/train.py": "import os\nprint('training')\nprint('---')\nprint('score: 1.25')\n"
             "print('other:', os.environ['NIGHTLAB_SEED'])\n", "README": "top\n"}
    j = job(tmp_path, "cat ../README && python train.py", files=files)
    log = tmp_path / "head" / "run.log"
    res = executor.run(j, log_path=log)
    assert isinstance(res, RemoteResult), res
    assert res.run.ok and res.run.exit_code == 0
    assert res.run.sandbox == "bwrap"  # "auto" resolved on the worker; bwrap is installed
    assert res.run.log_path == str(log)
    assert res.measurement.metric == 1.25 and res.measurement.secondary == {"other": 7.0}
    assert log.read_text().splitlines()[:2] == ["top", "training"]
    assert res.attempts == 1 and res.node


def test_crash_is_data_with_exit_code_and_log(executor: RayExecutor, tmp_path: Path) -> None:
    res = executor.run(job(tmp_path, "echo boom >&2; exit 3"), log_path=tmp_path / "run.log")
    assert isinstance(res, RemoteResult)
    assert res.run.exit_code == 3 and not res.run.timed_out
    assert res.measurement.metric is None and "no 'score'" in res.measurement.error
    assert (tmp_path / "run.log").read_text() == "boom\n"


def test_timeout_kills_the_tree_on_the_worker(executor: RayExecutor, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    cmd = f"sleep 60 & echo $! > {pids}; setsid sleep 60 & echo $! >> {pids}; wait"
    t0 = time.monotonic()
    res = executor.run(job(tmp_path, cmd, timeout_s=1.5, mode="none"), log_path=tmp_path / "run.log")
    assert isinstance(res, RemoteResult)
    assert res.run.timed_out and res.run.exit_code is None
    assert time.monotonic() - t0 < 15
    for pid in map(int, pids.read_text().split()):
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] in "ZX", pid


def test_json_metric_data_dir_read_only_and_tree_writable(executor: RayExecutor, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "n.txt").write_text("41\n")
    cmd = ('n=$(cat "$NIGHTLAB_DATA_DIR/n.txt"); echo "{\\"score\\": $((n + 1))}" > out.json; '
           'touch "$NIGHTLAB_DATA_DIR/x" 2>/dev/null && echo data-writable; echo done')
    metric = {"name": "score", "source": "json", "file": "out.json"}
    res = executor.run(job(tmp_path, cmd, metric=metric, data_dir=str(data)), log_path=tmp_path / "run.log")
    assert isinstance(res, RemoteResult) and res.run.sandbox == "bwrap"
    assert res.measurement.metric == 42.0, res.measurement
    assert (tmp_path / "run.log").read_text() == "done\n"
    assert not (data / "x").exists()


def test_real_commit_tree_at_root_and_temp_dir_removed(executor: RayExecutor, tmp_path: Path) -> None:
    files = {"a/b/c.txt": "deep\n", "run.sh": "cat a/b/c.txt; echo ---; echo score: $(ls | wc -l)\n"}
    j = job(tmp_path, "sh run.sh; echo $PWD > " + str(tmp_path / "cwd"), files=files, lab_rel="", mode="none")
    res = executor.run(j, log_path=tmp_path / "run.log")
    assert isinstance(res, RemoteResult)
    assert res.measurement.metric == 2.0  # a/ and run.sh: no .git in an archive
    assert (tmp_path / "run.log").read_text().startswith("deep\n")
    workdir = Path((tmp_path / "cwd").read_text().strip())
    assert workdir.name == "tree" and not workdir.exists()


def test_worker_death_is_retried_and_runs_recorded_once(executor: RayExecutor, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    before = executor.workers()
    # First execution: SIGKILL our own Ray worker (the slot actor's process) mid-run.
    cmd = (f"echo $PPID >> {runs}; if [ $(wc -l < {runs}) -eq 1 ]; then kill -9 $PPID; sleep 3; fi; "
           "echo ---; echo score: 3")
    res = executor.run(job(tmp_path, cmd, mode="none"), log_path=tmp_path / "run.log")
    assert isinstance(res, RemoteResult), res
    assert res.attempts == 2 and res.measurement.metric == 3.0
    first, second = (int(p) for p in runs.read_text().split())  # run twice, returned once
    after = executor.workers()
    # Ray restarted the same slot in a new process, and the second attempt ran there
    assert len(after) == len(before) and first in [p for _, p in before]
    assert first != second and second in [p for _, p in after] and first not in [p for _, p in after]


def test_slots_the_cluster_cannot_place_are_given_up_and_jobs_wait_for_a_free_one(tmp_path: Path,
                                                                                  executor: RayExecutor) -> None:
    # the module's executor holds one of the 2 CPUs: of 2 slots asked for, 1 can be placed
    ex = RayExecutor(slots=2, unschedulable_s=3)
    try:
        assert ex.started == 1 and len(ex.workers()) == 1
        # the user is told how many started, how many could not be placed, and what each asks for
        assert ex.placement["unplaced"] == 1 and ex.placement["request"] == "CPU=1"
        msg = ex.placement_message()
        assert "1 of 2 slot(s) started; 1 could not be placed" in msg and "CPU=1" in msg, msg
        results: list[object] = []
        threads = [threading.Thread(target=lambda i=i: results.append(ex.run(
            job(tmp_path / str(i), "sleep 0.5; echo ---; echo score: 2", mode="none", key=f"c/{i}"),
            log_path=tmp_path / f"{i}.log", timeout=60))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        # every job ran, one after the other on the one slot, none bound to a slot that never started
        assert len(results) == 3 and all(isinstance(r, RemoteResult) and r.measurement.metric == 2.0
                                         for r in results), results
        assert len(ex.workers()) == 1
    finally:
        ex.shutdown()


def test_slots_are_started_with_the_executor_and_keep_their_process(tmp_path: Path,
                                                                     executor: RayExecutor) -> None:
    ex = RayExecutor(slots=1, max_retries=0)  # the module's executor holds the cluster's other CPU
    try:
        assert ex.started == 1 and len(ex.workers()) == 1
        (_, pid), = ex.workers()
        outs = [ex.run(job(tmp_path / str(i), "echo $PPID; echo ---; echo score: 1", mode="none", key=f"s/{i}"),
                       log_path=tmp_path / f"{i}.log") for i in range(2)]
        for i, out in enumerate(outs):
            assert isinstance(out, RemoteResult) and out.measurement.metric == 1.0
            assert (tmp_path / f"{i}.log").read_text().split()[0] == str(pid)  # both jobs in the slot's process
            # nightlab was imported when the slot started, not on the job's path; the breakdown adds up
            assert out.timing["import_on_path"] == 0 and out.timing["sandbox"] > 0
            assert set(out.timing) == {"start", "setup", "sandbox", "measure", "home", "import_on_path"}
    finally:
        ex.shutdown()
    assert ex.workers() == []


def test_a_job_waiting_for_a_free_slot_reacts_to_cancel_and_stop_at_once(executor: RayExecutor,
                                                                         tmp_path: Path) -> None:
    ex = RayExecutor(slots=1, poll_s=0.05)  # the module's executor holds the cluster's other CPU
    try:
        marker, release = tmp_path / "running", tmp_path / "release"
        hold = f"touch {marker}; while [ ! -e {release} ]; do sleep 0.05; done; echo ---; echo score: 1"
        first: list[object] = []
        holder = threading.Thread(target=lambda: first.append(ex.run(
            job(tmp_path / "a", hold, mode="none", key="w/a"), log_path=tmp_path / "a.log", timeout=60)))
        holder.start()
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        cancel, stop = threading.Event(), threading.Event()
        waited: dict[str, object] = {}
        waiters = [threading.Thread(target=lambda: waited.__setitem__("cancel", ex.run(
                       job(tmp_path / "b", "echo ran > ran-b", mode="none", key="w/b"), log_path=tmp_path / "b.log",
                       cancel=cancel))),
                   threading.Thread(target=lambda: waited.__setitem__("stop", ex.run(
                       job(tmp_path / "c", "echo ran > ran-c", mode="none", key="w/c"), log_path=tmp_path / "c.log",
                       stopping=stop.is_set)))]
        for t in waiters:
            t.start()
        time.sleep(0.3)
        assert waited == {}  # both wait: the only slot is busy
        cancel.set()
        stop.set()
        for t in waiters:
            t.join(10)
        # both came back while the slot is still busy: never started, interrupted, the log says why
        assert not release.exists() and first == []
        for what, log in (("cancel", "b.log"), ("stop", "c.log")):
            out = waited[what]
            assert isinstance(out, RemoteResult) and out.attempts == 0 and out.run.interrupted, (what, out)
            assert out.run.exit_code is None and out.measurement.metric is None
            assert "stopped before its run" in (tmp_path / log).read_text()
        release.touch()
        holder.join(30)
        assert isinstance(first[0], RemoteResult) and first[0].measurement.metric == 1.0
    finally:
        ex.shutdown()


def test_worker_death_without_retries_left_is_lost(executor: RayExecutor, tmp_path: Path) -> None:
    ex = RayExecutor(max_retries=0)
    cmd = "kill -9 $PPID; sleep 3"
    t0 = time.monotonic()
    res = ex.run(job(tmp_path, cmd, mode="none"), log_path=tmp_path / "run.log")
    assert isinstance(res, Lost) and res.attempts == 1, res
    # the slot actor's process died: Ray says so as ActorDiedError or (its connection cut) ActorUnavailableError
    assert "ActorDiedError" in res.reason or "ActorUnavailableError" in res.reason, res.reason
    assert time.monotonic() - t0 < 30
    assert (tmp_path / "run.log").read_text().startswith("[nightlab] lost:")
    assert Status.LOST.is_failure() and not Status.LOST.was_run()


def test_task_error_is_lost_at_once_not_retried(executor: RayExecutor, tmp_path: Path) -> None:
    res = executor.run(job(tmp_path, "true", metric={"name": "score", "source": "json"}),
                       log_path=tmp_path / "run.log")
    assert isinstance(res, Lost) and res.attempts == 1
    assert "ValidationError" in res.reason and "on " in res.reason, res.reason


def test_unschedulable_job_is_lost_not_hung(tmp_path: Path, executor: RayExecutor) -> None:
    ex = RayExecutor(resources={"no-such-resource": 1}, unschedulable_s=1)
    t0 = time.monotonic()
    res = ex.run(job(tmp_path, "true"), log_path=tmp_path / "run.log")
    assert isinstance(res, Lost) and "no alive node offers" in res.reason
    assert time.monotonic() - t0 < 10


def test_cancel_interrupts_the_run(executor: RayExecutor, tmp_path: Path) -> None:
    cancel = threading.Event()
    started = tmp_path / "started"
    cmd = f"touch {started}; sleep 60"
    h = executor.submit(job(tmp_path, cmd, mode="none"))

    def set_when_started() -> None:
        deadline = time.monotonic() + 20
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        cancel.set()

    threading.Thread(target=set_when_started, daemon=True).start()
    t0 = time.monotonic()
    res = executor.result(h, log_path=tmp_path / "run.log", cancel=cancel)
    assert isinstance(res, RemoteResult) and res.run.interrupted and res.run.exit_code is None
    assert res.measurement.metric is None
    assert time.monotonic() - t0 < 15


def test_without_ray_a_usage_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when it is not installed
    with pytest.raises(UsageError) as e:
        RayExecutor()
    assert "nightlab[ray]" in e.value.fix


def test_progress_lines_stream_home_and_the_cancel_flag_brings_the_partial_log(executor: RayExecutor,
                                                                                tmp_path: Path) -> None:
    script = ("import time\nfor s in range(1, 41):\n    print(f'nightlab: step={s} loss={1 / s}', flush=True)\n"
              "    print('noise', flush=True)\n    time.sleep(0.2)\nprint('---')\nprint('score: 1')\n")
    seen: list[str] = []
    cancel = threading.Event()

    def on_progress(line: str) -> None:
        seen.append(line)
        if len(seen) == 5:  # what the engine's pruner does: judge from the lines, then stop the run
            cancel.set()

    j = job(tmp_path, "python train.py", files={"lab/train.py": script}, mode="none", key="t/progress")
    res = executor.run(j, log_path=tmp_path / "run.log", cancel=cancel, on_progress=on_progress)
    assert isinstance(res, RemoteResult) and res.run.interrupted and res.measurement.metric is None
    steps = [int(line.split()[1].removeprefix("step=")) for line in seen]
    assert steps[:5] == [1, 2, 3, 4, 5] and steps == sorted(steps) and steps[-1] < 40  # in order, stopped early
    log = (tmp_path / "run.log").read_text()  # the task ended by itself: its partial log came home
    assert "nightlab: step=5 " in log and "noise" in log and "---" not in log
