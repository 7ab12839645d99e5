"""A lab with one real short session in its ledger, for the dashboard and report tests.

The run prints the secret env value into its log (adversarial): every page must mask it.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SPEC, TARGET_PY, commit_all, git

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher

SECRET = "sk-test-Zq8wS3cretValue0123456789"
LEAKY_TARGET = TARGET_PY.replace(
    'print("training...", file=sys.stderr)',
    'print("training with key", os.environ.get("OPENAI_API_KEY"), file=sys.stderr)',
)
DASH_SPEC = SPEC.replace(
    "[metric]", f'[run.env]\nOPENAI_API_KEY = "{SECRET}"\nPLAIN_SETTING = "visible-value"\n\n[metric]'
)


def target(x: float, y: float = 0.0) -> str:
    return LEAKY_TARGET.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")


STEPS = [
    {
        "rationale": "move X to its optimum\n\nThe score is quadratic in X.",
        "files": {"target.py": target(1.0)},
    },
    {"rationale": "overshoot X", "files": {"target.py": target(2.0)}},
    {"rationale": "break the program", "files": {"target.py": "raise SystemExit(3)\n"}},
    {"rationale": "move Y to its optimum", "files": {"target.py": target(1.0, 2.0)}},
]


def make_dash_lab(root: Path) -> Path:
    lab = root / "repo"
    lab.mkdir(parents=True)
    git(lab, "init", "-q", "-b", "main")
    files = {
        "target.py": LEAKY_TARGET,
        "evaluate.py": "print('protected')\n",
        "program.md": "# test\n",
        "nightlab.toml": DASH_SPEC,
    }
    for name, text in files.items():
        (lab / name).write_text(text)
    commit_all(lab)
    return lab


def run_session(lab: Path, tag: str = "t", steps: list | None = None, **kw: object) -> None:
    steps = STEPS if steps is None else steps
    eng = Engine(
        lab,
        tag=tag,
        researcher=ScriptedResearcher(steps),
        sandbox_mode="none",
        max_experiments=len(steps),
        **kw,
    )  # type: ignore[arg-type]
    try:
        eng.run()
    finally:
        eng.close()
