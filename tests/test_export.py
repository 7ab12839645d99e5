"""Exports of a real SQLite ledger: karpathy's results.tsv exactly, CSV and JSONL round trips."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from nightlab.errors import UsageError
from nightlab.export import CSV_COLUMNS, export
from nightlab.ledger import Ledger
from nightlab.types import Candidate, Direction, Session, Status, Usage

A, B, C, D = "a1b2c3d" + "0" * 33, "b2c3d4e" + "1" * 33, "c3d4e5f" + "2" * 33, "d4e5f60" + "3" * 33


@pytest.fixture
def filled(tmp_path: Path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as led:
        s = led.create_session(
            tag="mar5",
            branch="nightlab/mar5",
            base_commit=A,
            metric_name="val_bpb",
            direction=Direction.MINIMIZE,
            sandbox="bwrap",
            spec_hash="h",
            spec_json="{}",
            lab_path="/lab",
            machine={},
            researcher="llm",
        )

        def add(
            idx: int,
            status: Status,
            *,
            parent: str,
            commit: str | None,
            metric: float | None,
            desc: str,
            secondary: dict[str, float] | None = None,
            tokens: int = 0,
        ) -> None:
            cand = None
            if idx > 0:
                cand = Candidate(
                    parent=parent,
                    rationale=f"why {idx}",
                    diff=f"diff {idx}\n",
                    params={"k": idx},
                    usage=Usage(tokens, 1, 0, 0.01 * idx, 2.0),
                    researcher="llm",
                )
            e = led.start_experiment(
                s.id,
                idx=idx,
                parent_commit=parent,
                seed=idx,
                candidate=cand,
                description=desc,
                propose_s=2.0,
                started_at=1000.0 + idx,
            )
            if status is not Status.RUNNING:
                led.finish_experiment(
                    e,
                    status=status,
                    metric=metric,
                    secondary=secondary,
                    commit=commit,
                    trust="evaluator",
                    run_s=300.0,
                    finished_at=1300.0 + idx,
                    evidence={"delta": idx},
                )

        add(
            0,
            Status.KEEP,
            parent=A,
            commit=A,
            metric=0.9979,
            desc="baseline",
            secondary={"peak_vram_mb": 45060.2},
        )
        add(
            1,
            Status.KEEP,
            parent=A,
            commit=B,
            metric=0.993212345,
            desc="increase LR to 0.04",
            secondary={"peak_vram_mb": 45060.2, "other_mb": 2048.0},
            tokens=100,
        )
        add(
            2,
            Status.DISCARD,
            parent=B,
            commit=C,
            metric=1.005,
            desc="switch to\tGeLU\nactivation",
            secondary={"peak_vram_mb": 44000.0},
        )
        add(3, Status.CRASH, parent=B, commit=None, metric=float("nan"), desc="double the width (OOM)")
        add(4, Status.TIMEOUT, parent=B, commit=D, metric=None, desc="huge batch")
        add(5, Status.INVALID, parent=B, commit=None, metric=None, desc="edit did not apply")
        add(6, Status.RUNNING, parent=B, commit=None, metric=None, desc="in flight")
        yield led, led.get_session("mar5")


def test_tsv_is_karpathys_results_tsv(filled: tuple[Ledger, Session]) -> None:
    led, s = filled
    out = io.StringIO()
    n = export(led, s, "tsv", out)
    assert out.getvalue() == (
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
        "b2c3d4e\t0.993212\t44.0\tkeep\tincrease LR to 0.04\n"
        "c3d4e5f\t1.005000\t43.0\tdiscard\tswitch to GeLU activation\n"
        "b2c3d4e\t0.000000\t0.0\tcrash\tdouble the width (OOM)\n"
        "d4e5f60\t0.000000\t0.0\tcrash\thuge batch\n"
        "\t\t\tinvalid\tedit did not apply\n"  # never ran: no metric, no one else's commit
    )
    assert n == 6
    for line in out.getvalue().splitlines():
        assert line.count("\t") == 4


def test_tsv_memory_key_and_metric_name(filled: tuple[Ledger, Session]) -> None:
    led, s = filled
    out = io.StringIO()
    export(led, s, "tsv", out, memory_key="other_mb")
    lines = out.getvalue().splitlines()
    assert lines[1].split("\t")[2] == "0.0" and lines[2].split("\t")[2] == "2.0"
    led.update_session(s.id, metric_name="accuracy")
    out = io.StringIO()
    export(led, led.get_session("mar5"), "tsv", out)  # type: ignore[arg-type]
    assert out.getvalue().startswith("commit\taccuracy\tmemory_gb\tstatus\tdescription\n")


def test_csv_round_trip(filled: tuple[Ledger, Session]) -> None:
    led, s = filled
    out = io.StringIO()
    assert export(led, s, "csv", out) == 7
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_idx = {int(r["idx"]): r for r in rows}
    for exp in led.experiments(s.id):
        r = by_idx[exp.idx]
        assert r["status"] == exp.status.value and r["session"] == "mar5"
        assert (float(r["metric"]) if r["metric"] else None) == exp.metric
        assert r["description"] == exp.description and r["commit"] == (exp.commit or "")
        assert int(r["tokens_in"]) == exp.usage.tokens_in and float(r["cost_usd"]) == exp.usage.cost_usd
        assert json.loads(r["secondary"]) == exp.secondary and json.loads(r["params"]) == exp.params
        assert json.loads(r["evidence"]) == exp.evidence and r["trust"] == exp.trust
    assert by_idx[2]["description"] == "switch to\tGeLU\nactivation"  # csv quotes, nothing lost
    assert by_idx[1]["metric"] == "0.993212345"


def test_jsonl_round_trip(filled: tuple[Ledger, Session]) -> None:
    led, s = filled
    out = io.StringIO()
    assert export(led, s, "jsonl", out) == 7
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 7
    for rec, exp in zip(records, led.experiments(s.id), strict=True):
        assert rec["session"] == "mar5" and rec["metric_name"] == "val_bpb" and rec["direction"] == "minimize"
        assert rec["idx"] == exp.idx and rec["status"] == exp.status.value and rec["metric"] == exp.metric
        assert rec["usage"] == {
            "tokens_in": exp.usage.tokens_in,
            "tokens_out": exp.usage.tokens_out,
            "tokens_cached": exp.usage.tokens_cached,
            "cost_usd": exp.usage.cost_usd,
            "seconds": exp.usage.seconds,
        }
        assert rec["trust"] == exp.trust and rec["diff"] == exp.diff and rec["secondary"] == exp.secondary
    assert records[3]["metric"] is None and records[1]["usage"]["tokens_in"] == 100


def test_unknown_format_lists_the_formats(filled: tuple[Ledger, Session]) -> None:
    led, s = filled
    with pytest.raises(UsageError) as err:
        export(led, s, "xlsx", io.StringIO())
    assert "xlsx" in err.value.message
    assert "tsv" in err.value.fix and "csv" in err.value.fix and "jsonl" in err.value.fix
    assert err.value.exit_code == 2
