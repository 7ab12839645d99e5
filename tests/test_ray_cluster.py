"""The Ray executor against a real multi-node cluster on 127.0.0.1 whose worker nodes we kill.

``ray start --head --num-cpus 0`` plus two ``ray start --address`` worker nodes with one CPU each,
all started by this module in their own process groups, with their own ``--temp-dir`` and ports;
teardown SIGKILLs exactly those groups (never ``ray stop``, which would stop every Ray on the host).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nightlab.executors.ray_executor import Lost, RayExecutor, RemoteJob, RemoteResult

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

SRC = str(Path(__file__).resolve().parents[1] / "src")
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1])


# A loopback address Ray does not rewrite (it replaces 127.0.0.1 with the machine's outward address).
NODE_IP = "127.0.0.2"


@dataclass
class Cluster:
    root: Path
    port: int
    env: dict[str, str]
    groups: dict[str, int] = field(default_factory=dict)  # node name -> process group of its daemons

    def start(self, name: str, *args: str) -> None:
        ports = [f"--{opt}={_free_port()}" for opt in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")]
        argv = [RAY, "start", "--node-ip-address", NODE_IP, "--temp-dir", str(self.root / name),
                "--disable-usage-stats", *ports, *args]
        with open(self.root / f"{name}.out", "wb") as out:
            # A new session: every daemon of this node keeps this process group, so one killpg
            # kills the node (raylet, its workers, its agents) and nothing else on the host.
            p = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True)
            self.groups[name] = p.pid
            rc = p.wait(timeout=120)
        if rc != 0:
            raise RuntimeError(f"ray start {name} failed: {(self.root / f'{name}.out').read_text()[-2000:]}")

    def kill(self, name: str) -> None:
        pgid = self.groups.pop(name)
        if _pgid_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Token auth (Ray's default; the token is ~/.ray/auth_token). A driver given an explicit address
    # must have RAY_AUTH_MODE=token before Ray reads its config (at import), as a user's shell would.
    # On a fresh machine there is no token yet and `ray start` refuses to start (CI on a clean machine saw
    # it): made first, as a user does, with `ray get-auth-token --generate` (a no-op when there is one,
    # e.g. made by an earlier test's local Ray, whose token this process may have cached).
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    already = "ray" in sys.modules
    ray = pytest.importorskip("ray")
    if already:  # another module imported Ray first: refresh its cached config, as Ray itself does
        ray._raylet.Config.initialize("")
    root = Path(tempfile.mkdtemp(prefix="nlr", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {**os.environ, "PYTHONPATH": SRC, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # several nodes; they stay on loopback by NODE_IP
    c = Cluster(root, _free_port(), env)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=True)
    try:
        c.start("head", "--head", "--port", str(c.port), "--num-cpus", "0", "--include-dashboard=false",
                f"--dashboard-port={_free_port()}")
        for w in ("w1", "w2"):
            c.start(w, "--address", f"{NODE_IP}:{c.port}", "--num-cpus", "1")
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for name in list(c.groups):
            c.kill(name)
        mp.undo()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _job(tmp_path: Path, key: str, command: str) -> RemoteJob:
    archive = _tar(tmp_path)
    return RemoteJob(key=key, archive=archive, lab_rel="", command=command,
                     env={"PATH": os.environ["PATH"]}, timeout_s=120, kill_grace_s=0.5, sandbox_mode="none",
                     network=False, memory_mb=0, metric={"name": "score"}, data_dir=None)


def _tar(tmp_path: Path) -> bytes:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x.invalid"}
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "run.sh").write_text("echo ---; echo score: 5\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    return subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "HEAD"], check=True, env=env,
                          capture_output=True).stdout


def _node_running(cluster: Cluster, runs: Path, n: int, timeout: float = 60) -> tuple[str, int, int]:
    """Wait for the n-th execution to record itself; (name of its node, its shell, its Ray worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = runs.read_text().splitlines() if runs.exists() else []
        if len(lines) >= n:
            sh, worker = map(int, lines[n - 1].split())
            pid = worker
            for _ in range(4):  # the Ray worker leads its own group; its raylet is in the node's
                pgid = os.getpgid(pid)
                name = next((name for name, g in cluster.groups.items() if g == pgid), None)
                if name is not None:
                    return name, sh, worker
                pid = _ppid(pid)
            raise AssertionError(f"the worker of execution {n} is on no node this test started")
        time.sleep(0.1)
    raise AssertionError(f"execution {n} never started")


def _kill_node(cluster: Cluster, node: str, sh: int, worker: int) -> None:
    """Node death: its Ray worker (which leads its own process group), then the node's daemons, then
    the orphaned command (sandbox "none": nothing takes it down)."""
    os.kill(worker, signal.SIGKILL)
    cluster.kill(node)
    os.killpg(sh, signal.SIGKILL)


# The command records "<its pid> <its Ray worker's pid>" per execution; the first one waits to be killed.
CMD = "echo $$ $PPID >> {runs}; if [ $(wc -l < {runs}) -eq 1 ]; then sleep 60; fi; sh run.sh"


def test_killed_worker_node_is_retried_elsewhere_and_returns_once(cluster: Cluster, tmp_path: Path) -> None:
    ex = RayExecutor(address=f"{NODE_IP}:{cluster.port}", max_retries=1, unschedulable_s=5)
    runs = tmp_path / "runs"
    h = ex.submit(_job(tmp_path, "s/1", CMD.format(runs=runs)))
    node, sh, worker = _node_running(cluster, runs, 1)
    _kill_node(cluster, node, sh, worker)
    t0 = time.monotonic()
    res = ex.result(h, log_path=tmp_path / "run.log", timeout=120)
    assert isinstance(res, RemoteResult), res
    assert res.attempts == 2 and res.measurement.metric == 5.0
    assert len(runs.read_text().splitlines()) == 2  # executed twice, returned once
    assert _node_running(cluster, runs, 2)[0] != node
    assert time.monotonic() - t0 < 90


def test_killed_last_worker_node_is_lost_in_bounded_time(cluster: Cluster, tmp_path: Path) -> None:
    ex = RayExecutor(address=f"{NODE_IP}:{cluster.port}", max_retries=1, unschedulable_s=5)
    runs = tmp_path / "runs"
    h = ex.submit(_job(tmp_path, "s/2", CMD.format(runs=runs)))
    node, sh, worker = _node_running(cluster, runs, 1)
    assert not [n for n in cluster.groups if n not in ("head", node)], "the previous test left a node"
    _kill_node(cluster, node, sh, worker)
    t0 = time.monotonic()
    res = ex.result(h, log_path=tmp_path / "run.log", timeout=120)
    assert isinstance(res, Lost), res
    assert "no alive node offers CPU=1" in res.reason
    assert res.attempts == 2
    assert time.monotonic() - t0 < 90
    assert len(runs.read_text().splitlines()) == 1
