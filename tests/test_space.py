"""The search space out of the box: autoresearch- and nanoGPT-style scripts, [researcher.space],
asserts respected, `nightlab space`, `init` printing and writing it, validation up front."""

from __future__ import annotations

import ast
import json
import subprocess
import tomllib
from pathlib import Path

import pytest
from tests.conftest import cli_env, commit_all, git, nightlab_cmd
from tests.spacelabs import AR_PREPARE, AR_TRAIN, NANO_TRAIN

from nightlab.constants import evaluate, find_constants, rewrite
from nightlab.engine import Engine
from nightlab.errors import SpecError
from nightlab.space import search_space
from nightlab.spec import Spec, load_spec
from nightlab.types import Status

AR_PROGRAM = "# autoresearch\nThis is an experiment to have the LLM do its own research.\n"


def spec(**space: object) -> Spec:
    return Spec.model_validate({"files": {"editable": ["train.py"]}, "run": {"command": "python train.py"},
                                "metric": {"name": "loss"}, "researcher": {"kind": "search", "space": space}})


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nightlab_cmd(*args), capture_output=True, text=True, env=cli_env(), cwd=cwd)


def repo(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "lab"
    root.mkdir()
    git(root, "init", "-q", "-b", "master")
    for name, text in files.items():
        (root / name).write_text(text)
    commit_all(root)
    return root


def ar_space(tmp_path: Path, **space: object):
    (tmp_path / "prepare.py").write_text(AR_PREPARE)
    return search_space(spec(**space), {"train.py": AR_TRAIN}, tmp_path)


# --------------------------------------------------------------------------- what is found


def test_autoresearch_layout_space(tmp_path: Path) -> None:
    space = ar_space(tmp_path)
    p = space.params
    assert list(p) == [
        "ASPECT_RATIO", "HEAD_DIM", "TOTAL_BATCH_SIZE", "EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR",
        "WEIGHT_DECAY", "ADAM_BETAS[0]", "ADAM_BETAS[1]", "WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC",
        "DEPTH", "DEVICE_BATCH_SIZE",
    ]  # fmt: skip
    # an expression, evaluated without eval: searched over powers of two
    assert p["TOTAL_BATCH_SIZE"].value == 2**19 and p["TOTAL_BATCH_SIZE"].text == "2**19"
    assert p["TOTAL_BATCH_SIZE"].choices == (2**17, 2**18, 2**19, 2**20, 2**21)
    # the divisibility assert narrows the batch size to powers of two (no 384 to crash on)
    assert p["DEVICE_BATCH_SIZE"].choices == (32, 64, 128, 256, 512)
    # tuple elements are parameters; betas stay below 1
    assert p["ADAM_BETAS[1]"].value == 0.95 and p["ADAM_BETAS[1]"].high < 1
    skipped = {e.name: e.reason for e in space.entries if e.constant is None}
    assert skipped == {"WINDOW_PATTERN": "a string: give choices to search it",
                       "H100_BF16_PEAK_FLOPS": "hardware figure"}
    [check] = space.checks.checks
    assert check.text == "assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0"
    assert check.uses == {"TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"}


def test_the_assert_is_evaluated_with_the_constant_imported_from_prepare(tmp_path: Path) -> None:
    space = ar_space(tmp_path)
    assert space.violations({}) == []
    assert space.violations({"DEVICE_BATCH_SIZE": 256}) == []
    line = AR_TRAIN.splitlines().index("    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0") + 1
    assert space.violations({"DEVICE_BATCH_SIZE": 512}) == [
        f"train.py:{line}: assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0"]
    assert space.violations({"DEVICE_BATCH_SIZE": 384})
    assert space.violations({"TOTAL_BATCH_SIZE": 2**17})  # 2**17 / (128 * 2048) is not whole
    assert not space.violations({"TOTAL_BATCH_SIZE": 2**17, "DEVICE_BATCH_SIZE": 64})
    # without prepare.py MAX_SEQ_LEN cannot be read: taken as it is now (the baseline shows it divides),
    # a proposal passes when TOTAL/DEVICE stays a whole multiple of its current value (conservative)
    alone = search_space(spec(), {"train.py": AR_TRAIN}, tmp_path / "elsewhere")
    assert alone.checks and alone.params["DEVICE_BATCH_SIZE"].choices == (32, 64, 128, 256, 512)
    assert not alone.violations({}) and not alone.violations({"DEVICE_BATCH_SIZE": 64})
    assert not alone.violations({"TOTAL_BATCH_SIZE": 2**20, "DEVICE_BATCH_SIZE": 256})
    assert alone.violations({"DEVICE_BATCH_SIZE": 512}) and alone.violations({"TOTAL_BATCH_SIZE": 2**18})
    assert alone.violations({"DEVICE_BATCH_SIZE": 256})  # would work with 2048, refused without knowing it


def test_nanogpt_layout_space() -> None:
    space = search_space(spec(), {"train.py": NANO_TRAIN})
    assert list(space.params) == [
        "gradient_accumulation_steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "dropout",
        "learning_rate", "max_iters", "weight_decay", "beta1", "beta2", "grad_clip", "warmup_iters",
    ]  # fmt: skip
    p = space.params
    lr = p["learning_rate"]
    assert (lr.low, lr.high, lr.log) == pytest.approx((6e-5, 6e-3, True))
    assert p["gradient_accumulation_steps"].value == 40 and p["n_layer"].kind == "int"
    assert p["dropout"].high == 0.5 and p["beta2"].high < 1
    skipped = {e.name: e.reason for e in space.entries if e.constant is None}
    for name, why in {"vocab_size": "defines the data", "seed": "seed", "device": "hardware", "dtype": "hardware",
                      "out_dir": "path", "eval_interval": "logging", "eval_iters": "evaluation",
                      "iter_num": "a variable: the script changes it as it runs",
                      "best_val_loss": "a variable: the script changes it as it runs"}.items():
        assert skipped[name] == why
    assert "compile" not in skipped and "bias" not in skipped  # bools are not constants
    assert space.violations({"n_head": 7})  # assert n_embd % n_head == 0
    assert not space.violations({"n_head": 8})


def test_rewrite_keeps_powers_tuples_and_strings_as_written() -> None:
    src = 'T = 2**19  # tokens\nB = (0.8, 0.95)  # betas\nP = "SSSL"\nlr = 6e-4\n'
    out = rewrite(src, {"T": 2**20, "B[1]": 0.99, "B[0]": 0.85, "P": "SL", "lr": 1e-3})
    assert out == 'T = 2**20  # tokens\nB = (0.85, 0.99)  # betas\nP = "SL"\nlr = 0.001\n'
    assert rewrite(src, {"T": 3 * 2**17}) == src.replace("2**19", "393216")
    assert {c.name: c.value for c in find_constants(out)}["B[1]"] == 0.99


def test_literal_arithmetic_never_evals() -> None:
    assert evaluate(ast.parse("64 * 8 + 2**3 - 1", mode="eval").body) == 519
    for text in ("__import__('os').system('true')", "10**10**10", "x + 1", "[1][0]", "(1).real"):
        assert [c.name for c in find_constants(f"A = {text}\n")] == []


# --------------------------------------------------------------------------- [researcher.space]


def test_researcher_space_wins_and_reaches_any_name() -> None:
    src = ("LR = 3e-4  # nightlab: fixed  (note)\nseed = 3\nbatch_size = 12\nPATTERN = 'SSSL'\n"
           "BETAS = (0.8, 0.95)\n")
    with pytest.raises(SpecError, match="cannot read"):  # the comment alone is malformed
        search_space(spec(), {"train.py": src})
    space = search_space(spec(LR="1e-5..1e-2 log", seed={"range": [0, 10]}, batch_size={"choices": [8, 12, 16]},
                              PATTERN={"choices": ["SSSL", "L"]}, BETAS="fixed"), {"train.py": src})
    p = space.params
    assert (p["LR"].low, p["LR"].high, p["LR"].log, p["LR"].source) == (1e-5, 1e-2, True, "spec")
    assert p["seed"].high == 10 and p["batch_size"].choices == (8, 12, 16)
    assert p["PATTERN"].choices == ("SSSL", "L") and "BETAS[0]" not in p
    one = search_space(spec(**{"BETAS[1]": "0.9..0.999"}), {"train.py": src.replace("  (note)", "")})
    assert one.params["BETAS[1]"].low == 0.9 and one.params["BETAS[0]"].source == "default"


@pytest.mark.parametrize(("entry", "words"), [
    ({"NOPE": "fixed"}, "'NOPE' is not a constant"),
    ({"LR": "1..2"}, "outside the range"),
    ({"LR": {"choices": [1, 2]}}, "is not one of"),
    ({"PATTERN": {"range": [0, 1]}}, "takes choices"),
    ({"batch": {"range": [1.5, 20]}}, "whole-number"),
    ({"LR": "sometimes"}, "cannot read"),
])
def test_researcher_space_errors_name_the_key(entry: dict[str, object], words: str) -> None:
    src = "LR = 3e-4\nbatch = 12\nPATTERN = 'SSSL'\n"
    with pytest.raises(SpecError) as info:
        search_space(spec(**entry), {"train.py": src})
    assert words in info.value.message and next(iter(entry)) in info.value.message and info.value.fix


# --------------------------------------------------------------------------- the CLI


def test_init_from_autoresearch_prints_and_writes_a_sensible_space(tmp_path: Path) -> None:
    root = repo(tmp_path, {"train.py": AR_TRAIN, "prepare.py": AR_PREPARE, "program.md": AR_PROGRAM})
    proc = run_cli("init", str(root), "--from-autoresearch")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "TOTAL_BATCH_SIZE" in out and "2**19" in out and "hardware figure" in out
    assert "assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0" in out
    data = tomllib.loads((root / "nightlab.toml").read_text())
    space = data["researcher"]["space"]
    assert space["WINDOW_PATTERN"] == {"choices": ["SSSL", "SSLL", "SLSL", "SL", "L"]}
    assert space["DEVICE_BATCH_SIZE"] == {"choices": [32, 64, 128, 256, 512]}
    assert "H100_BF16_PEAK_FLOPS" not in space
    assert data["run"]["env"]["HF_HUB_OFFLINE"] == "1"
    assert "varunneal/flash-attention-3" in data["run"]["setup"] and "HF_HUB_OFFLINE=0" in data["run"]["setup"]
    load_spec(root)  # a valid spec
    shown = json.loads(run_cli("space", "--lab", str(root), "--json").stdout)
    assert {r["name"]: r["searched"] for r in shown["params"]}["WINDOW_PATTERN"] is True


def test_plain_init_comments_the_space_and_program_md_says_who_reads_it(tmp_path: Path) -> None:
    root = repo(tmp_path, {"train.py": NANO_TRAIN})
    proc = run_cli("init", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "learning_rate" in proc.stdout and "vocab_size" in proc.stdout
    text = (root / "nightlab.toml").read_text()
    assert "# learning_rate = { range = [6e-5, 0.006], log = true }" in text
    assert tomllib.loads(text)["researcher"].get("space", {}) == {}  # all commented: the code is the source
    program = (root / "program.md").read_text()
    assert "nightlab space" in program and "does not read" in program
    table = run_cli("space", "--lab", str(root))
    assert table.returncode == 0 and "learning_rate" in table.stdout and "6e-4" in table.stdout


def test_a_bad_space_stops_the_session_before_the_baseline(tmp_path: Path) -> None:
    root = repo(tmp_path, {"train.py": "LR = 0.1  # nightlab: fixed  (note)\nprint('---'); print('loss: 1')\n"})
    assert run_cli("init", str(root)).returncode == 0
    commit_all(root, "spec")
    for cmd in (("space", "--lab", str(root)), ("run", "--lab", str(root), "--sandbox", "none", "-q")):
        proc = run_cli(*cmd)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "train.py:1: constant LR" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / ".nightlab" / "artifacts").exists() or not any((root / ".nightlab" / "artifacts").iterdir())
    (root / "nightlab.toml").write_text((root / "nightlab.toml").read_text() + '\n[researcher.space]\nLRR = "fixed"\n')
    (root / "train.py").write_text((root / "train.py").read_text().replace("  (note)", ""))
    proc = run_cli("space", "--lab", str(root))
    assert proc.returncode == 2 and "[researcher.space] 'LRR'" in proc.stderr and "LR" in proc.stderr


# --------------------------------------------------------------------------- whole sessions


def test_a_search_session_on_the_autoresearch_layout_never_breaks_the_assert(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # setup creates ~/.cache/autoresearch, runs read it
    root = repo(tmp_path, {"train.py": AR_TRAIN, "prepare.py": AR_PREPARE, "program.md": AR_PROGRAM})
    assert run_cli("init", str(root), "--from-autoresearch").returncode == 0
    text = (root / "nightlab.toml").read_text().replace("budget_s = 300", "budget_s = 5")
    (root / "nightlab.toml").write_text(text.replace("timeout_s = 600", "timeout_s = 30"))
    commit_all(root, "nightlab")
    eng = Engine(root, tag="ar", sandbox_mode="none", max_experiments=12)
    try:
        exps = eng.ledger.experiments(eng.run().id)
    finally:
        eng.close()
    assert exps[0].status is Status.KEEP  # the Hub kernel loads: setup ran, runs are offline
    assert len(exps) == 13 and all(e.status in (Status.KEEP, Status.DISCARD) for e in exps), \
        [(e.idx, e.status, e.reason, e.log_tail[-200:]) for e in exps if e.status not in (Status.KEEP, Status.DISCARD)]
    for e in exps[1:]:
        t, d = e.params.get("TOTAL_BATCH_SIZE", 2**19), e.params.get("DEVICE_BATCH_SIZE", 128)
        assert t % (d * 2048) == 0
    assert len({(e.params["TOTAL_BATCH_SIZE"], e.params["DEVICE_BATCH_SIZE"]) for e in exps[1:]}) > 1
    # the diff keeps the source's own forms: a power stays a power, the tuple stays a tuple
    diffs = "\n".join(e.diff for e in exps[1:])
    assert "+TOTAL_BATCH_SIZE = 2**" in diffs and "+ADAM_BETAS = (" in diffs
    assert any(e.params["WINDOW_PATTERN"] != "SSSL" for e in exps[1:])


def test_a_search_session_on_the_nanogpt_layout_learns_from_crashes(tmp_path: Path) -> None:
    root = repo(tmp_path, {"train.py": NANO_TRAIN})
    assert run_cli("init", str(root)).returncode == 0
    text = (root / "nightlab.toml").read_text().replace("budget_s = 300", "budget_s = 5")
    text = text.replace("max_crashes_in_row = 5", "max_crashes_in_row = 2").replace("timeout_s = 660", "timeout_s = 30")
    (root / "nightlab.toml").write_text(text)
    commit_all(root, "nightlab")
    eng = Engine(root, tag="nano", sandbox_mode="none", max_experiments=16)
    try:
        session = eng.run()
        exps = eng.ledger.experiments(session.id)
    finally:
        eng.close()
    assert session.stop_reason == "max_experiments (16) reached", session.stop_reason
    # crash streaks happened, a health check re-ran the incumbent each time, and the night went on
    assert list(eng.artifacts_dir.glob("health-nano-*.log"))
    crashes = [e for e in exps if e.status is Status.CRASH]
    assert crashes and all("out of memory" in e.log_tail for e in crashes)  # never the assert, never vocab
    assert not any("AssertionError" in e.log_tail for e in exps)
    assert all(e.params["n_embd"] % e.params["n_head"] == 0 for e in exps[1:])
    assert any(e.status is Status.KEEP for e in exps[1:])


@pytest.mark.parametrize(("entry", "words"), [
    ("{ rnge = [0.01, 0.1] }", "unknown key 'rnge'"),
    ("5", "'LR' = 5"),
    ("{ range = [0.01, 0.1], choices = [1, 2] }", "not both"),
    ("{ fixed = true, log = true }", "fixed = true takes no"),
])
def test_researcher_space_table_errors_name_the_entry(tmp_path: Path, entry: str, words: str) -> None:
    (tmp_path / "train.py").write_text("LR = 0.04\n")
    (tmp_path / "nightlab.toml").write_text(
        '[files]\neditable = ["train.py"]\n[run]\ncommand = "python train.py"\n[metric]\nname = "loss"\n'
        f"[researcher.space]\nLR = {entry}\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert words in info.value.message and "[researcher.space] 'LR'" in info.value.message


def test_the_local_researcher_reads_the_same_space() -> None:
    from nightlab.researchers.local import find_constants as local_constants

    found = local_constants({"train.py": NANO_TRAIN}, spec(learning_rate="1e-5..1e-2 log", n_layer="fixed"))
    by_name = {c.name: c for c in found}
    lr = by_name["learning_rate"]
    assert (lr.lo, lr.hi, lr.log) == (1e-5, 1e-2, True)
    assert "n_layer" not in by_name and "vocab_size" not in by_name and "batch_size" in by_name
