"""The output contract: the '---' summary block or a JSON file; NaN/inf/missing are failures."""

from __future__ import annotations

import json
import math

from nightlab.measure import measure, parse_summary
from nightlab.spec import MetricSpec


def test_parse_summary_takes_the_last_block():
    text = "step 1\n---\nval_bpb: 2.0\n\nlogs\n---\nval_bpb:          0.997900\ntraining_seconds: 300.1\n"
    assert parse_summary(text) == {"val_bpb": "0.997900", "training_seconds": "300.1"}


def test_no_block_means_no_metric(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("val_bpb: 0.5\n")  # not after a '---' line: free-form logs are never scraped
    m = measure(MetricSpec(name="val_bpb"), log, tmp_path)
    assert m.metric is None and "val_bpb" in m.error


def test_nan_and_inf_are_failures(tmp_path):
    log = tmp_path / "run.log"
    for bad in ("nan", "inf", "-inf", "abc"):
        log.write_text(f"---\nval_bpb: {bad}\n")
        m = measure(MetricSpec(name="val_bpb"), log, tmp_path)
        assert m.metric is None and not m.valid, bad


def test_secondary_figures(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("---\nloss: 1.5\npeak_vram_mb: 1024.0\nnote: hello\n")
    m = measure(MetricSpec(name="loss", secondary=["peak_vram_mb", "note", "absent"]), log, tmp_path)
    assert m.metric == 1.5 and m.secondary == {"peak_vram_mb": 1024.0}


def test_json_source(tmp_path):
    (tmp_path / "out.json").write_text(json.dumps({"acc": 0.91, "secs": 3}))
    m = measure(MetricSpec(name="acc", direction="maximize", source="json", file="out.json",
                           secondary=["secs"]), tmp_path / "none.log", tmp_path)
    assert math.isclose(m.metric or 0, 0.91) and m.secondary == {"secs": 3.0}


def test_json_symlink_outside_is_refused(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"acc": 1.0}')
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "out.json").symlink_to(outside)
    m = measure(MetricSpec(name="acc", source="json", file="out.json"), lab / "x.log", lab)
    assert m.metric is None and "outside" in m.error
