"""The sandbox's minimal file-system view, attacked with real listening Unix sockets and real bwrap.

A read-only bind does not stop ``connect()`` to a Unix socket on it, so the only defence is that
the host's sockets are not in the run's view at all (issue 11, item 4).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nightlab import sandbox
from nightlab.sandbox import SandboxPolicy

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
HOME = Path(os.path.expanduser("~"))
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(HOME), "LC_ALL": "C"}

PROBE = """\
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        print("CONNECTED", path)
    except OSError as e:
        print("refused", path, e.errno)
    finally:
        s.close()
"""


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)  # connect() completes against the backlog; nobody needs to accept
    return s


@pytest.fixture
def lab() -> Iterator[Path]:
    """A lab folder outside /tmp (the sandbox's /tmp is private anyway) with a worktree and data."""
    d = Path(tempfile.mkdtemp(prefix="nightlab-view-", dir="/var/tmp"))
    (d / ".nightlab" / "worktrees" / "1").mkdir(parents=True)
    (d / ".nightlab" / "data").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _policy(lab: Path, **kw: object) -> SandboxPolicy:
    wt = lab / ".nightlab" / "worktrees" / "1"
    return SandboxPolicy(mode="bwrap", writable=(wt,), readonly=(lab / ".nightlab" / "data",),
                         hidden=(lab / ".nightlab",), **kw)  # type: ignore[arg-type]


def _probe(lab: Path, paths: list[Path], policy: SandboxPolicy) -> dict[str, str]:
    wt = lab / ".nightlab" / "worktrees" / "1"
    (wt / "probe.py").write_text(PROBE)
    log = lab / "probe.log"
    cmd = " ".join([sys.executable, "probe.py", *map(str, paths)])
    r = sandbox.run(cmd, cwd=wt, env=ENV, policy=policy, timeout_s=30, log_path=log)
    text = log.read_text()
    assert r.exit_code == 0, text
    return {line.split()[1]: line.split()[0] for line in text.splitlines() if line.split()[:1] in (["CONNECTED"],
                                                                                                  ["refused"])}


@needs_bwrap
def test_host_unix_sockets_are_unreachable(lab: Path) -> None:
    tag = f"nightlab-test-{os.getpid()}"
    hostile = [
        Path("/run") / f"{tag}.sock",  # where docker.sock, D-Bus and systemd live
        Path("/var/tmp") / tag / "agent.sock",
        HOME / f".{tag}" / "ssh-agent.sock",  # an ssh-agent in $HOME
        lab / "lab.sock",  # the lab folder outside the worktree
        lab / ".nightlab" / "worktrees" / "other.sock",  # next to the run's own worktree
        Path("/etc") / f"{tag}.sock",  # reachable only if /etc were exposed whole
    ]
    exposed = lab / ".nightlab" / "data" / "exposed.sock"  # inside a path the run is given: reachable
    listeners = [_listen(p) for p in [*hostile, exposed]]
    try:
        # control: the listeners are real, and without bwrap the run reaches every one
        plain = _probe(lab, [*hostile, exposed], SandboxPolicy(mode="none"))
        assert set(plain.values()) == {"CONNECTED"} and len(plain) == len(hostile) + 1, plain
        got = _probe(lab, [*hostile, exposed], _policy(lab))
        for p in hostile:
            assert got[str(p)] == "refused", (p, got)
        # the probe does detect reachability under bwrap: a socket in exposed data is reached
        assert got[str(exposed)] == "CONNECTED"
        # the evaluator's shape (nothing writable, the worktree read-only) sees no more
        wt = lab / ".nightlab" / "worktrees" / "1"
        pol = SandboxPolicy(mode="bwrap", readonly=(wt, lab / ".nightlab" / "data"), hidden=(lab / ".nightlab",))
        (wt / "probe.py").write_text(PROBE)
        log = lab / "eval.log"
        sandbox.run(" ".join([sys.executable, "probe.py", *map(str, hostile)]), cwd=wt, env=ENV, policy=pol,
                    timeout_s=30, log_path=log)
        assert log.read_text().count("refused") == len(hostile), log.read_text()
    finally:
        for s, p in zip(listeners, [*hostile, exposed], strict=True):
            s.close()
            p.unlink(missing_ok=True)
        shutil.rmtree(Path("/var/tmp") / tag, ignore_errors=True)
        shutil.rmtree(HOME / f".{tag}", ignore_errors=True)


@needs_bwrap
def test_home_secrets_are_not_readable_and_home_is_private(lab: Path) -> None:
    tag = f".nightlab-test-ssh-{os.getpid()}"
    key = HOME / tag / "id_ed25519"
    key.parent.mkdir()
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY----- host-secret")
    wt = lab / ".nightlab" / "worktrees" / "1"
    try:
        log = lab / "home.log"
        made = f"{tag}-made"
        cmd = (f"cat {key}; echo rc=$?; ls -A \"$HOME\"; echo made > \"$HOME/{made}\" && echo home-writable;"
               " cat /etc/shadow /etc/ssh/ssh_host_ed25519_key; echo etc=$?; ls /")
        r = sandbox.run(cmd, cwd=wt, env=ENV, policy=_policy(lab), timeout_s=30, log_path=log)
        out = log.read_text()
        assert r.exit_code == 0, out
        assert "host-secret" not in out and "rc=1" in out, out
        lines = out.splitlines()
        assert tag not in lines, out  # the home holds nothing of the host's (only toolchain mount points)
        assert "home-writable" in out and not (HOME / made).exists()  # writable, private, gone after
        assert "etc=1" in out
        top = set(lines[lines.index("etc=1") + 1:])
        for absent in ("run", "var", "srv", "mnt", "media", "boot", "opt", "home"):
            if HOME.parts[1] != absent and Path(sys.prefix).parts[1] != absent and lab.parts[1] != absent:
                assert absent not in top, (absent, top)
        # a control: mode none reads it (the file is real and readable)
        r = sandbox.run(f"cat {key}", cwd=wt, env=ENV, policy=SandboxPolicy(mode="none"), timeout_s=30,
                        log_path=log)
        assert "host-secret" in log.read_text()
    finally:
        shutil.rmtree(key.parent, ignore_errors=True)


@needs_bwrap
def test_the_interpreter_and_numpy_still_work(lab: Path) -> None:
    """The minimal view still holds the interpreter, its venv and compiled extensions."""
    pytest.importorskip("numpy")
    wt = lab / ".nightlab" / "worktrees" / "1"
    log = lab / "py.log"
    code = "import numpy, ssl, json, locale, getpass; print(numpy.ones(3).sum(), getpass.getuser())"
    cmd = f"{sys.executable} -c '{code}'"
    r = sandbox.run(cmd, cwd=wt, env=ENV, policy=_policy(lab), timeout_s=60, log_path=log)
    assert r.exit_code == 0 and log.read_text().split()[0] == "3.0", log.read_text()


@needs_bwrap
def test_exposing_a_socket_directly_is_refused(lab: Path) -> None:
    sock = lab / "direct.sock"
    s = _listen(sock)
    try:
        wt = lab / ".nightlab" / "worktrees" / "1"
        with pytest.raises(sandbox.SandboxError, match="not a file or folder"):
            sandbox.run("true", cwd=wt, env=ENV, policy=SandboxPolicy(mode="bwrap", writable=(wt,), readonly=(sock,)),
                        timeout_s=10, log_path=lab / "x.log")
    finally:
        s.close()


def test_toolchain_paths_never_expose_home_or_the_lab(tmp_path: Path) -> None:
    home = tmp_path / "home"
    venv = home / "proj" / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (home / "bin").mkdir()
    (home / "lab").mkdir()
    (home / ".pyenv" / "shims").mkdir(parents=True)
    (tmp_path / "cuda" / "lib64").mkdir(parents=True)
    env = {"HOME": str(home), "PATH": f"{home}:{venv / 'bin'}:{home / 'bin'}:{home / 'lab'}:/usr/bin:/:"
           f"{home / '.pyenv' / 'shims'}", "LD_LIBRARY_PATH": str(tmp_path / "cuda" / "lib64")}
    got = sandbox.toolchain_paths(env, avoid=[home / "lab" / ".nightlab" / "wt"])
    assert venv in got and home / "bin" in got  # a venv prefix whole; a plain bin folder alone
    assert home / ".pyenv" in got and tmp_path / "cuda" / "lib64" in got  # shims bring their root
    assert home not in got and tmp_path not in got and Path("/") not in got and Path("/usr/bin") not in got
    assert home / "lab" not in got  # an ancestor of the run's folder: the lab stays out


# --------------------------------------------------------------------------- through the engine

PROBE_MAIN = PROBE.replace("for path in sys.argv[1:]:", "for path in open('socks.txt').read().split():")


@needs_bwrap
def test_runs_evaluators_and_holdout_checks_reach_no_host_socket(make_lab) -> None:
    """The engine's real policies: the run, the protected evaluator and the holdout check."""
    from tests.conftest import SPEC

    from nightlab.engine import Engine
    from nightlab.researchers.scripted import ScriptedResearcher
    from nightlab.types import Status

    tag = f"nightlab-eng-{os.getpid()}"
    spec = SPEC.replace('protected = ["evaluate.py"]', 'protected = ["evaluate.py", "holdout.py"]').replace(
        "[metric]", '[evaluate]\ncommand = "python evaluate.py"\noutputs = []\n\n'
        '[holdout]\ncommand = "python holdout.py"\n\n[metric]')
    score = "print('---')\nprint('score: 1.0')\n"
    lab = make_lab(files={"target.py": PROBE_MAIN + score, "evaluate.py": PROBE_MAIN + score,
                          "holdout.py": PROBE_MAIN + score, "socks.txt": ""}, spec=spec)
    hostile = [Path("/run") / f"{tag}.sock", HOME / f".{tag}.sock", lab / "lab.sock",
               lab / ".nightlab" / "lab-state.sock", Path("/var/tmp") / f"{tag}.sock"]
    (lab / ".nightlab").mkdir(exist_ok=True)
    listeners = [_listen(p) for p in hostile]
    try:
        # committed, so every worktree's socks.txt lists them
        (lab / "socks.txt").write_text("\n".join(map(str, hostile)) + "\n")
        from tests.conftest import commit_all

        commit_all(lab, "sockets to try")
        step = {"rationale": "same again", "files": {"target.py": PROBE_MAIN + score + "# again\n"}}
        eng = Engine(lab, tag="s", researcher=ScriptedResearcher([step]), sandbox_mode="required",
                     max_experiments=1)
        session = eng.run()
        base = eng.ledger.experiments(session.id)[0]
        assert base.status is Status.KEEP and base.trust == "evaluator", base.reason
        folder = lab / ".nightlab" / "artifacts" / "s" / str(base.idx)
        for name in ("run.log", "evaluate.log", "holdout.log"):
            text = (folder / name).read_text()
            assert "CONNECTED" not in text and text.count("refused") == len(hostile), (name, text)
        eng.close()
    finally:
        for s, p in zip(listeners, hostile, strict=True):
            s.close()
            p.unlink(missing_ok=True)
