"""`nightlab init` and `--from-autoresearch` on a fixture repo with autoresearch's layout."""

from __future__ import annotations

import subprocess

from tests.conftest import cli_env, commit_all, git, nightlab_cmd

from nightlab.spec import load_spec

# Small stand-ins with the shape of karpathy/autoresearch's files (written for this test).
AR_PREPARE = '''\
"""One-time data prep and the fixed evaluation. Do not modify."""
MAX_SEQ_LEN = 2048
TIME_BUDGET = 300
def evaluate_bpb(model, tokenizer, batch_size):
    return 1.0
'''
AR_TRAIN = '''\
from prepare import MAX_SEQ_LEN, TIME_BUDGET, evaluate_bpb
DEPTH = 8
MATRIX_LR = 0.04
TOTAL_BATCH_SIZE = 2**19
val_bpb = evaluate_bpb(None, None, 1)
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"peak_vram_mb:     {45060.2:.1f}")
'''
AR_PROGRAM = "# autoresearch\nThis is an experiment to have the LLM do its own research.\n"


def run_cli(*args, cwd=None):
    return subprocess.run(nightlab_cmd(*args), capture_output=True, text=True, env=cli_env(), cwd=cwd)


def make_repo(tmp_path, files):
    repo = tmp_path / "ar"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "master")
    for name, text in files.items():
        (repo / name).write_text(text)
    commit_all(repo)
    return repo


def test_from_autoresearch_recognises_the_layout(tmp_path):
    repo = make_repo(tmp_path, {"train.py": AR_TRAIN, "prepare.py": AR_PREPARE, "program.md": AR_PROGRAM})
    proc = run_cli("init", str(repo), "--from-autoresearch")
    assert proc.returncode == 0, proc.stderr
    spec = load_spec(repo)
    assert spec.files.editable == ["train.py"]
    assert spec.files.protected == ["prepare.py"]
    assert spec.metric.name == "val_bpb" and spec.metric.direction.value == "minimize"
    assert spec.metric.source == "summary"
    assert spec.run.budget_s == 300
    assert spec.metric.memory == "peak_vram_mb"
    # autoresearch's own program.md is kept, not overwritten
    assert (repo / "program.md").read_text() == AR_PROGRAM


def test_from_autoresearch_names_what_is_missing(tmp_path):
    repo = make_repo(tmp_path, {"train.py": AR_TRAIN})
    proc = run_cli("init", str(repo), "--from-autoresearch")
    assert proc.returncode == 2
    assert "prepare.py" in proc.stderr and "Traceback" not in proc.stderr


def test_plain_init_writes_a_valid_spec_and_program(tmp_path):
    repo = make_repo(tmp_path, {"train.py": "LR = 0.1\nprint('---'); print('loss: 1.0')\n"})
    proc = run_cli("init", str(repo))
    assert proc.returncode == 0, proc.stderr
    spec = load_spec(repo)
    assert spec.files.editable == ["train.py"] and spec.run.command == "python train.py"
    assert "train.py" in (repo / "program.md").read_text()


def test_init_refuses_to_overwrite_and_needs_git(tmp_path):
    repo = make_repo(tmp_path, {"train.py": "LR = 0.1\n"})
    assert run_cli("init", str(repo)).returncode == 0
    again = run_cli("init", str(repo))
    assert again.returncode == 2 and "--force" in again.stderr
    assert run_cli("init", str(repo), "--force").returncode == 0
    plain = tmp_path / "not-git"
    plain.mkdir()
    (plain / "train.py").write_text("X = 1\n")
    proc = run_cli("init", str(plain))
    assert proc.returncode == 2 and "git init" in proc.stderr


def test_from_autoresearch_declares_its_data_cache_read_only(tmp_path):
    """autoresearch's prepare.py writes ~/.cache/autoresearch; the sandbox shows runs only what is declared."""
    repo = make_repo(tmp_path, {"train.py": AR_TRAIN, "prepare.py": AR_PREPARE, "program.md": AR_PROGRAM})
    assert run_cli("init", str(repo), "--from-autoresearch").returncode == 0
    assert load_spec(repo).sandbox.readonly == ["~/.cache/autoresearch"]
