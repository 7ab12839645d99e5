"""Every invalid spec: one clear message naming the file and the key, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.conftest import SPEC, cli_env, nightlab_cmd

from nightlab.errors import SpecError
from nightlab.spec import load_spec


def write(lab: Path, text: str) -> Path:
    (lab / "nightlab.toml").write_text(text)
    return lab


def error_of(lab: Path) -> SpecError:
    with pytest.raises(SpecError) as ei:
        load_spec(lab)
    return ei.value


def test_valid_spec_loads(make_lab):
    lab = make_lab()
    spec = load_spec(lab)
    assert spec.metric.name == "score"
    assert spec.run.hard_timeout_s == 20
    assert spec.files.editable == ["target.py"]


def test_unknown_key_is_named_with_a_suggestion(make_lab):
    lab = write(make_lab(), SPEC.replace('command = "python target.py"', 'comand = "python target.py"'))
    err = error_of(lab)
    assert "nightlab.toml" in err.message and "[run] comand" in err.message
    assert "'command'" in err.fix


def test_unknown_key_suggests_the_right_one(make_lab):
    lab = write(make_lab(), SPEC.replace("budget_s = 5", "budget_s = 5\nbudgt_s = 3"))
    err = error_of(lab)
    assert "[run] budgt_s" in err.message and "unknown key" in err.message
    assert "budget_s" in err.fix


def test_unknown_section(make_lab):
    lab = write(make_lab(), SPEC + "\n[runn]\ncommand = 'x'\n")
    err = error_of(lab)
    assert "runn" in err.message and "unknown key" in err.message
    assert "run" in err.fix


def test_wrong_type(make_lab):
    lab = write(make_lab(), SPEC.replace("budget_s = 5", 'budget_s = "five"'))
    err = error_of(lab)
    assert "[run] budget_s" in err.message
    assert "number" in err.fix


def test_editable_file_that_does_not_exist(make_lab):
    lab = write(make_lab(), SPEC.replace('editable = ["target.py"]', 'editable = ["trian.py"]'))
    err = error_of(lab)
    assert "[files] editable" in err.message and "trian.py" in err.message


def test_file_both_editable_and_protected(make_lab):
    lab = write(make_lab(), SPEC.replace('protected = ["evaluate.py"]', 'protected = ["*.py"]'))
    err = error_of(lab)
    assert "target.py" in err.message and "both editable and protected" in err.message


def test_empty_run_command(make_lab):
    lab = write(make_lab(), SPEC.replace('command = "python target.py"', 'command = "  "'))
    err = error_of(lab)
    assert "[run] command" in err.message and "empty" in err.message


def test_bad_direction(make_lab):
    lab = write(make_lab(), SPEC.replace('direction = "minimize"', 'direction = "down"'))
    err = error_of(lab)
    assert "[metric] direction" in err.message
    assert "minimize" in err.fix and "maximize" in err.fix


def test_bad_toml_syntax(make_lab):
    lab = write(make_lab(), SPEC + "\n[stop\n")
    err = error_of(lab)
    assert "not valid TOML" in err.message


def test_missing_spec_file(tmp_path):
    err = error_of(tmp_path)
    assert "nightlab.toml" in err.message and "nightlab init" in err.fix


def test_unknown_researcher_kind(make_lab):
    lab = write(make_lab(), SPEC.replace('kind = "scripted"', 'kind = "oracle"'))
    err = error_of(lab)
    assert "[researcher] kind" in err.message and "search" in err.fix


def test_unknown_researcher_option_is_named(make_lab):
    lab = write(make_lab(), SPEC.replace('kind = "scripted"', 'kind = "scripted"\nstepz = []'))
    err = error_of(lab)
    assert "[researcher] stepz" in err.message


def test_cli_exit_code_2_and_no_traceback(make_lab):
    lab = write(make_lab(), SPEC.replace('direction = "minimize"', 'direction = "down"'))
    proc = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--plain"), capture_output=True, text=True,
                          env=cli_env())
    assert proc.returncode == 2
    assert "[metric] direction" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
