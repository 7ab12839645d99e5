"""The pool worker: fetch the lab at the pool's head, search it locally, submit a claim per keep.

    join("https://pool.example.org", token, dir=Path("pool-work"), researcher="search", seed=3,
         experiments=10, rounds=None)          # `nightlab pool join URL --token T ...`

Each round: ``GET /api/pool/info``; when the head moved (or on the first round), ``GET /api/pool/bundle`` and
clone it into ``<dir>/lab-<head12>`` (the host's snapshot of its head: no holdout, no ``.nightlab/``); run an
ordinary nightlab session there (``python -m nightlab.pool.worker session ...``: the lab's spec with the
worker's researcher, seed and sandbox) and read its ledger while it runs (read-only). Every new keep becomes a
:class:`Claim`: ``parent`` = the pool head, ``diff`` = the kept commit against the snapshot (cumulative,
lab-relative), the claimed metric and samples, the run's log tail, the seed, the hardware, and the run seconds
and count of the experiments since the previous claim. Claims go into a local queue (``<dir>/claims.db``,
SQLite; :mod:`nightlab.pool.client`) before they are sent, so a host that restarts loses none: connection
errors, 5xx and 429 are retried with capped, jittered exponential backoff (honouring ``Retry-After``), a claim
is ``submitted`` only on 200/202, and ``refused`` (with the host's reason) on any other 4xx. The claim id is
``sha256(worker|parent|diff)[:32]``, so a resend is answered with the stored status, never credited twice. A
head that moves during a round stops the session after its experiment in flight (``.nightlab/STOP``); the next
round starts from the new head. After each round the worker prints its leaderboard row.

Nothing here is trusted by the host: it re-runs what it must (docs/pool.md). Nor does the worker trust the
host's spec with its machine: :func:`worker_spec` drops what could reach the worker's secrets.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightlab.errors import NightlabError, UsageError
from nightlab.pool.client import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    Claim,
    ClaimQueue,
    PoolClient,
    Unavailable,
    backoff_s,
    claim_id,
    drain,
    plain,
)

__all__ = ["BACKOFF_BASE_S", "BACKOFF_CAP_S", "Claim", "ClaimQueue", "LabCopy", "PoolClient", "Round", "Unavailable",
           "backoff_s", "claim_id", "drain", "fetch_lab", "hardware", "join", "lab_diff", "open_copy",
           "prune_copies", "queue_left_keeps", "worker_spec"]

POOL_TAG = "pool"  # the worker's local session tag in each lab copy
BUNDLE_BRANCH = "pool"  # the bundle's one branch (refs/heads/pool)
WATCH_S = 0.5  # how often the running session's ledger is read
INFO_EVERY_S = 5.0  # how often the pool head is checked during a round
MAX_LAB_MB = 1024  # default cap on the bundle download and on the lab's checked-out files (--max-lab-mb)


# ---------------------------------------------------------------------------------------------- the lab copy


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "nightlab-pool", "GIT_AUTHOR_EMAIL": "pool@nightlab.invalid",
           "GIT_COMMITTER_NAME": "nightlab-pool", "GIT_COMMITTER_EMAIL": "pool@nightlab.invalid",
           "GIT_TERMINAL_PROMPT": "0"}
    p = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise NightlabError(f"git {' '.join(args[:3])} failed in {cwd}: {p.stderr.strip()[:500]}")
    return p.stdout


@dataclass(frozen=True)
class LabCopy:
    """A local clone of the pool's snapshot of ``head``."""

    repo: Path
    lab: Path  # the folder with nightlab.toml (the repo, or a folder in it)
    head: str  # the pool commit it snapshots (claims name it as parent)
    snapshot: str  # the bundle's commit (claims diff against it)

    @property
    def rel(self) -> str:
        r = self.lab.relative_to(self.repo).as_posix()
        return "" if r == "." else r


HEAD_FILE = "nightlab-pool-head"  # in a copy's .git: the pool commit it snapshots
SHA_RE = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
NEUTRAL_ATTRIBUTES = "* !filter !diff !merge !working-tree-encoding\n"  # a copy's .git/info/attributes


class HostileBundle(NightlabError):
    """The pool's bundle holds what a worker does not accept (see :func:`check_snapshot`)."""


def check_snapshot(repo: Path, max_bytes: int) -> None:
    """Refuse a cloned (not yet checked out) snapshot whose files could reach outside the worker's lab
    copy or fill its disk: a tree over ``max_bytes``, a submodule, a ``.nightlab`` path (the worker's
    own state: ledger, worktrees, STOP file). Symlinks are checked after checkout (:func:`check_links`)."""
    fix = "ask the pool operator: the pool's lab must not hold it"
    total = 0
    out = _git(repo, "ls-tree", "-r", "-l", "-z", "--full-tree", f"refs/heads/{BUNDLE_BRANCH}")
    for rec in out.split("\0"):
        if not rec:
            continue
        meta, path = rec.split("\t", 1)
        mode, _kind, _sha, size = meta.split()
        if mode == "160000":
            raise HostileBundle(f"the pool's bundle holds a submodule ({path}); refused", fix)
        if ".nightlab" in path.split("/"):
            raise HostileBundle(f"the pool's bundle holds {path} (the worker's own state folder); refused", fix)
        total += int(size) if size.isdigit() else 0
        if max_bytes and total > max_bytes:
            raise HostileBundle(f"the pool's lab holds over {max_bytes // 2**20} MiB of files; refused",
                                "ask the pool operator why, or raise --max-lab-mb if you trust the pool")


def check_links(repo: Path) -> None:
    """Refuse a checked-out snapshot with a symlink that resolves outside the lab copy (``~/.ssh``, ``/etc``,
    ``../..``): runs are sandboxed, but the worker's own process (an LLM researcher reading the editable
    files, the guard, the evaluator hash check) follows links. Resolved on disk, so chains count."""
    top = repo.resolve()
    for dirpath, dirnames, filenames in os.walk(repo):
        if ".git" in dirnames and Path(dirpath) == repo:
            dirnames.remove(".git")
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink():
                target = Path(os.path.realpath(p))
                if target != top and top not in target.parents:
                    raise HostileBundle(f"the pool's bundle holds a symlink {p.relative_to(repo)} -> "
                                        f"{os.readlink(p)} that leaves the lab; refused",
                                        "ask the pool operator: the pool's lab must not hold it")


def fetch_lab(client: PoolClient, root: Path, head: str, max_bytes: int = MAX_LAB_MB * 2**20) -> LabCopy:
    """The lab copy for ``head`` under ``root``: reused when present, else cloned from the pool's bundle
    (at most ``max_bytes`` downloaded and checked out; no submodule, ``.nightlab`` or escaping symlink)."""
    if not SHA_RE.fullmatch(head):  # the host's word: never part of a path; the bundle's (checked) head names it
        head = ""
    repo = root / f"lab-{head[:12]}"
    if not head or not (repo / ".git" / HEAD_FILE).is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
        try:
            bundle = tmp / "head.bundle"
            got = client.bundle(bundle, max_bytes)
            if got != head:  # the head moved between info and bundle: take the bundle's
                head, repo = got, root / f"lab-{got[:12]}"
            if not (repo / ".git" / HEAD_FILE).is_file():
                _git(tmp, "clone", "-q", "--no-checkout", "-b", BUNDLE_BRANCH, str(bundle), str(tmp / "repo"))
                _git(tmp / "repo", "remote", "remove", "origin")
                check_snapshot(tmp / "repo", max_bytes)
                # the bundle's .gitattributes must not start a filter, textconv or merge driver of the worker's
                # own git config (git-lfs, whose .lfsconfig would come from the host): info/attributes wins
                (tmp / "repo" / ".git" / "info").mkdir(exist_ok=True)
                (tmp / "repo" / ".git" / "info" / "attributes").write_text(NEUTRAL_ATTRIBUTES)
                _git(tmp / "repo", "-c", "core.symlinks=true", "checkout", "-q", BUNDLE_BRANCH)
                check_links(tmp / "repo")
                (tmp / "repo" / ".git" / HEAD_FILE).write_text(head + "\n")
                if repo.exists():
                    shutil.rmtree(repo)
                (tmp / "repo").rename(repo)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    copy = open_copy(repo)
    if copy is None:
        raise NightlabError(f"the pool's bundle for {head[:12]} holds no nightlab.toml",
                            "ask the pool operator: the pool's lab must have one")
    return copy


def open_copy(repo: Path) -> LabCopy | None:
    """The lab copy in ``repo`` (made by :func:`fetch_lab`), or None when it is not one."""
    try:
        head = (repo / ".git" / HEAD_FILE).read_text().strip()
        snapshot = _git(repo, "rev-parse", f"refs/heads/{BUNDLE_BRANCH}^{{commit}}").strip()
    except (OSError, NightlabError):
        return None
    specs = sorted(repo.rglob("nightlab.toml"), key=lambda p: len(p.parts))
    specs = [p for p in specs if ".nightlab" not in p.parts and ".git" not in p.parts]
    return LabCopy(repo, specs[0].parent, head, snapshot) if specs else None


def prune_copies(root: Path, keep: set[Path]) -> list[Path]:
    """Remove the lab copies under ``root`` not in ``keep`` (a worker that runs all night follows many heads;
    every claim of an old copy is already in ``claims.db``). Returns what was removed."""
    gone = []
    for d in sorted(root.glob("lab-*")):
        if d.is_dir() and re.fullmatch(r"lab-[0-9a-f]{12}", d.name) and d.resolve() not in keep:
            shutil.rmtree(d, ignore_errors=True)
            (root / f"session-{d.name[4:]}.log").unlink(missing_ok=True)
            gone.append(d)
    return gone


def lab_diff(copy: LabCopy, commit: str) -> str:
    """The kept commit's tree against the snapshot, lab-relative, as ``git diff`` prints it."""
    args = ["diff", "--no-color", "--no-ext-diff", "--full-index", "--binary"]
    if copy.rel:
        args.append(f"--relative={copy.rel}")
    return _git(copy.repo, *args, copy.snapshot, commit)


# ---------------------------------------------------------------------------------------------- hardware


def hardware() -> str:
    """platform; CPU model and count; GPU (nvidia-smi, or torch.cuda where a driver is present)."""
    parts = [platform.platform()]
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts.append(f"{cpu + ', ' if cpu else ''}{os.cpu_count()} CPUs")
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5).stdout
            gpus = [ln.split(" (UUID")[0].strip() for ln in out.splitlines() if ln.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    if not gpus and Path("/proc/driver/nvidia").exists():  # a driver but no nvidia-smi: ask torch, if installed
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            try:
                import torch

                if torch.cuda.is_available():
                    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            except Exception:  # a broken torch install only loses the GPU name
                pass
    parts.append("GPU: " + (", ".join(gpus) if gpus else "none"))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- one round


@dataclass
class Round:
    """What one round did (for the rank line and for tests)."""

    head: str
    experiments: int = 0
    keeps: int = 0
    claims: list[str] = field(default_factory=list)
    stopped_for_head: bool = False


def _session_argv(copy: LabCopy, max_experiments: int, resume: bool, researcher: str | None, seed: int,
                  sandbox: str | None, setup_network: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "nightlab.pool.worker", "session", str(copy.lab), str(max_experiments),
            "1" if resume else "0", researcher or "-", str(seed), sandbox or "-",
            "network" if setup_network else "offline"]
    return argv


def _read_experiments(lab: Path) -> tuple[list[Any], str]:
    """The local session's experiments (read-only) and its researcher kind; ([], '') before it exists."""
    from nightlab.ledger_read import open_fast

    reader = open_fast(lab / ".nightlab" / "ledger.db")
    if reader is None:
        return [], ""
    with reader:
        s = reader.get_session(POOL_TAG)
        if s is None:
            return [], ""
        return reader.experiments(s.id), s.researcher


class Watcher:
    """Turns the local session's finished experiments into queued claims, in order, once each."""

    def __init__(self, copy: LabCopy, queue: ClaimQueue, *, worker: str, seed: int, hw: str,
                 limits: dict[str, Any], say: Callable[[str], None]) -> None:
        self.copy, self.queue, self.worker, self.seed, self.hw = copy, queue, worker, seed, hw
        self.limits, self.say = limits, say
        self.key = str(copy.repo)

    def scan(self, rnd: Round) -> None:
        from nightlab.types import Status

        experiments, researcher = _read_experiments(self.copy.lab)
        last, compute_s, count = self.queue.progress(self.key)
        log_cap = int(self.limits.get("max_log_kb", 16)) * 1024
        max_samples = int(self.limits.get("max_samples", 64))
        for e in experiments:
            if e.idx <= last:
                continue
            if not e.status.is_finished():
                break  # in order: wait for it
            compute_s += max(0.0, float(e.run_s or 0.0))
            count += 1
            rnd.experiments += 1
            claim = None
            if e.idx > 0 and e.status is Status.KEEP and e.commit and e.metric is not None:
                rnd.keeps += 1
                diff = lab_diff(self.copy, e.commit)
                if diff.strip():
                    samples = e.evidence.get("samples") if isinstance(e.evidence, dict) else None
                    if not isinstance(samples, list) or not samples:
                        samples = [e.metric]
                    tail = e.log_tail.encode()[-log_cap:].decode(errors="ignore") if log_cap > 0 else ""
                    claim = Claim(
                        claim_id=claim_id(self.worker, self.copy.head, diff), parent=self.copy.head, diff=diff,
                        metric=float(e.metric), samples=tuple(float(x) for x in samples[:max_samples]),
                        log_tail=tail, seed=self.seed, hardware=self.hw, compute_s=round(compute_s, 3),
                        experiments=count, researcher=researcher or e.researcher or "unknown")
            self.queue.record(self.key, e.idx, 0.0 if claim else compute_s, 0 if claim else count, claim)
            if claim is not None:
                compute_s, count = 0.0, 0
                rnd.claims.append(claim.claim_id)
                self.say(f"experiment {e.idx}: keep {e.metric:.6g} -> claim {claim.claim_id[:12]} queued "
                         f"({claim.experiments} experiments, {claim.compute_s:.1f}s)")
            last = e.idx


def queue_left_keeps(root: Path, queue: ClaimQueue, *, worker: str, seed: int, hw: str, limits: dict[str, Any],
                     say: Callable[[str], None]) -> list[str]:
    """Queue the claims of keeps that a previous run made in the lab copies under ``root`` but did not queue
    (it was killed mid-round); returns their ids. Claims already queued are not queued again."""
    ids: list[str] = []
    for repo in sorted(root.glob("lab-*")):
        copy = open_copy(repo)
        if copy is not None:
            rnd = Round(copy.head)
            Watcher(copy, queue, worker=worker, seed=seed, hw=hw, limits=limits, say=say).scan(rnd)
            ids += rnd.claims
    return ids


# ---------------------------------------------------------------------------------------------- join


def _rank_line(me: dict[str, Any]) -> str:
    return (f"rank {me.get('rank', '?')}  {me.get('worker', '?')}: verified gain "
            f"{float(me.get('verified_gain_pct') or 0.0):+.2f}%, accepted {me.get('accepted', 0)}, "
            f"rejected {me.get('rejected', 0)}, pending {me.get('pending', 0)}, "
            f"compute {float(me.get('compute_s') or 0.0):.0f}s, strikes {me.get('strikes', 0)}, "
            f"trust {me.get('trust', '?')}" + ("  QUARANTINED" if me.get("quarantined") else ""))


def _rounds(rounds: int | str | None) -> Iterator[int]:
    if rounds is None or rounds == "forever" or rounds == 0:
        n = 0
        while True:
            n += 1
            yield n
    try:
        total = int(rounds)
    except ValueError:
        raise UsageError(f"--rounds {rounds!r} is not a number", "give a count, or 'forever'") from None
    if total < 0:
        raise UsageError(f"--rounds {total} is negative", "give a count, or 'forever'")
    yield from range(1, total + 1)


def join(url: str, token: str, *, dir: Path | str | None = None, directory: Path | str | None = None,
         researcher: str | None = None, seed: int | None = None, experiments: int = 10,
         rounds: int | str | None = 1, sandbox: str | None = None, drain_timeout_s: float = 600.0,
         setup_network: bool = False, max_lab_mb: int = MAX_LAB_MB,
         say: Callable[[str], None] | None = None, **options: Any) -> list[Round]:
    """Join the pool at ``url`` with ``token`` (``nightlab pool join``); run ``rounds`` rounds (None or
    'forever': until stopped) of ``experiments`` experiments each in ``dir`` (alias ``directory``; default
    ``./nightlab-pool-<host>``) with the worker's ``researcher`` kind (default: the lab's), ``seed`` (default:
    one derived from the worker's name, so that workers do not search the same points) and ``sandbox`` mode
    (default ``required``). The host's ``[run] setup`` runs in that sandbox too, with network only when
    ``setup_network``; the lab (bundle and checked-out files) may be at most ``max_lab_mb`` MiB.
    Returns what each round did. Claims still unsent after the last round are retried for up to
    ``drain_timeout_s`` seconds, then left in ``<dir>/claims.db`` for the next ``join`` with the same dir."""
    say = functools.partial(_say_plain, say or (lambda m: print(m, flush=True)))  # the host's text, escaped
    unknown = {k: v for k, v in options.items() if v is not None}
    if unknown:
        raise UsageError(f"unknown pool join option(s): {', '.join(sorted(unknown))}",
                         "see `nightlab pool join --help`")
    if not token:
        raise UsageError("no pool token given", "pass --token T (from `nightlab pool invite NAME` on the host)")
    if experiments < 1:
        raise UsageError(f"--experiments {experiments} must be at least 1", "give the experiments per round")
    m = re.match(r"^https?://([^/:?#]+)", url)
    if not m:
        raise UsageError(f"{url!r} is not an http(s) URL", "give the pool's URL, e.g. http://127.0.0.1:8766")
    dir = dir if dir is not None else directory
    if dir is None:
        dir = Path.cwd() / ("nightlab-pool-" + re.sub(r"[^A-Za-z0-9._-]", "_", m.group(1)))
    root = Path(dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{os.getpid()}:{time.time_ns()}")
    client = PoolClient(url, token)
    queue = ClaimQueue(root / "claims.db")
    try:
        try:
            info = client.info()
        except Unavailable as e:
            raise UsageError(f"cannot reach the pool at {url} ({e})",
                             "check the URL and that `nightlab pool serve` runs there") from None
        worker = str(info.get("worker") or "")
        if seed is None:
            seed = int(hashlib.sha256(worker.encode()).hexdigest()[:7], 16)
        say(f"joined pool {info.get('pool')!r} at {url} as {worker}: {info.get('metric', {}).get('name')} "
            f"({info.get('metric', {}).get('direction')}), head {str(info.get('head'))[:12]}")
        hw = hardware()
        limits = dict(info.get("limits") or {})
        queue_left_keeps(root, queue, worker=worker, seed=seed, hw=hw, limits=limits, say=say)
        drain(client, queue, say, rng)  # claims a previous run left
        done: list[Round] = []
        copy: LabCopy | None = None
        for n in _rounds(rounds):
            if n > 1:
                info = _wait_for(client, queue, say, rng, client.info)
            head = str(info["head"])
            if copy is None or copy.head != head:
                previous = copy
                copy = _wait_for(client, queue, say, rng,
                                 functools.partial(fetch_lab, client, root, head, int(max_lab_mb) * 2**20))
                prune_copies(root, {c.repo.resolve() for c in (previous, copy) if c is not None})
                say(f"round {n}: lab at pool head {copy.head[:12]} in {copy.repo}")
            rnd = _run_round(client, queue, copy, n, worker=worker, researcher=researcher, seed=seed,
                             experiments=experiments, sandbox=sandbox, setup_network=setup_network, hw=hw,
                             limits=dict(info.get("limits") or {}),
                             say=say, rng=rng)
            done.append(rnd)
            try:
                say(_rank_line(client.me()))
            except Unavailable as e:
                say(f"rank: the pool is unreachable now ({e}); claims stay queued")
        _final_drain(client, queue, say, rng, drain_timeout_s)
        return done
    finally:
        queue.close()
        client.close()


def _say_plain(out: Callable[[str], None], message: str) -> None:
    """``out(message)`` with control characters escaped: names and reasons the host sent reach a terminal."""
    out(plain(message, 100_000))


def _wait_for(client: PoolClient, queue: ClaimQueue, say: Callable[[str], None], rng: random.Random,
              call: Callable[[], Any]) -> Any:
    """``call()``, retried with backoff while the host is unavailable (queued claims are tried meanwhile)."""
    attempts = 0
    while True:
        try:
            return call()
        except Unavailable as e:
            delay = backoff_s(attempts, e.retry_after, rng)
            if attempts == 0 or attempts % 10 == 0:
                say(f"the pool is unavailable ({e}); retrying in {delay:.1f}s")
            attempts += 1
            time.sleep(delay)
            drain(client, queue, say, rng)


def _final_drain(client: PoolClient, queue: ClaimQueue, say: Callable[[str], None], rng: random.Random,
                 timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        drain(client, queue, say, rng)
        nxt = queue.next_due_at()
        if nxt is None:
            return
        if time.monotonic() >= deadline:
            left = queue.counts().get("pending", 0)
            say(f"{left} claim(s) not yet accepted by the pool stay queued in {queue.path}; "
                "`nightlab pool join` with the same --dir sends them")
            return
        time.sleep(min(max(0.05, nxt - time.time()), max(0.05, deadline - time.monotonic()), BACKOFF_CAP_S))


def _run_round(client: PoolClient, queue: ClaimQueue, copy: LabCopy, n: int, *, worker: str,
               researcher: str | None, seed: int, experiments: int, sandbox: str | None, hw: str,
               limits: dict[str, Any], say: Callable[[str], None], rng: random.Random,
               setup_network: bool = False) -> Round:
    rnd = Round(copy.head)
    existing, _ = _read_experiments(copy.lab)
    tried = sum(1 for e in existing if e.idx > 0)
    argv = _session_argv(copy, tried + experiments, bool(existing), researcher, seed, sandbox, setup_network)
    log = copy.repo.parent / f"session-{copy.head[:12]}.log"
    (copy.lab / ".nightlab" / "STOP").unlink(missing_ok=True)  # a stop meant for a session that had ended
    watcher = Watcher(copy, queue, worker=worker, seed=seed, hw=hw, limits=limits, say=say)
    with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(argv, cwd=copy.lab, stdin=devnull, stdout=out, stderr=subprocess.STDOUT)
    next_info = time.monotonic() + INFO_EVERY_S
    try:
        while proc.poll() is None:
            time.sleep(WATCH_S)
            watcher.scan(rnd)
            drain(client, queue, say, rng)
            if not rnd.stopped_for_head and time.monotonic() >= next_info:
                next_info = time.monotonic() + INFO_EVERY_S
                try:
                    head = str(client.info().get("head"))
                except (Unavailable, NightlabError):
                    head = copy.head
                if head != copy.head:
                    rnd.stopped_for_head = True
                    (copy.lab / ".nightlab").mkdir(exist_ok=True)
                    (copy.lab / ".nightlab" / "STOP").write_text(f"the pool head moved to {head}\n")
                    say(f"round {n}: the pool head moved to {head[:12]}; stopping after the experiment in flight")
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    watcher.scan(rnd)
    drain(client, queue, say, rng)
    if proc.returncode not in (0, 130):
        tail = log.read_text(errors="replace")[-2000:]
        raise NightlabError(f"the local session in {copy.lab} failed (exit {proc.returncode}); its log: {log}\n"
                            f"{tail}", "fix the local setup (sandbox, Python packages the lab needs) and rejoin")
    say(f"round {n}: {rnd.experiments} experiments, {rnd.keeps} keeps, {len(rnd.claims)} claims")
    return rnd


# ---------------------------------------------------------------------------------------------- the session process


# researcher options a pool's spec may not set on a worker's machine: they name commands to run outside the
# sandbox, URLs its API keys would go to, or paths outside the lab
_HOST_ONLY_OPTIONS = frozenset({"base_url", "api_key_env", "extra_body", "command", "writable", "env", "model_path",
                                "sandbox"})


def worker_spec(spec: Any, *, researcher: str | None, seed: int, sandbox: str | None) -> Any:
    """The lab's spec as the worker runs it: the pool host is not trusted with the worker's machine either.

    - researcher: the worker's kind (default ``search``) and seed; the host's search space; the host's other
      options only when they cannot run a command, reach a URL or a path of the worker (``_HOST_ONLY_OPTIONS``);
    - sandbox: the worker's ``--sandbox``, else ``required`` (no bwrap: an error, never unsandboxed); runs get
      no network, no host-chosen read-only paths outside the lab, and none of the worker's environment
      (``pass_env``): a run's output goes back to the host in the claims' log tails;
    - executor: local (a host cannot point the worker at its Ray cluster); autonomy: ``auto`` (nobody to ask);
      ``[notify]`` and ``[holdout]`` cleared (the bundle has none; a forged one is ignored)."""
    from nightlab.spec import (
        DEFAULT_AGENT_DENY,
        AutonomySpec,
        HoldoutSpec,
        NotifySpec,
        ResearcherSpec,
    )

    host = spec.researcher.model_dump()
    kind = researcher or "search"
    options: dict[str, Any] = {"kind": kind, "space": host.get("space", {})}
    if kind == host.get("kind"):
        options.update({k: v for k, v in host.items() if k not in _HOST_ONLY_OPTIONS and k not in ("kind", "space")})
    options["seed"] = int(seed)
    mode = sandbox or "required"
    readonly = [p for p in spec.sandbox.readonly
                if not p.startswith(("/", "~")) and ".." not in Path(p).parts]
    perms = spec.permissions.model_copy(update={
        "run_network": False,
        "agent_commands_deny": list(dict.fromkeys([*DEFAULT_AGENT_DENY, *spec.permissions.agent_commands_deny])),
    })
    return spec.model_copy(update={
        "researcher": ResearcherSpec.model_validate(options),
        "sandbox": spec.sandbox.model_copy(update={"mode": mode, "network": False, "readonly": readonly}),
        "run": spec.run.model_copy(update={"pass_env": []}),
        "permissions": perms,
        "executor": spec.executor.model_copy(update={"kind": "local", "address": ""}),
        "autonomy": AutonomySpec(),
        "notify": NotifySpec(),
        "holdout": HoldoutSpec(),
    })


def _session_main(argv: list[str]) -> int:
    """``python -m nightlab.pool.worker session LAB MAX RESUME RESEARCHER SEED SANDBOX SETUP`` (what a round
    runs): an ordinary session, tag ``pool``, of :func:`worker_spec` (the lab's spec as the worker may run it),
    whose ``[run] setup`` runs in the runs' sandbox (SETUP: ``offline`` or ``network``)."""
    from nightlab.console import make_reporter
    from nightlab.engine import Engine, install_signal_handlers
    from nightlab.spec import load_spec

    lab, max_exp, resume, kind, seed, sandbox, setup = (*argv, "offline") if len(argv) == 6 else argv
    spec = worker_spec(load_spec(Path(lab)), researcher=None if kind == "-" else kind, seed=int(seed),
                       sandbox=None if sandbox == "-" else sandbox)
    engine = Engine(lab, tag=POOL_TAG, resume=resume == "1", spec=spec, max_experiments=int(max_exp),
                    reporter=make_reporter(False, True))
    engine.setup_sandbox = "network" if setup == "network" else "offline"
    restore = install_signal_handlers(engine)
    try:
        s = engine.run()
    finally:
        restore()
        engine.close()
    print(f"session {s.tag}: {s.status} ({s.stop_reason}); best {s.incumbent_metric}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (8, 9) and sys.argv[1] == "session":  # SETUP is optional (default: offline)
        try:
            sys.exit(_session_main(sys.argv[2:]))
        except NightlabError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
    print("usage: python -m nightlab.pool.worker session LAB MAX RESUME RESEARCHER SEED SANDBOX [SETUP] "
          "(use `nightlab pool join`)", file=sys.stderr)
    sys.exit(2)
