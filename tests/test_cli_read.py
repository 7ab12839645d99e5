"""The read-only commands against a real ledger filled directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nightlab.cli.read import diff, export_cmd, log, show, status
from nightlab.ledger import Ledger
from nightlab.types import Candidate, Direction, Status, Usage

BASE, K1, D2 = "1111111" + "a" * 33, "2222222" + "b" * 33, "3333333" + "c" * 33
DIFF = "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-LR = 0.04\n+LR = 0.06\n"


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("NIGHTLAB_DB", raising=False)
    with Ledger.for_lab(tmp_path) as led:
        old = led.create_session(
            tag="older", branch="nightlab/older", base_commit=BASE, metric_name="val_bpb",
            direction=Direction.MINIMIZE, sandbox="none", spec_hash="h", spec_json="{}",
            lab_path=str(tmp_path), machine={}, researcher="search",
        )  # fmt: skip
        led.update_session(old.id, status="finished")
        s = led.create_session(
            tag="mar5", branch="nightlab/mar5", base_commit=BASE, metric_name="val_bpb",
            direction=Direction.MINIMIZE, sandbox="bwrap", spec_hash="h", spec_json="{}",
            lab_path=str(tmp_path), machine={"gpu": "H100"}, researcher="llm",
        )  # fmt: skip
        e0 = led.start_experiment(s.id, idx=0, parent_commit=BASE, seed=0, candidate=None,
                                  description="baseline", propose_s=0.0)  # fmt: skip
        led.finish_experiment(
            e0, status=Status.KEEP, metric=1.0, commit=BASE, incumbent=(BASE, 1.0), run_s=300
        )
        led.update_session(s.id, baseline_metric=1.0)

        def cand(n: int, diff_text: str) -> Candidate:
            usage = Usage(tokens_in=1000 * n, tokens_out=100 * n, tokens_cached=10 * n, cost_usd=0.5 * n,
                          seconds=3.0 * n)  # fmt: skip
            return Candidate(parent=BASE, rationale=f"rationale {n}", diff=diff_text, params={"lr": 0.06},
                             usage=usage, researcher="llm")  # fmt: skip

        e1 = led.start_experiment(s.id, idx=1, parent_commit=BASE, seed=1, candidate=cand(1, DIFF),
                                  description="raise LR [to 0.06]", propose_s=3.0)  # fmt: skip
        led.finish_experiment(
            e1, status=Status.KEEP, metric=0.95, commit=K1, incumbent=(K1, 0.95), trust="evaluator",
            secondary={"peak_vram_mb": 2048.0}, reason="better by 0.05 > noise 0.01", run_s=301.5,
            evidence={"delta": 0.05}, log_tail="step 99 loss 2.1\nval_bpb: 0.95\n", exit_code=0,
        )  # fmt: skip
        e2 = led.start_experiment(s.id, idx=2, parent_commit=K1, seed=2, candidate=cand(2, "x"),
                                  description="wider MLP", propose_s=6.0)  # fmt: skip
        led.finish_experiment(e2, status=Status.DISCARD, metric=0.97, commit=D2, run_s=299.0)
        e3 = led.start_experiment(s.id, idx=3, parent_commit=K1, seed=3, candidate=cand(3, "y"),
                                  description="deeper net OOMs", propose_s=9.0)  # fmt: skip
        led.finish_experiment(e3, status=Status.CRASH, exit_code=1, reason="exit code 1", run_s=12.0)
    return tmp_path


def invoke(cmd, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner(env={"COLUMNS": "200"}).invoke(cmd, list(args), catch_exceptions=False)


def test_status_shows_the_numbers(lab: Path) -> None:
    r = invoke(status, "--lab", str(lab))
    assert r.exit_code == 0, r.output
    out = r.output
    assert "mar5" in out and "nightlab/mar5" in out and "bwrap" in out
    assert "val_bpb (minimize)" in out
    assert "1.000000" in out  # baseline
    assert "2222222  0.950000" in out  # incumbent
    assert "+0.050000 (+5.00%)" in out  # improvement
    assert "4  (keep 2  discard 1  crash 1)" in out
    assert "tokens in 6,000" in out and "$3.00" in out and "propose 18.0s" in out
    assert "cached 60 (1% of input)" in out and "latency" in out and "propose 6.0s  run" in out
    assert "#3 crash" in out and "deeper net OOMs" in out
    older = invoke(status, "--lab", str(lab), "--tag", "older")
    assert older.exit_code == 0 and "older" in older.output and "finished" in older.output
    assert "experiments  0" in older.output and "2222222" not in older.output


def test_log_shows_rows(lab: Path) -> None:
    r = invoke(log, "--lab", str(lab))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    row1 = next(line for line in lines if "raise LR [to 0.06]" in line)  # markup-like text survives
    assert "keep" in row1 and "0.950000" in row1 and "-0.050000" in row1 and "evaluator" in row1
    row2 = next(line for line in lines if "wider MLP" in line)
    assert "discard" in row2 and "+0.020000" in row2  # compared with its parent K1, not the baseline
    row3 = next(line for line in lines if "deeper net OOMs" in line)
    assert "crash" in row3 and "inline" not in row3  # no metric, so no trust label
    limited = invoke(log, "--lab", str(lab), "--limit", "1")
    assert "deeper net OOMs" in limited.output and "wider MLP" not in limited.output
    only = invoke(log, "--lab", str(lab), "--status", "keep", "--all")
    assert "baseline" in only.output and "raise LR" in only.output and "wider MLP" not in only.output


def test_show_everything_and_missing_n_exits_2(lab: Path) -> None:
    r = invoke(show, "--lab", str(lab), "1")
    assert r.exit_code == 0, r.output
    expected = [
        "keep",
        "better by 0.05 > noise 0.01",
        "0.950000",
        "trust: evaluator",
        "peak_vram_mb = 2048.0",
    ]
    expected += [
        BASE,
        K1,
        "rationale 1",
        '{"lr": 0.06}',
        '{"delta": 0.05}',
        "val_bpb: 0.95",
        "tokens in 1,000",
    ]
    for text in expected:
        assert text in r.output, text
    missing = invoke(show, "--lab", str(lab), "42")
    assert missing.exit_code == 2
    assert "no experiment 42 in session 'mar5'" in missing.output
    assert "nightlab log" in missing.output and "Traceback" not in missing.output


def test_diff_prints_the_stored_diff(lab: Path) -> None:
    r = invoke(diff, "--lab", str(lab), "1")
    assert r.exit_code == 0 and r.output == DIFF
    assert invoke(diff, "--lab", str(lab), "9").exit_code == 2


def test_export_tsv_to_stdout_and_file(lab: Path, tmp_path: Path) -> None:
    r = invoke(export_cmd, "--lab", str(lab), "--format", "tsv")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert lines[2] == "2222222\t0.950000\t2.0\tkeep\traise LR [to 0.06]"
    assert len(lines) == 5
    out = tmp_path / "results.jsonl"
    r = invoke(export_cmd, "--lab", str(lab), "--format", "jsonl", "-o", str(out))
    assert r.exit_code == 0 and "wrote 4 rows" in r.output
    assert [json.loads(x)["idx"] for x in out.read_text().splitlines()] == [0, 1, 2, 3]
    assert invoke(export_cmd, "--lab", str(lab), "--format", "xlsx").exit_code == 2


def test_no_session_is_a_usage_error_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NIGHTLAB_DB", raising=False)
    r = invoke(status, "--lab", str(tmp_path))
    assert r.exit_code == 2
    assert f"no nightlab session in {tmp_path / '.nightlab'}" in r.output and "nightlab run" in r.output
    assert not (tmp_path / ".nightlab").exists()
    Ledger.for_lab(tmp_path).close()  # a ledger without sessions
    assert invoke(log, "--lab", str(tmp_path)).exit_code == 2


def test_unknown_tag_and_explicit_db(lab: Path, tmp_path: Path) -> None:
    r = invoke(status, "--lab", str(lab), "--tag", "nope")
    assert r.exit_code == 2 and "no session 'nope'" in r.output and "older, mar5" in r.output
    url = f"sqlite:///{lab / '.nightlab' / 'ledger.db'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = invoke(status, "--lab", str(elsewhere), "--db", url)
    assert r.exit_code == 0 and "mar5" in r.output
