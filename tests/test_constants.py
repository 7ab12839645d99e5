"""nightlab.constants: finding, ranging and rewriting tunable constants."""

from __future__ import annotations

import ast
import math

import pytest

from nightlab.constants import evaluate, find_constants, format_value, rewrite
from nightlab.errors import SpecError

TRAIN = '''"""A karpathy-style train.py: the knobs live at the top."""
import math
import torch

# Model
DEPTH = 8                     # number of layers
ASPECT_RATIO = 64
HEAD_DIM: int = 128
VOCAB = 2**13                 # an expression: not a literal
# Optimisation
MATRIX_LR = 0.04
EMBEDDING_LR = 0.6   # nightlab: 0.1..1.0
WEIGHT_DECAY = 0.0
WARMUP_RATIO = -0.5
ADAM_BETAS = (0.8, 0.95)
TOTAL_BATCH_SIZE = 2**19
DEVICE_BATCH_SIZE = 128       # nightlab: choices 32,64,128
SEED = 42                     # nightlab: fixed
SCALAR_LR = 0.5               # nightlab: skip
USE_FP8 = False
RUN_NAME = "baseline"
lowercase_knob = 3
A = B = 7
TIME_BUDGET = 300 if torch.cuda.is_available() else 30
if True:
    INSIDE_IF = 5

def train():
    LOCAL = 3
    return LOCAL

class Config:
    FIELD = 4
'''


def test_finds_module_level_number_literals_only() -> None:
    assert [c.name for c in find_constants(TRAIN, "train.py")] == [
        "DEPTH", "ASPECT_RATIO", "HEAD_DIM", "MATRIX_LR", "EMBEDDING_LR", "WEIGHT_DECAY", "WARMUP_RATIO",
        "ADAM_BETAS[0]", "ADAM_BETAS[1]", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE", "lowercase_knob",
    ]  # fmt: skip  (VOCAB defines the data, SEED/SCALAR_LR are fixed, RUN_NAME is a string without choices)
    consts = {c.name: c for c in find_constants(TRAIN, "train.py")}
    assert (consts["DEPTH"].value, consts["DEPTH"].kind) == (8, "int")
    assert (consts["MATRIX_LR"].value, consts["MATRIX_LR"].kind) == (0.04, "float")
    assert (consts["WARMUP_RATIO"].value, consts["WARMUP_RATIO"].text) == (-0.5, "-0.5")
    assert consts["HEAD_DIM"].value == 128
    assert all(c.file == "train.py" for c in consts.values())


def test_positions_point_at_the_literal() -> None:
    lines = TRAIN.splitlines()
    for c in find_constants(TRAIN):
        assert lines[c.line - 1][c.col : c.end_col] == c.text
        assert evaluate(ast.parse(c.text, mode="eval").body) == c.value


def test_default_ranges_follow_the_documented_rule() -> None:
    src = "POS = 3e-4\nNEG = -0.5\nZERO = 0.0\nSMALL = 2\nBIG = 16\nIZERO = 0\nINEG = -3\nONE = 1\n"
    c = {k.name: k for k in find_constants(src)}
    assert math.isclose(c["POS"].low, 3e-5) and math.isclose(c["POS"].high, 3e-3) and c["POS"].log
    assert (c["NEG"].low, c["NEG"].high, c["NEG"].log) == (-5.0, -0.05, False)
    assert (c["ZERO"].low, c["ZERO"].high, c["ZERO"].log) == (0.0, 1.0, False)
    assert (c["SMALL"].low, c["SMALL"].high, c["SMALL"].log) == (1, 8, False)
    assert (c["BIG"].low, c["BIG"].high, c["BIG"].log) == (4, 64, True)
    assert (c["IZERO"].low, c["IZERO"].high) == (0, 8)
    assert (c["INEG"].low, c["INEG"].high, c["INEG"].log) == (-12, -1, False)
    assert (c["ONE"].low, c["ONE"].high) == (1, 4)
    assert not any(k.explicit for k in c.values())
    for k in c.values():
        assert k.contains(k.value)


def test_comment_ranges() -> None:
    src = (
        "LR = 3e-4  # nightlab: 1e-5..1e-2 log\n"
        "DEPTH = 8  # tuned by hand; nightlab: 1..64\n"
        "DROP = 0.1  # nightlab: 0.0..0.5\n"
        "HEADS = 4  # nightlab: 1..64 log\n"
        "WIDTH = 3.0  # nightlab: 1..10\n"
        "BATCH = 64  # nightlab: choices 32, 64, 128\n"
        "SEED = 1  # nightlab: fixed\n"
        "KEEP = 2  # a comment without the marker\n"
    )
    c = {k.name: k for k in find_constants(src)}
    assert set(c) == {"LR", "DEPTH", "DROP", "HEADS", "WIDTH", "BATCH", "KEEP"}
    assert (c["LR"].low, c["LR"].high, c["LR"].log, c["LR"].explicit) == (1e-5, 1e-2, True, True)
    assert (c["DEPTH"].low, c["DEPTH"].high, c["DEPTH"].log, c["DEPTH"].kind) == (1, 64, False, "int")
    assert (c["DROP"].low, c["DROP"].high, c["DROP"].log) == (0.0, 0.5, False)
    assert c["HEADS"].log and c["WIDTH"].kind == "float" and c["WIDTH"].high == 10.0
    assert c["BATCH"].choices == (32, 64, 128)
    assert not c["KEEP"].explicit


def test_a_string_that_looks_like_a_marker_is_not_a_comment() -> None:
    src = 'X = 5; NOTE = "# nightlab: nonsense"\n'
    assert [k.name for k in find_constants(src)] == ["X"]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("DEPTH = 8  # nightlab: lots", "cannot read"),
        ("DEPTH = 8  # nightlab: 1.5..64", "whole-number"),
        ("LR = 0.1  # nightlab: 1..0.01", "empty"),
        ("LR = 0.1  # nightlab: 0..1 log", "LOW > 0"),
        ("LR = 0.1  # nightlab: 0.2..1", "outside"),
        ("BATCH = 48  # nightlab: choices 32,64", "not one of"),
        ("BATCH = 32  # nightlab: choices 32", "at least two"),
    ],
)
def test_malformed_comment_raises_spec_error_naming_the_place(line: str, words: str) -> None:
    src = "import os\n\n" + line + "\n"
    with pytest.raises(SpecError) as info:
        find_constants(src, "model/train.py")
    err = info.value
    name = line.split()[0]
    assert "model/train.py:3" in err.message and name in err.message and words in err.message
    assert "# nightlab: LOW..HIGH" in err.fix


def test_unparsable_source_has_no_constants() -> None:
    assert find_constants("X = 1\ndef (:\n") == []


def test_rewrite_changes_only_the_literals() -> None:
    out = rewrite(TRAIN, {"DEPTH": 12, "MATRIX_LR": 0.0123456, "WARMUP_RATIO": 0.25, "HEAD_DIM": 64})
    old, new = TRAIN.splitlines(keepends=True), out.splitlines(keepends=True)
    assert len(old) == len(new)
    changed = {i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b}
    assert [new[i] for i in sorted(changed)] == [
        "DEPTH = 12                     # number of layers\n",  # the comment moves, its spacing stays
        "HEAD_DIM: int = 64\n",
        "MATRIX_LR = 0.01235\n",
        "WARMUP_RATIO = 0.25\n",
    ]
    c = {k.name: k.value for k in find_constants(out)}
    assert (c["DEPTH"], c["MATRIX_LR"], c["WARMUP_RATIO"], c["HEAD_DIM"]) == (12, 0.01235, 0.25, 64)


def test_rewrite_negative_numbers_both_ways() -> None:
    src = "A = -0.5  # x\nB = 2\nC = -  3\n"
    out = rewrite(src, {"A": -0.05, "B": -7, "C": 4})
    assert out == "A = -0.05  # x\nB = -7\nC = 4\n"
    assert {k.name: k.value for k in find_constants(out)} == {"A": -0.05, "B": -7, "C": 4}


def test_rewrite_handles_non_ascii_lines() -> None:
    src = "# überschrift ✓\nNAME = 'größe'; LR = 3e-4  # lérning rate 🚀\nΔ = 1\nDEPTH = 8\r\nEND = 1"
    consts = {c.name: c for c in find_constants(src)}
    assert consts["LR"].text == "3e-4"
    out = rewrite(src, {"LR": 0.002, "DEPTH": 9, "END": 2})
    expected = "# überschrift ✓\nNAME = 'größe'; LR = 0.002  # lérning rate 🚀\nΔ = 1\nDEPTH = 9\r\nEND = 2"
    assert out == expected


def test_rewrite_keeps_text_of_unchanged_values_and_rejects_unknown_names() -> None:
    src = "LR = 3E-4\nDEPTH = 0x8\n"
    assert rewrite(src, {"LR": 3e-4, "DEPTH": 8}) == src
    with pytest.raises(KeyError):
        rewrite(src, {"NOPE": 1})


@pytest.mark.parametrize(
    ("value", "kind", "text"),
    [
        (1.0, "float", "1.0"),
        (3e-4, "float", "0.0003"),
        (1e-5, "float", "1e-5"),
        (1.23456e-7, "float", "1.235e-7"),
        (-0.5, "float", "-0.5"),
        (123456.0, "float", "1.235e5"),
        (0.1 + 0.2, "float", "0.3"),
        (8, "int", "8"),
        (-3, "int", "-3"),
        (8.0, "int", "8"),
    ],
)
def test_format_value(value: float, kind: str, text: str) -> None:
    assert format_value(value, kind) == text
    literal = ast.literal_eval(text)
    assert isinstance(literal, float if kind == "float" else int)


def test_format_value_refuses_non_finite() -> None:
    with pytest.raises(ValueError):
        format_value(float("nan"), "float")


def test_names_the_script_changes_as_it_runs_are_variables_not_constants() -> None:
    from nightlab.constants import scan

    src = (
        "step = 0\nsmooth = 0.0\nbest = 1e9\ngas = 40\nlr = 6e-4\nB = 32\nB *= 2\nddp = False\n"
        "if ddp:\n    gas //= 8\n    lr = 1e-3\n"
        "def f():\n    global G\n    G = 2\nG = 1\n"
        "for i in range(3):\n    pass\ni = 5\n"
        "while True:\n    step += 1\n    smooth = 0.9 * smooth\n    if step > 3:\n        best = 1.0\n        break\n"
    )
    reasons = {e.name: e.reason for e in scan(src)}
    variable = "a variable: the script changes it as it runs"
    assert {n for n, r in reasons.items() if r == variable} == {"step", "smooth", "best", "B", "G", "i"}
    assert reasons["gas"] == reasons["lr"] == ""  # changed only under an `if`: still knobs
