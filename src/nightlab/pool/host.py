"""The host's shared state (:class:`PoolHost`) and the claim intake rules (:meth:`PoolHost.intake`).

One :class:`PoolHost` per ``nightlab pool serve``: the HTTP router (api.py) and the claim feeder (feeder.py)
both hold it. Intake never runs a worker's code; it only decides what a claim is worth running:

1. size caps (``[pool] max_diff_kb``, ``max_log_kb``, ``max_samples``) -> 413;
2. the same ``claim_id`` of the same worker -> the stored claim (idempotent, never credited twice);
3. ``max_pending`` claims of this worker waiting -> 429;
4. the parent must be a commit (not a tree or a tag) of the pool branch's history, and the diff must apply on
   it (``git apply``, as the verification applies it) -> else 422;
5. the diff's paths, then what git applying it actually changes (modes included), are guarded like a local
   candidate's (protected, holdout, outside the editable files, ``..``/absolute/``.git``/``.nightlab`` paths,
   symlinks, submodules: ``rejected`` and a strike; ``max_new_files``/``max_diff_bytes``: ``rejected``);
6. the same normalised diff claimed before (by anyone) -> ``duplicate`` (credited to the first only);
7. a claim of a new best is always ``queued`` for a host run; any other is queued with the worker's
   spot-check probability (:func:`trust.check_probability`), else ``credited`` for its compute, unverified.
"""

from __future__ import annotations

import random
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.events import EventSink, NullSink
from nightlab.guard import Guard, diff_paths
from nightlab.ledger import Ledger
from nightlab.permissions import rule_of
from nightlab.pool import store, trust
from nightlab.pool.snapshot import Snapshots
from nightlab.spec import Spec, load_spec
from nightlab.types import Session
from nightlab.workspace import _GIT_CFG, Change, Workspace

SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
STRIKE_RULES = ("protected", "path", "editable", "file_type")  # guard rules a worker breaks on purpose


# files git itself reads from a checkout: a worker's one could start the host's filters (git-lfs with a
# worker's .lfsconfig URL), textconv or merge drivers, or add a submodule, even where [files] editable is "*"
GIT_FILES = frozenset({".gitattributes", ".gitmodules", ".lfsconfig", ".gitignore", ".mailmap"})


def git_file_problem(changes: list[Change]) -> str | None:
    for ch in changes:
        if ch.path.rsplit("/", 1)[-1].lower() in GIT_FILES:
            return f"path ({ch.path}: git's own files are off limits to a pool claim)"
    return None


@dataclass(frozen=True)
class Intake:
    """What intake made of a claim: the HTTP code and the stored claim (or an error text)."""

    code: int
    claim: store.Claim | None = None
    error: str = ""
    retry_after: int = 0


class PoolHost:
    """The pool of one lab: its session tag, branch, ledger, guard, snapshots, audit sink. Thread-safe."""

    def __init__(self, lab_dir: Path | str, ledger: Ledger, spec: Spec | None = None, *,
                 events: EventSink | None = None, rng: random.Random | None = None) -> None:
        self.lab_dir = Path(lab_dir).resolve()
        self.spec = spec or load_spec(self.lab_dir)
        self.policy = self.spec.pool
        self.name = self.policy.name
        self.tag = f"pool-{self.name}"
        self.branch = f"nightlab/{self.tag}"
        self.ledger = ledger
        self.ws = Workspace(self.lab_dir)
        self.guard = Guard(self.spec, self.ws)
        self.snapshots = Snapshots(self.ws, self.spec, self.ws.state_dir / "pool" / "bundles")
        self.events: EventSink = events or NullSink()
        self.rng = rng or random.Random()
        self.lab_name = self.spec.lab.name or self.lab_dir.name
        self.wake = threading.Event()  # set when a claim is queued (the feeder waits on it)
        self._lock = threading.Lock()  # one intake at a time (pending counts, duplicates, the rng)
        store.ensure_tables(ledger)

    # ------------------------------------------------------------------ state

    def session(self) -> Session | None:
        return self.ledger.get_session(self.tag)

    def head(self) -> str | None:
        return self.ws.resolve(f"refs/heads/{self.branch}")

    def noise_sd(self) -> float | None:
        """The verifier's noise floor (sigma) of the pool session, when calibrated."""
        s = self.session()
        if s is None:
            return None
        sigma = self.ledger.session_json(s.id)[1].get("sigma")
        return float(sigma) if isinstance(sigma, int | float) and sigma > 0 else None

    def refutation(self, claim: store.Claim, measured: float | None, run_s: float, *, ran: bool = True) -> str:
        """Why the host's run of ``claim`` refutes it: ``metric contradicted: ...`` or ``compute inflated: ...``
        ("" when it does not). The one judgement of a claim, used before the keep (:mod:`nightlab.pool.engine`)
        and for the worker's record (:mod:`nightlab.pool.feeder`).

        The metric tolerance widens with the number of runs the claim was selected from (a greedy keep is the
        record of its whole session: the best of every run since the session began on that pool head, not only
        of those since the previous claim), counted from the worker's stored claims on the same parent. Counts are
        the worker's word, so only what the host's clock allows is believed: all of a worker's claimed
        experiments since its invite, at ``[pool] max_parallel`` runs at once (:func:`trust.plausible_experiments`).
        A count beyond that is inflated compute."""
        policy, direction, sd = self.policy, self.spec.metric.direction, self.noise_sd()
        w = store.get_worker(self.ledger, self.name, claim.worker)
        elapsed = claim.received_at - (w.created_at if w is not None else claim.received_at)
        before = store.experiments_before(self.ledger, self.name, claim.worker, claim.seq)
        session = store.experiments_on_parent(self.ledger, self.name, claim.worker, claim.parent, claim.seq)
        n = max(1, min(session, trust.plausible_experiments(elapsed, run_s, policy)))
        if trust.contradicted(claim.metric, measured, direction, sd, policy, experiments=n):
            got = f"{measured:.6g}" if measured is not None else "no metric"
            return (f"metric contradicted: claimed {claim.metric:.6g}, the host's re-run measured {got}"
                    + (f" (noise sd {sd:.3g})" if sd else ""))
        if ran and trust.compute_inflated(claim.compute_s, claim.experiments, run_s, policy,
                                          claimed_before=before, elapsed_s=elapsed):
            return (f"compute inflated: claimed {claim.compute_s:.0f}s for {claim.experiments} experiment(s) "
                    f"({before} claimed before, {max(0.0, elapsed):.0f}s since the invite); the host's run took "
                    f"{run_s:.2f}s ([pool] compute_ratio = {policy.compute_ratio:g}, "
                    f"max_parallel = {policy.max_parallel:g})")
        return ""

    def emit(self, kind: str, **data: Any) -> None:
        self.events.emit(kind, **data)  # an audit log that cannot write fails the request (no silent loss)

    def limits(self) -> dict[str, Any]:
        p = self.policy
        return {"max_diff_kb": p.max_diff_kb, "max_log_kb": p.max_log_kb, "max_samples": p.max_samples,
                "max_pending": p.max_pending, "max_strikes": p.max_strikes}

    def max_body_bytes(self) -> int:
        p = self.policy
        return (p.max_diff_kb + p.max_log_kb) * 1024 + p.max_samples * 64 + 16 * 1024

    # ------------------------------------------------------------------ git

    def is_pool_commit(self, sha: str) -> bool:
        """True when ``sha`` is a commit (not a tree, blob or tag that git would peel) of the pool branch's
        history (its tip included)."""
        head = self.head()
        if head is None or not SHA.fullmatch(sha):
            return False
        kind = subprocess.run(["git", *_GIT_CFG, "cat-file", "-t", sha], cwd=self.ws.repo_root, env=self.ws._env,
                              capture_output=True, text=True)
        if kind.returncode != 0 or kind.stdout.strip() != "commit":
            return False
        return self.ws.is_ancestor(sha, head)

    def apply_problem(self, parent: str, diff: str) -> str | None:
        """Why ``diff`` does not apply on ``parent``, or None (see :meth:`applied_changes`)."""
        return self.applied_changes(parent, diff)[0]

    def applied_changes(self, parent: str, diff: str) -> tuple[str | None, list[Change]]:
        """``(why it does not apply, None)`` or ``(None, what it changes)``: ``git apply --cached`` (the command
        the verification runs) of ``diff`` on ``parent`` in a private index and a private object folder (a
        refused diff leaves no object in the lab's repo), then what git reports changed, with modes: a symlink,
        submodule, mode change, rename, copy or binary patch is judged as git applies it, whatever the diff's
        text pretends."""
        if not diff.endswith("\n"):
            diff += "\n"
        with tempfile.TemporaryDirectory(prefix="nightlab-pool-apply-") as tmp:
            (Path(tmp) / "objects").mkdir()
            env = {**self.ws._env, "GIT_INDEX_FILE": str(Path(tmp) / "index"),
                   "GIT_OBJECT_DIRECTORY": str(Path(tmp) / "objects"),
                   "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(self.ws.git_dir / "objects")}
            read = subprocess.run(["git", *_GIT_CFG, "read-tree", f"{parent}^{{commit}}"], cwd=self.ws.repo_root,
                                  env=env, capture_output=True)
            if read.returncode != 0:
                return "the parent cannot be read", []
            args = ["git", *_GIT_CFG, "apply", "--cached", "--whitespace=nowarn", "--recount"]
            if self.ws.lab_rel:
                args.append(f"--directory={self.ws.lab_rel}")
            proc = subprocess.run([*args, "-"], cwd=self.ws.repo_root, env=env, capture_output=True,
                                  input=diff.encode("utf-8", "surrogateescape"))
            if proc.returncode != 0:
                return proc.stderr.decode("utf-8", "replace").strip()[:500] or "git apply failed", []
            raw = subprocess.run(["git", *_GIT_CFG, "diff-index", "--cached", "--raw", "-z", "--no-renames",
                                  parent], cwd=self.ws.repo_root, env=env, capture_output=True)
            if raw.returncode != 0:
                return "git cannot list what the diff changes", []
        fields = raw.stdout.decode("utf-8", "surrogateescape").split("\0")
        changes = [Change(status=meta[1:].split()[4][0], path=path, new_mode=meta[1:].split()[1])
                   for meta, path in zip(fields[0::2], fields[1::2], strict=False) if meta.startswith(":")]
        return None, changes

    # ------------------------------------------------------------------ intake

    def intake(self, worker: store.Worker, body: Any) -> Intake:
        """Decide what a validated claim body (api.ClaimIn) is worth; store it. See the module docstring."""
        p = self.policy
        if len(body.diff.encode("utf-8", "surrogatepass")) > p.max_diff_kb * 1024:
            return Intake(413, error=f"the diff is larger than [pool] max_diff_kb = {p.max_diff_kb}")
        if len(body.log_tail.encode("utf-8", "surrogatepass")) > p.max_log_kb * 1024:
            return Intake(413, error=f"the log tail is larger than [pool] max_log_kb = {p.max_log_kb}")
        if len(body.samples) > p.max_samples:
            return Intake(413, error=f"more than [pool] max_samples = {p.max_samples} samples")
        with self._lock:
            old = store.get_claim(self.ledger, self.name, worker.name, body.claim_id)
            if old is not None:
                return Intake(200, old)
            if store.pending_count(self.ledger, self.name, worker.name) >= p.max_pending:
                return Intake(429, error=f"{p.max_pending} claims of yours are waiting for verification "
                                         "([pool] max_pending); send this one later", retry_after=30)
            if not self.is_pool_commit(body.parent):
                return Intake(422, error=f"parent {body.parent[:12]} is not a commit of the pool branch "
                                         f"{self.branch}: fetch the pool's bundle and claim against its head")
            paths = diff_paths(body.diff)
            if not paths:
                return Intake(422, error="the diff names no file")
            problem = self.guard.check_paths(paths)
            if not problem:
                why, changes = self.applied_changes(body.parent, body.diff)
                if why:
                    return Intake(422, error=f"the diff does not apply on its parent {body.parent[:12]}: {why}")
                if not changes:
                    return Intake(422, error="the diff changes nothing")
                problem = (self.guard.check_changes(changes) or git_file_problem(changes)
                           or self.guard.check_size(changes, body.diff))
            fields = dict(pool=self.name, worker=worker.name, claim_id=body.claim_id, parent=body.parent,
                          diff=body.diff, metric=body.metric, samples=body.samples, log_tail=body.log_tail,
                          seed=body.seed, hardware=body.hardware, compute_s=body.compute_s,
                          experiments=body.experiments, researcher=body.researcher)
            self.emit("pool.claim", worker=worker.name, claim_id=body.claim_id, parent=body.parent,
                      claimed=body.metric, compute_s=body.compute_s, experiments=body.experiments,
                      diff_sha256=store.diff_digest(body.diff))
            if problem:
                strike = rule_of(f"policy: {problem}") in STRIKE_RULES
                claim, _ = store.add_claim(self.ledger, **fields, status="rejected", reason=f"policy: {problem}",
                                           strike=strike)
                if strike:
                    rec = store.strike(self.ledger, self.name, worker.name, p)
                    self.emit("pool.strike", worker=worker.name, claim_id=body.claim_id, reason=problem,
                              strikes=rec.strikes, quarantined=rec.quarantined)
                self._decided(claim)
                return Intake(202, claim)
            first = store.first_with_diff(self.ledger, self.name, body.diff)
            if first is not None:
                who = "you" if first.worker == worker.name else "another worker"
                claim, _ = store.add_claim(self.ledger, **fields, status="duplicate",
                                           reason=f"the same change was claimed first by {who} "
                                                  f"(claim {first.claim_id}); credited to the first only")
                self._decided(claim)
                return Intake(202, claim)
            s = self.session()
            best = s.incumbent_metric if s is not None else None
            must = trust.must_verify(body.metric, best, self.spec.metric.direction)
            prob = trust.check_probability(worker.record, p)
            if must:
                status, reason = "queued", "claims a new best: the host re-runs it"
            elif self.rng.random() < prob:
                status, reason = "queued", f"spot check (probability {prob:.2f})"
            else:
                status, reason = "credited", f"compute credited, not sampled for a check (probability {prob:.2f})"
            claim, _ = store.add_claim(self.ledger, **fields, status=status, reason=reason, must_verify=must)
            if status == "queued":
                self.emit("pool.check", worker=worker.name, claim_id=claim.claim_id, must_verify=must,
                          probability=round(prob, 4), incumbent=best)
                self.wake.set()
            else:
                self._decided(claim)
            return Intake(202, claim)

    def _decided(self, claim: store.Claim) -> None:
        self.emit("pool.decision", worker=claim.worker, claim_id=claim.claim_id, status=claim.status,
                  reason=claim.reason, strike=claim.strike)
