"""``nightlab init`` and ``nightlab demo``: write a starter spec, or copy an example lab.

``init`` never overwrites without ``force`` and never touches files other than
``nightlab.toml`` and ``program.md`` (an existing ``program.md`` is kept: autoresearch
ships one that is the research org's own text).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nightlab.errors import UsageError
from nightlab.spec import PROGRAM_FILE, SPEC_FILE
from nightlab.workspace import _env

SPEC_TEMPLATE = """\
# nightlab.toml: what the researcher may change, how to run and measure an experiment.
# Reference: https://github.com/nightlab/nightlab#nightlabtoml-reference

[files]
editable = [{editable}]        # globs the researcher may change
protected = [{protected}]      # globs nobody may change (nightlab.toml and program.md always are)

[run]
{setup_line}command = "{command}"   # run from this folder in a fresh git worktree per experiment
budget_s = {budget}             # passed to the run as NIGHTLAB_BUDGET_S; the run should respect it
timeout_s = {timeout}            # hard kill of the whole process tree
{env_line}
[metric]
name = "{metric}"               # read from the run's summary block: a line '---' then 'key: value' lines
direction = "{direction}"       # minimize | maximize
secondary = [{secondary}]
{memory_line}
[stop]
max_experiments = 100
max_hours = 8
patience = 0                    # experiments without a keep before stopping (0: off)
max_crashes_in_row = 5

[researcher]
kind = "search"                 # Optuna over the UPPER_CASE numeric constants of the editable files
sampler = "tpe"
seed = 0

[sandbox]
mode = "auto"                   # auto | required | none (bubblewrap: no network, read-only root)
"""

PROGRAM_TEMPLATE = """\
# program.md — the research org

You are an autonomous researcher improving `{target}`.

## Goal
Get the {direction_word} `{metric}` you can. Each experiment runs `{command}` with a fixed
time budget of {budget} seconds; the harness measures `{metric}` and keeps your change only
if it is better than the current best.

## Rules
- Edit only: {editable}. Everything else is read-only; edits elsewhere are rejected.
- Do not change how `{metric}` is computed or printed.
- Keep each experiment to one idea, with a one-line rationale.
- Prefer simple changes; a small gain that adds much complexity is not worth it.

## Ideas to try
- (write your hunches here: what to vary, what is known not to work)
"""


@dataclass(frozen=True)
class Layout:
    editable: list[str]
    protected: list[str]
    command: str
    setup: str
    metric: str
    direction: str
    budget: float
    timeout: float
    secondary: list[str]
    memory: str = ""
    env: dict[str, str] | None = None
    readonly: tuple[str, ...] = ()  # [sandbox] readonly: host data the runs read


def _q(items: list[str]) -> str:
    return ", ".join(f'"{i}"' for i in items)


def detect_autoresearch(root: Path) -> Layout:
    """karpathy/autoresearch: train.py (agent edits), prepare.py (fixed), val_bpb, 5-minute budget."""
    missing = [f for f in ("train.py", "prepare.py") if not (root / f).is_file()]
    if missing:
        raise UsageError(
            f"{root} does not look like karpathy/autoresearch: missing {', '.join(missing)}",
            "run it in a checkout of autoresearch, or use plain `nightlab init`",
        )
    train = (root / "train.py").read_text(errors="replace")
    if "val_bpb" not in train and "val_bpb" not in (root / "prepare.py").read_text(errors="replace"):
        raise UsageError(
            f"{root}/train.py never mentions val_bpb, autoresearch's metric",
            "use plain `nightlab init` and set [metric] name yourself",
        )
    return Layout(
        editable=["train.py"], protected=["prepare.py"], command="python train.py",
        setup="python prepare.py", metric="val_bpb", direction="minimize", budget=300, timeout=600,
        secondary=["peak_vram_mb", "training_seconds", "mfu_percent", "num_params_M"], memory="peak_vram_mb",
        env={"TRITON_CACHE_DIR": "/tmp/triton-cache"},
        readonly=("~/.cache/autoresearch",),  # prepare.py's data and tokenizer, read by train.py
    )


def detect_generic(root: Path) -> Layout:
    candidates = ["train.py", "main.py", "run.py"]
    target = next((c for c in candidates if (root / c).is_file()), None)
    if target is None:
        pys = sorted(p.name for p in root.glob("*.py"))
        target = pys[0] if pys else "train.py"
    if not (root / target).exists():
        raise UsageError(
            f"no Python file found in {root} to make editable",
            "create your experiment script (e.g. train.py) first, then run `nightlab init`",
        )
    return Layout(editable=[target], protected=[], command=f"python {target}", setup="", metric="loss",
                  direction="minimize", budget=300, timeout=660, secondary=[])


def init_lab(root: Path, *, from_autoresearch: bool = False, force: bool = False) -> list[Path]:
    root = root.resolve()
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder", "create it, or pass an existing folder")
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, env=_env())
    if proc.returncode != 0:
        raise UsageError(f"{root} is not inside a git repository", "run `git init` there first")
    spec_path = root / SPEC_FILE
    if spec_path.exists() and not force:
        raise UsageError(f"{spec_path} already exists", "edit it, or pass --force to overwrite it")
    layout = detect_autoresearch(root) if from_autoresearch else detect_generic(root)
    env_line = ""
    if layout.env:
        env_line = "env = { " + ", ".join(f'{k} = "{v}"' for k, v in layout.env.items()) + " }\n"
    spec_path.write_text(SPEC_TEMPLATE.format(
        editable=_q(layout.editable), protected=_q(layout.protected), command=layout.command,
        setup_line=f'setup = "{layout.setup}"     # once per session, before the baseline\n' if layout.setup else "",
        budget=f"{layout.budget:g}", timeout=f"{layout.timeout:g}", env_line=env_line, metric=layout.metric,
        direction=layout.direction, secondary=_q(layout.secondary),
        memory_line=f'memory = "{layout.memory}"         # MB figure shown as memory_gb in results.tsv\n'
        if layout.memory else "",
    ))
    if layout.readonly:  # [sandbox] is the template's last section
        with spec_path.open("a") as f:
            f.write(f"readonly = [{_q(list(layout.readonly))}]   # host data runs may read; "
                    "the sandbox shows nothing else of $HOME\n")
    written = [spec_path]
    program = root / PROGRAM_FILE
    if not program.exists():
        program.write_text(PROGRAM_TEMPLATE.format(
            target=", ".join(layout.editable), metric=layout.metric, command=layout.command,
            budget=f"{layout.budget:g}", editable=", ".join(f"`{e}`" for e in layout.editable),
            direction_word="lowest" if layout.direction == "minimize" else "highest",
        ))
        written.append(program)
    return written


def examples_dir() -> Path:
    """The shipped example labs: inside the wheel, or the repo's ``examples/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_examples", here.parents[1] / "examples"):
        if candidate.is_dir():
            return candidate
    raise UsageError("the example labs are not installed with this copy of nightlab",
                     "reinstall nightlab from its source or wheel")


def copy_example(name: str, dest: Path) -> Path:
    src = examples_dir() / name
    if not src.is_dir():
        known = sorted(p.name for p in examples_dir().iterdir() if p.is_dir())
        raise UsageError(f"no example lab named {name!r}", f"use one of: {', '.join(known)}")
    dest = dest.resolve()
    if dest.exists() and any(dest.iterdir()):
        raise UsageError(f"{dest} exists and is not empty", "pass a new folder, or remove it first")
    shutil.copytree(src, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".nightlab", "data", "*.pt"))
    env = _env()
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", f"example lab {name}"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest
