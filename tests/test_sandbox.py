"""The runner's guarantees, tested adversarially with real processes and real bubblewrap."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nightlab import sandbox
from nightlab.errors import SandboxError
from nightlab.sandbox import SandboxPolicy

HAS_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap (bwrap) is not installed on this machine")
MODES = ["none", pytest.param("bwrap", marks=needs_bwrap)]
PY = sys.executable  # visible inside the sandbox through the read-only root
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


def _run(
    cmd: str, wt: Path, mode: str = "bwrap", timeout_s: float = 20, **policy: object
) -> sandbox.RunResult:
    pol = SandboxPolicy(mode=mode, writable=(wt,), **policy)  # type: ignore[arg-type]
    return sandbox.run(cmd, cwd=wt, env=ENV, policy=pol, timeout_s=timeout_s, log_path=wt.parent / "run.log",
                       kill_grace_s=0.5)


def _log(wt: Path) -> str:
    return (wt.parent / "run.log").read_text(errors="replace")


@pytest.fixture
def wt(tmp_path: Path) -> Path:
    d = tmp_path / "wt"
    d.mkdir()
    return d


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory outside /tmp (which the sandbox replaces), so it is visible inside."""
    d = Path(tempfile.mkdtemp(prefix="nightlab-test-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it (it runs no code and holds no resources)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def _host_pid(ns_pid: int, candidates: list[int]) -> int | None:
    """The host pid of a process whose innermost-namespace pid is ``ns_pid``."""
    for pid in candidates:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                return pid
    return None


# --------------------------------------------------------------------------- basic contract


@pytest.mark.parametrize("mode", MODES)
def test_exit_code_and_merged_log_nothing_on_terminal(
    mode: str, wt: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    started: list[int] = []
    pol = SandboxPolicy(mode=mode, writable=(wt,))
    r = sandbox.run("echo to-out; echo to-err >&2; exit 3", cwd=wt, env=ENV, policy=pol, timeout_s=20,
                    log_path=wt.parent / "logs" / "run.log", on_start=started.append)
    assert (r.exit_code, r.timed_out, r.interrupted, r.ok, r.sandbox) == (3, False, False, False, mode)
    assert r.log_path == str(wt.parent / "logs" / "run.log")
    assert Path(r.log_path).read_text().split() == ["to-out", "to-err"]
    assert started and started[0] > 1
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert _run("true", wt, mode).ok


@pytest.mark.parametrize("mode", MODES)
def test_env_is_exactly_env_and_stdin_is_devnull(mode: str, wt: Path) -> None:
    assert "HOME" in os.environ
    r = sandbox.run("cat; env", cwd=wt, env={**ENV, "NIGHTLAB_X": "42"},
                    policy=SandboxPolicy(mode=mode, writable=(wt,)), timeout_s=20, log_path=wt / "log")
    assert r.exit_code == 0
    names = {line.split("=", 1)[0] for line in (wt / "log").read_text().splitlines()}
    assert "NIGHTLAB_X" in names and "HOME" not in names


@pytest.mark.parametrize("mode", MODES)
def test_killed_by_signal_reports_shell_exit_code(mode: str, wt: Path) -> None:
    assert _run("kill -9 $$", wt, mode).exit_code == 128 + signal.SIGKILL


@pytest.mark.parametrize("mode", MODES)
def test_own_session_and_no_controlling_terminal(mode: str, wt: Path) -> None:
    """The command leads its own session (bwrap --new-session; TIOCSTI) and cannot open a tty."""
    # the session leader is visible to the command: its own sh (none) or bwrap's init (bwrap);
    # without --new-session it is the harness-side bwrap, outside the PID namespace (sid 0)
    cmd = 'sid=$(cut -d" " -f6 /proc/$$/stat); echo "sid=$sid"; [ "$sid" != 0 ] && [ -d "/proc/$sid" ]'
    assert _run(cmd, wt, mode).exit_code == 0, _log(wt)
    assert _run(": < /dev/tty", wt, mode).exit_code != 0


def test_cannot_start_raises(tmp_path: Path) -> None:
    with pytest.raises(SandboxError):
        sandbox.run("true", cwd=tmp_path / "missing", env=ENV, policy=SandboxPolicy(mode="none"),
                    timeout_s=5, log_path=tmp_path / "log")
    with pytest.raises(SandboxError):
        sandbox.run("true", cwd=tmp_path, env=ENV, policy=SandboxPolicy(mode="auto"), timeout_s=5,
                    log_path=tmp_path / "log")


@needs_bwrap
def test_missing_bind_path_raises(wt: Path) -> None:
    with pytest.raises(SandboxError, match="does not exist"):
        _run("true", wt, readonly=(wt.parent / "nope",))


# --------------------------------------------------------------------------- killing the tree

TREE = (
    # a child that ignores SIGTERM, and a grandchild that leaves the process group
    "sh -c 'trap \"\" TERM; echo $$ > child.pid; while :; do sleep 0.1; done' & "
    f"{PY} -c 'import os, time; os.setsid(); open(\"gc.tmp\", \"w\").write(str(os.getpid())); "
    "os.rename(\"gc.tmp\", \"gc.pid\"); time.sleep(100)' & "
    "sleep 100"
)


@pytest.mark.parametrize("mode", MODES)
def test_timeout_kills_whole_tree(mode: str, wt: Path) -> None:
    roots: list[int] = []
    tree: dict[str, int] = {}

    def watch() -> None:  # map the pids the tree wrote (namespace pids under bwrap) to host pids
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(tree) < 2:
            if roots and (wt / "child.pid").exists() and (wt / "gc.pid").exists():
                host = list(sandbox._descendants(roots))
                for name in ("child", "gc"):
                    text = (wt / f"{name}.pid").read_text().strip()
                    pid = _host_pid(int(text), host) if text else None
                    if pid is not None:
                        tree[name] = pid
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    pol = SandboxPolicy(mode=mode, writable=(wt,))
    r = sandbox.run(TREE, cwd=wt, env=ENV, policy=pol, timeout_s=1.5, log_path=wt / "log",
                    kill_grace_s=0.5, on_start=roots.append)
    watcher.join()
    assert (r.timed_out, r.exit_code, r.interrupted) == (True, None, False)
    assert 1.5 <= r.wall_s < 5
    assert set(tree) == {"child", "gc"}, f"tree never started: {(wt / 'log').read_text()}"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not all(_dead(p) for p in [*roots, *tree.values()]):
        time.sleep(0.05)
    alive = [p for p in [*roots, *tree.values()] if not _dead(p)]
    assert alive == []


@pytest.mark.parametrize("mode", MODES)
def test_background_stragglers_die_with_the_run(mode: str, wt: Path) -> None:
    r = _run("sleep 30 & echo $! > bg.pid; exit 0", wt, mode)
    assert r.exit_code == 0
    ns_pid = int((wt / "bg.pid").read_text())
    if mode == "none":
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not _dead(ns_pid):
            time.sleep(0.05)
        assert _dead(ns_pid)
    else:  # the namespace is gone: no process on the host is a `sleep 30` started by this test
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _sleepers(wt):
            time.sleep(0.05)
        assert _sleepers(wt) == []


def _sleepers(wt: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and (entry / "cmdline").read_bytes() == b"sleep\x0030\x00"
                    and os.readlink(entry / "cwd") == str(wt) and not _dead(int(entry.name))):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("mode", MODES)
def test_cancel_interrupts_promptly(mode: str, wt: Path) -> None:
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    r = sandbox.run("sleep 30", cwd=wt, env=ENV, policy=SandboxPolicy(mode=mode, writable=(wt,)),
                    timeout_s=30, log_path=wt / "log", kill_grace_s=0.5, cancel=cancel)
    assert (r.interrupted, r.timed_out, r.exit_code) == (True, False, None)
    assert r.wall_s < 2


def test_kill_orphan_checks_start_time() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30"], start_new_session=True,
                            stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.1)
        start = sandbox.proc_start_time(proc.pid)
        assert start is not None
        children = list(sandbox._descendants([proc.pid]))
        assert children
        assert sandbox.kill_orphan(proc.pid, start + 1) is False
        assert sandbox.kill_orphan(proc.pid, None) is False
        assert proc.poll() is None
        assert sandbox.kill_orphan(proc.pid, start) is True
        assert proc.wait(timeout=3) == -signal.SIGKILL
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not all(_dead(c) for c in children):
            time.sleep(0.05)
        assert all(_dead(c) for c in children)
        assert sandbox.proc_start_time(proc.pid) is None
        assert sandbox.kill_orphan(proc.pid, start) is False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("mode", MODES)
def test_memory_limit(mode: str, wt: Path) -> None:
    big = _run(f"{PY} -c 'x = bytearray(1 << 30); print(len(x))'", wt, mode, memory_mb=200)
    assert big.exit_code not in (0, None)
    assert "MemoryError" in _log(wt)
    small = _run(f"{PY} -c 'x = bytearray(16 << 20); print(len(x))'", wt, mode, memory_mb=200)
    assert small.exit_code == 0, _log(wt)
    unlimited = _run(f"{PY} -c 'x = bytearray(300 << 20); print(len(x))'", wt, mode)
    assert unlimited.exit_code == 0, _log(wt)


# --------------------------------------------------------------------------- bwrap confinement


def _connect_cmd(host: str, port: int) -> str:
    return (f"{PY} -c 'import socket, sys\n"
            "try:\n"
            f"    socket.create_connection((\"{host}\", {port}), timeout=2); print(\"CONNECTED\")\n"
            "except OSError as e:\n"
            "    print(\"ERRNO\", e.errno); sys.exit(1)'")


def _host_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outbound interface
        except OSError:
            return None
        ip: str = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


@pytest.mark.parametrize("mode", MODES)
def test_network(mode: str, wt: Path) -> None:
    with socket.socket() as srv:
        srv.bind(("0.0.0.0", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        targets = ["127.0.0.1"] + ([ip] if (ip := _host_ip()) else [])
        for host in targets:
            r = _run(_connect_cmd(host, port), wt, mode)
            if mode == "none":  # control: the listener is reachable without the sandbox
                assert r.exit_code == 0 and "CONNECTED" in _log(wt), _log(wt)
            else:
                assert r.exit_code == 1 and "CONNECTED" not in _log(wt), _log(wt)
        if mode == "bwrap":  # network=True shares the host's network
            assert _run(_connect_cmd("127.0.0.1", port), wt, mode, network=True).exit_code == 0, _log(wt)
    if mode == "bwrap":
        r = _run(_connect_cmd("192.0.2.1", 80), wt, mode)
        assert r.exit_code == 1 and _log(wt).split() == ["ERRNO", "101"]  # ENETUNREACH: no route out


@needs_bwrap
def test_readonly_root_and_no_remount(wt: Path, host_dir: Path) -> None:
    target = host_dir / "victim.txt"
    target.write_text("original")
    assert _run(f"cat {target}", wt).exit_code != 0  # the minimal view: not exposed, not there
    ro = {"readonly": (host_dir,)}
    assert _run(f"cat {target}", wt, **ro).exit_code == 0 and _log(wt) == "original"  # exposed read-only
    assert _run(f"echo evil > {target}", wt, **ro).exit_code != 0
    assert _run(f"touch {host_dir}/new", wt, **ro).exit_code != 0
    assert _run("touch /new-at-root", wt).exit_code != 0  # the sandbox's own root is read-only too
    remount = _run(f"mount -o remount,rw / ; mount -o remount,rw,bind {host_dir} ; "
                   f"echo evil > {target} && exit 0; exit 9", wt, readonly=(host_dir,))
    assert remount.exit_code == 9
    assert "permission denied" in _log(wt).lower()
    assert target.read_text() == "original" and sorted(p.name for p in host_dir.iterdir()) == ["victim.txt"]


@needs_bwrap
def test_worktree_writable_and_tmp_private(wt: Path) -> None:
    name = f"nightlab-probe-{os.getpid()}-{time.monotonic_ns()}"
    r = _run(f"echo made > made.txt && echo x > /tmp/{name} && cat /tmp/{name} && ls /tmp", wt)
    assert r.exit_code == 0, _log(wt)
    assert (wt / "made.txt").read_text() == "made\n"
    assert not Path("/tmp", name).exists()
    assert wt.parent.name not in _log(wt).split()[1:]  # the host's /tmp content is not listed


@needs_bwrap
def test_hidden_and_readonly_rebinds(host_dir: Path) -> None:
    lab = host_dir / "lab"
    (lab / ".nightlab" / "worktrees" / "1" / "holdout").mkdir(parents=True)
    (lab / ".nightlab" / "data").mkdir()
    (lab / ".nightlab" / "secret.txt").write_text("secret")
    (lab / ".nightlab" / "data" / "train.txt").write_text("train")
    (lab / "holdout.csv").write_text("holdout")
    wt = lab / ".nightlab" / "worktrees" / "1"
    (wt / "holdout" / "y.txt").write_text("answers")
    (wt / ".git").write_text("gitdir: elsewhere")
    data = lab / ".nightlab" / "data"

    def go(cmd: str, **policy: object) -> int | None:
        pol = SandboxPolicy(mode="bwrap", writable=(wt,), **policy)  # type: ignore[arg-type]
        r = sandbox.run(cmd, cwd=wt, env=ENV, policy=pol, timeout_s=20, log_path=host_dir / "log")
        return r.exit_code

    hide = {"hidden": (lab / ".nightlab", lab / "holdout.csv", wt / "holdout", lab / "absent"),
            "readonly": (lab, data, wt / ".git")}
    # control: the lab exposed read-only without hiding, everything is readable
    assert go(f"cat {lab}/.nightlab/secret.txt {lab}/holdout.csv holdout/y.txt", readonly=(lab,)) == 0
    assert go(f"cat {lab}/.nightlab/secret.txt", **hide) != 0
    assert go(f"ls -A {lab}/.nightlab | grep -v -x -e worktrees -e data && exit 1 || exit 0", **hide) == 0
    assert go(f"test -s {lab}/holdout.csv", **hide) != 0  # a hidden file reads as empty
    assert go("cat holdout/y.txt", **hide) != 0  # hidden inside the writable worktree stays hidden
    assert go(f"cat {data}/train.txt", **hide) == 0  # re-exposed read-only under a hidden folder
    assert go(f"echo evil > {data}/train.txt", **hide) != 0
    assert go("echo evil > .git", **hide) != 0
    assert go("echo ok > out.txt", **hide) == 0
    assert (wt / "out.txt").read_text() == "ok\n"
    assert (data / "train.txt").read_text() == "train" and (wt / ".git").read_text() == "gitdir: elsewhere"
    assert (lab / ".nightlab" / "secret.txt").read_text() == "secret"


# --------------------------------------------------------------------------- resolve_mode


def _fake_path(tmp_path: Path, bwrap_script: str | None) -> str:
    d = tmp_path / "bin"
    d.mkdir()
    if bwrap_script is not None:
        (d / "bwrap").write_text(bwrap_script)
        (d / "bwrap").chmod(0o755)
    return str(d)


def test_resolve_none_and_unknown() -> None:
    assert sandbox.resolve_mode("none") == "none"
    with pytest.raises(SandboxError):
        sandbox.resolve_mode("sometimes")


def test_resolve_without_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_path(tmp_path, None))
    assert sandbox.resolve_mode("auto") == "none"
    with pytest.raises(SandboxError, match="not on PATH") as e:
        sandbox.resolve_mode("required")
    assert "install bubblewrap" in e.value.fix


def test_resolve_fails_closed_when_bwrap_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = "#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n"
    monkeypatch.setenv("PATH", _fake_path(tmp_path, script))
    for requested in ("auto", "required"):
        with pytest.raises(SandboxError, match="uid map") as e:
            sandbox.resolve_mode(requested)
        assert e.value.fix


@needs_bwrap
def test_resolve_with_working_bwrap() -> None:
    assert sandbox.resolve_mode("auto") == "bwrap"
    assert sandbox.resolve_mode("required") == "bwrap"


# --------------------------------------------------------------------------- tail


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "log"
    assert sandbox.tail(log) == ""
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(5000)) + b"\xff\xfe\x00bin\n")
    t = sandbox.tail(log, lines=3)
    assert t.splitlines()[:2] == ["line 4998", "line 4999"]
    assert t.splitlines()[2].endswith("bin") and "\x00" not in t
    assert len(sandbox.tail(log, lines=10_000, max_bytes=100).encode()) <= 110
    assert sandbox.tail(log, lines=10_000, max_bytes=100).splitlines()[0].startswith("line ")


@needs_bwrap
def test_a_toolchain_under_tmp_stays_visible(tmp_path: Path) -> None:
    """A venv under /tmp (a CI checkout, say) must survive the sandbox's private /tmp."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    tool = venv / "bin" / "nightlab-hello"
    tool.write_text("#!/bin/sh\necho hello-from-tmp\n")
    tool.chmod(0o755)
    wt = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
        r = sandbox.run("nightlab-hello", cwd=wt, env=env, policy=SandboxPolicy(mode="bwrap", writable=(wt,)),
                        timeout_s=10, log_path=wt / "log")
        assert r.exit_code == 0 and "hello-from-tmp" in (wt / "log").read_text()
        # only the toolchain comes back: the rest of the host's /tmp stays private
        (tmp_path / "secret.txt").write_text("s")
        r = sandbox.run(f"cat {tmp_path / 'secret.txt'}", cwd=wt, env=env,
                        policy=SandboxPolicy(mode="bwrap", writable=(wt,)), timeout_s=10, log_path=wt / "log2")
        assert r.exit_code != 0
    finally:
        shutil.rmtree(wt, ignore_errors=True)
