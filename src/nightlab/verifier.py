"""The verifier: everything that makes a kept change a verified one (issue 4).

It works for an :class:`~nightlab.engine.Engine` (seen through the narrow :class:`Host` protocol) and owns:

- **measurement** of a finished run: in *evaluator mode* (``[evaluate] command``) the protected
  evaluator runs after the run in a **clean tree** (:mod:`nightlab.evaltree`): a fresh folder with
  the lab's non-editable files from the session's trusted commit and the candidate's committed
  editable files (both from git objects) plus only the run's declared ``[evaluate] outputs``,
  copied as regular files under a size cap. The run's worktree is hidden from it; its cwd is the
  clean tree; ``PYTHONSAFEPATH=1`` keeps the cwd off ``sys.path``, ``PYTHONPATH`` is the trusted
  files only, bytecode is never written or read from the tree. Nothing the run wrote can be
  imported or executed by it. Its summary block gives the metric (``trust: evaluator``); a metric
  line the run printed changes nothing (kept as ``evidence.run_claimed``). Without an evaluator
  the run's own block counts (``trust: inline``). A rejected output (symlink, folder, FIFO,
  device, hard link, over the cap) makes the experiment a ``crash`` with the reason.
- **tamper checks**: before every evaluation the protected files in the worktree (evaluator and
  holdout files included, and every lab file the two commands name) are checked against the
  session's hashes; a run that changed one is ``rejected: protected: ...`` (its evaluator would not
  have seen the change anyway).
- **re-measurement** (``remeasure(r)`` for :class:`~nightlab.policy.Repeat`), **calibration**
  (the noise floor), **holdout** checks after keeps, **replay** and **verify**.

Seeds: the first run of every experiment uses ``[run] seed``. Re-run ``j`` of experiment
``idx`` uses ``seed + 1000 * idx + j`` (so calibration, the baseline's re-runs, uses
``seed + 1 .. seed + k``); ``nightlab verify`` uses ``seed + 1000 * idx + 500 + j``.

Holdout: files matching ``[holdout] files`` and the folder ``.nightlab/holdout`` (where setup
writes holdout data, ``$NIGHTLAB_HOLDOUT_DIR``) are hidden from runs and evaluators — the lab
folder's copy and the worktree's copy (bwrap mounts an empty file or folder over them) — are left
out of the evaluator's clean tree, and never enter the researcher's context. Only the holdout
command sees them, in its own clean tree (same rules as the evaluator's), in a sandbox with no
network where nothing is writable but ``/tmp``.
Not covered: with ``sandbox = "none"`` nothing is hidden (the engine warns); the clean tree still
keeps the run's files out of the evaluator's imports.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nightlab import evaltree, globs, sandbox
from nightlab.errors import NightlabError, UsageError
from nightlab.events import EventSink
from nightlab.guard import Guard
from nightlab.ledger import Ledger
from nightlab.measure import measure, parse_summary, read_log, sanity
from nightlab.policy import IncumbentStats, noise_of
from nightlab.spec import MetricSpec, Spec
from nightlab.stats import diff_ci, mean_ci, welch
from nightlab.types import Direction, Experiment, Measurement, RunResult, Session, Status
from nightlab.workspace import Workspace


class _Stop(Protocol):
    cancel: threading.Event
    graceful: str


class _Reporter(Protocol):
    def message(self, text: str) -> None: ...


class Host(Protocol):
    """What the verifier uses of the engine it works for (a narrow interface: no import of the engine)."""

    lab_dir: Path
    spec: Spec
    ws: Workspace
    ledger: Ledger
    events: EventSink
    artifacts_dir: Path
    guard: Guard
    policy: Any
    session: Session
    protected_hashes: dict[str, str]

    @property
    def stop(self) -> _Stop: ...
    @property
    def reporter(self) -> _Reporter: ...
    def exp_dir(self, idx: int) -> Path: ...
    def new_run(self, kind: str, idx: int | None = None) -> str: ...
    def run_env(self, seed: int, idx: int) -> dict[str, str]: ...
    def sandbox_policy(self, worktree: Path) -> sandbox.SandboxPolicy: ...

VERIFY_OFFSET = 500
# environment variables that could make the evaluator's interpreter load code from elsewhere
_PY_ENV_DROP = ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE", "PYTHONINSPECT")


def repeat_seed(base: int, idx: int, j: int) -> int:
    """The seed of re-run ``j`` (1-based) of experiment ``idx``; idx 0 gives calibration's seeds."""
    return base + 1000 * idx + j


@dataclass(frozen=True)
class Sample:
    """One run (and evaluation) of a committed tree."""

    seed: int
    measurement: Measurement
    run: RunResult | None
    rejected: str = ""  # a tamper check refused it ("protected: ...")
    status: Status = Status.KEEP  # KEEP: measured; CRASH/TIMEOUT/INTERRUPTED/REJECTED otherwise


@dataclass(frozen=True)
class ReplayResult:
    idx: int
    commit: str
    seed: int
    recorded: float | None
    replayed: float | None
    sigma: float | None
    status: Status
    reason: str = ""

    @property
    def diff(self) -> float | None:
        if self.recorded is None or self.replayed is None:
            return None
        return self.replayed - self.recorded

    @property
    def z(self) -> float | None:
        d = self.diff
        if d is None or not self.sigma:
            return None
        return d / self.sigma

    @property
    def exact(self) -> bool:
        return self.diff == 0.0


@dataclass(frozen=True)
class VerifyRow:
    label: str
    idx: int
    commit: str
    samples: tuple[float, ...]
    mean: float | None
    ci: tuple[float, float] | None  # CI of the mean
    gain: float | None = None  # improvement over the baseline's mean (metric units, positive: better)
    gain_ci: tuple[float, float] | None = None
    p: float | None = None  # one-sided Welch p-value that it beats the baseline


@dataclass(frozen=True)
class VerifyReport:
    metric: str
    direction: Direction
    repeats: int
    level: float
    rows: tuple[VerifyRow, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": self.direction.value, "repeats": self.repeats,
                "level": self.level, "rows": [dataclasses.asdict(r) for r in self.rows]}


class Verifier:
    """See the module docstring. One per engine; uses the engine's spec, workspace, ledger and events."""

    def __init__(self, engine: Host) -> None:
        self.e = engine

    # ------------------------------------------------------------------ configuration

    @property
    def evaluator_mode(self) -> bool:
        return bool(self.e.spec.evaluate.command.strip())

    @property
    def holdout_dir(self) -> Path:
        return self.e.ws.state_dir / "holdout"

    def hidden_paths(self, lab_root: Path | None) -> list[Path]:
        """``[holdout] files`` and ``[sandbox] hide`` in the lab folder and in ``lab_root`` (a worktree's
        lab folder), and the holdout dir: what runs and evaluators must not see."""
        pats = [*self.e.spec.holdout.files, *self.e.spec.sandbox.hide]
        out = [self.holdout_dir]
        for root in (self.e.lab_dir, lab_root):
            if root is not None and pats:
                out += [root / p for p in globs.cover(root, pats)]
        return out

    def start_message(self) -> str:
        """What ``nightlab run`` says at start about the evaluator: auto-protected files, clean tree."""
        e = self.e
        if not (self.evaluator_mode or e.spec.holdout.command):
            return ""
        auto = [f for f in e.guard.auto_protected if not globs.match(f, e.spec.files.protected)]
        outs = ", ".join(e.spec.evaluate.outputs or []) or "none"
        msg = (f"evaluator/holdout run in a clean tree (committed files + declared outputs: {outs}; "
               f"cap {e.spec.evaluate.max_output_mb:g} MB)")
        if auto:
            msg += f"; protected automatically (named by [evaluate]/[holdout]): {', '.join(auto)}"
        return msg

    def setup_env(self, env: dict[str, str]) -> dict[str, str]:
        """The setup command's env: with a holdout, ``NIGHTLAB_HOLDOUT_DIR`` (created)."""
        if self.e.spec.holdout.command:
            self.holdout_dir.mkdir(parents=True, exist_ok=True)
            env = {**env, "NIGHTLAB_HOLDOUT_DIR": str(self.holdout_dir)}
        return env

    def _eval_policy(self, wt: Path, tree: evaltree.CleanTree, *, holdout: bool = False) -> sandbox.SandboxPolicy:
        """Nothing writable but a private /tmp; the clean tree read-only; the run's worktree hidden."""
        base = self.e.sandbox_policy(wt)
        readonly = [p for p in base.readonly if not _under(p, wt)] + [tree.root]
        hidden = [h for h in base.hidden if not _under(h, wt)] + [wt]
        if holdout:  # the holdout command alone sees the holdout data
            hidden = [h for h in hidden if h != self.holdout_dir]
            if self.holdout_dir.exists():
                readonly.append(self.holdout_dir)
        return dataclasses.replace(base, writable=(), readonly=tuple(dict.fromkeys(readonly)),
                                   hidden=tuple(dict.fromkeys(hidden)), network=False)

    def _eval_env(self, seed: int, idx: int, tree: evaltree.CleanTree, *, holdout: bool = False) -> dict[str, str]:
        env = {k: v for k, v in self.e.run_env(seed, idx).items() if k not in _PY_ENV_DROP}
        env.update({
            "PYTHONSAFEPATH": "1",  # the cwd / script folder is not put on sys.path
            "PYTHONPATH": str(tree.trusted),  # the lab's trusted files, then the stdlib and site-packages
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            # never a __pycache__ from the tree, nor bytecode planted in a shared /tmp (sandbox = "none": a
            # run could leave a forged .pyc of a stdlib module there): an empty folder of this tree only
            "PYTHONPYCACHEPREFIX": str(tree.root / "pycache"),
            "NIGHTLAB_TRUSTED_DIR": str(tree.trusted),
        })
        if holdout:
            env["NIGHTLAB_HOLDOUT_DIR"] = str(self.holdout_dir)
        return env

    def clean_tree(self, commit: str, wt: Path | None, *, holdout: bool = False) -> evaltree.CleanTree:
        """The clean tree for ``commit`` with the outputs of the run in ``wt``; raises OutputRejected."""
        e = self.e
        # holdout files only in the holdout command's tree; [sandbox] hide files in neither, unless they
        # are also [evaluate] files (hidden from runs, read by the evaluator)
        exclude = [] if holdout else list(e.spec.holdout.files)
        keep = [*e.spec.evaluate.files, *e.spec.holdout.files] if holdout else list(e.spec.evaluate.files)
        return evaltree.build(
            e.ws, trusted_commit=e.session.base_commit, commit=commit,
            editable=list(e.spec.files.editable), protected=e.guard.protected, exclude=exclude,
            hide=e.spec.sandbox.hide,
            run_root=e.ws.lab_in(wt) if wt is not None else None, outputs=e.spec.evaluate.outputs or [],
            max_bytes=int(e.spec.evaluate.max_output_mb * 2**20), parent=evaltree.session_dir(e.ws, e.session.tag),
            keep=keep)

    # ------------------------------------------------------------------ tamper checks

    def tamper(self, wt: Path, lab_root: Path, commit: str) -> str | None:
        """Why the worktree may not be evaluated: a protected (evaluator, holdout) file changed by the run.

        The evaluator would not see the change (it runs in a clean tree from git objects), but a run
        that tries is rejected rather than scored.
        """
        return Guard.verify_protected(lab_root, self.e.protected_hashes)

    # ------------------------------------------------------------------ measurement

    def measure(self, wt: Path, lab_root: Path, commit: str, log_path: Path, seed: int, idx: int,
                run_ok: bool, tag: str = "") -> tuple[Measurement, str]:
        """The measurement of a finished run, and a tamper reason ("" when clean).

        Evaluator mode: tamper checks, then the evaluator (only when the run succeeded).
        """
        problem = self.tamper(wt, lab_root, commit)
        if problem:
            self.e.events.emit("guard", experiment=idx, stage="after-run", ok=False, reason=problem)
            return Measurement(None, error=f"protected: {problem}"), f"protected: {problem}"
        inline = self.sane(measure(self.e.spec.metric, log_path, lab_root))
        if not self.evaluator_mode:
            return inline, ""
        if not run_ok:
            return dataclasses.replace(inline, metric=None, trust="evaluator",
                                       error="the run failed; not evaluated"), ""
        elog = log_path.with_name(f"evaluate{tag}.log")
        spec = self.e.spec.evaluate
        try:
            tree = self.clean_tree(commit, wt)
        except evaltree.OutputRejected as rejected:
            self.e.events.emit("evaluate.outputs", experiment=idx, ok=False, reason=str(rejected))
            return Measurement(None, trust="evaluator", error=f"output rejected: {rejected}"), ""
        try:
            self.e.events.emit("evaluate.outputs", experiment=idx, ok=True,
                               outputs=[evaltree.shown(o) for o in tree.outputs[:100]], files=len(tree.outputs),
                               bytes=tree.output_bytes)
            pol = self._eval_policy(wt, tree)
            self.e.events.emit("sandbox.start", experiment=idx, command=spec.command, cwd=str(tree.lab),
                               mode=pol.mode, network=False, stage="evaluate",
                               hidden=[str(h) for h in pol.hidden])
            res = sandbox.run(spec.command, cwd=tree.lab, env=self._eval_env(seed, idx, tree), policy=pol,
                              timeout_s=spec.timeout_s, log_path=elog, kill_grace_s=self.e.spec.run.kill_grace_s,
                              cancel=self.e.stop.cancel, run_id=self.e.new_run("evaluate", idx))
            self.e.events.emit("sandbox.exit", experiment=idx, stage="evaluate", exit_code=res.exit_code,
                               timed_out=res.timed_out, wall_s=round(res.wall_s, 3))
            if not res.ok:
                why = "timed out" if res.timed_out else f"exited with {res.exit_code}"
                tail = " | ".join(sandbox.tail(elog, 3).splitlines())
                return Measurement(None, trust="evaluator", error=f"evaluator {why}: {tail}"[:500]), ""
            m = self.sane(measure(_eval_metric_spec(self.e.spec.metric), elog, tree.lab, trust="evaluator"))
        finally:
            evaltree.remove(tree.root)
        # secondary figures the evaluator did not give may come from the run's own block (labelled)
        secondary = dict(m.secondary)
        for k, v in inline.secondary.items():
            secondary.setdefault(k, v)
        return dataclasses.replace(m, secondary=secondary), ""

    def sane(self, m: Measurement) -> Measurement:
        """Refuse an absurd metric (``[metric] max_abs``/``max_ratio``; see nightlab.measure.sanity)."""
        return sanity(m, self.e.spec.metric, self.e.session.baseline_metric)

    def evidence_extras(self, m: Measurement, log_path: Path) -> dict[str, Any]:
        """What to add to a decision's evidence about where the numbers came from."""
        out: dict[str, Any] = {"trust": m.trust}
        if self.evaluator_mode:
            try:
                block = parse_summary(read_log(log_path))
            except OSError:
                block = {}
            name = self.e.spec.metric.name
            if name in block:
                out["run_claimed"] = block[name][:200]  # what the run printed: ignored for the metric
            elog = log_path.with_name("evaluate.log")
            try:
                evaluated = parse_summary(read_log(elog))
            except OSError:
                evaluated = {}
            out["inline_secondary"] = sorted(k for k in m.secondary if k not in evaluated)
        return out

    def sample(self, commit: str, idx: int, seed: int, label: str, exp_dir: Path) -> Sample:
        """Run and measure ``commit`` once with ``seed`` in a fresh worktree (removed afterwards)."""
        e = self.e
        name = f"{e.session.tag}-{idx}-{label}"
        wt = e.ws.add_worktree(name, commit)
        try:
            lab_root = e.ws.lab_in(wt)
            problem = Guard.verify_protected(lab_root, e.protected_hashes)
            if problem:
                return Sample(seed, Measurement(None, error=f"protected: {problem}"), None,
                              f"protected: {problem}", Status.REJECTED)
            log_path = exp_dir / f"{label}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            pol = e.sandbox_policy(wt)
            e.events.emit("sandbox.start", experiment=idx, command=e.spec.run.command, cwd=str(lab_root),
                          mode=pol.mode, stage=label, seed=seed)
            res = sandbox.run(e.spec.run.command, cwd=lab_root, env=e.run_env(seed, idx), policy=pol,
                              timeout_s=e.spec.run.hard_timeout_s, log_path=log_path,
                              kill_grace_s=e.spec.run.kill_grace_s, cancel=e.stop.cancel,
                              run_id=e.new_run(label, idx))
            e.events.emit("sandbox.exit", experiment=idx, stage=label, exit_code=res.exit_code,
                          timed_out=res.timed_out, wall_s=round(res.wall_s, 3))
            if res.interrupted:
                return Sample(seed, Measurement(None, error="interrupted"), res, "", Status.INTERRUPTED)
            if res.timed_out:
                return Sample(seed, Measurement(None, error="timed out"), res, "", Status.TIMEOUT)
            m, rejected = self.measure(wt, lab_root, commit, log_path, seed, idx, res.exit_code == 0,
                                       tag=f"-{label}")
            if rejected:
                return Sample(seed, m, res, rejected, Status.REJECTED)
            if res.exit_code != 0:
                return Sample(seed, dataclasses.replace(m, metric=None, error=f"exit code {res.exit_code}"),
                              res, "", Status.CRASH)
            return Sample(seed, m, res, "", Status.KEEP if m.valid else Status.CRASH)
        finally:
            e.ws.remove_worktree(wt)

    def remeasurer(self, commit: str, idx: int, exp_id: int) -> Callable[[int], list[Measurement]]:
        """``remeasure(r)`` for a policy: ``r`` fresh runs of ``commit``, seeds ``repeat_seed(idx, j)``."""

        def remeasure(r: int) -> list[Measurement]:
            out: list[Measurement] = []
            for j in range(1, r + 1):
                seed = repeat_seed(self.e.spec.run.seed, idx, j)
                s = self.sample(commit, idx, seed, f"repeat-{j}", self.e.exp_dir(idx))
                self.e.events.emit("repeat", experiment=idx, j=j, seed=seed, metric=s.measurement.metric,
                                   status=s.status.value, error=s.measurement.error)
                out.append(s.measurement)
                if not s.measurement.valid:
                    break  # one failed re-run is enough to discard
            return out

        return remeasure

    # ------------------------------------------------------------------ noise floor

    def noise(self) -> dict[str, Any]:
        return self.e.ledger.session_json(self.e.session.id)[1]

    def _save_noise(self, **updates: Any) -> dict[str, Any]:
        noise = {**self.noise(), **updates}
        self.e.session = self.e.ledger.update_session(self.e.session.id, noise=noise)
        return noise

    def calibrate(self, k: int | None = None) -> dict[str, Any]:
        """Run the baseline commit ``k`` times (seeds seed+1..seed+k); store the noise on the session."""
        e = self.e
        k = k or e.spec.accept.calibrate
        if k < 2:
            raise UsageError("calibration needs at least 2 runs", "use --k 2 or more")
        commit = e.session.base_commit
        e.reporter.message(f"calibrating the noise floor: {k} runs of the baseline with new seeds")
        e.events.emit("calibrate.start", k=k, commit=commit)
        samples: list[float] = []
        seeds: list[int] = []
        for j in range(1, k + 1):
            seed = repeat_seed(e.spec.run.seed, 0, j)
            s = self.sample(commit, 0, seed, f"calibrate-{j}", e.artifacts_dir / e.session.tag / "calibrate")
            if s.status is Status.INTERRUPTED:
                raise NightlabError("calibration interrupted", "run `nightlab calibrate` again")
            if not s.measurement.valid:
                why = s.measurement.error or s.status.value
                raise NightlabError(f"calibration run {j} (seed {seed}) failed: {why}",
                                    "make the baseline run reliably; logs: .nightlab/artifacts/<tag>/calibrate")
            samples.append(float(s.measurement.metric))  # type: ignore[arg-type]
            seeds.append(seed)
        rec = {**noise_of(samples), "seeds": seeds, "commit": commit, "metric": e.spec.metric.name,
               "trust": "evaluator" if self.evaluator_mode else "inline", "at": time.time()}
        e.events.emit("calibrate.done", **{k_: v for k_, v in rec.items() if k_ != "at"})
        e.reporter.message(f"noise floor: sigma = {rec['sigma']:.6g} over {k} runs (mean {rec['mean']:.6g})")
        self._save_noise(**rec)
        return rec

    def needs_calibration(self) -> bool:
        return bool(getattr(self.e.policy, "needs_noise", False)) and "sigma" not in self.noise()

    def _incumbent_row(self, commit: str) -> Experiment | None:
        """The kept row of the incumbent ``commit``, read once per incumbent (kept rows never change
        their metric or samples; the holdout check a keep gains later is not used here)."""
        cached = getattr(self, "_inc_row", None)
        if cached is None or cached[0] != commit:
            cached = (commit, self.e.ledger.kept(self.e.session.id, commit))
            self._inc_row = cached
        return cached[1]

    def incumbent_stats(self) -> IncumbentStats:
        """The incumbent's best estimate, its unbiased samples and the session's noise floor."""
        e = self.e
        noise = self.noise()
        sigma = noise.get("sigma")
        sigma_df = int(noise.get("k", 1)) - 1
        inc = e.session.incumbent_commit
        x = self._incumbent_row(inc)
        samples: list[float] = []
        if x is not None:
            if x.evidence.get("samples"):
                samples = [float(v) for v in x.evidence["samples"]]
            elif x.metric is not None:
                samples = [x.metric]
                if inc == noise.get("commit") and noise.get("samples"):
                    samples += [float(v) for v in noise["samples"]]
        if len(samples) > 1:
            return IncumbentStats.of(samples, sigma, sigma_df)
        return IncumbentStats(e.session.incumbent_metric, tuple(samples), sigma, sigma_df)

    # ------------------------------------------------------------------ holdout

    def after_keep(self, exp: Experiment, wt: Path, lab_root: Path) -> None:
        """Score a keep on the holdout (every n-th keep, the baseline always); warn or stop on divergence."""
        e = self.e
        h = e.spec.holdout
        if not h.command or exp.commit is None:
            return
        n = e.ledger.count_experiments(e.session.id, Status.KEEP) - 1  # 0 for the baseline
        if n > 0 and n % h.every:
            return
        problem = Guard.verify_protected(lab_root, e.protected_hashes)
        value: float | None = None
        error = ""
        if problem:
            error = f"protected: {problem}"
        else:
            log = e.exp_dir(exp.idx) / "holdout.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            value, error = self._holdout_score(exp, wt, log)
        rec: dict[str, Any] = {"metric": value, "name": h.metric or e.spec.metric.name, "error": error[:500]}
        noise = self.noise()
        hold = dict(noise.get("holdout", {}))
        warnings = list(noise.get("warnings", []))
        if value is not None and n == 0:  # the first keep: the baseline
            hold["baseline"] = value
        elif value is not None and hold.get("baseline") is not None and e.session.baseline_metric:
            d = e.spec.metric.direction
            base_s, base_h = e.session.baseline_metric, float(hold["baseline"])
            search = e.session.incumbent_metric if e.session.incumbent_metric is not None else exp.metric
            s_gain = d.improvement(float(search or 0.0), base_s) / abs(base_s)
            h_gain = d.improvement(value, base_h) / abs(base_h) if base_h else 0.0
            rec.update(search_gain=s_gain, holdout_gain=h_gain, divergence=s_gain - h_gain)
            if s_gain - h_gain > h.max_divergence:
                msg = (f"holdout divergence after #{exp.idx}: search metric improved {100 * s_gain:+.2f}%, "
                       f"holdout {100 * h_gain:+.2f}% (gap {100 * (s_gain - h_gain):.2f} points > "
                       f"{100 * h.max_divergence:.2f}): the search metric may be overfitted")
                warnings.append({"idx": exp.idx, "message": msg, "at": time.time()})
                e.reporter.message("WARNING: " + msg)
                e.events.emit("holdout.warning", experiment=exp.idx, message=msg)
                if h.stop_on_divergence:
                    e.stop.graceful = f"overfitting: {msg}"
        hold["last"] = {"idx": exp.idx, **rec}
        self._save_noise(holdout=hold, warnings=warnings)
        e.events.emit("holdout", experiment=exp.idx, **rec)
        secondary = dict(exp.secondary)
        if value is not None:
            secondary["holdout"] = value
        e.ledger.update_experiment(exp.id, secondary=secondary, evidence={**exp.evidence, "holdout": rec})

    def _holdout_score(self, exp: Experiment, wt: Path, log: Path) -> tuple[float | None, str]:
        """Run the holdout command in a clean tree of the kept commit (holdout files included)."""
        e = self.e
        h = e.spec.holdout
        assert exp.commit is not None
        try:
            tree = self.clean_tree(exp.commit, wt, holdout=True)
        except evaltree.OutputRejected as rejected:
            return None, f"output rejected: {rejected}"
        try:
            pol = self._eval_policy(wt, tree, holdout=True)
            e.events.emit("sandbox.start", experiment=exp.idx, command=h.command, stage="holdout",
                          mode=pol.mode, cwd=str(tree.lab))
            res = sandbox.run(h.command, cwd=tree.lab, env=self._eval_env(exp.seed, exp.idx, tree, holdout=True),
                              policy=pol, timeout_s=h.timeout_s, log_path=log,
                              kill_grace_s=e.spec.run.kill_grace_s, cancel=e.stop.cancel,
                              run_id=e.new_run("holdout", exp.idx))
            e.events.emit("sandbox.exit", experiment=exp.idx, stage="holdout", exit_code=res.exit_code,
                          timed_out=res.timed_out, wall_s=round(res.wall_s, 3))
            if not res.ok:
                why = "timed out" if res.timed_out else f"exited with {res.exit_code}"
                return None, f"holdout command {why}: " + " | ".join(sandbox.tail(log, 3).splitlines())
            name = h.metric or e.spec.metric.name
            m = measure(MetricSpec.model_validate({"name": name}), log, tree.lab, trust="verifier")
            return m.metric, m.error
        finally:
            evaltree.remove(tree.root)

    # ------------------------------------------------------------------ replay and verify

    def replay(self, idx: int) -> ReplayResult:
        """Re-run experiment ``idx`` from its recorded commit and seed; compare with its recorded metric."""
        e = self.e
        exp = e.ledger.get_experiment(e.session.id, idx)
        if exp is None:
            raise UsageError(f"session '{e.session.tag}' has no experiment {idx}", "see `nightlab log`")
        commit = exp.commit or (exp.parent_commit if idx == 0 else None)
        if commit is None or not e.ws.resolve(commit):
            raise UsageError(f"experiment {idx} has no commit to replay ({exp.status.value})",
                             "only experiments that were committed and run can be replayed")
        s = self.sample(commit, idx, exp.seed, f"replay-{int(time.time())}", e.exp_dir(exp.idx))
        sigma = self.noise().get("sigma")
        r = ReplayResult(idx, commit, exp.seed, exp.metric, s.measurement.metric, sigma, s.status,
                         s.rejected or s.measurement.error)
        e.events.emit("replay", experiment=idx, recorded=r.recorded, replayed=r.replayed, sigma=sigma,
                      status=s.status.value)
        return r

    def verify(self, repeats: int = 5, each: bool = False, level: float = 0.95) -> VerifyReport:
        """Re-run the baseline and the incumbent (and with ``each`` every kept commit) ``repeats`` times.

        Reports each one's mean and CI, and its improvement over the baseline's mean with a
        Welch confidence interval and one-sided p-value. Stored on the session as ``noise.verify``.
        """
        e = self.e
        if repeats < 2:
            raise UsageError("verify needs at least 2 repeats", "use --repeats 2 or more")
        kept = e.ledger.experiments(e.session.id, status=Status.KEEP)
        if not kept:
            raise UsageError(f"session '{e.session.tag}' has no baseline yet", "run `nightlab run` first")
        base = kept[0]
        targets = [x for x in kept[1:] if each or x.commit == e.session.incumbent_commit]
        if not each:
            targets = targets[-1:]
        d = e.spec.metric.direction
        sign = 1 if d is Direction.MAXIMIZE else -1
        rows: list[VerifyRow] = []
        base_samples: list[float] = []
        for x in [base, *targets]:
            commit = x.commit or x.parent_commit
            vals: list[float] = []
            for j in range(1, repeats + 1):
                seed = repeat_seed(e.spec.run.seed, x.idx, VERIFY_OFFSET + j)
                s = self.sample(commit, x.idx, seed, f"verify-{j}",
                                e.artifacts_dir / e.session.tag / "verify" / str(x.idx))
                if s.status is Status.INTERRUPTED:
                    raise NightlabError("verify interrupted", "run `nightlab verify` again")
                if s.measurement.valid:
                    vals.append(float(s.measurement.metric))  # type: ignore[arg-type]
            mean = math.fsum(vals) / len(vals) if vals else None
            ci = mean_ci(vals, level)[1:] if len(vals) >= 2 else None
            label = "baseline" if x is base else f"#{x.idx}"
            if x is base:
                base_samples = vals
                rows.append(VerifyRow(label, x.idx, commit, tuple(vals), mean, ci))
                continue
            gain = gain_ci = p = None
            if len(vals) >= 2 and len(base_samples) >= 2:
                g, lo, hi = diff_ci(vals, base_samples, sign, level)
                gain, gain_ci, p = g, (lo, hi), welch(vals, base_samples, sign).p
            rows.append(VerifyRow(label, x.idx, commit, tuple(vals), mean, ci, gain, gain_ci, p))
        report = VerifyReport(e.spec.metric.name, d, repeats, level, tuple(rows))
        self._save_noise(verify={**report.as_dict(), "at": time.time()})
        e.events.emit("verify", rows=len(rows))
        return report


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _eval_metric_spec(metric: MetricSpec) -> MetricSpec:
    """The evaluator's output contract is always the summary block."""
    if metric.source == "summary":
        return metric
    return metric.model_copy(update={"source": "summary", "file": ""})
