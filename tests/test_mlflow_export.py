"""`nightlab export --mlflow`: a real session exported to a local MLflow store (SQLite + file artifacts) and read
back with MLflow's own client; re-exporting changes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import SPEC, TARGET_PY, cli_env, nightlab_cmd

pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'nightlab[mlflow]'")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

from mlflow import MlflowClient  # noqa: E402

from nightlab.engine import Engine  # noqa: E402
from nightlab.researchers.scripted import ScriptedResearcher  # noqa: E402


def step(x: float) -> dict[str, Any]:
    return {"rationale": f"move X to {x}", "files": {"target.py": TARGET_PY.replace("X = 3.0", f"X = {x}")}}


def export(lab: Path, uri: str) -> str:
    # cwd: MLflow puts artifacts under ./mlruns of the current folder by default
    res = subprocess.run(nightlab_cmd("export", "--lab", str(lab), "--mlflow", "--tracking-uri", uri),
                         env=cli_env(), capture_output=True, text=True, timeout=120, cwd=lab.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.slow
def test_a_session_round_trips_through_mlflow(make_lab, tmp_path):
    lab = make_lab(spec=SPEC.replace("max_experiments = 3", "max_experiments = 3"))
    eng = Engine(lab, tag="ml", researcher=ScriptedResearcher([step(2.0), step(4.0), step(1.0)]),
                 sandbox_mode="none")
    eng.run()
    eng.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = export(lab, uri)
    assert "4 runs created, 0 replaced, 0 unchanged" in out

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"nightlab/{lab.name}/ml")
    assert exp is not None and exp.tags["nightlab.metric"] == "score"
    runs = {int(r.data.tags["nightlab.n"]): r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == [0, 1, 2, 3]
    assert [runs[i].data.tags["nightlab.status"] for i in range(4)] == ["keep", "keep", "discard", "keep"]
    assert runs[1].data.metrics["score"] == pytest.approx(5.5) and runs[3].data.metrics["score"] == pytest.approx(4.5)
    assert runs[2].data.metrics["score"] == pytest.approx(13.5)
    assert runs[1].data.params["rationale"] == "move X to 2.0" and runs[1].data.params["researcher"] == "scripted"
    assert runs[1].data.tags["nightlab.trust"] == "inline" and len(runs[1].data.tags["nightlab.commit"]) == 40
    # lineage: #2 and #3 started from #1's commit; #1 from the baseline's
    assert runs[1].data.tags["nightlab.parent_n"] == "0"
    assert runs[3].data.tags["nightlab.parent_n"] == "1"
    assert runs[3].data.tags["nightlab.parent_run_id"] == runs[1].info.run_id
    assert runs[2].info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(runs[1].info.run_id)}
    assert arts == {"diff.patch", "log_tail.txt"}
    diff = Path(client.download_artifacts(runs[1].info.run_id, "diff.patch", str(tmp_path))).read_text()
    assert "+X = 2.0" in diff

    assert "0 runs created, 0 replaced, 4 unchanged" in export(lab, uri)  # idempotent
    assert len(client.search_runs([exp.experiment_id])) == 4


def test_without_a_session_the_export_says_what_to_do(make_lab, tmp_path):
    lab = make_lab()
    res = subprocess.run(nightlab_cmd("export", "--lab", str(lab), "--mlflow", "--tracking-uri",
                                      f"sqlite:///{tmp_path / 'm.db'}"),
                         env=cli_env(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "no nightlab session" in res.stderr and "Traceback" not in res.stderr
