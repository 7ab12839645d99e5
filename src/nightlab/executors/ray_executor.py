"""Run experiments on Ray (``--executor ray``): one long-lived actor per slot, the log and the
measurement brought home.

Contract
--------
The head (the engine's process) builds a :class:`RemoteJob`: the ``git archive`` tar of the
experiment commit, the command, the env and the sandbox settings. ``RayExecutor.submit`` puts it in
Ray's object store once (``ray.put``) and calls ``run`` on a free :class:`Slot`: a Ray actor with the
executor's resource request (``num_cpus``, ``num_gpus``, custom ``resources``) that lives as long as
the executor. The engine starts ``[executor] slots`` of them with the session (``slots=``), so a run
never waits for a Ray worker process to start and import nightlab; more are started when more jobs
run at once. On the worker the slot unpacks the tar into a fresh temp dir, runs the command with
:func:`nightlab.sandbox.run` (the same sandbox guarantees as a local run, bwrap resolved on the
worker), measures it with :func:`nightlab.measure.measure` (the ``[metric]`` spec is re-validated
there), and returns the exit status, the measurement and the last :data:`LOG_CAP` bytes of the log;
the temp dir is always removed. ``RayExecutor.result`` writes that log to the head's ``log_path``
and returns a :class:`RemoteResult` whose ``run.log_path`` is that head path, or a :class:`Lost`.
A crashed or timed-out command is data (a ``RemoteResult``), never an exception.
``RemoteResult.timing`` says where the run went: submit to the slot's first line (``start``), unpack
(``setup``), the command (``sandbox``), ``measure``, the way back (``home``); the engine stores it in
the experiment's evidence (``ray_timing``), with ``archive``: the head's ``git archive`` of the commit
(all of these count in the experiment's ``run`` stage).

Idempotency (Ray runs work at least once)
-----------------------------------------
The worker never writes the ledger, the session branch or anything on the head: a call only
returns a value. The head records each experiment once, from the single value that ``result``
returns, so re-executions (retries) can never create a duplicate row. Each attempt is a separate
actor call named ``nightlab:<job.key>#<attempt>``.

Retries and ``lost``
--------------------
Slots are restarted by Ray (``max_restarts=-1``: wherever their resource request fits, on another
node if theirs died); calls are never retried by Ray (``max_task_retries=0``): a *system* failure
(the slot's process or its node died, the result object was lost, the Ray OOM killer struck) is
resubmitted by the head up to the executor's ``max_retries`` times, each time once the slot answers
again. This counts attempts exactly (``RemoteResult.attempts``) and keeps every attempt bounded.
After the last attempt, or at once for a failure that a retry cannot fix (an exception raised by the
job itself, e.g. bwrap required but missing on that worker), ``result`` returns ``Lost(reason)``; the
engine records status ``lost``. ``result`` never hangs on a cluster that cannot run the job: when no
alive node offers the requested resources for ``unschedulable_s`` seconds (all workers gone),
``Lost`` is returned and that slot removed. A job merely queued behind others on a cluster that
*can* run it waits; pass ``timeout`` to bound that too. ``start`` records how many slots came up and
how many the cluster could not place (``placement``, ``placement_message()``: the engine reports it).

A job beyond the started slots waits on the head for a free one; ``run(cancel=..., stopping=...)`` ends
that wait within ``poll_s`` when the cancel flag is set or a graceful stop is requested: the job never
starts and comes back interrupted with ``attempts == 0``.

Cancel
------
When ``cancel`` is set, the call gets ``ray.cancel``; if it has not ended after ``kill_grace_s + 5``
s the slot's process is killed (``ray.kill``; Ray restarts the slot; under bwrap the sandbox dies
with it). ``result`` returns an interrupted ``RunResult``; the partial log stays on the worker and
is discarded.

Progress and pruning
--------------------
``result(..., on_progress=f)`` streams the run's progress lines (``nightlab: step=N name=value``,
``nightlab.prune``) to the head while it runs, so the engine's pruner watches Ray runs as it watches
local ones. The transport is Ray's own: one :class:`ProgressBoard` actor per executor (``num_cpus=0``,
created on first use). On the worker a thread tails the run's log and calls
``board.exchange(key, new_lines)`` every ``PROGRESS_S``; the head takes the lines with
``board.take(key)`` at each poll and hands them to ``f``, in order (a retried attempt's repeated
steps are the watch's to ignore). With a board, setting ``cancel`` first raises the job's cancel flag
(``board.cancel(key)``, answered by the next ``exchange``): the worker stops the command as a local
cancel does, and the call returns normally, with its partial log, ``interrupted``. Only when it has not
ended after ``kill_grace_s + 5`` s does the head fall back to ``ray.cancel`` as above.

Where the code and the data come from
-------------------------------------
- nightlab must be importable on every worker (the :class:`Slot` class is sent by reference). A local
  cluster (``ray.init()`` from the engine) inherits the head's environment. Nodes started with
  ``ray start`` must run the same Python with nightlab installed (or ``PYTHONPATH`` pointing at it);
  ``init_kwargs={"runtime_env": {...}}`` works too but makes Ray start dedicated workers (slower).
- ``env`` is passed exactly as given (it names the head's interpreter in ``PATH``): all nodes need
  the same paths, as with any Ray cluster built from one image.
- ``data_dir`` (``NIGHTLAB_DATA_DIR``) is bound read-only when it exists *on the worker*. On one
  machine that is the head's own folder. On several machines it must be a shared filesystem mounted
  at the same path on every node (NFS, a cluster FS); nightlab does not copy data to workers. When
  the path is missing on a worker the run sees no such folder and will usually crash (recorded as
  ``crash``, not hidden).
- GPUs: Ray's resources are logical. With ``num_gpus > 0`` a run pins ``CUDA_VISIBLE_DEVICES``
  to the GPU ids Ray assigned its slot, overriding the head's value; with ``num_gpus == 0`` the env is
  left as given (leave ``memory_mb`` at 0 for GPU jobs, see ``sandbox``).

Not covered
-----------
- A worker process or node killed hard (node death, forced cancel) with ``sandbox_mode="none"``
  can leave the command running on that node until it exits by itself: the kill-the-tree logic
  runs in the worker that died. Under bwrap, ``--die-with-parent`` takes the sandbox down with it.
- The unpacked tree is a plain folder, not a git worktree (no ``.git``); commands that call git
  on their own tree do not work remotely.
- ``on_start`` (a pid for ``kill_orphan`` on resume) has no remote counterpart: the pid lives on
  the worker. A head that dies loses its Ray driver, and Ray then kills the driver's actors.
- A slot holds its resources while idle, for the whole session (as a local slot holds its place):
  the cluster's other users see them taken. ``shutdown`` (the session's close) frees them.
- Logs are capped at the last :data:`LOG_CAP` bytes (the summary block is at the end); the head
  notes the truncation in the first line of the log it writes.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nightlab import globs, sandbox
from nightlab.errors import UsageError
from nightlab.measure import measure
from nightlab.spec import MetricSpec
from nightlab.types import Measurement, RunResult
from nightlab.workspace import wipe

LOG_CAP = 1024 * 1024  # bytes of the log's end that travel back to the head
_IMPORTED_AT = time.time()  # when this process imported the module (a worker's import on the task's path?)
PROGRESS_S = 0.25  # how often a worker sends the run's new progress lines (and reads its cancel flag)


@dataclass(frozen=True)
class RemoteJob:
    """One experiment, self-contained, as it travels to a worker."""

    key: str  # idempotency key, e.g. f"{session_tag}/{idx}"
    archive: bytes  # `git archive --format=tar <commit>` of the experiment commit (the whole repo tree)
    lab_rel: str  # the lab folder inside the tree ('' = the root)
    command: str
    env: dict[str, str]  # exactly the run's env (the engine builds it)
    timeout_s: float
    kill_grace_s: float
    sandbox_mode: str  # "bwrap", "none", or "auto"/"required" (resolved on the worker)
    network: bool
    memory_mb: int
    metric: dict[str, Any]  # MetricSpec.model_dump(); re-validated on the worker
    data_dir: str | None  # NIGHTLAB_DATA_DIR: bound read-only where it exists on the worker
    hide: tuple[str, ...] = ()  # globs of lab paths hidden from the run ([sandbox] hide, [holdout] files)
    max_log_bytes: int = 20 * 1024 * 1024  # [run] max_log_mb: the log keeps its head and tail within this


@dataclass(frozen=True)
class RemoteResult:
    run: RunResult  # log_path is the head's local path, where the log was written
    measurement: Measurement
    node: str  # "<hostname>/<ray node id>" of the worker that ran the last attempt
    attempts: int
    timing: dict[str, float] = field(default_factory=dict)  # where the run stage went (see ``_timing``)


@dataclass(frozen=True)
class Lost:
    """The job could not be run to a result (see the module docstring); the engine records ``lost``."""

    reason: str
    attempts: int
    node: str = ""


@dataclass(frozen=True)
class TaskOutput:
    """What the task returns to the head (plain data: picklable, no paths of the worker)."""

    exit_code: int | None
    timed_out: bool
    wall_s: float
    sandbox: str
    interrupted: bool
    measurement: Measurement
    log: bytes
    log_truncated: bool
    node: str = ""
    stamps: dict[str, float] = field(default_factory=dict)  # time.time() on the worker: task, run, exit, out


@dataclass(frozen=True)
class RayHandle:
    """A submitted job: give it back to ``RayExecutor.result``."""

    job: RemoteJob
    ref: Any  # ray.ObjectRef of the first attempt
    submitted_at: float = field(default_factory=time.time)  # wall clock: compared with the worker's stamps
    progress: bool = False  # the task reports progress lines to the executor's ProgressBoard
    job_ref: Any = None  # the job (archive included) in Ray's object store, put once: every attempt reads it
    actor: Any = None  # the Slot actor that runs it (every attempt: Ray restarts a slot that died)


class ProgressBoard:
    """The Ray actor between running tasks and the head: progress lines up, cancel flags down.

    Keyed by ``RemoteJob.key``. One caller per method and key at a time (a Ray actor runs its calls
    one by one), so no lock is needed.
    """

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}
        self.cancelled: set[str] = set()

    def exchange(self, key: str, lines: list[str]) -> bool:
        """From the worker: new progress lines; returns True when the job should stop."""
        if lines:
            self.lines.setdefault(key, []).extend(lines)
        return key in self.cancelled

    def take(self, key: str) -> list[str]:
        """From the head: the lines received since the last call."""
        return self.lines.pop(key, [])

    def cancel(self, key: str) -> None:
        self.cancelled.add(key)

    def forget(self, key: str) -> None:
        self.lines.pop(key, None)
        self.cancelled.discard(key)


# --------------------------------------------------------------------------- the worker side


def _read_tail(path: Path, cap: int) -> tuple[bytes, bool]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - cap))
            return f.read(), size > cap
    except OSError:
        return b"", False


class _Tail:
    """Tails a run's log on the worker; sends its progress lines through ``send`` (True: stop the run)."""

    def __init__(self, log_path: Path, send: Callable[[list[str]], bool], cancel: threading.Event) -> None:
        self.log_path, self.send, self.cancel = log_path, send, cancel
        self._pos, self._partial = 0, b""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nightlab-progress", daemon=True)
        self._thread.start()

    def _lines(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() < self._pos:  # rewritten (a capped log): from the start again
                    self._pos, self._partial = 0, b""
                f.seek(self._pos)
                data = f.read(1 << 20)
        except OSError:
            return []
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [raw.decode("utf-8", "replace") for raw in lines if raw.startswith(b"nightlab:")]

    def _run(self) -> None:
        while not self._done.wait(PROGRESS_S):
            try:
                if self.send(self._lines()):
                    self.cancel.set()
            except Exception:  # the head is gone or busy: the run goes on, its lines come next time
                pass

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        lines = self._lines()
        if self._partial.startswith(b"nightlab:"):
            lines.append(self._partial.decode("utf-8", "replace"))
        with contextlib.suppress(Exception):
            self.send(lines)


def run_job(job: RemoteJob, *, extra_env: dict[str, str] | None = None,
            extra_hidden: tuple[Path, ...] = (), node: str = "",
            progress: Callable[[list[str]], bool] | None = None) -> TaskOutput:
    """Unpack, run sandboxed, measure, clean up. Runs on the worker; needs no Ray.

    ``progress(lines)``, when given, receives the run's new progress lines every :data:`PROGRESS_S`
    while it runs (and the last ones after it ended); when it returns True the run is stopped
    (``interrupted``, as a local cancel).

    Raises ``SandboxError`` when the sandbox cannot start there, ``ValidationError`` for a bad
    metric spec, ``tarfile`` errors for an unsafe archive (absolute paths, links out of the tree).
    """
    stamps = {"task": time.time()}
    metric = MetricSpec.model_validate(job.metric)
    mode = job.sandbox_mode if job.sandbox_mode == "bwrap" else sandbox.resolve_mode(job.sandbox_mode)
    work = Path(tempfile.mkdtemp(prefix="nightlab-ray-"))
    try:
        tree = work / "tree"
        tree.mkdir()
        with tarfile.open(fileobj=io.BytesIO(job.archive), mode="r:") as tar:
            tar.extractall(tree, filter="data")
        lab_root = (tree / job.lab_rel) if job.lab_rel else tree
        lab_root.mkdir(parents=True, exist_ok=True)
        env = dict(job.env)
        env.update(extra_env or {})
        readonly: list[Path] = []
        if job.data_dir:
            env["NIGHTLAB_DATA_DIR"] = job.data_dir
            if Path(job.data_dir).exists():
                readonly.append(Path(job.data_dir))
        # Hide the temp root (other jobs' trees, our own log) and Ray's state (its auth token);
        # the tree itself is re-exposed writable because deeper mounts win.
        hidden = (work.parent, *extra_hidden, *(lab_root / h for h in globs.cover(lab_root, job.hide)))
        policy = sandbox.SandboxPolicy(
            mode=mode, network=job.network, writable=(tree,), readonly=tuple(readonly),
            hidden=tuple(dict.fromkeys(hidden)), memory_mb=job.memory_mb, max_log_bytes=job.max_log_bytes,
        )
        log_path = work / "run.log"
        cancel = threading.Event()
        tail = _Tail(log_path, progress, cancel) if progress is not None else None
        stamps["run"] = time.time()
        try:
            res = sandbox.run(job.command, cwd=lab_root, env=env, policy=policy, timeout_s=job.timeout_s,
                              log_path=log_path, kill_grace_s=job.kill_grace_s, cancel=cancel)
        finally:
            stamps["exit"] = time.time()
            if tail is not None:
                tail.close()
        m = measure(metric, log_path, lab_root)
        log, truncated = _read_tail(log_path, LOG_CAP)
        stamps["out"] = time.time()
        return TaskOutput(res.exit_code, res.timed_out, res.wall_s, res.sandbox, res.interrupted, m, log,
                          truncated, node, stamps)
    finally:
        wipe(Path(work))  # the run's folder: never recursive (a run can nest folders thousands deep)


def _run_here(job: RemoteJob, board: Any = None) -> TaskOutput:
    """A slot's job on its worker: ``run_job`` plus what only Ray knows (node id, assigned GPUs, Ray's
    paths); with ``board`` (a :class:`ProgressBoard` handle), progress lines go up and the cancel flag
    comes down."""
    entered = time.time()
    import ray

    ctx = ray.get_runtime_context()
    extra_env: dict[str, str] = {}
    gpus = ctx.get_accelerator_ids().get("GPU", [])
    if gpus:
        extra_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    hidden = [Path.home() / ".ray"]
    with contextlib.suppress(Exception):  # older Ray: no get_temp_dir; /tmp/ray is under the private /tmp
        hidden.append(Path(ctx.get_temp_dir()))
    node = f"{socket.gethostname()}/{ctx.get_node_id()}"

    def send(lines: list[str]) -> bool:
        return bool(ray.get(board.exchange.remote(job.key, lines), timeout=30))

    try:
        out = run_job(job, extra_env=extra_env, extra_hidden=tuple(hidden), node=node,
                      progress=send if board is not None else None)
        return replace(out, stamps={"enter": entered, "imported": _IMPORTED_AT, **out.stamps})
    except Exception as e:  # one plain, picklable exception type travels back, with a one-line reason
        raise RemoteJobError(f"on {node}: {_brief(e)}") from None


class Slot:
    """One slot's Ray actor: a worker process that lives as long as the executor and runs its jobs one
    at a time. Its Python, Ray and nightlab are loaded when the executor starts, so a job's run begins
    at once (a fresh Ray worker per job imported them on the job's path: README, "Duty cycle and
    throughput")."""

    def ready(self) -> tuple[str, int]:
        """(host, pid) of the slot's worker process."""
        return socket.gethostname(), os.getpid()

    def run(self, job: RemoteJob, board: Any = None) -> TaskOutput:
        return _run_here(job, board)


class RemoteJobError(Exception):
    """The task itself failed on the worker (not the command): no retry, the job is ``Lost``."""


# --------------------------------------------------------------------------- the head side


class RayExecutor:
    """Submit ``RemoteJob``s to a Ray cluster and collect ``RemoteResult``s (or ``Lost``).

    ``address``: ``None`` starts a local cluster (or joins ``RAY_ADDRESS``), ``"auto"`` joins the
    cluster running on this machine, ``"ray://host:port"`` uses Ray Client. If Ray is already
    initialised in this process it is reused as is, and ``shutdown`` leaves it running.
    ``init_kwargs`` go to ``ray.init`` (defaults: no dashboard, worker output not echoed).
    ``slots``: :class:`Slot` actors started now (the engine passes ``[executor] slots``); more are
    started when more jobs run at once. Thread-safe: the engine's slots may call ``run`` concurrently.
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: dict[str, float] | None = None,
        max_retries: int = 2,
        init_kwargs: dict[str, Any] | None = None,
        unschedulable_s: float = 30.0,
        poll_s: float = 0.2,
        slots: int = 0,
    ) -> None:
        if not address:
            # A cluster of our own stays on loopback (Ray otherwise advertises the machine's outward
            # address). Read by Ray when it is first imported; later imports keep Ray's own choice.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError as e:
            raise UsageError("the ray executor needs Ray", fix="pip install 'nightlab[ray]'") from e
        if max_retries < 0:
            raise UsageError(f"max_retries must be >= 0, got {max_retries}", fix="use 0 or more")
        self._ray: Any = ray
        self._owns = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            ray.init(address=address, **kwargs)
            self._owns = True
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = dict(resources or {})
        self.max_retries = max_retries
        self.unschedulable_s = unschedulable_s
        self.poll_s = poll_s
        self._slot_cls = ray.remote(Slot)
        self._idle: list[Any] = []  # Slot actors free for a job
        self._slots: list[Any] = []  # every Slot actor of this executor
        self._pool_lock = threading.Lock()
        self._freed = threading.Condition(self._pool_lock)  # a slot was given back or removed
        self._cap: int | None = None  # the most slots kept (set by ``start``; None: as many as jobs at once)
        self._board: Any = None  # the ProgressBoard actor, created on first use
        self._board_lock = threading.Lock()
        self.placement: dict[str, Any] = {}  # the last ``start``: asked, started, unplaced, request, waited_s
        self.started = self.start(slots) if slots > 0 else 0

    # ------------------------------------------------------------------ slots

    def _new_slot(self) -> Any:
        """A Slot actor with the jobs' resource request (the caller registers it). Ray places it and
        restarts it, wherever the request fits, when its process or node dies (``max_restarts=-1``); a
        job's call is never retried by Ray (``max_task_retries=0``): the head counts and bounds attempts."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": -1,
                                "max_task_retries": 0}
        if self.resources:
            opts["resources"] = self.resources
        return self._slot_cls.options(**opts).remote()

    def start(self, n: int, timeout_s: float | None = None) -> int:
        """Start ``n`` :class:`Slot` actors (and the :class:`ProgressBoard`) and wait, at most
        ``timeout_s`` (default ``unschedulable_s``), until their processes are up with nightlab loaded.

        From then on the executor keeps at most as many slots as came up (``n`` when none did: the
        jobs then wait for the cluster, or are ``Lost`` when no node offers the request): a job
        beyond them waits in ``submit`` for a free slot, as a Ray task waits for a free CPU. Slots that
        Ray could not place in time are given up, so that no job is bound to one that may never start.
        Returns how many came up."""
        t0 = time.monotonic()
        actors = [self._new_slot() for _ in range(n)]
        ping = self._progress_board().take.remote("")
        refs = [a.ready.remote() for a in actors]
        ready, _ = self._ray.wait([*refs, ping], num_returns=n + 1,
                                  timeout=self.unschedulable_s if timeout_s is None else timeout_s)
        came = {r.hex() for r in ready}
        up = [a for a, r in zip(actors, refs, strict=True) if r.hex() in came]
        keep = up or actors
        for a, r in zip(actors, refs, strict=True):
            if up and r.hex() not in came:
                with contextlib.suppress(Exception):
                    self._ray.kill(a, no_restart=True)
        with self._freed:
            self._slots.extend(keep)
            self._idle.extend(keep)
            self._cap = len(self._slots)
            self._freed.notify_all()
        self.placement = {"asked": n, "started": len(up), "unplaced": n - len(up), "request": self.request(),
                          "waited_s": round(time.monotonic() - t0, 3)}
        return len(up)

    def placement_message(self) -> str:
        """One line for the user about the last :meth:`start`: how many slots started, how many the
        cluster could not place and why (each slot's resource request against what the cluster has)."""
        p = self.placement
        if not p:
            return ""
        if not p["unplaced"]:
            return f"Ray: {p['started']} slot(s) started ({p['request']} each) in {p['waited_s']:g} s"
        try:
            have = ", ".join(f"{k}={v:g}" for k, v in sorted(self._ray.cluster_resources().items())
                             if k in ("CPU", "GPU") or k in self.resources)
        except Exception:  # the cluster is gone: the request alone says why
            have = "unknown"
        then = (f"runs beyond {p['started']} at once wait for a free slot" if p["started"] else
                "runs wait for the cluster to offer it, and are lost if no node does")
        return (f"Ray: {p['started']} of {p['asked']} slot(s) started; {p['unplaced']} could not be placed within "
                f"{p['waited_s']:g} s: each slot asks for {p['request']}, the cluster has {have or 'none of it'} "
                f"in all (other actors and tasks hold part of it); {then}")

    def workers(self) -> list[tuple[str, int]]:
        """(host, pid) of each slot's worker process now (waits for slots that are restarting)."""
        with self._pool_lock:
            actors = list(self._slots)
        return list(self._ray.get([a.ready.remote() for a in actors], timeout=60)) if actors else []

    def _acquire(self, cancel: threading.Event | None = None, stopping: Callable[[], bool] | None = None) -> Any:
        """A free slot; a new one while under the cap (none without ``slots``); else wait for one.
        ``None`` when ``cancel`` is set or ``stopping()`` is true while it waits (checked every ``poll_s``)."""
        with self._freed:
            while not self._idle and self._cap is not None and len(self._slots) >= self._cap:
                if (cancel is not None and cancel.is_set()) or (stopping is not None and stopping()):
                    return None
                self._freed.wait(self.poll_s)
            if self._idle:
                return self._idle.pop(0)
            actor = self._new_slot()
            self._slots.append(actor)
            return actor

    def _release(self, actor: Any, drop: bool = False) -> None:
        """Give ``actor`` back to the pool, or (``drop``: it could not be placed) remove it for good."""
        with self._freed:
            if drop:
                with contextlib.suppress(ValueError):
                    self._slots.remove(actor)
            else:
                self._idle.append(actor)
            self._freed.notify()
        if drop:
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)

    # ------------------------------------------------------------------ submit

    def _progress_board(self) -> Any:
        with self._board_lock:
            if self._board is None:  # no CPU: it must not wait for a slot that the jobs hold
                self._board = self._ray.remote(ProgressBoard).options(num_cpus=0).remote()
            return self._board

    def _submit(self, handle: RayHandle, attempt: int) -> Any:
        """Attempt ``attempt`` of ``handle``'s job on its slot (``handle.actor``)."""
        return handle.actor.run.options(name=f"nightlab:{handle.job.key}#{attempt}").remote(
            handle.job_ref, self._progress_board() if handle.progress else None)

    def submit(self, job: RemoteJob, *, progress: bool = False) -> RayHandle:
        """Start the first attempt of ``job`` on a free :class:`Slot` (a new one when none is free);
        returns at once. ``progress``: report progress lines (collect them with ``result(...,
        on_progress=...)``). The job goes to Ray's object store once (``ray.put``); a retried attempt
        reads it from there, the head does not send it again. Every handle must go to ``result``, which
        frees its slot."""
        handle = self._submit_when_free(job, progress, None, None)
        assert handle is not None  # without a cancel it waits for a slot
        return handle

    def _submit_when_free(self, job: RemoteJob, progress: bool, cancel: threading.Event | None,
                          stopping: Callable[[], bool] | None) -> RayHandle | None:
        """``submit``, or ``None`` when ``cancel``/``stopping`` stops the wait for a free slot."""
        actor = self._acquire(cancel, stopping)
        if actor is None:
            return None
        handle = RayHandle(job, None, submitted_at=time.time(), progress=progress, job_ref=self._ray.put(job),
                           actor=actor)
        return replace(handle, ref=self._submit(handle, 1))

    # ------------------------------------------------------------------ result

    def _classify(self, e: BaseException) -> str:
        """"system" (a retry may help), "cancelled", or "error" (a retry will not help)."""
        ex = self._ray.exceptions
        system = (ex.WorkerCrashedError, ex.NodeDiedError, ex.LocalRayletDiedError, ex.ObjectLostError,
                  ex.RaySystemError, ex.OutOfMemoryError, ex.RayActorError, ex.ActorUnavailableError)
        if isinstance(e, ex.TaskCancelledError):
            return "cancelled"
        if isinstance(e, ex.ActorUnschedulableError):
            return "error"
        if isinstance(e, system):
            return "system"
        if isinstance(e, ex.RayTaskError) and isinstance(getattr(e, "cause", None), system):
            return "system"
        return "error"

    def _hostable(self) -> bool:
        """True when some alive node offers the resources the job asks for (totals, not free)."""
        need = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        need = {k: v for k, v in need.items() if v > 0}
        for node in self._ray.nodes():
            have = node.get("Resources", {})
            if node.get("Alive") and all(have.get(k, 0) >= v for k, v in need.items()):
                return True
        return False

    def _cancel(self, ref: Any, actor: Any, grace_s: float) -> None:
        """Stop an attempt: ``ray.cancel`` first; if it has not ended after ``grace_s + 5`` s, kill its
        slot's process (Ray restarts the slot; under bwrap the sandbox dies with it)."""
        ray = self._ray
        try:
            ray.cancel(ref, force=False)
            ready, _ = ray.wait([ref], timeout=grace_s + 5)
            if not ready:
                ray.kill(actor, no_restart=False)
        except Exception:  # already finished or the cluster is gone: nothing left to stop
            pass

    def result(self, handle: RayHandle, *, log_path: Path, timeout: float | None = None,
               cancel: threading.Event | None = None,
               on_progress: Callable[[str], None] | None = None) -> RemoteResult | Lost:
        """Wait for ``handle``'s job: retries system failures, never hangs (see module docstring).

        ``timeout`` bounds the whole wait (queueing included): past it the attempt is stopped and
        ``Lost`` returned. Writes the log to ``log_path`` (parents created) on every outcome.
        ``on_progress(line)`` gets each progress line of a job submitted with ``progress=True``, in
        order, on this thread; such a job is stopped by its cancel flag first (module docstring).
        Frees the job's slot.
        """
        slot = [handle.actor]  # the slot that runs the job (replaced when it is gone for good)
        out: RemoteResult | Lost | None = None
        try:
            out = self._result(handle, slot, log_path, timeout, cancel, on_progress)
            return out
        finally:
            # a slot whose request no node offers is removed (it would hold nothing but a pending actor)
            self._release(slot[0], drop=isinstance(out, Lost) and out.reason.startswith("no alive node"))
            if handle.progress:
                with contextlib.suppress(Exception):
                    self._progress_board().forget.remote(handle.job.key)

    def _result(self, handle: RayHandle, slot: list[Any], log_path: Path, timeout: float | None,
                cancel: threading.Event | None, on_progress: Callable[[str], None] | None) -> RemoteResult | Lost:
        ray = self._ray
        job, ref, attempts, submitted = handle.job, handle.ref, 1, handle.submitted_at
        board = self._progress_board() if handle.progress else None
        soft_until: float | None = None  # the cancel flag is raised: until then the task may end by itself
        # After a system failure the next attempt waits until the slot answers again (Ray restarts it,
        # on another node if its node died): ``ref`` is then the slot's ``ready`` call, not an attempt.
        probing = False

        def drain() -> None:
            if board is None:
                return
            with contextlib.suppress(Exception):  # lines are advisory: a late one is simply not seen
                for line in ray.get(board.take.remote(job.key), timeout=10):
                    if on_progress is not None:
                        on_progress(line)
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        unhostable_since: float | None = None
        next_check = start
        while True:
            try:
                ready, _ = ray.wait([ref], timeout=self.poll_s)
                drain()
                if ready and probing:
                    ray.get(ref)  # raises while the slot is still down
                    probing = False
                    try:
                        ref, submitted = self._submit(replace(handle, actor=slot[0]), attempts), time.time()
                    except Exception as e2:
                        return self._lost(log_path, f"resubmit failed: {_brief(e2)}", attempts)
                    continue
                if ready:
                    return self._deliver(ray.get(ref), job, log_path, attempts, submitted)
            except Exception as e:
                kind = self._classify(e)
                if probing and kind == "system":  # not up yet: ask again (a slot gone for good is replaced)
                    if isinstance(e, ray.exceptions.ActorDiedError):
                        self._release(slot[0], drop=True)
                        slot[0] = self._new_slot()
                    time.sleep(self.poll_s)
                    ref = slot[0].ready.remote()
                    continue
                if kind == "system" and attempts <= self.max_retries:
                    attempts += 1
                    probing, ref = True, slot[0].ready.remote()
                    unhostable_since = None
                    continue
                what = "gave up after" if kind == "system" else "failed on"
                return self._lost(log_path, f"{what} attempt {attempts}: {_brief(e)}", attempts)
            now = time.monotonic()
            if cancel is not None and cancel.is_set() and board is not None and soft_until is None and not probing:
                with contextlib.suppress(Exception):
                    board.cancel.remote(job.key)
                soft_until = now + job.kill_grace_s + 5
            elif cancel is not None and cancel.is_set() and (soft_until is None or now >= soft_until or probing):
                if not probing:
                    self._cancel(ref, slot[0], job.kill_grace_s)
                log_path.write_text("[nightlab] cancelled; the partial log stayed on the Ray worker\n")
                run = RunResult(None, False, time.monotonic() - start, str(log_path), job.sandbox_mode,
                                job.command, interrupted=True)
                return RemoteResult(run, Measurement(None, error="interrupted"), "", attempts)
            if deadline is not None and now >= deadline:
                if not probing:
                    self._cancel(ref, slot[0], job.kill_grace_s)
                return self._lost(log_path, f"no result within {timeout:g} s", attempts)
            if now >= next_check:
                next_check = now + 1.0
                try:
                    hostable = self._hostable()
                except Exception as e:
                    return self._lost(log_path, f"cannot reach the Ray cluster: {_brief(e)}", attempts)
                if hostable:
                    unhostable_since = None
                elif unhostable_since is None:
                    unhostable_since = now
                elif now - unhostable_since >= self.unschedulable_s:
                    return self._lost(log_path, f"no alive node offers {self.request()} for "
                                      f"{self.unschedulable_s:g} s", attempts)

    def run(self, job: RemoteJob, *, log_path: Path, cancel: threading.Event | None = None,
            timeout: float | None = None, on_progress: Callable[[str], None] | None = None,
            stopping: Callable[[], bool] | None = None) -> RemoteResult | Lost:
        """``submit`` then ``result`` (with progress lines when ``on_progress`` is given).

        While the job waits for a free slot, ``cancel`` (or ``stopping()`` turning true: a graceful stop)
        ends the wait within ``poll_s``: the job never starts, and an interrupted ``RemoteResult`` with
        ``attempts == 0`` comes back."""
        t0 = time.monotonic()
        handle = self._submit_when_free(job, on_progress is not None, cancel, stopping)
        if handle is None:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("[nightlab] stopped before its run: it was waiting for a free Ray slot\n")
            run = RunResult(None, False, time.monotonic() - t0, str(log_path), job.sandbox_mode, job.command,
                            interrupted=True)
            return RemoteResult(run, Measurement(None, error="interrupted"), "", 0)
        return self.result(handle, log_path=log_path, cancel=cancel, timeout=timeout, on_progress=on_progress)

    def shutdown(self) -> None:
        """Stop this executor's actors; disconnect from (and stop, when this executor started it) the
        Ray cluster."""
        if self._ray.is_initialized():
            with self._pool_lock:
                actors, self._slots, self._idle = [*self._slots, self._board], [], []
            self._board = None
            for actor in actors:
                if actor is not None:
                    with contextlib.suppress(Exception):
                        self._ray.kill(actor, no_restart=True)
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False

    # ------------------------------------------------------------------ helpers

    def request(self) -> str:
        """Each slot's resource request, e.g. ``CPU=1, GPU=1``."""
        need = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return ", ".join(f"{k}={v:g}" for k, v in need.items() if v > 0) or "no resources"

    def _lost(self, log_path: Path, reason: str, attempts: int) -> Lost:
        log_path.write_text(f"[nightlab] lost: {reason}\n")
        return Lost(reason, attempts)

    def _deliver(self, out: TaskOutput, job: RemoteJob, log_path: Path, attempts: int,
                 submitted: float) -> RemoteResult:
        with open(log_path, "wb") as f:
            if out.log_truncated:
                f.write(f"[nightlab] log truncated to its last {LOG_CAP} bytes on the worker\n".encode())
            f.write(out.log)
        run = RunResult(out.exit_code, out.timed_out, out.wall_s, str(log_path), out.sandbox, job.command,
                        interrupted=out.interrupted)
        return RemoteResult(run, out.measurement, out.node, attempts, _timing(out.stamps, submitted, time.time()))


def _timing(stamps: dict[str, float], submitted: float, home: float) -> dict[str, float]:
    """Where the last attempt's time went, in seconds: ``start`` (submit to the task's first line on the
    worker: scheduling, a worker process, the argument's transfer), ``setup`` (unpack, sandbox policy),
    ``sandbox`` (the command, bwrap's start included), ``measure``, ``home`` (the result's way back and
    the log's write); ``import_on_path`` is 1 when the worker imported nightlab after the submit. Worker
    stamps are the worker's clock: on several machines the split of ``start``/``home`` carries their skew."""
    s = stamps
    if not {"enter", "run", "exit", "out"} <= s.keys():
        return {}
    return {k: round(v, 4) for k, v in {
        "start": s["enter"] - submitted, "setup": s["run"] - s["enter"], "sandbox": s["exit"] - s["run"],
        "measure": s["out"] - s["exit"], "home": home - s["out"],
        "import_on_path": float(s.get("imported", 0.0) > submitted)}.items()}


def _brief(e: BaseException) -> str:
    """One line about an exception: its type and the first line of its message (the cause's, for a
    ``RayTaskError``)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    if isinstance(e, RemoteJobError):
        return str(e)
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {text[0].strip()[:300]}" if text else type(e).__name__


__all__ = [
    "LOG_CAP", "Lost", "ProgressBoard", "RayExecutor", "RayHandle", "RemoteJob", "RemoteJobError", "RemoteResult",
    "TaskOutput", "run_job",
]
