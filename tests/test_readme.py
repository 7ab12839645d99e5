"""The README, as a new user follows it: "Your own repository" walked end to end, commands as written.

The shell block of that section is read from README.md and each line is run by bash in a fresh
git repository, with ``nightlab`` on PATH (this checkout's), after the edits the README asks for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import GIT_ENV, SRC, commit_all, git

from nightlab.spec import AcceptSpec

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """\
LR = 0.5
X = 3.0
print("---")
print(f"loss: {(X - 1.0) ** 2 + LR:.6f}")
"""


def section_commands(title: str) -> list[str]:
    """The lines of the first ```bash block after the heading ``title``, comments stripped."""
    text = (ROOT / "README.md").read_text()
    at = text.index(f"### {title}\n")
    block = re.search(r"```bash\n(.*?)```", text[at:], re.S)
    assert block is not None
    return [re.sub(r"\s+#\s.*$", "", ln).strip() for ln in block.group(1).splitlines() if ln.strip()]


def bash(cmd: str, cwd: Path, bindir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV, "PYTHONPATH": SRC, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "200"}
    env.pop("NIGHTLAB_DB", None)
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_your_own_repository_as_written(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "nightlab"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nightlab "$@"\n')
    shim.chmod(0o755)
    repo = tmp_path / "my-research-repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "train.py").write_text(SCRIPT)
    commit_all(repo, "a committed experiment script")

    commands = section_commands("Your own repository")
    assert commands[0] == "cd my-research-repo" and commands[1] == "nightlab init"
    assert any(c.startswith("git add nightlab.toml program.md && git commit") for c in commands)
    assert any(c.startswith("nightlab run --tag ") for c in commands)
    cwd = tmp_path
    outputs: dict[str, str] = {}
    for cmd in commands:
        if cmd.startswith("cd "):
            cwd = cwd / cmd[3:]
            continue
        r = bash(cmd, cwd, bindir)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        outputs[cmd] = r.stdout + r.stderr
        if cmd == "nightlab init":
            # "edit them": a short night
            spec = (cwd / "nightlab.toml").read_text()
            assert 'name = "loss"' in spec  # init found the metric the script prints
            spec = re.sub(r"max_experiments = \d+", "max_experiments = 3", spec)
            spec = re.sub(r"budget_s = \d+", "budget_s = 5", spec)
            (cwd / "nightlab.toml").write_text(re.sub(r"timeout_s = \d+", "timeout_s = 60", spec))
    tag = next(c.split("--tag ")[1].split()[0] for c in commands if c.startswith("nightlab run --tag "))
    run_out = next(v for k, v in outputs.items() if k.startswith("nightlab run --tag "))
    assert f"session {tag}: finished" in run_out
    assert "loss (minimize)" in outputs["nightlab status"] and tag in outputs["nightlab status"]

    # "`nightlab run --resume` continues": a longer night, committed, continues without a new baseline
    spec = (cwd / "nightlab.toml").read_text().replace("max_experiments = 3", "max_experiments = 5")
    (cwd / "nightlab.toml").write_text(spec)
    r = bash("nightlab run --resume", cwd, bindir)
    assert r.returncode == 2 and "uncommitted changes in nightlab.toml" in r.stderr  # runs use commits
    assert bash("git commit -qam 'a longer night'", cwd, bindir).returncode == 0
    r = bash("nightlab run --resume", cwd, bindir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "harmless changes: [stop] max_experiments: 3 -> 5" in r.stdout
    assert "running: baseline" not in r.stdout

    # the read commands of the worked example
    log = bash("nightlab log", cwd, bindir).stdout
    assert [int(n) for n in re.findall(r"^│\s+(\d+)\s+│", log, re.M)] == list(range(6)), log
    for cmd in ("nightlab show 1", "nightlab diff 1", "nightlab export --format tsv",
                f"git log --oneline nightlab/{tag}"):
        r = bash(cmd, cwd, bindir)
        assert r.returncode == 0, (cmd, r.stderr)
    tsv = bash("nightlab export --format tsv", cwd, bindir).stdout.splitlines()
    assert tsv[0] == "commit\tloss\tmemory_gb\tstatus\tdescription" and len(tsv) == 1 + 6
    assert "train.py" in bash("nightlab diff 1", cwd, bindir).stdout


def test_bench_readme_marks_the_repeat_defaults_row() -> None:
    d = AcceptSpec()
    text = (ROOT / "bench" / "README.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "defaults" in ln]
    assert len(rows) == 1
    want = f"{d.screen} screen z = {d.screen_z:g}, r = {d.repeats}, {'Welch' if d.test == 'welch' else d.test}, " \
           f"alpha = {d.alpha:g}"
    assert want in rows[0], (want, rows[0])
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"repeat, defaults \(threshold screen z = 1, r = 5, Welch, α = 0\.02\)", readme)
