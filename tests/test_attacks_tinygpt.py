"""Attacks on tinygpt's protected evaluator by a hostile train.py (issue 11, forged trust).

The evaluator (and holdout.py) must never run the candidate's Python: it rebuilds the model from
the protected model.py and loads a weights-only checkpoint. Each attack here forged a metric
labelled ``trust: evaluator`` when evaluate.py imported ``train.build_model`` (reproduced on the
old evaluator); now each gives the honest figure, or a refusal with the reason.

Real processes throughout: the hostile train.py trains for a few steps (``TINYGPT_STEPS``), and
the evaluator runs the way nightlab starts it, in a clean tree (the lab's files plus ``ckpt.pt``)
with ``PYTHONSAFEPATH=1`` and the protected files on ``PYTHONPATH`` (``$NIGHTLAB_TRUSTED_DIR``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.scaffold import copy_example
from nightlab.types import Status

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROTECTED = ("prepare.py", "model.py", "evaluate.py", "holdout.py")
FORGED = 0.0001

# Runs at import: inside any evaluator that imports train.py. (a) patches the scoring and torch.
PATCH = '''
import sys as _sys, torch as _torch
if not _sys.argv[0].endswith("train.py"):
    open(__import__("os").environ.get("HOSTILE_MARKER", "/dev/null"), "w").write("patched")
    for _name in ("__main__", "evaluate", "prepare"):
        _m = _sys.modules.get(_name)
        if _m is not None and hasattr(_m, "evaluate_bpb"):
            _m.evaluate_bpb = lambda *a, **k: 0.0001
    _torch.nn.functional.log_softmax = lambda x, dim=-1, **k: _torch.zeros_like(x)
'''
# (b) prints a later summary block when the evaluator exits: the last block counts.
ATEXIT = '''
import atexit as _atexit, sys as _sys
if not _sys.argv[0].endswith("train.py"):
    open(__import__("os").environ.get("HOSTILE_MARKER", "/dev/null"), "w").write("atexit")
    _atexit.register(lambda: print("---\\nval_bpb: 0.0001\\nholdout_bpb: 0.0001", flush=True))
'''


def py(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=180)


def summary(stdout: str) -> dict[str, float]:
    lines = stdout.splitlines()
    assert "---" in lines, stdout
    start = len(lines) - 1 - lines[::-1].index("---")
    return {k.strip(): float(v) for k, _, v in (line.partition(":") for line in lines[start + 1 :])}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, float]]:
    """A tinygpt lab whose train.py carries both attacks, trained for 3 steps; its own summary."""
    root = tmp_path_factory.mktemp("tinygpt")
    lab = root / "lab"
    shutil.copytree(EXAMPLES / "tinygpt", lab, ignore=shutil.ignore_patterns("data", "__pycache__", "*.pt"))
    (lab / "train.py").write_text((lab / "train.py").read_text() + PATCH + ATEXIT)
    env = {"NIGHTLAB_DATA_DIR": str(root / "data"), "NIGHTLAB_HOLDOUT_DIR": str(root / "hold"),
           "NIGHTLAB_SEED": "0", "TINYGPT_STEPS": "3", "TINYGPT_THREADS": "1",
           "HOSTILE_MARKER": str(root / "marker")}
    p = py(["prepare.py", "--train-bytes", "20000", "--val-bytes", "2048", "--holdout-bytes", "2048"], lab, env)
    assert p.returncode == 0, p.stderr
    p = py(["train.py"], lab, env)
    assert p.returncode == 0, p.stderr
    assert not (root / "marker").exists()  # the attacks stay quiet while training
    return lab, env, summary(p.stdout)


def evaluate(lab: Path, env: dict[str, str], script: str, work: Path,
             ckpt: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python <script>`` as nightlab starts it: a clean tree, PYTHONSAFEPATH, the trusted files on PYTHONPATH."""
    tree, trusted = work / "tree", work / "trusted"
    tree.mkdir(parents=True)
    trusted.mkdir()
    for f in lab.iterdir():
        if f.suffix in (".py", ".md", ".toml"):
            shutil.copy(f, tree / f.name)
    for f in PROTECTED:
        shutil.copy(lab / f, trusted / f)
    shutil.copy(ckpt or lab / "ckpt.pt", tree / "ckpt.pt")
    safe = {**env, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(trusted), "NIGHTLAB_TRUSTED_DIR": str(trusted),
            "PYTHONDONTWRITEBYTECODE": "1"}
    return py([script], tree, safe)


@pytest.mark.slow
@pytest.mark.parametrize(("script", "key"), [("evaluate.py", "val_bpb"), ("holdout.py", "holdout_bpb")])
def test_a_hostile_train_py_cannot_patch_or_outprint_the_evaluator(lab, tmp_path, script, key):
    path, env, claimed = lab
    marker = Path(env["HOSTILE_MARKER"])
    p = evaluate(path, env, script, tmp_path)
    assert p.returncode == 0, p.stderr
    assert not marker.exists(), f"train.py ran inside {script}: {marker.read_text()}"
    lines = p.stdout.splitlines()
    assert lines.count("---") == 1 and str(FORGED) not in p.stdout
    got = summary(p.stdout)[key]
    assert got > 2.0  # an honest 3-step model: far above the floor (~1.93), nowhere near 0.0001
    if key == "val_bpb":  # the same figure train.py's own honest evaluation printed
        assert math.isclose(got, claimed["val_bpb"], abs_tol=2e-6)


def test_the_evaluator_never_imports_train_py():
    # the design, stated where a reader looks: no import of the editable file by protected code
    for f in PROTECTED:
        src = (EXAMPLES / "tinygpt" / f).read_text()
        assert "import train" not in src and "from train" not in src, f


class Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_on_load_is_refused(lab, tmp_path):
    torch = pytest.importorskip("torch")
    path, env, _ = lab
    marker = tmp_path / "pickle-ran"
    good = torch.load(path / "ckpt.pt", weights_only=True)
    bad = tmp_path / "evil.pt"
    for name, obj in [("in the state_dict", {"config": good["config"], "model": Payload(str(marker))}),
                      ("as the config", {"config": Payload(str(marker)), "model": good["model"]}),
                      ("at the top", Payload(str(marker)))]:
        torch.save(obj, bad)
        p = evaluate(path, env, "evaluate.py", tmp_path / name.replace(" ", "-"), ckpt=bad)
        assert p.returncode == 1, (name, p.stdout, p.stderr)
        assert "not a weights-only checkpoint" in p.stderr, name
        assert "---" not in p.stdout.splitlines(), name
        assert not marker.exists(), f"code in the checkpoint ran ({name})"


@pytest.mark.slow
@pytest.mark.parametrize(("edit", "reason"), [
    ({"n_layer": 10**9}, "n_layer"),
    ({"bias": "True"}, "bias"),
    ({"__class__": "os.system"}, "unknown config keys"),
    ({"pos": "rope"}, "do not match the config's model"),  # a member, but the weights are another's
    ({"n_layer": 64, "n_head": 64, "head_dim": 128}, "do not match"),  # 50 G parameters: never allocated
    ({"pos": ["rope"]}, "pos"),
])
def test_a_config_outside_the_family_is_refused(lab, tmp_path, edit, reason):
    torch = pytest.importorskip("torch")
    path, env, _ = lab
    good = torch.load(path / "ckpt.pt", weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save({"config": {**good["config"], **edit}, "model": good["model"]}, bad)
    p = evaluate(path, env, "evaluate.py", tmp_path / "e", ckpt=bad)
    assert p.returncode == 1 and reason in p.stderr, p.stderr
    assert "---" not in p.stdout.splitlines()


@pytest.mark.slow
def test_through_the_engine_a_hostile_train_py_gets_an_honest_evaluator_metric(tmp_path):
    """The same attacks committed by a researcher and run by nightlab (bwrap when present): the
    candidate's metric and holdout score, labelled trust: evaluator, are its model's real ones."""
    pytest.importorskip("torch")
    from test_examples_verified import MODE, tiny

    lab = copy_example("tinygpt", tmp_path / "tg")
    spec = tiny(lab, run={"budget_s": 60.0, "timeout_s": 120.0, "env": {"TINYGPT_STEPS": "3", "TINYGPT_THREADS": "1"},
                          "setup": "python prepare.py --train-bytes 20000 --val-bytes 2048 --holdout-bytes 2048"},
                accept={"policy": "greedy"})
    tail = '\nif __name__ == "__main__":\n    main()\n'
    assert (lab / "train.py").read_text().endswith(tail)
    # a real gain too (a higher learning rate over 3 steps), so the candidate is kept and the holdout check runs
    lr = "LEARNING_RATE = 2e-3  # nightlab: 1e-4..3e-2 log\n"
    src = (lab / "train.py").read_text()
    assert lr in src
    hostile = src.replace(tail, PATCH + ATEXIT + tail).replace(lr, "LEARNING_RATE = 2e-2\n")
    steps = [{"rationale": "hostile", "replace": {"train.py": [src, hostile]}}]
    eng = Engine(lab, tag="atk", spec=spec, researcher=ScriptedResearcher(steps), sandbox_mode=MODE,
                 max_experiments=1)
    session = eng.run()
    base, cand = eng.ledger.experiments(session.id)
    assert base.status is Status.KEEP and base.trust == "evaluator", base.reason
    assert cand.trust == "evaluator" and cand.status is Status.KEEP, cand.reason
    assert 2.0 < cand.metric < base.metric  # the honest gain, not the forged 0.0001
    assert cand.secondary["holdout"] > 2.0 and base.secondary["holdout"] > 2.0
    eng.close()
