"""The output contract: the '---' summary block or a JSON file; NaN/inf/missing are failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nightlab.measure import MAX_JSON_BYTES, measure, parse_summary, sanity
from nightlab.spec import MetricSpec
from nightlab.types import Measurement

JSON = MetricSpec(name="score", source="json", file="m.json", secondary=["x"])


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
    assert m.metric is None and "symlink" in m.error


# -- hostile metric files (issue 11, items 6 and 7): every one is a failed measurement, none raises

def _write(p: Path, data: str | bytes) -> None:
    p.write_bytes(data if isinstance(data, bytes) else data.encode())


HOSTILE_JSON = [
    ("int400", '{"score": ' + "9" * 400 + "}", "not a finite number"),  # float(int) -> OverflowError on main
    ("int5000", '{"score": ' + "9" * 5000 + "}", "not a finite number"),  # int() digit limit -> ValueError
    ("deep", '{"score": 1, "x": ' + "[" * 200_000 + "]" * 200_000 + "}", "nests deeper"),  # RecursionError
    ("deep_obj", '{"score": 1, "x": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}", "nests deeper"),
    ("utf8", b'{"score": 1.0, "\xff": 2}', "not valid UTF-8"),
    ("utf16", '{"score": 1.0}'.encode("utf-16"), "not valid UTF-8"),
    ("list", "[1.0]", "must hold a JSON object"),
    ("string", '"1.0"', "must hold a JSON object"),
    ("nan", '{"score": NaN}', "not a finite number"),
    ("inf", '{"score": -Infinity}', "not a finite number"),
    ("float_overflow", '{"score": 1e999}', "not a finite number"),
    ("bool", '{"score": true}', "not a finite number"),
    ("nul", b'{"score": 1.0}\x00', "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("huge", " " * (MAX_JSON_BYTES + 1), "larger than"),
]


@pytest.mark.parametrize("name,data,why", HOSTILE_JSON, ids=[h[0] for h in HOSTILE_JSON])
def test_hostile_json_is_a_failed_measurement(tmp_path, name, data, why):
    _write(tmp_path / "m.json", data)
    m = measure(JSON, tmp_path / "none.log", tmp_path)
    assert m.metric is None and why in m.error, m


def test_json_bom_crlf_and_duplicates(tmp_path):
    _write(tmp_path / "m.json", b'\xef\xbb\xbf{"score": 0.5,\r\n "x": 3, "score": 0.25, "n": {"score": 9}}')
    m = measure(JSON, tmp_path / "none.log", tmp_path)
    assert m.metric == 0.25 and m.secondary == {"x": 3.0}
    assert len(m.warnings) == 1 and "duplicate key 'score'" in m.warnings[0]  # nested keys are not figures


def test_summary_numbers_are_plain_decimals(tmp_path):
    log = tmp_path / "run.log"
    for bad in ("١٢", "0x10", "1_000", "9" * 401, "1e999", "--1", "NaN", "infinity", ""):
        log.write_text(f"---\nscore: {bad}\n")
        assert measure(MetricSpec(name="score"), log, tmp_path).metric is None, bad
    log.write_bytes(b"\xff\xfe\x00junk\r\n---\r\nscore: 0.5 bits\r\nscore: .25\r\n")
    m = measure(MetricSpec(name="score"), log, tmp_path)
    assert m.metric == 0.25 and "duplicate key 'score'" in m.warnings[0] and "0.5 bits, .25" in m.warnings[0]


def test_absurd_metrics_are_refused_and_kept_visible():
    spec = MetricSpec(name="score")
    m = sanity(Measurement(-1e308), spec, 0.5)
    assert m.metric is None and "max_abs" in m.error and "-1e+308" in m.warnings[-1]
    m = sanity(Measurement(-600.0), spec, 0.5)  # 1200 baseline magnitudes away
    assert m.metric is None and "max_ratio" in m.error
    assert sanity(Measurement(0.1), spec, 0.5).metric == 0.1
    assert sanity(Measurement(1e9), spec, None).metric == 1e9  # the baseline itself: only max_abs
    off = MetricSpec(name="score", max_abs=0, max_ratio=0)
    assert sanity(Measurement(-1e308), off, 0.5).metric == -1e308


def test_warnings_are_bounded(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("---\n" + "".join(f"k{i}: 1\nk{i}: 2\n" for i in range(10_000)) + "score: 1\n")
    m = measure(MetricSpec(name="score"), log, tmp_path)
    assert m.metric == 1.0 and len(m.warnings) == 6 and m.warnings[-1] == "... and 9995 more"
