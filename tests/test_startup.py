"""The CLI answers at once: what each command imports (structure, not timing; figures in bench/startup.py).

``--version`` and ``--help`` import neither SQLAlchemy, pydantic, Optuna nor Rich; the read
commands read the lab's SQLite ledger with sqlite3: no SQLAlchemy, pydantic, Optuna, numpy or web stack.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import GIT_ENV, SRC

from nightlab.cli.main import COMMANDS, main

HEAVY = {"sqlalchemy", "pydantic", "optuna", "numpy", "rich", "fastapi", "starlette", "jinja2", "matplotlib"}


def imported(args: list[str], cwd: Path) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Top-level packages imported by ``python -X importtime -m nightlab ARGS`` (and its result)."""
    env = {**os.environ, **GIT_ENV, "PYTHONPATH": SRC}
    env.pop("NIGHTLAB_DB", None)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "nightlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    mods = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}
    return mods, proc


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["nosuchcommand"]])
def test_version_and_help_import_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    mods, proc = imported(args, tmp_path)
    assert proc.returncode == (2 if args == ["nosuchcommand"] else 0), proc.stderr[-2000:]
    assert "nightlab" in mods and "click" in mods
    assert not mods & HEAVY, sorted(mods & HEAVY)


def test_package_import_is_light() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, nightlab, nightlab.cli.main; "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                          f"{sorted(HEAVY)!r}))"], env={**os.environ, "PYTHONPATH": SRC},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.dashlab import make_dash_lab, run_session

    lab = make_dash_lab(tmp_path_factory.mktemp("startup"))
    run_session(lab)
    return lab


@pytest.mark.parametrize("args", [["status"], ["log"], ["show", "1"], ["diff", "1"], ["export"]])
def test_read_commands_read_sqlite_without_sqlalchemy(args: list[str], lab: Path) -> None:
    mods, proc = imported(args, lab)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sqlite3" in mods  # the lab's ledger, read by nightlab.ledger_read
    assert not mods & (HEAVY - {"rich"}), sorted(mods & HEAVY)


def test_lazy_registry_matches_the_commands() -> None:
    """`nightlab --help` shows the registry's one-line help without importing the modules; it must be
    what each command says of itself."""
    for name, (module, attr, short) in COMMANDS.items():
        cmd = getattr(importlib.import_module(module), attr)
        assert cmd.get_short_help_str(limit=72) == short, name
    out = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    for name in COMMANDS:
        assert f"  {name} " in out
