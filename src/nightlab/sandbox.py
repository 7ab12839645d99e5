"""The runner: execute one experiment command, sandboxed, under a hard timeout.

Contract
--------
``run()`` executes ``command`` through ``/bin/sh -c`` in ``cwd`` with exactly ``env``; stdout and
stderr go, merged, through a pipe to ``log_path`` (never to the terminal), capped at the policy's
``max_log_bytes`` with its head and tail kept (:mod:`nightlab.logcap`); stdin is ``/dev/null``. The command gets
its own session and process group. At ``timeout_s`` (or when ``cancel`` is set) the whole process
tree gets SIGTERM, then SIGKILL after ``kill_grace_s``. A failing command is data (a ``RunResult``),
never an exception; ``SandboxError`` is raised only when the command cannot be started at all.
Exit codes follow the shell: a command killed by signal N reports ``128 + N`` in both modes.

With ``mode="bwrap"`` the command runs under bubblewrap in a minimal read-only view of the host
(``SYSTEM_DIRS``, the ``ETC_ENTRIES`` of /etc, the toolchain, an empty private ``$HOME``, and the
policy's paths; nothing else: a read-only bind would still let ``connect()`` reach a host Unix
socket), private ``/dev``, ``/proc`` and ``/tmp``, new PID/IPC/UTS (and, unless ``network``,
network) namespaces, a new terminal session, all capabilities dropped, bwrap dies with its parent.
``host_root=True`` (the agent researcher only) binds the whole host ``/`` read-only instead.
Mount order: more specific (deeper) paths are mounted after shallower ones so they win; at the
same path ``readonly`` wins over ``writable`` wins over ``hidden``. A data dir under a hidden
folder can thus be re-exposed read-only, and a hidden dir inside a writable worktree stays hidden.

Covered
-------
- No network (``--unshare-net``: only a private loopback; the host's 127.0.0.1 is unreachable).
- No host Unix socket and no host file outside the view (``/run``, ``/var``, ``/home``, ``/root``,
  the lab folder around the worktree); ``$HOME`` is an empty tmpfs; a socket is never bound in.
- Read-only view and root, submounts included; remounting read-write fails (caps dropped).
- Only the ``writable`` paths (the experiment worktree) are writable on the host.
- Private ``/tmp`` and ``/dev/shm`` (tmpfs, gone after the run).
- ``hidden`` paths (the lab's ``.nightlab`` and ``.git``, holdout data) are empty (a hidden file
  cannot be opened).
- Timeouts kill the whole tree: process group + a ``/proc`` walk of descendants (catches children
  that called ``setsid``), and under bwrap the PID namespace with ``--die-with-parent``.
- No keystroke injection into the harness terminal (``--new-session``, TIOCSTI).
- Address-space limit (``RLIMIT_AS``) when ``memory_mb > 0`` (applied with ``ulimit -v`` in a
  wrapper shell inside the sandbox; the command cannot raise it back once caps are dropped).
- No harness file descriptors leak into the command (``close_fds``); stdin is ``/dev/null``.
- ``resolve_mode`` fails closed: bwrap installed but unable to start is an error, not a fallback.
- Orphans: with ``run_id`` every process of the run carries ``NIGHTLAB_RUN_ID``; ``kill_tagged``
  finds them through ``/proc/<pid>/environ`` whatever their parentage (``setsid``, double fork, a
  ``bwrap`` whose parent died before ``--die-with-parent`` took hold: killing it kills its PID
  namespace), at run end and on resume.

Not covered
-----------
- Fork bombs: no cgroup ``pids.max``; ``RLIMIT_NPROC`` does not bind root. A fork bomb is bounded
  only by the PID namespace and the timeout (and may slow the machine until then).
- No cgroup CPU/memory limits: ``RLIMIT_AS`` is per process and counts virtual memory (CUDA and
  some allocators reserve large address ranges, so leave ``memory_mb`` at 0 for GPU jobs); files
  written to the private ``/tmp`` or ``/dev/shm`` count against RAM, not against the limit.
- Disk: the worktree can be filled without bound (the log cannot: ``max_log_bytes``).
- No GPU isolation: NVIDIA/DRI/KFD device nodes present on the host are bound into the sandbox;
  pin devices with ``CUDA_VISIBLE_DEVICES``. (Not yet tested on a GPU machine.)
- Grace under bwrap: when the command's top-level shell exits on SIGTERM, bwrap tears the PID
  namespace down at once, so children that ignore SIGTERM get no grace period there.
- Sockets and secrets inside what is exposed (system folders, the chosen /etc entries, toolchain
  and ``PATH`` folders, ``readonly`` data) are reachable; ``env`` is passed as given (the engine
  builds it from an allowlist, ``nightlab.runenv``). With ``network=True`` abstract sockets and the
  host's loopback are reachable.
- Runs as the harness user (root here) with capabilities dropped, not as an unprivileged uid;
  a kernel exploit escapes. bwrap is not a security boundary against a determined attacker.
- ``mode="none"``: none of the filesystem/network guarantees; only the process-tree kill,
  the timeout, stdin/log redirection, the run-id sweep and ``RLIMIT_AS``. A descendant that leaves
  the tree *and* drops ``NIGHTLAB_RUN_ID`` (``env -i``, or overwriting its environ memory) survives.
- Another user's processes (unreadable environ, EPERM) are neither found nor killed.
- A bwrap setup failure at run time (after the probe passed) shows up as a crashed run whose log
  starts with ``bwrap:``; it is not turned into ``SandboxError`` (the command could fake it).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from nightlab import escape
from nightlab.errors import SandboxError
from nightlab.logcap import DEFAULT_MAX_BYTES as DEFAULT_MAX_LOG_BYTES
from nightlab.logcap import CappedLog
from nightlab.types import RunResult

log = logging.getLogger(__name__)

MODES = ("auto", "required", "none")
_SH = "/bin/sh"
RUN_ID_ENV = "NIGHTLAB_RUN_ID"  # tags every process of a run (inherited through fork and exec)
# Device nodes bound into the sandbox when present, so GPU jobs still see their accelerator.
_GPU_DEVICE_GLOBS = ("nvidia*", "nvidia-caps", "dri", "kfd")


@dataclass(frozen=True)
class SandboxPolicy:
    """How one command is confined. ``mode`` is already resolved (``resolve_mode``)."""

    mode: str  # "bwrap" or "none"
    network: bool = False  # bwrap: --unshare-net unless True
    writable: tuple[Path, ...] = ()  # bound read-write at the same path (the experiment worktree)
    readonly: tuple[Path, ...] = ()  # bound read-only at the same path; wins over writable/hidden
    hidden: tuple[Path, ...] = ()  # an empty tmpfs over each; paths that do not exist are skipped
    memory_mb: int = 0  # RLIMIT_AS for the command when > 0
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES  # the log keeps its head and tail within this (nightlab.logcap)
    # bwrap: False (runs, evaluators, holdout checks): a minimal view -- system folders, chosen /etc
    # entries, the toolchain and the paths above, nothing else of the host. True: the whole host
    # file system read-only (the agent researcher, which needs its CLI and its config).
    host_root: bool = False


# --------------------------------------------------------------------------- mode resolution

_probe_cache: dict[str, str | None] = {}  # bwrap path -> None (works) or the error text
_probe_lock = threading.Lock()


def _probe(bwrap: str) -> str | None:
    """Start ``bwrap <our flags> /bin/sh -c true``; None when it works, else the reason. Cached."""
    with _probe_lock:
        if bwrap not in _probe_cache:
            argv = [bwrap, *_bwrap_args(SandboxPolicy(mode="bwrap"), Path("/")), _SH, "-c", "true"]
            try:
                p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
                err = None if p.returncode == 0 else (
                    f"exit {p.returncode}: {p.stderr.decode(errors='replace').strip()[:500]}")
            except (OSError, subprocess.TimeoutExpired) as e:
                err = str(e)
            _probe_cache[bwrap] = err
        return _probe_cache[bwrap]


def resolve_mode(requested: str) -> str:
    """Turn the spec's ``sandbox`` setting into ``"bwrap"`` or ``"none"``.

    ``auto``: bwrap when on PATH; installed but unable to start -> ``SandboxError`` (fail closed);
    absent -> ``"none"`` with a warning. ``required``: bwrap must exist and start, else
    ``SandboxError``. ``none`` -> ``"none"``. The probe runs once per bwrap binary per process.
    """
    if requested not in MODES:
        raise SandboxError(f"unknown sandbox mode {requested!r}", fix=f"use one of {', '.join(MODES)}")
    if requested == "none":
        return "none"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if requested == "required":
            raise SandboxError(
                "sandbox = \"required\" but bubblewrap (bwrap) is not on PATH",
                fix="install bubblewrap (apt install bubblewrap / dnf install bubblewrap), "
                "or set sandbox = \"none\" if you trust the researcher",
            )
        log.warning("bubblewrap (bwrap) not found: experiments run UNSANDBOXED (sandbox = \"none\")")
        return "none"
    err = _probe(os.path.realpath(bwrap))
    if err is not None:
        raise SandboxError(
            f"bubblewrap is installed ({bwrap}) but cannot start a sandbox: {err}",
            fix="allow unprivileged user namespaces (Ubuntu 24.04: an AppArmor profile for bwrap, or "
            "sysctl kernel.apparmor_restrict_unprivileged_userns=0; Docker: --security-opt "
            "seccomp=unconfined or --privileged), or set sandbox = \"none\" explicitly",
        )
    return "bwrap"


# --------------------------------------------------------------------------- bwrap arguments


_PRIVATE_ROOTS = (Path("/tmp"), Path("/dev/shm"))
# The host's system folders, bound read-only (a top-level symlink such as /bin -> usr/bin on a
# merged-/usr system is recreated as the same symlink). /sys holds no sockets; CUDA, NCCL, hwloc
# and OpenBLAS read the hardware layout there.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/sys")
# What of /etc a program needs: users and groups (not shadow), name service and the hosts file
# (localhost), time zone, locale, the dynamic linker's cache and config (CUDA's ld.so.conf.d entry),
# Debian's alternatives (targets of /usr/bin links), TLS roots, OS release, MIME and magic tables,
# fonts (matplotlib), GPU vendor files, the system Python's config. Not /etc as a whole: it holds
# secrets root can read (ssh host keys, shadow, docker and cloud configs).
ETC_ENTRIES = (
    "passwd", "group", "nsswitch.conf", "host.conf", "hosts", "resolv.conf", "gai.conf", "protocols",
    "services", "networks", "localtime", "timezone", "locale.alias", "locale.conf", "ld.so.cache",
    "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl", "ca-certificates", "ca-certificates.conf", "pki",
    "crypto-policies", "os-release", "lsb-release", "debian_version", "redhat-release", "system-release",
    "mime.types", "magic", "magic.mime", "fonts", "matplotlibrc", "OpenCL", "vulkan", "glvnd",
    "python3", "python3.*",
)


_ETC_RE = re.compile("|".join(fnmatch.translate(p) for p in ETC_ENTRIES))


def _plain_entry(path: Path) -> bool:
    """A file or folder (after symlinks): never a socket, FIFO or device bound in by accident."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _under(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or inside it (both absolute and normalised)."""
    p, r = str(path), str(root)
    return p == r or p.startswith(r if r.endswith("/") else r + "/")


def _broad(path: Path, home: Path | None) -> bool:
    """``/``, or ``$HOME`` or one of its ancestors: never bound whole as a toolchain folder."""
    return path == Path("/") or (home is not None and _under(home, path))


def toolchain_paths(env: dict[str, str], avoid: Iterable[Path] = ()) -> list[Path]:
    """Folders of the interpreter and the commands on ``PATH`` that a run needs, outside /usr.

    ``sys.prefix``, ``sys.base_prefix``, the folder of the real ``sys.executable``,
    ``VIRTUAL_ENV``, and each ``PATH`` entry -- an entry ``X/bin`` brings ``X`` when ``X`` is a
    virtualenv or conda prefix (``pyvenv.cfg`` / ``conda-meta``), else only itself; an entry ``X/shims``
    (pyenv, rbenv, asdf) brings ``X``, whose scripts and versions the shims run; each
    ``LD_LIBRARY_PATH`` folder (CUDA images put driver libraries there). Folders already
    under a system folder, missing ones, ``/``, ``$HOME`` or its ancestors, and ancestors of an
    ``avoid`` path (the run's folder: the lab folder around it stays out) are left out (a ``PATH``
    entry ``~`` does not expose the home folder). They are bound back read-only; under
    ``/tmp`` or ``/dev/shm`` (a CI checkout) they come back over the private tmpfs.
    """
    cands = [Path(sys.prefix), Path(sys.base_prefix), Path(os.path.dirname(os.path.realpath(sys.executable)))]
    if env.get("VIRTUAL_ENV"):
        cands.append(Path(env["VIRTUAL_ENV"]))
    for entry in env.get("PATH", "").split(os.pathsep):
        if entry and os.path.isabs(entry):
            p = Path(entry)
            prefix = p.parent
            is_prefix = (prefix / "pyvenv.cfg").exists() or (prefix / "conda-meta").is_dir()
            # X/shims (pyenv, rbenv, asdf): the shims exec X's own scripts and versions
            cands.append(prefix if (p.name == "bin" and is_prefix) or p.name == "shims" else p)
    cands += [Path(e) for e in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if os.path.isabs(e)]
    home = Path(os.path.realpath(env["HOME"])) if env.get("HOME", "").startswith("/") else None
    system = [Path(os.path.realpath(d)) for d in SYSTEM_DIRS]
    away = [Path(os.path.realpath(a)) for a in avoid]
    out: list[Path] = []
    for c in cands:
        real = Path(os.path.realpath(c))
        if (not real.is_dir() or real in out or _broad(real, home) or any(_under(a, real) for a in away)
                or any(_under(real, d) for d in system if d.is_dir())):
            continue
        out.append(real)
    return [p for p in out if not any(q != p and _under(p, q) for q in out)]  # nested ones add nothing


def _system_view() -> tuple[list[str], list[Path]]:
    """bwrap arguments for the system folders and the chosen /etc entries, and the paths they show."""
    args: list[str] = []
    shown: list[Path] = []
    for d in SYSTEM_DIRS:
        p = Path(d)
        if p.is_symlink():
            target = os.readlink(p)
            if _plain_entry(p):
                args += ["--symlink", target, d]
        elif p.is_dir():
            args += ["--ro-bind", d, d]
            shown.append(p)
    try:
        names = sorted(e.name for e in os.scandir("/etc"))
    except OSError:
        names = []
    for name in filter(_ETC_RE.fullmatch, names):
        p = Path("/etc", name)
        if not _plain_entry(p):
            continue
        if p.is_symlink() and any(_under(Path(os.path.realpath(p)), d) for d in shown):
            args += ["--symlink", os.readlink(p), str(p)]  # into a bound system folder: no mount needed
        else:
            args += ["--ro-bind", str(p), str(p)]
            shown.append(p)
    args += ["--symlink", "../proc/self/mounts", "/etc/mtab"]
    return args, shown


def _mounts(policy: SandboxPolicy, extra_readonly: list[Path] | None = None,
            shown: list[Path] | None = None, home: Path | None = None) -> list[str]:
    """The hidden/writable/readonly mounts, deeper paths last; same path: readonly wins.

    ``shown`` (the minimal view): the host paths visible anyway; a hidden path outside every
    visible path is skipped (nothing to hide, and its name would appear). ``home``: an empty
    tmpfs over it, so the run has a writable home that holds nothing of the host's.
    """
    entries: list[tuple[int, int, str, list[str]]] = []
    visible: list[Path] = list(shown or [])
    for path in extra_readonly or []:
        entries.append((len(path.parts), 2, str(path), ["--ro-bind", str(path), str(path)]))
        visible.append(path)
    exposed = [Path(os.path.realpath(p)) for p in (*policy.writable, *policy.readonly, *(extra_readonly or []))]
    if home is not None and not any(_under(home, e) for e in exposed):  # never over part of an exposed path
        entries.append((len(home.parts), 0, str(home), ["--tmpfs", str(home)]))
    for rank, flag, paths in ((1, "--bind", policy.writable), (2, "--ro-bind", policy.readonly)):
        for p in paths:
            path = Path(os.path.realpath(p))
            if not path.exists():
                raise SandboxError(f"sandbox path does not exist: {p}",
                                   fix="create it before the run, or drop it from the policy")
            if not _plain_entry(path):
                raise SandboxError(f"sandbox path is not a file or folder: {p}",
                                   fix="expose regular files and folders only (a socket is a way out)")
            entries.append((len(path.parts), rank, str(path), [flag, str(path), str(path)]))
            visible.append(path)
    for p in policy.hidden:
        path = Path(os.path.realpath(p))
        if shown is not None and not any(_under(path, v) for v in visible):
            continue
        if path.is_dir():
            entries.append((len(path.parts), 0, str(path), ["--tmpfs", str(path)]))
        elif path.exists():  # a file: cover it with an empty read-only one
            entries.append((len(path.parts), 0, str(path), ["--ro-bind", "/dev/null", str(path)]))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    return [a for e in entries for a in e[3]]


def _gpu_devices() -> list[str]:
    args: list[str] = []
    for pattern in _GPU_DEVICE_GLOBS:
        for dev in sorted(Path("/dev").glob(pattern)):
            args += ["--dev-bind", str(dev), str(dev)]
    return args


def _home(env: dict[str, str]) -> Path | None:
    """The run's ``$HOME``, when it is a folder of its own (not /, a system or a private folder)."""
    raw = env.get("HOME", "")
    if not raw.startswith("/"):
        return None
    home = Path(os.path.normpath(raw))
    special = [Path(d) for d in (*SYSTEM_DIRS, "/proc", "/dev", "/etc")]
    if any(_under(Path(d), home) for d in (*special, *_PRIVATE_ROOTS)):
        return None  # / or an ancestor of what the view needs
    if any(_under(home, d) for d in special) and not _under(home, Path("/dev/shm")):
        return None
    return home  # under /tmp too: a tmpfs over the private /tmp's mount point


def _bwrap_args(policy: SandboxPolicy, cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    """bwrap flags (without the bwrap binary and the command); see docs/sandbox.md."""
    env = env or {}
    if policy.host_root:
        root, shown, home = ["--ro-bind", "/", "/"], None, None
    else:
        root, shown = _system_view()
        home = _home(env)
    args = [
        *root,
        "--dev", "/dev",
        *_gpu_devices(),
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--tmpfs", "/dev/shm",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
    ]
    if not policy.network:
        args.append("--unshare-net")
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    args += _mounts(policy, toolchain_paths(env, avoid=[cwd, *policy.writable]), shown, home)
    if not policy.host_root:
        args += ["--remount-ro", "/"]
    args += ["--chdir", str(cwd)]
    return args


def _argv(command: str, cwd: Path, policy: SandboxPolicy, env: dict[str, str] | None = None) -> list[str]:
    if policy.memory_mb > 0:
        # A wrapper shell sets RLIMIT_AS (soft and hard) then execs the real one: no preexec_fn,
        # so spawning stays safe in a threaded harness. 125: the limit could not be set.
        sh = [_SH, "-c", 'ulimit -v "$1" || exit 125; exec /bin/sh -c "$2"', "nightlab-run",
              str(policy.memory_mb * 1024), command]
    else:
        sh = [_SH, "-c", command]
    if policy.mode == "none":
        return sh
    if policy.mode != "bwrap":
        raise SandboxError(f"unresolved sandbox mode {policy.mode!r}", fix="call resolve_mode() first")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("bubblewrap (bwrap) is not on PATH", fix="install bubblewrap")
    return [bwrap, *_bwrap_args(policy, cwd, env), "--", *sh]


# --------------------------------------------------------------------------- process tree


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/pid/stat (index 0 is the state), or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].decode().split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/pid/stat`` (start time in clock ticks since boot); None if gone."""
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def _alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def _descendants(roots: Iterable[int]) -> dict[int, int]:
    """pid -> start time of every live descendant of ``roots`` (roots excluded), from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(entry.name))
        starts[int(entry.name)] = int(f[19])
    found: dict[int, int] = {}
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = starts[child]
                stack.append(child)
    return found


def _signal(pid: int, start: int | None, sig: int) -> None:
    """Send ``sig`` to ``pid`` only if it is still the process that started at ``start``."""
    if start is not None and proc_start_time(pid) != start:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _killpg(pgid: int, sig: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():
        return
    # PermissionError: a group member we may not signal; the tree walk still covers ours.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_tree(root: int, known: dict[int, int], *, include_root: bool, rounds: int = 5) -> None:
    """SIGKILL the group of ``root`` and every descendant of ``root`` and of ``known``.

    Repeats the walk so children forked during the kill are caught too. ``known`` is updated.
    """
    for _ in range(rounds):
        if include_root:
            _killpg(root, signal.SIGKILL)
        found = _descendants([root, *known])
        new = {p: s for p, s in found.items() if p not in known}
        known.update(found)
        for pid, start in known.items():
            _signal(pid, start, signal.SIGKILL)
        if not new:
            break


def _exited(pid: int) -> bool:
    """True once ``pid`` (our child) has exited; it stays a zombie (not reaped) so its pid and
    process group id cannot be reused while we clean up."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid == pid


def _wait_exit(pid: int, deadline: float, cancel: threading.Event | None) -> str:
    """Wait until the process exits ("exit"), ``deadline`` passes ("timeout") or ``cancel`` is set.

    The wait sleeps on a pidfd (Linux 5.3+), which wakes it the moment the process exits (it is not
    reaped: :func:`_exited`), and looks at ``cancel`` and the deadline every 50 ms; without a pidfd
    it polls, from 0.5 ms up to every 50 ms (measured: ~20 ms late on average for a 0.2 s run).
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    poller = None
    if fd >= 0:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
    delay = 0.0005
    try:
        while True:
            if _exited(pid):
                return "exit"
            if cancel is not None and cancel.is_set():
                return "cancel"
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if poller is not None:
                poller.poll(math.ceil(1000 * min(0.05, deadline - now)))
            else:
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.05)
    finally:
        if fd >= 0:
            os.close(fd)


def _terminate(proc: subprocess.Popen[bytes], sandboxed: bool, grace_s: float) -> None:
    """SIGTERM the tree, wait ``grace_s`` for it to exit, then SIGKILL the tree."""
    pid = proc.pid
    known = _descendants([pid])
    if not sandboxed:
        _killpg(pid, signal.SIGTERM)
        _signal(pid, None, signal.SIGTERM)
    # Under bwrap, TERM goes to the sandboxed processes only: killing bwrap itself first would
    # SIGKILL its namespace at once and leave the command no grace.
    for child, start in known.items():
        _signal(child, start, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not (_exited(pid) and not any(map(_alive, known))):
        time.sleep(0.01)
    known.update(_descendants([pid, *known]))
    _signal(pid, None, signal.SIGKILL)
    _kill_tree(pid, known, include_root=True)


# --------------------------------------------------------------------------- run


def run(
    command: str,
    *,
    cwd: Path,
    env: dict[str, str],
    policy: SandboxPolicy,
    timeout_s: float,
    log_path: Path,
    kill_grace_s: float = 3.0,
    on_start: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Run ``command`` under ``policy``; see the module docstring for the contract.

    ``on_start(pid)`` is called right after spawn (the pid of ``/bin/sh`` or of ``bwrap``; record
    it with ``proc_start_time`` for ``kill_orphan``). Returns ``exit_code=None`` with
    ``timed_out=True`` at the timeout, or with ``interrupted=True`` when ``cancel`` was set.

    ``run_id`` tags every process of the run: it is added to the environment as
    ``NIGHTLAB_RUN_ID`` (after any filtering of ``env``: nightlab's own variable always passes), and
    when the command ends every process still carrying it is killed (:func:`kill_tagged`, one
    ``/proc`` sweep, ~5 ms per 100 processes; skipped under bwrap, whose PID namespace is gone
    already), so background children that left the process group go too. Record it (the ledger) *before*
    calling: a harness killed mid-run is cleaned up on resume by that tag.
    """
    if run_id:
        env = {**env, RUN_ID_ENV: run_id}
    cwd = Path(cwd)
    argv = _argv(command, cwd, policy, env)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    out = CappedLog(log_path, policy.max_log_bytes)
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out.write_fd, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    except OSError as e:
        out.close()
        raise SandboxError(f"cannot start the command: {e}",
                           fix="check that the working directory exists and /bin/sh is present") from e
    out.start()
    try:
        if on_start is not None:
            on_start(proc.pid)
        outcome = _wait_exit(proc.pid, started + timeout_s, cancel)
        if outcome == "exit":
            # Stragglers left in the command's process group (background jobs) go with it.
            _killpg(proc.pid, signal.SIGKILL)
        else:
            _terminate(proc, policy.mode == "bwrap", kill_grace_s)
    except BaseException:
        _kill_tree(proc.pid, {}, include_root=True)
        proc.wait()
        if run_id:
            kill_tagged({run_id})
        raise
    finally:
        out.close()
    code = proc.wait()
    if run_id and policy.mode != "bwrap":  # (under bwrap, nothing outlives the PID namespace)
        kill_tagged({run_id})  # stragglers that left the group (setsid, double fork) carry the tag
    wall = time.monotonic() - started
    if outcome != "exit":
        return RunResult(None, outcome == "timeout", wall, str(log_path), policy.mode, command,
                         interrupted=outcome == "cancel")
    return RunResult(128 - code if code < 0 else code, False, wall, str(log_path), policy.mode, command)


# --------------------------------------------------------------------------- logs and orphans


def tail(log_path: Path, lines: int = 50, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a log (at most ``max_bytes`` read), escaped (nightlab.escape); "" if absent."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = escape.text(data)  # bytes that are not UTF-8 as \xNN, NUL as \x00: storable anywhere
    if size > max_bytes and "\n" in text:  # drop the partial first line
        text = text.split("\n", 1)[1]
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def kill_orphan(pid: int, start_time: int | None) -> bool:
    """Kill a run left behind by a harness that died (resume).

    Acts only if ``pid`` is alive and started at ``start_time`` (pid reuse guard; ``None`` never
    matches): SIGKILLs its process group (when it leads one, as ``run`` arranges) and every
    descendant. Returns True when something was killed.
    """
    if start_time is None or not _alive(pid) or proc_start_time(pid) != start_time:
        return False
    known = _descendants([pid])
    try:
        leads_group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return False
    _signal(pid, start_time, signal.SIGSTOP)  # no more forking while we walk
    _kill_tree(pid, known, include_root=leads_group)
    _signal(pid, start_time, signal.SIGKILL)
    return True


_RUN_ID_KEY = RUN_ID_ENV.encode() + b"="


def run_id_of(pid: int) -> str | None:
    """The ``NIGHTLAB_RUN_ID`` in ``/proc/<pid>/environ`` (the environment it was exec'd with).

    None when it has none, is gone, a zombie (empty environ), or not ours to read.
    """
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone, or EACCES/EPERM (another user's process without the rights)
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    key = _RUN_ID_KEY
    i = data.find(key)  # the first entry that starts with the key (a sweep reads every process's: no split)
    while i > 0 and data[i - 1] != 0:
        i = data.find(key, i + 1)
    if i < 0:
        return None
    end = data.find(b"\0", i)
    return data[i + len(key):end if end >= 0 else len(data)].decode("utf-8", "replace")


def _protected_pids() -> set[int]:
    """This process and its ancestors: never killed by a tag sweep (a nested harness)."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        f = _stat_fields(pid)
        pid = int(f[1]) if f else 0
    out.add(1)
    return out


def find_tagged(run_ids: Callable[[str], bool] | Iterable[str]) -> dict[int, int]:
    """pid -> start time of every live process on the machine whose environment carries a
    matching ``NIGHTLAB_RUN_ID`` (a set of ids, or a predicate), plus all their descendants
    (which may have changed their environment). Zombies, this process and its ancestors are
    left out. Processes we may not read (another user's, without root) are not found.
    """
    match = run_ids if callable(run_ids) else set(run_ids).__contains__
    skip = _protected_pids()
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        rid = run_id_of(pid)
        if rid is None or not match(rid):
            continue
        f = _stat_fields(pid)
        if f is not None and f[0] not in ("Z", "X"):
            found[pid] = int(f[19])
    if found:
        for pid, start in _descendants(found).items():
            if pid not in skip and _alive(pid):
                found.setdefault(pid, start)
    return found


def kill_tagged(run_ids: Callable[[str], bool] | Iterable[str], *, settle_s: float = 5.0) -> dict[int, int]:
    """SIGKILL every process :func:`find_tagged` finds, until a sweep finds none alive.

    Each sweep SIGSTOPs what it found (no more forking while we kill), then SIGKILLs it (pid reuse
    guarded by the start time); children forked meanwhile are caught by the next sweep. Killing a
    ``bwrap`` kills its PID namespace (its init dies), whatever the processes inside did to their
    environment. Races are handled: a process that exits between the scan and the signal is
    skipped; one we may not signal (EPERM) is left and reported by the caller's next scan.
    Returns pid -> start time of everything signalled; waits up to ``settle_s`` for them to go.
    """
    ids = run_ids if callable(run_ids) else set(run_ids)
    if not callable(ids) and not ids:
        return {}
    killed: dict[int, int] = {}
    deadline = time.monotonic() + settle_s
    delay = 0.001
    while True:
        found = find_tagged(ids)
        for pid, start in found.items():
            with contextlib.suppress(PermissionError):
                _signal(pid, start, signal.SIGSTOP)
        for pid, start in found.items():
            with contextlib.suppress(PermissionError):
                _signal(pid, start, signal.SIGKILL)
        killed.update(found)
        if not found or time.monotonic() >= deadline:
            return killed
        time.sleep(delay)  # a SIGKILLed process needs a moment to become a zombie
        delay = min(delay * 2, 0.05)


__all__ = ["RUN_ID_ENV", "SandboxPolicy", "find_tagged", "kill_orphan", "kill_tagged", "proc_start_time",
           "resolve_mode", "run", "tail"]
