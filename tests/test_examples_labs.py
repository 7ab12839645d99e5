"""The example labs in ``examples/``: their protected scripts, run for real as subprocesses.

Each test copies a lab folder into ``tmp_path`` (the scripts write data, checkpoints and
packings into their working directory) and runs its scripts with ``sys.executable`` and the
``NIGHTLAB_*`` environment a run gets. The tinygpt floor is checked against an independent
brute force: enumerating every random choice the generator can make.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from nightlab.spec import check_files, parse_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LABS = ["quickfit", "tinygpt", "circle_packing"]


# --------------------------------------------------------------------------- helpers


def lab_copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(
        EXAMPLES / name, dst, ignore=shutil.ignore_patterns("data", "__pycache__", "*.pt", "*.json")
    )
    return dst


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def summary(stdout: str) -> dict[str, float]:
    """The last ``---`` block's ``key: value`` lines, as floats."""
    lines = stdout.splitlines()
    assert "---" in lines, f"no summary block in:\n{stdout}"
    start = len(lines) - 1 - lines[::-1].index("---")
    out: dict[str, float] = {}
    for line in lines[start + 1 :]:
        key, _, value = line.partition(":")
        out[key.strip()] = float(value)
    return out


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- all labs


@pytest.mark.parametrize("name", LABS)
def test_lab_spec_is_valid_and_complete(name: str) -> None:
    path = EXAMPLES / name / "nightlab.toml"
    spec = parse_spec(path, tomllib.loads(path.read_text()))
    check_files(path, spec)
    for f in [*spec.files.editable, *spec.files.protected, "program.md", "README.md"]:
        assert (EXAMPLES / name / f).is_file(), f
    assert spec.lab.name == name


# --------------------------------------------------------------------------- quickfit


def test_quickfit_prints_finite_val_loss_and_is_deterministic(tmp_path: Path) -> None:
    lab = lab_copy("quickfit", tmp_path)
    env = {"NIGHTLAB_DATA_DIR": str(tmp_path / "data"), "NIGHTLAB_BUDGET_S": "5", "NIGHTLAB_SEED": "0"}
    ok(run(["prepare.py"], lab, env))
    assert (tmp_path / "data" / "data.npz").is_file()
    first = summary(ok(run(["fit.py"], lab, env)).stdout)
    second = summary(ok(run(["fit.py"], lab, env)).stdout)
    assert math.isfinite(first["val_loss"]) and first["val_loss"] > 0.01  # above the noise floor
    assert first["val_loss"] == second["val_loss"]
    assert first["train_seconds"] < 2.0
    other = summary(ok(run(["fit.py"], lab, {**env, "NIGHTLAB_SEED": "1"})).stdout)
    assert other["val_loss"] != first["val_loss"]


def test_quickfit_better_constants_beat_the_baseline(tmp_path: Path) -> None:
    """The demo's premise: the baseline constants leave a lot on the table."""
    lab = lab_copy("quickfit", tmp_path)
    env = {"NIGHTLAB_DATA_DIR": str(tmp_path / "data")}
    ok(run(["prepare.py"], lab, env))
    base = summary(ok(run(["fit.py"], lab, env)).stdout)["val_loss"]
    src = (lab / "fit.py").read_text()
    better = {"LEARNING_RATE": "0.02", "MOMENTUM": "0.9", "INIT_SCALE": "1.0", "HIDDEN": "48", "EPOCHS": "60"}
    for k, v in better.items():
        line = next(ln for ln in src.splitlines() if ln.startswith(f"{k} = "))
        src = src.replace(line, f"{k} = {v}")
    (lab / "fit.py").write_text(src)
    tuned = summary(ok(run(["fit.py"], lab, env)).stdout)["val_loss"]
    assert tuned < 0.5 * base


# --------------------------------------------------------------------------- tinygpt: the floor


@pytest.fixture(scope="module")
def tg() -> ModuleType:
    return load_module(EXAMPLES / "tinygpt" / "prepare.py", "tinygpt_prepare")


def enumerate_step(src: Any, st: Any) -> dict[int, float]:
    """p(next byte) by running ``src.sample`` down every path of its random choices."""
    out: dict[int, float] = {}

    def walk(forced: list[int]) -> None:
        taken: list[tuple[int, float]] = []
        branch: list[Sequence[float]] = []

        def choose(w: Sequence[float]) -> int:
            i = len(taken)
            if i < len(forced):
                taken.append((forced[i], w[forced[i]]))
                return forced[i]
            branch.append(w)
            raise StopIteration

        try:
            b = src.sample(st, choose)
        except StopIteration:
            for j, p in enumerate(branch[0]):
                if p > 0:
                    walk([*forced, j])
            return
        prob = math.prod(p for _, p in taken)
        out[b] = out.get(b, 0.0) + prob

    walk([])
    return out


def brute_bits(tg: ModuleType, src: Any, stream: bytes) -> list[float]:
    """-log2 p of every byte of ``stream``, each by exhaustive enumeration of the sampler."""
    st = tg.State()
    bits = []
    for b in stream:
        probs = enumerate_step(src, st)
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-12)
        bits.append(-math.log2(probs[b]))
        st.push(b)
    return bits


TINY: dict[str, Any] = dict(
    symbols=b"ab",
    keys=b"01",
    orders=(1, 2),
    order_weights=(0.5, 0.5),
    table_rows=64,
    e_def=0.2,
    e_rec=0.3,
    min_len=1,
    max_len=3,
    q_end=0.4,
    alpha=0.5,
)


def test_tinygpt_floor_matches_brute_force_on_a_tiny_source(tg: ModuleType) -> None:
    src = tg.Source(tg.SourceConfig(seed=3, **TINY))
    stream, bits = src.generate(600, stream_seed=11, score=True)
    assert b"<" in stream and b"{" in stream and b">" in stream  # definitions and recalls both occur
    assert math.isclose(sum(brute_bits(tg, src, stream)), bits, rel_tol=0, abs_tol=1e-9)


def test_tinygpt_tiny_source_joint_distribution(tg: ModuleType) -> None:
    """Enumerate every sampler path over 7 bytes: the joint sums to 1, and every conditional
    P(prefix + x) / P(prefix) equals the closed-form predictive (no hidden state leaks)."""
    src = tg.Source(tg.SourceConfig(seed=5, **TINY))
    n = 7
    joint: dict[bytes, float] = {}

    def extend(prefix: bytes, st: Any, p: float) -> None:
        if len(prefix) == n:
            joint[prefix] = joint.get(prefix, 0.0) + p
            return
        for b, q in enumerate_step(src, st).items():
            nxt = tg.State()
            for c in prefix + bytes([b]):
                nxt.push(c)
            extend(prefix + bytes([b]), nxt, p * q)

    extend(b"", tg.State(), 1.0)
    assert math.isclose(sum(joint.values()), 1.0, abs_tol=1e-12)
    marg: dict[bytes, float] = {}
    for seq, p in joint.items():
        for k in range(n + 1):
            marg[seq[:k]] = marg.get(seq[:k], 0.0) + p
    checked = 0
    for prefix, p_prefix in marg.items():
        if len(prefix) == n:
            continue
        st = tg.State()
        for c in prefix:
            st.push(c)
        pred = src.predictive(st)
        for b, q in pred.items():
            assert math.isclose(marg.get(prefix + bytes([b]), 0.0) / p_prefix, q, abs_tol=1e-9), (prefix, b)
        checked += 1
    assert checked > 100


def test_tinygpt_prepare_floor_matches_brute_force(tmp_path: Path, tg: ModuleType) -> None:
    """The floor prepare.py writes for the default source equals the brute-force recomputation."""
    lab = lab_copy("tinygpt", tmp_path)
    env = {"NIGHTLAB_DATA_DIR": str(tmp_path / "data"), "NIGHTLAB_HOLDOUT_DIR": str(tmp_path / "hold")}
    p = ok(
        run(
            [
                "prepare.py",
                "--seed",
                "2",
                "--train-bytes",
                "2000",
                "--val-bytes",
                "1500",
                "--holdout-bytes",
                "1200",
            ],
            lab,
            env,
        )
    )
    assert "floor" in p.stdout
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    hmeta = json.loads((tmp_path / "hold" / "holdout_meta.json").read_text())
    assert not (tmp_path / "data" / "holdout.bin").exists()
    src = tg.Source(tg.SourceConfig(seed=2))
    for split, d, floor in (
        ("val", "data", meta["floor_val_bpb"]),
        ("holdout", "hold", hmeta["floor_holdout_bpb"]),
    ):
        stream = (tmp_path / d / f"{split}.bin").read_bytes()
        bits = brute_bits(tg, src, stream)
        assert math.isclose(sum(bits[1:]) / (len(stream) - 1), floor, rel_tol=0, abs_tol=1e-9), split
        assert 0.5 < floor < 4.0


def test_tinygpt_prepare_text(tmp_path: Path) -> None:
    lab = lab_copy("tinygpt", tmp_path)
    text = "".join(f"line {i}: naïve café, ünïcödé — the quick brown fox {i * i}\n" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    env = {"NIGHTLAB_DATA_DIR": str(tmp_path / "data")}
    ok(run(["prepare.py", "--text", str(tmp_path / "corpus.txt")], lab, env))
    raw = text.encode()
    d = tmp_path / "data"
    train, val, hold = ((d / f"{s}.bin").read_bytes() for s in ("train", "val", "holdout"))
    assert train + val + hold == raw
    assert len(val) == len(hold) == len(raw) // 20
    meta = json.loads((d / "meta.json").read_text())
    assert meta["source"] == "text" and meta["floor_val_bpb"] is None
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf8" * 20)
    bad = run(["prepare.py", "--text", str(tmp_path / "bad.txt")], lab, env)
    assert bad.returncode != 0 and "UTF-8" in bad.stderr


# --------------------------------------------------------------------------- tinygpt: end to end


@pytest.mark.slow
def test_tinygpt_train_evaluate_holdout(tmp_path: Path) -> None:
    lab = lab_copy("tinygpt", tmp_path)
    env = {
        "NIGHTLAB_DATA_DIR": str(tmp_path / "data"),
        "NIGHTLAB_HOLDOUT_DIR": str(tmp_path / "hold"),
        "NIGHTLAB_BUDGET_S": "3",
        "NIGHTLAB_SEED": "0",
    }
    ok(
        run(
            ["prepare.py", "--train-bytes", "60000", "--val-bytes", "8192", "--holdout-bytes", "8192"],
            lab,
            env,
        )
    )
    trained = summary(ok(run(["train.py"], lab, env)).stdout)
    keys = {"val_bpb", "training_seconds", "peak_memory_mb", "num_params_M", "total_tokens_M", "num_steps"}
    assert keys <= trained.keys()
    assert 3.0 <= trained["training_seconds"] < 6.0
    assert trained["num_steps"] >= 1 and trained["total_tokens_M"] > 0
    assert 0 < trained["val_bpb"] < 8.1  # 8 bits per byte is the uniform guess
    assert (lab / "ckpt.pt").is_file()
    floor = json.loads((tmp_path / "data" / "meta.json").read_text())["floor_val_bpb"]
    assert trained["val_bpb"] > floor

    evaluated = summary(ok(run(["evaluate.py"], lab, env)).stdout)
    assert math.isclose(evaluated["val_bpb"], trained["val_bpb"], abs_tol=2e-6)
    assert math.isclose(evaluated["floor_bpb"], floor, abs_tol=1e-6)
    held = summary(ok(run(["holdout.py"], lab, env)).stdout)
    assert 0 < held["holdout_bpb"] < 8.1
    assert held["holdout_bpb"] != evaluated["val_bpb"]

    # without the holdout dir the holdout split is not found: it never went to the data dir
    no_hold = run(["holdout.py"], lab, {k: v for k, v in env.items() if k != "NIGHTLAB_HOLDOUT_DIR"})
    assert no_hold.returncode != 0 and "holdout.bin" in no_hold.stderr


@pytest.mark.slow
def test_tinygpt_can_train_for_a_number_of_steps_instead_of_seconds(tmp_path: Path) -> None:
    # bench/efficiency.py --tinygpt-steps: the same work whatever the machine's load
    lab = lab_copy("tinygpt", tmp_path)
    env = {"NIGHTLAB_DATA_DIR": str(tmp_path / "data"), "NIGHTLAB_BUDGET_S": "0.001", "NIGHTLAB_SEED": "0",
           "TINYGPT_STEPS": "20", "TINYGPT_THREADS": "1"}
    ok(run(["prepare.py", "--train-bytes", "60000", "--val-bytes", "4096", "--holdout-bytes", "4096"], lab, env))
    out = ok(run(["train.py"], lab, env)).stdout
    assert summary(out)["num_steps"] == 20  # not the 1 step a 1 ms time budget allows
    steps = [int(line.split()[1].removeprefix("step=")) for line in out.splitlines() if line.startswith("nightlab:")]
    assert steps == list(range(5, 101, 5))  # a progress line every 5 % of the steps


@pytest.mark.slow
def test_tinygpt_evaluator_rejects_a_model_that_sees_the_future(tmp_path: Path) -> None:
    lab = lab_copy("tinygpt", tmp_path)
    env = {"NIGHTLAB_DATA_DIR": str(tmp_path / "data")}
    ok(
        run(
            ["prepare.py", "--train-bytes", "5000", "--val-bytes", "4096", "--holdout-bytes", "1024"],
            lab,
            env,
        )
    )
    # the architecture is the protected model.py's: a bug there (attention that sees later bytes) is caught
    src = (lab / "model.py").read_text()
    assert "is_causal=True" in src
    (lab / "model.py").write_text(src.replace("is_causal=True", "is_causal=False"))
    save = (
        "import torch, model\n"
        "cfg = dict(vocab_size=256, seq_len=64, n_layer=1, n_head=2, head_dim=8, mlp_ratio=2, dropout=0.0)\n"
        "torch.manual_seed(0)\n"
        "torch.save({'config': cfg, 'model': model.build_model(cfg).state_dict()}, 'ckpt.pt')\n"
    )
    ok(run(["-c", save], lab, env))
    p = run(["evaluate.py"], lab, env)
    assert p.returncode != 0
    assert "not causal" in p.stderr
    assert "---" not in p.stdout.splitlines()


def test_tinygpt_evaluate_without_checkpoint_fails_with_reason(tmp_path: Path) -> None:
    lab = lab_copy("tinygpt", tmp_path)
    p = run(["evaluate.py"], lab, {"NIGHTLAB_DATA_DIR": str(tmp_path / "data")})
    assert p.returncode != 0 and "ckpt.pt does not exist" in p.stderr


# --------------------------------------------------------------------------- circle packing


def grid_packing() -> tuple[list[list[float]], list[float]]:
    """25 circles of radius 0.1 on a 5x5 grid, and a 26th in the hole between four of them."""
    centers = [[0.1 + 0.2 * i, 0.1 + 0.2 * j] for j in range(5) for i in range(5)]
    radii = [0.1] * 25
    centers.append([0.2, 0.2])
    radii.append(0.1 * math.sqrt(2) - 0.1 - 1e-12)
    return centers, radii


def evaluate_packing(tmp_path: Path, data: Any, raw: str | None = None) -> subprocess.CompletedProcess[str]:
    lab = tmp_path / "circle_packing"
    if not lab.exists():
        lab = lab_copy("circle_packing", tmp_path)
    (lab / "packing.json").write_text(raw if raw is not None else json.dumps(data))
    return run(["evaluate.py"], lab)


def test_circle_evaluator_accepts_a_valid_packing_with_the_exact_score(tmp_path: Path) -> None:
    centers, radii = grid_packing()
    p = ok(evaluate_packing(tmp_path, {"centers": centers, "radii": radii}))
    s = summary(p.stdout)
    assert math.isclose(s["sum_radii"], 2.5 + 0.1 * (math.sqrt(2) - 1), abs_tol=1e-11)
    assert s["num_circles"] == 26
    assert math.isclose(s["min_radius"], 0.1 * (math.sqrt(2) - 1), abs_tol=1e-11)


Mutation = Callable[[list[list[float]], list[float]], Any]


def _overlap(c: list[list[float]], r: list[float]) -> Any:
    c[1][0] -= 1e-8  # circles 0 and 1 now overlap by 1e-8 (> the 1e-9 tolerance)
    return {"centers": c, "radii": r}


def _outside(c: list[list[float]], r: list[float]) -> Any:
    c[24][0] += 2e-9  # the top-right circle now crosses the right side by 2e-9
    return {"centers": c, "radii": r}


def _set_radius(value: Any) -> Mutation:
    def mutate(c: list[list[float]], r: list[Any]) -> Any:
        r[3] = value
        return {"centers": c, "radii": r}

    return mutate


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_overlap, "circles 0 and 1 overlap"),
        (_outside, "circle 24"),
        (_set_radius(-0.01), "radius 3 is negative"),
        (_set_radius(True), "not a number"),
        (_set_radius("0.1"), "not a number"),
        (lambda c, r: {"centers": c[:25], "radii": r[:25]}, "expected 26 circles"),
        (lambda c, r: {"centers": [*c, [0.5, 0.5]], "radii": [*r, 0.0]}, "expected 26 circles"),
        (lambda c, r: {"centers": c, "radii": r[:25]}, "expected 26 circles"),
        (lambda c, r: [c, r], "expected a JSON object"),
        (lambda c, r: {"centers": [[0.5], *c[1:]], "radii": r}, "center 0"),
    ],
)
def test_circle_evaluator_rejects(tmp_path: Path, mutate: Mutation, reason: str) -> None:
    centers, radii = grid_packing()
    p = evaluate_packing(tmp_path, mutate(centers, radii))
    assert p.returncode == 1
    assert "invalid packing" in p.stdout and reason in p.stdout
    assert "---" not in p.stdout.splitlines()


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_circle_evaluator_rejects_non_finite(tmp_path: Path, token: str) -> None:
    centers, radii = grid_packing()
    raw = json.dumps({"centers": centers, "radii": radii}).replace("0.1, ", f"{token}, ", 1)
    assert token in raw
    p = evaluate_packing(tmp_path, None, raw=raw)
    assert p.returncode == 1 and "not finite" in p.stdout


def test_circle_evaluator_rejects_missing_and_malformed_files(tmp_path: Path) -> None:
    p = evaluate_packing(tmp_path, None, raw="{not json")
    assert p.returncode == 1 and "not valid JSON" in p.stdout
    (tmp_path / "circle_packing" / "packing.json").unlink()
    p = run(["evaluate.py"], tmp_path / "circle_packing")
    assert p.returncode == 1 and "does not exist" in p.stdout


def test_circle_baseline_is_valid_and_below_the_published_figures(tmp_path: Path) -> None:
    lab = lab_copy("circle_packing", tmp_path)
    built = ok(run(["pack.py"], lab))
    assert "---" not in built.stdout.splitlines()  # the summary block is the evaluator's alone
    s = summary(ok(run(["evaluate.py"], lab)).stdout)
    assert 2.2 < s["sum_radii"] < 2.6
    assert s["num_circles"] == 26 and s["min_slack"] >= -1e-9


@pytest.mark.gpu
@pytest.mark.slow
def test_tinygpt_trains_on_cuda_and_evaluate_agrees(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    lab = lab_copy("tinygpt", tmp_path)
    env = {"NIGHTLAB_DATA_DIR": str(tmp_path / "data"), "NIGHTLAB_BUDGET_S": "3"}
    ok(
        run(
            ["prepare.py", "--train-bytes", "60000", "--val-bytes", "8192", "--holdout-bytes", "8192"],
            lab,
            env,
        )
    )
    trained = summary(ok(run(["train.py"], lab, env)).stdout)
    assert trained["num_steps"] >= 1 and trained["peak_memory_mb"] > 0
    evaluated = summary(ok(run(["evaluate.py"], lab, env)).stdout)
    assert math.isclose(evaluated["val_bpb"], trained["val_bpb"], abs_tol=1e-3)
