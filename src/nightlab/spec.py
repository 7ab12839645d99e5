"""``nightlab.toml``: parsed with tomllib, validated with pydantic, errors that name the key.

Every error is a :class:`SpecError` whose message names the file, the ``[section] key``
and the fix. Nothing here touches git or runs anything.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from nightlab import globs
from nightlab.errors import SpecError
from nightlab.types import Direction

SPEC_FILE = "nightlab.toml"
PROGRAM_FILE = "program.md"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilesSpec(_Section):
    editable: list[str] = Field(min_length=1, description="globs of files the researcher may change")
    protected: list[str] = Field(default_factory=list, description="globs of files nobody may change")


class RunSpec(_Section):
    command: str = Field(description="the experiment command, run from the lab folder of a worktree")
    setup: str = Field("", description="run once per session in the lab folder before the baseline")
    setup_sandbox: bool = Field(False, description="run setup in the runs' sandbox: the lab read-only, only "
                                "NIGHTLAB_DATA_DIR writable, network as [permissions] run_network")
    budget_s: float = Field(300.0, gt=0, description="passed to the run as NIGHTLAB_BUDGET_S")
    timeout_s: float | None = Field(None, gt=0, description="hard kill; default budget_s * 2 + 60")
    env: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(default_factory=list, description="variables of nightlab's environment a run "
                                "also gets: names, or prefixes written PREFIX_* (see nightlab.runenv)")
    seed: int = 0
    memory_mb: int = Field(0, ge=0, description="address-space limit per run (0: none)")
    kill_grace_s: float = Field(3.0, ge=0, description="SIGTERM to SIGKILL grace at the timeout")
    max_log_mb: float = Field(20.0, gt=0, description="stored log per run: its head and tail, the middle cut")

    @field_validator("pass_env")
    @classmethod
    def _env_patterns(cls, v: list[str]) -> list[str]:
        from nightlab.runenv import PATTERN

        bad = [p for p in v if not PATTERN.fullmatch(p)]
        if bad:
            raise ValueError(f"not a variable name or PREFIX_* pattern: {', '.join(map(repr, bad))} "
                             '(write names such as "HF_HOME", or prefixes such as "WANDB_*")')
        return v

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('the run command is empty; fix: write the command that runs one experiment, '
                             'e.g. command = "python train.py"')
        return v

    @property
    def hard_timeout_s(self) -> float:
        return self.timeout_s if self.timeout_s is not None else self.budget_s * 2 + 60

    @property
    def max_log_bytes(self) -> int:
        return max(4096, int(self.max_log_mb * 1024 * 1024))


class MetricSpec(_Section):
    name: str
    direction: Direction = Direction.MINIMIZE
    source: Literal["summary", "json"] = "summary"
    file: str = Field("", description="with source = 'json': the JSON file the run writes")
    secondary: list[str] = Field(default_factory=list, description="other figures to record")
    memory: str = Field("", description="secondary figure (MB) used for results.tsv's memory_gb")
    max_abs: float = Field(1e15, ge=0, description="a metric of larger magnitude is absurd: refused (0: off)")
    max_ratio: float = Field(1000.0, ge=0, description="a metric further from the baseline than this many "
                             "times the baseline's magnitude is absurd: refused (0: off)")
    constraints: list[str] = Field(default_factory=list, description="limits a kept run must respect, "
                                   "e.g. [\"peak_vram_mb <= 40000\"] (see nightlab.constraints)")

    @model_validator(mode="after")
    def _json_needs_file(self) -> MetricSpec:
        if self.source == "json" and not self.file:
            raise ValueError("source = 'json' needs a file; fix: add file = \"<path the run writes>\", "
                             "e.g. file = \"metrics.json\"")
        return self

    @field_validator("constraints")
    @classmethod
    def _constraints_parse(cls, v: list[str], info: ValidationInfo) -> list[str]:
        from nightlab.constraints import parse_all

        parse_all(v, [info.data.get("name", ""), *info.data.get("secondary", [])])
        return v


class StopSpec(_Section):
    max_experiments: int = Field(default=100, ge=0,
                                 description="experiments after the baseline (0: no limit)")
    max_hours: float = Field(default=0.0, ge=0, description="wall time (0: no limit)")
    patience: int = Field(default=0, ge=0, description="experiments without a keep (0: off)")
    max_crashes_in_row: int = Field(default=5, ge=0, description="consecutive crashes/timeouts (0: off)")
    max_policy_violations: int = Field(default=10, ge=0,
                                       description="candidates rejected by [permissions] (0: off)")
    max_cost_usd: float = Field(default=0.0, ge=0, description="researcher USD spend, from its price table (0: off)")
    max_tokens: int = Field(default=0, ge=0, description="researcher tokens in + out (0: no limit)")


class SpaceEntry(_Section):
    """One entry of ``[researcher.space]`` as a table (the string form is the ``# nightlab:`` grammar)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    range: tuple[float, float] | None = Field(None, description="[LOW, HIGH]")
    log: bool = Field(False, description="log-uniform (needs LOW > 0)")
    integer: bool = Field(False, alias="int", description="search whole numbers only")
    choices: list[int | float | str] = Field(default_factory=list, description="one of these values")
    fixed: bool = Field(False, description="never searched")

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceEntry:
        if self.fixed and (self.range or self.choices or self.log):
            raise ValueError("fixed = true takes no range, log or choices")
        if self.range and self.choices:
            raise ValueError("give range or choices, not both")
        return self


class ResearcherSpec(BaseModel):
    """``kind`` picks the researcher; the other keys are that researcher's options.

    ``[researcher.space]`` (read by the ``search`` and ``local`` researchers) declares the search
    space per constant name; see :mod:`nightlab.constants`.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "search"
    space: dict[str, str | SpaceEntry] = Field(
        default_factory=dict, description="NAME = 'LOW..HIGH [log]' | 'choices A,B' | 'fixed' | a table")

    @field_validator("space", mode="before")
    @classmethod
    def _space_entries(cls, v: Any) -> Any:
        """One clear message per bad entry, naming it (the union would give two obscure ones)."""
        if not isinstance(v, dict):
            return v
        forms = ("write NAME = 'LOW..HIGH', 'LOW..HIGH log', 'choices A,B', 'fixed', or a table "
                 "{ range = [LOW, HIGH], log = true, int = true } / { choices = [...] } / { fixed = true }")
        out: dict[str, Any] = {}
        for key, entry in v.items():
            if isinstance(entry, str | SpaceEntry):
                out[key] = entry
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"[researcher.space] {key!r} = {entry!r}: {forms}")
            try:
                out[key] = SpaceEntry.model_validate(entry)
            except ValidationError as e:
                err = e.errors()[0]
                what = (f"unknown key {err['loc'][0]!r} (known: range, log, int, choices, fixed)"
                        if err["type"] == "extra_forbidden" else
                        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}".removeprefix(": ")
                        .replace("Value error, ", ""))
                raise ValueError(f"[researcher.space] {key!r}: {what}; {forms}") from None
        return out

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AcceptSpec(_Section):
    """``[accept]``: how a measured candidate is kept or discarded (see nightlab.policy)."""

    policy: Literal["greedy", "threshold", "repeat"] = Field(
        "greedy", description="greedy: strictly better; threshold: better by max(min_delta, z*sigma); "
        "repeat: promising candidates are re-run and kept only if a test says the improvement holds")
    min_delta: float = Field(0.0, ge=0, description="smallest improvement worth keeping, in metric units")
    z: float = Field(2.0, ge=0, description="threshold: sigmas of run-to-run noise an improvement must clear")
    repeats: int = Field(5, ge=2, le=499, description="repeat: fresh re-runs of a promising candidate")
    screen: Literal["greedy", "threshold"] = Field("threshold", description="repeat: what makes a candidate "
                                                   "promising")
    screen_z: float = Field(1.0, ge=0, description="repeat with screen = 'threshold': its z")
    test: Literal["welch", "bootstrap"] = Field("welch", description="repeat: one-sided test on the re-runs")
    alpha: float = Field(0.02, gt=0, lt=1, description="repeat: significance level of the test")
    calibrate: int = Field(5, ge=2, le=499, description="baseline runs (seeds seed+1..seed+k) that "
                           "measure sigma")


class EvaluateSpec(_Section):
    """``[evaluate]``: a protected evaluator run after the run step, in its own read-only sandbox."""

    command: str = Field("", description="e.g. 'python evaluate.py'; its summary block gives the metric")
    files: list[str] = Field(default_factory=list, description="evaluator files; protected and hash-checked "
                             "(files named in the command are protected automatically)")
    outputs: list[str] | None = Field(None, description="globs of the files the run writes that the evaluator "
                                      "(and the holdout command) read, e.g. [\"ckpt.pt\", \"out/*.json\"]; "
                                      "copied as regular files into the clean tree they run in")
    max_output_mb: float = Field(1024.0, gt=0, description="size cap on the declared outputs, all together")
    timeout_s: float = Field(600.0, gt=0, description="hard kill for one evaluation")


class HoldoutSpec(_Section):
    """``[holdout]``: a held-out check run by the verifier only, never visible to runs or the researcher."""

    command: str = Field("", description="e.g. 'python holdout.py'; run after keeps, in the kept worktree")
    metric: str = Field("", description="the key it prints (default: [metric] name)")
    files: list[str] = Field(default_factory=list, description="lab files (globs) hidden from runs, "
                             "evaluator and researcher; each pattern must match a file")
    every: int = Field(1, ge=1, description="evaluate every n-th keep (the baseline always)")
    max_divergence: float = Field(0.05, ge=0, description="allowed gap: relative search gain minus "
                                  "relative holdout gain")
    stop_on_divergence: bool = Field(False, description="stop the session when the gap exceeds it")
    timeout_s: float = Field(600.0, gt=0, description="hard kill for one holdout evaluation")


class SandboxSpec(_Section):
    readonly: list[str] = Field(default_factory=list, description="host files or folders runs may read "
                                "(data outside the lab; ~ expands, relative paths are from the lab folder)")
    mode: Literal["auto", "required", "none"] = "auto"
    network: bool = False
    hide: list[str] = Field(default_factory=list, description="extra lab paths (globs, or folders) hidden "
                            "from runs and researchers, in the lab folder and in every worktree")


class ExecutorSpec(_Section):
    """How many experiments run at once, and where (issue: many experiments at once)."""

    kind: Literal["local", "ray"] = "local"
    slots: int = Field(default=1, ge=1, description="experiments at once")
    pipeline: bool = Field(default=True, description="propose the next candidate while experiments run")
    gpus_per_slot: int = Field(default=0, ge=0, description="GPUs pinned per slot via CUDA_VISIBLE_DEVICES")
    gpus: list[int] = Field(default_factory=list, description="GPU ids to share out (default 0..slots*gpus_per_slot-1)")
    cpus_per_slot: int = Field(default=0, ge=0, description="CPU cores pinned per slot (0: no affinity)")
    address: str = Field(default="", description="ray: cluster address (auto, ray://host:port); empty starts one")
    num_cpus: float = Field(default=1.0, ge=0, description="ray: CPUs requested per experiment")
    num_gpus: float = Field(default=0.0, ge=0, description="ray: GPUs requested per experiment")
    resources: dict[str, float] = Field(default_factory=dict, description="ray: custom resources per experiment")
    max_retries: int = Field(default=2, ge=0,
                             description="ray: resubmits of a run whose slot actor or node died, then lost")


DEFAULT_AGENT_DENY = (
    "sudo *", "su", "su *", "git push*", "git remote*", "git config*", "ssh *", "scp *", "curl *", "wget *",
    "nc *", "rm -rf /*", "rm -rf ~*", "chmod -R *", "crontab*", "systemctl*", "docker *", "pip install*",
    "*.git/hooks*", "*.nightlab/*", "*.nightlab",
)


class PermissionsSpec(_Section):
    """What the researcher may do. ``editable``/``protected`` files live in ``[files]``.

    See :mod:`nightlab.permissions` for how patterns are matched.
    """

    max_diff_bytes: int = Field(default=100_000, ge=0,
                                description="canonical diff size limit in bytes (0: none)")
    max_new_files: int = Field(default=10, ge=-1, description="files a candidate may add (-1: no limit)")
    agent_commands_allow: list[str] = Field(
        default_factory=list, description="globs of shell commands an agent researcher may run (empty: any "
                                          "not denied)")
    agent_commands_deny: list[str] = Field(
        default_factory=lambda: list(DEFAULT_AGENT_DENY),
        description="globs of shell commands it may not run")
    researcher_network: Literal["off", "on"] | list[str] = Field(
        default="on", description='"off", "on", or a list of hosts the researcher process may reach')
    run_network: bool = Field(default=False,
                              description="network for experiment runs (bwrap: off = loopback only)")

    def agent_command_allowed(self, command: str) -> bool:
        from nightlab.permissions import command_allowed

        return command_allowed(command, self.agent_commands_allow, self.agent_commands_deny)

    def researcher_host_allowed(self, host: str) -> bool:
        from nightlab.permissions import host_allowed

        return host_allowed(host, self.researcher_network)


class AutonomySpec(_Section):
    level: Literal["auto", "approve-keep", "review"] = Field(
        default="auto",
        description="review: each candidate waits for a human before it runs; approve-keep: a keep waits "
                    "before the branch advances; auto: nothing waits")
    poll_s: float = Field(default=1.0, gt=0, description="how often a waiting session polls the ledger")
    expire_h: float = Field(default=0.0, ge=0,
                            description="no answer after this counts as a rejection (0: never)")
    agents_may_approve: bool = Field(default=False,
                                     description="coding agents (nightlab mcp) may answer approvals")


class AuditSpec(_Section):
    enabled: bool = Field(default=True,
                          description="write .nightlab/audit.jsonl (hash-chained, fsynced per record)")
    sign: bool = Field(default=False,
                       description="sign checkpoints with ed25519 (.nightlab/keys/audit_ed25519)")
    checkpoint_every: int = Field(default=100, ge=1,
                                  description="records between checkpoints (and at session stop)")


class PruneSpec(_Section):
    """``[prune]``: stop hopeless runs early from their progress lines (see nightlab.prune). Off by default."""

    pruner: Literal["none", "median", "successive_halving", "hyperband", "threshold"] = Field(
        "none", description="median: worse than the median of earlier runs at the same step; successive_halving"
        " / hyperband: Optuna's asynchronous SHA / Hyperband; threshold: outside [lower, upper]")
    figure: str = Field("", description="the progress figure pruned on (default: [metric] name), e.g. "
                        "'train_bpb' when the run's progress lines carry a training loss")
    warmup_steps: int = Field(0, ge=0, description="never prune before this step (Optuna's n_warmup_steps)")
    warmup_fraction: float = Field(0.25, ge=0, lt=1, description="median: never prune before this "
                                   "fraction of a full run (the longest completed curve's last step); 0: off")
    finish_fraction: float = Field(0.9, gt=0, le=1, description="median: never prune a run past this fraction "
                                   "of a full run (it saves little and loses a nearly complete measurement); 1: off")
    startup_runs: int = Field(3, ge=0, description="median: runs that must finish before any is pruned")
    reference: Literal["all", "reached", "completed"] = Field(
        "all", description="median: the runs a run is compared with at a step: every earlier run, a pruned "
        "one counted at the steps it reached and as worse than any value after ('all'); pruned ones only at "
        "the steps they reached ('reached'); only the runs that went to their end ('completed', Optuna's)")
    percentile: float = Field(50.0, gt=0, le=100, description="median: prune a run worse than this percentile "
                              "of the reference values at its step (50: the median; 75: only the worst quarter)")
    min_resource: int = Field(1, ge=1, description="successive_halving / hyperband: the first rung, in steps")
    max_resource: int = Field(0, ge=0, description="hyperband: the last step of a full run (0: learnt)")
    reduction_factor: int = Field(3, ge=2, description="successive_halving / hyperband: 1 in this many "
                                  "runs goes on at each rung")
    lower: float | None = Field(None, description="threshold: prune when the value falls below")
    upper: float | None = Field(None, description="threshold: prune when the value rises above")
    poll_s: float = Field(0.2, gt=0, le=10, description="how often the run's log is read for progress")

    @model_validator(mode="after")
    def _threshold_needs_a_bound(self) -> PruneSpec:
        if self.pruner == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("pruner = 'threshold' needs lower = … and/or upper = …")
        return self


class LabSpec(_Section):
    name: str = ""


class PoolSpec(_Section):
    """``[pool]``: a research pool of untrusted workers whose claims this lab verifies (docs/pool.md)."""

    name: str = Field("main", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="the pool's session tag is pool-<name>, its branch nightlab/pool-<name>")
    max_strikes: int = Field(3, ge=1, description="invalid results after which a worker is quarantined")
    max_diff_kb: int = Field(64, ge=1, description="size cap of a claim's diff")
    max_log_kb: int = Field(16, ge=1, description="size cap of a claim's log tail")
    max_samples: int = Field(64, ge=1, description="metric samples a claim may carry")
    max_pending: int = Field(20, ge=1, description="claims of one worker waiting for verification")
    spot_check_min: float = Field(0.1, ge=0, le=1, description="lowest spot-check rate of a trusted worker")
    trust_after: int = Field(5, ge=0, description="consecutive valid results before a worker's claims are "
                             "sampled instead of always checked")
    compute_ratio: float = Field(4.0, gt=0, description="claimed seconds per experiment may be at most this "
                                 "times the host's measured run seconds (more: a strike)")
    tolerance_sd: float = Field(3.0, ge=0, description="a claimed metric better than the re-run by more than "
                                "this many noise sds (plus the best-of-n selection of the worker's experiments) "
                                "is a strike")
    calibrate: bool = Field(True, description="measure the host's noise floor ([accept] calibrate baseline runs) "
                            "before verifying claims")
    max_parallel: float = Field(8.0, gt=0, description="experiments a worker may run at once: the compute it "
                                "is credited never exceeds this times the time since its invite")


NotifyKind = Literal["keep", "new_best", "session_stopped", "approval_waiting", "crash_streak",
                     "holdout_divergence", "pool_claim_accepted"]
_DEFAULT_NOTIFY: tuple[NotifyKind, ...] = ("new_best", "session_stopped", "approval_waiting", "crash_streak",
                                          "holdout_divergence", "pool_claim_accepted")


class NotifySpec(_Section):
    """Where to send a ping (see :mod:`nightlab.notify`); the user's ``~/.config/nightlab/config.toml``
    ``[notify]`` applies when the spec names no target."""

    webhooks: list[str] = Field(default_factory=list,
                                description="Slack/Discord-compatible incoming webhook URLs (${ENV} allowed)")
    ntfy: str = Field("", description="an ntfy topic URL, e.g. https://ntfy.sh/my-night")
    command: str = Field("", description="a command run with the event as JSON on stdin (no shell)")
    events: list[NotifyKind] = Field(
        default_factory=lambda: list(_DEFAULT_NOTIFY),
        description="which kinds to send (keep, new_best, session_stopped, approval_waiting, crash_streak, "
                    "holdout_divergence, pool_claim_accepted)")
    crash_streak: int = Field(3, ge=1, description="crashes or timeouts in a row that make a crash_streak")
    retries: int = Field(3, ge=0, le=10)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each time (at most 60 s)")
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("webhooks")
    @classmethod
    def _http_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://", "${")):
                raise ValueError("a webhook must be an http:// or https:// URL")
        return v

    @field_validator("ntfy")
    @classmethod
    def _ntfy_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://", "${")):
            raise ValueError("ntfy must be a topic URL, e.g. https://ntfy.sh/my-night")
        return v

    @property
    def has_target(self) -> bool:
        return bool(self.webhooks or self.ntfy or self.command)


class Spec(_Section):
    lab: LabSpec = Field(default_factory=LabSpec)
    files: FilesSpec
    run: RunSpec
    metric: MetricSpec
    stop: StopSpec = Field(default_factory=lambda: StopSpec())
    researcher: ResearcherSpec = Field(default_factory=ResearcherSpec)
    accept: AcceptSpec = Field(default_factory=AcceptSpec)
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    holdout: HoldoutSpec = Field(default_factory=HoldoutSpec)
    permissions: PermissionsSpec = Field(default_factory=PermissionsSpec)
    autonomy: AutonomySpec = Field(default_factory=AutonomySpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    notify: NotifySpec = Field(default_factory=NotifySpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    pool: PoolSpec = Field(default_factory=PoolSpec)

    @model_validator(mode="before")
    @classmethod
    def _one_network_setting(cls, data: Any) -> Any:
        """``[permissions] run_network`` is the setting; ``[sandbox] network`` is its old alias.

        Both end up equal, so code reading either sees the same value; giving both, different, is an error.
        """
        if not isinstance(data, dict):
            return data
        sb = data.get("sandbox")
        perms = data.get("permissions")
        sb = dict(sb) if isinstance(sb, dict) else ({} if sb is None else sb)
        perms = dict(perms) if isinstance(perms, dict) else ({} if perms is None else perms)
        if not isinstance(sb, dict) or not isinstance(perms, dict):
            return data
        if "network" in sb and "run_network" in perms and sb["network"] != perms["run_network"]:
            raise ValueError("[sandbox] network and [permissions] run_network disagree; "
                             "fix: keep only [permissions] run_network")
        value = perms.get("run_network", sb.get("network"))
        if value is None:
            return data
        sb["network"], perms["run_network"] = value, value
        return {**data, "sandbox": sb, "permissions": perms}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- errors

_FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it or check its spelling",
    "string_type": "write it as a quoted string",
    "int_type": "write it as a whole number",
    "int_parsing": "write it as a whole number",
    "float_type": "write it as a number",
    "float_parsing": "write it as a number",
    "bool_type": "write true or false",
    "list_type": 'write it as a list, e.g. ["train.py"]',
    "dict_type": "write it as a table",
    "enum": "use one of the allowed values",
    "literal_error": "use one of the allowed values",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "too_short": "give at least one entry",
}


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) >= 2:
        return f"[{parts[0]}] {'.'.join(parts[1:])}"
    return f"[{parts[0]}]" if parts else "(top level)"


def _validation_to_spec_error(path: Path, err: ValidationError, model: type[BaseModel] = Spec) -> SpecError:
    errors = err.errors()
    # an unknown key is usually the cause of a "missing" one (a typo): report it first
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    kind = first["type"]
    where = _format_loc(loc)
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    fix = _FIXES.get(kind, "correct the value")
    if kind == "extra_forbidden":
        known = _known_keys(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        msg = "unknown key"
        fix = f"did you mean '{close[0]}'?" if close else "remove it or check its spelling"
        if known:
            fix += f" (known keys here: {', '.join(known)})"
    elif kind in ("enum", "literal_error"):
        fix = f"use {first.get('ctx', {}).get('expected', 'an allowed value')}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "value_error":
        msg, sep, given = msg.partition("; fix: ")
        fix = given if sep else "correct the value as the message says"
    extra = f" ({len(err.errors()) - 1} more problem(s) after this one)" if len(err.errors()) > 1 else ""
    return SpecError(f"{path}: {where}: {msg}{extra}", fix)


# --------------------------------------------------------------------------- globs


def match_files(root: Path, patterns: list[str]) -> list[str]:
    """Paths under ``root`` (lab-relative, posix) matching any glob (see :mod:`nightlab.globs`)."""
    return globs.expand(root, patterns)


def matches(path: str, patterns: list[str]) -> bool:
    """True when a lab-relative posix path matches one of the globs (see :mod:`nightlab.globs`)."""
    return globs.match(path, patterns)


def command_files(command: str, root: Path, _depth: int = 0) -> list[str]:
    """Lab files a shell command names: every token (or ``--opt=value`` value) that is a file
    under ``root``, ``python -m mod``'s module file, and the same inside a quoted token with spaces
    (``sh -c "python evaluate.py"``). Unparsable commands name nothing."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)  # ; && | ( ) are tokens of their own
    except ValueError:
        return []
    out: list[str] = []
    for k, tok in enumerate(tokens):
        if _depth < 2 and any(c.isspace() for c in tok):
            out += command_files(tok, root, _depth + 1)
            continue
        cands = [tok, tok.split("=", 1)[1]] if "=" in tok else [tok]
        if k > 0 and tokens[k - 1] == "-m":
            mod = tok.replace(".", "/")
            cands += [f"{mod}.py", f"{mod}/__init__.py", f"{mod}/__main__.py"]
        for c in cands:
            c = c[2:] if c.startswith("./") else c
            if not c or globs.problem(c):
                continue
            f = root / c
            if f.is_file() and not f.is_symlink() and not c.startswith((".git/", ".nightlab/")):
                out.append(PurePosixPath(c).as_posix())
    return list(dict.fromkeys(out))


def evaluator_files(spec: Spec, root: Path) -> list[tuple[str, str]]:
    """(pattern or path, the key that names it) for every evaluator and holdout file, automatic ones too."""
    out = [(f, "[evaluate] command") for f in command_files(spec.evaluate.command, root)]
    out += [(f, "[holdout] command") for f in command_files(spec.holdout.command, root)]
    out += [(p, "[evaluate] files") for p in spec.evaluate.files]
    out += [(p, "[holdout] files") for p in spec.holdout.files]
    return out


# --------------------------------------------------------------------------- load


def parse_spec(path: Path, data: dict[str, Any]) -> Spec:
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise _validation_to_spec_error(path, e) from None
    return spec


def _glob_keys(spec: Spec) -> list[tuple[str, list[str]]]:
    return [("[files] editable", spec.files.editable), ("[files] protected", spec.files.protected),
            ("[sandbox] hide", spec.sandbox.hide), ("[evaluate] files", spec.evaluate.files),
            ("[evaluate] outputs", spec.evaluate.outputs or []), ("[holdout] files", spec.holdout.files)]


def check_files(path: Path, spec: Spec) -> None:
    """Errors that need the lab folder: patterns are lab-relative; editable files exist; nothing is both
    editable and protected (evaluator and holdout files included); holdout patterns match; outputs declared."""
    root = path.parent
    for key, pats in _glob_keys(spec):
        for i, pat in enumerate(pats):
            why = globs.problem(pat)
            if why:
                raise SpecError(f"{path}: {key}[{i}] = {pat!r}: {why}",
                                "use a path or glob relative to the lab folder, e.g. \"data/*.csv\"")
    for i, pat in enumerate(spec.files.editable):
        if not match_files(root, [pat]):
            raise SpecError(
                f"{path}: [files] editable[{i}] = {pat!r} matches no file in {root}",
                "create the file, or correct the path (it is relative to the folder of nightlab.toml)",
            )
    for i, pat in enumerate(spec.holdout.files):
        if not match_files(root, [pat]):
            raise SpecError(
                f"{path}: [holdout] files[{i}] = {pat!r} matches no file in {root}, so it would hide nothing",
                "correct the pattern (globs: * stays in one folder, dir/** is everything under dir, "
                "**/x is x at any depth), or remove it",
            )
    editable = set(match_files(root, spec.files.editable))
    protected = set(match_files(root, spec.files.protected))
    both = sorted(editable & protected)
    if both:
        raise SpecError(
            f"{path}: [files] {both[0]!r} is both editable and protected",
            "remove it from one of [files] editable or [files] protected",
        )
    for pat, key in evaluator_files(spec, root):
        named = [pat] if (root / pat).is_file() else match_files(root, [pat])
        for f in named:
            if matches(f, spec.files.editable):
                raise SpecError(
                    f"{path}: {f!r} is an evaluator/holdout file (named by {key}) and also matches "
                    "[files] editable, so a run could rewrite the code that scores it",
                    f"remove {f!r} from [files] editable (evaluator and holdout files are protected "
                    "automatically)",
                )
    if (spec.evaluate.command.strip() or spec.holdout.command.strip()) and spec.evaluate.outputs is None:
        which = "[evaluate] command" if spec.evaluate.command.strip() else "[holdout] command"
        raise SpecError(
            f"{path}: {which} is set but [evaluate] outputs is missing: the evaluator runs in a clean "
            "tree that holds only the committed files and the run's declared outputs",
            'add [evaluate] outputs = ["ckpt.pt"] listing the files the run writes that the evaluator '
            "reads (globs; [] when it reads none)",
        )
    outputs = spec.evaluate.outputs or []
    fixed = sorted(protected | {SPEC_FILE, PROGRAM_FILE}
                   | set(match_files(root, [p for p, _ in evaluator_files(spec, root)])))
    for f in fixed:
        if matches(f, outputs):
            raise SpecError(
                f"{path}: [evaluate] outputs matches {f!r}, a protected, evaluator or holdout file: a run "
                "could replace it in the evaluator's tree",
                "narrow the pattern to the files the run writes (e.g. \"out/*.json\")",
            )


def load_spec(path: Path | str, *, check_paths: bool = True) -> Spec:
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILE
    if not path.exists():
        raise SpecError(f"{path}: no such file", "run `nightlab init` in your lab's git repository")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}", "fix the syntax at the line named") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text", "save the file as UTF-8") from None
    spec = parse_spec(path, data)
    from nightlab.researchers import validate_options  # late: researchers import spec

    validate_options(path, spec.researcher)
    if check_paths:
        check_files(path, spec)
    return spec
