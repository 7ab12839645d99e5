"""``nightlab init`` and ``nightlab demo``: write a starter spec, or copy an example lab.

``init`` never overwrites without ``force`` and never touches files other than
``nightlab.toml`` and ``program.md`` (an existing ``program.md`` is kept: autoresearch
ships one that is the research org's own text).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.errors import SpecError, UsageError
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
kind = "search"                 # Optuna over the constants of the editable files: `nightlab space` lists them
sampler = "tpe"
seed = 0
# exclude = ["NOISE"]           # never search these (or: NAME = "fixed" in [researcher.space] below)

[sandbox]
mode = "auto"                   # auto | required | none (bubblewrap: no network, minimal host view)
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

PROGRAM_SPACE = """
## The search space
The `search` researcher (the default) and the `local` one change only the constants listed by
`nightlab space`: module-level numbers, tuples and strings of {editable}, over the ranges of
`[researcher.space]` in nightlab.toml (which wins), else of a `# nightlab:` comment on the line
(`# nightlab: 1e-5..1e-2 log`, `# nightlab: choices 32,64,128`, `# nightlab: fixed`), else a
default. Mark what defines your metric or data `fixed`. The `search` researcher does not read
this file; the `llm` and `agent` researchers read it and may edit the editable files freely.
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
    space: dict[str, Any] | None = None  # curated [researcher.space] entries, kept where they fit
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
    setup, env = "python prepare.py", {"TRITON_CACHE_DIR": "/tmp/triton-cache"}
    repos = hub_kernels(train)
    if repos:
        # runs have no network: fetch the Hub kernels train.py loads at import during setup (which
        # runs outside the sandbox), and let runs read them from the cache, offline
        fetch = 'python -c "import sys; from kernels import get_kernel; get_kernel(sys.argv[1])" "$r"'
        setup = (f"HF_HUB_OFFLINE=0 python prepare.py && for r in {' '.join(repos)}; do HF_HUB_OFFLINE=0 "
                 f"{fetch} || echo \"nightlab: could not cache the kernel $r (fine if train.py does not load "
                 "it on this GPU)\"; done")
        env["HF_HUB_OFFLINE"] = "1"
    return Layout(
        editable=["train.py"], protected=["prepare.py"], command="python train.py",
        setup=setup, metric="val_bpb", direction="minimize", budget=300, timeout=600,
        secondary=["peak_vram_mb", "training_seconds", "mfu_percent", "num_params_M"], memory="peak_vram_mb",
        env=env, space=AUTORESEARCH_SPACE,
        readonly=("~/.cache/autoresearch",),  # prepare.py's data and tokenizer, read by train.py
    )


#: A sensible space for autoresearch's train.py, on top of the defaults (entries that do not fit the
#: file at hand are left out): attention head sizes the kernels support, a depth that fits one GPU,
#: window patterns of S(hort) and L(ong) layers. Hardware figures are excluded by name, and
#: DEVICE_BATCH_SIZE/TOTAL_BATCH_SIZE are searched over powers of two that keep the divisibility assert.
AUTORESEARCH_SPACE: dict[str, Any] = {
    "HEAD_DIM": {"choices": [64, 128, 256]},
    "DEPTH": {"range": [4, 16], "int": True},
    "WINDOW_PATTERN": {"choices": ["SSSL", "SSLL", "SLSL", "SL", "L"]},
}


def hub_kernels(source: str) -> list[str]:
    """Hugging Face Hub repos that ``source`` passes to ``get_kernel(...)`` (literals, or the string
    literals of the one assignment of a name it passes)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    assigned: dict[str, ast.expr] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assigned[node.targets[0].id] = node.value
    repos: list[str] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "get_kernel"):
            continue
        arg = node.args[0]
        where: ast.AST = assigned.get(arg.id, arg) if isinstance(arg, ast.Name) else arg
        for sub in ast.walk(where):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.count("/") == 1 \
                    and all(ch.isalnum() or ch in "-_./" for ch in sub.value):
                repos.append(sub.value)
    return list(dict.fromkeys(repos))


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
        setup_line=f'setup = {json.dumps(layout.setup)}     # once per session, before the baseline\n'
        if layout.setup else "",
        budget=f"{layout.budget:g}", timeout=f"{layout.timeout:g}", env_line=env_line, metric=layout.metric,
        direction=layout.direction, secondary=_q(layout.secondary),
        memory_line=f'memory = "{layout.memory}"         # MB figure shown as memory_gb in results.tsv\n'
        if layout.memory else "",
    ))
    if layout.readonly:  # [sandbox] is the template's last section (before write_space's block)
        with spec_path.open("a") as f:
            f.write(f"readonly = [{_q(list(layout.readonly))}]   # host data runs may read; "
                    "the sandbox shows nothing else of $HOME\n")
    write_space(spec_path, layout.space or {})
    written = [spec_path]
    program = root / PROGRAM_FILE
    if not program.exists():
        program.write_text(PROGRAM_TEMPLATE.format(
            target=", ".join(layout.editable), metric=layout.metric, command=layout.command,
            budget=f"{layout.budget:g}", editable=", ".join(f"`{e}`" for e in layout.editable),
            direction_word="lowest" if layout.direction == "minimize" else "highest",
        ) + PROGRAM_SPACE.format(editable=", ".join(f"`{e}`" for e in layout.editable)))
        written.append(program)
    written.append(write_agents_md(root, layout.editable, layout.protected))
    return written


AGENTS_BEGIN = "<!-- nightlab: begin (written by `nightlab init`; edit freely, it is replaced only by init) -->"
AGENTS_END = "<!-- nightlab: end -->"
AGENTS_SECTION = """{begin}
## nightlab (autonomous research on this repository)

This repository is a nightlab lab: `nightlab.toml` says what a research session may edit ({editable}), how an
experiment runs and what it measures; `program.md` is the human's research brief.

- Read the state: `nightlab status`, `nightlab log`, `nightlab show N`, `nightlab diff N`, `nightlab status --all`
  (or the MCP server: `nightlab mcp`, tools `status`, `log`, `experiment`, `pending`, `audit_state`).
- Act: `nightlab run --tag TAG` starts a session (`--resume` continues one); `touch .nightlab/STOP` stops it
  after the experiment in flight. Kept results are commits on the branch `nightlab/TAG`.
- Do not edit {protected}`nightlab.toml`, `program.md` or anything under `.nightlab/` while a session runs;
  never rewrite `nightlab/*` branches or `refs/nightlab/*`. Answer approvals (`nightlab approve N`) only
  when the human asked you to.
{end}
"""


def write_agents_md(root: Path, editable: list[str], protected: list[str]) -> Path:
    """Add (or refresh) nightlab's section in the repository's ``AGENTS.md``; the rest of the file is kept."""
    path = root / "AGENTS.md"
    section = AGENTS_SECTION.format(
        begin=AGENTS_BEGIN, end=AGENTS_END, editable=", ".join(f"`{e}`" for e in editable) or "nothing",
        protected="".join(f"`{p}`, " for p in protected))
    text = path.read_text() if path.exists() else ""
    if AGENTS_BEGIN in text and AGENTS_END in text:
        head, rest = text.split(AGENTS_BEGIN, 1)
        tail = rest.split(AGENTS_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.write_text(text)
    return path


def write_space(spec_path: Path, curated: dict[str, Any]) -> None:
    """Append the lab's search space to the new spec as an editable ``[researcher.space]`` block.

    With ``curated`` entries (``--from-autoresearch``) the block is active: the entries that fit
    the file, and the found range of every other searched constant. Otherwise every line is a
    comment (the code and its ``# nightlab:`` comments stay the source; uncomment to override).
    A space that cannot be read (a malformed comment) is left out; ``nightlab space`` says why.
    """
    from nightlab import space as space_mod
    from nightlab.spec import load_spec

    spec = load_spec(spec_path, check_paths=False)
    fits: dict[str, Any] = {}
    for key, entry in curated.items():
        try:
            rspec = spec.researcher.model_copy(update={"space": {**fits, key: entry}})
            space_mod.lab_space(spec.model_copy(update={"researcher": rspec}), spec_path.parent)
        except SpecError:
            continue
        fits[key] = entry
    try:
        rspec = spec.researcher.model_copy(update={"space": fits})
        found = space_mod.lab_space(spec.model_copy(update={"researcher": rspec}), spec_path.parent)
    except SpecError:
        return
    if not found.entries:
        return
    with spec_path.open("a", encoding="utf-8") as f:
        f.write("\n" + space_mod.toml_block(found, active=bool(curated)))


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
