"""``nightlab report``: one self-contained HTML file and progress.png, from the ledger alone."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

pytest.importorskip("jinja2", reason="the ui extra is not installed")
pytest.importorskip("matplotlib", reason="the ui extra is not installed")

from click.testing import CliRunner
from tests.dashlab import SECRET, make_dash_lab, run_session

from nightlab.cli.ui import report
from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.report import write_report


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lab = make_dash_lab(tmp_path_factory.mktemp("rep"))
    run_session(lab)
    return lab


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_report_is_self_contained_with_the_inline_chart(lab: Path, tmp_path: Path):
    with Ledger.for_lab(lab) as led:
        html_path, png = write_report(led, tmp_path / "out" / "night.html")
        n = led.count_experiments(led.get_session("t").id)
    assert html_path == tmp_path / "out" / "night.html" and png == tmp_path / "out" / "progress.png"
    html = html_path.read_text()
    # nothing is fetched: no external src/href, no script or stylesheet links
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert all(r.startswith("#") for r in refs), refs
    assert not re.search(r"<(script|link|iframe|img)\b", html)
    assert not re.search(r"url\(\s*['\"]?https?:", html)
    # the chart is inline SVG with one circle per experiment
    assert '<svg class="nl-chart"' in html
    assert len(re.findall(r'<circle class="pt[^"]*"[^>]*data-idx=', html)) == n == 5
    assert "+94.12%" in html and "move Y to its optimum" in html
    assert SECRET not in html and "visible-value" in html
    w, h = png_size(png)
    assert w >= 800 and h >= 400


def test_report_command_writes_both_files(lab: Path, tmp_path: Path):
    out = tmp_path / "r.html"
    r = CliRunner().invoke(report, ["--lab", str(lab), "--tag", "t", "-o", str(out)], standalone_mode=False)
    assert r.exception is None, r.output
    assert out.exists() and (tmp_path / "progress.png").exists() and "wrote" in r.output


def test_report_of_a_missing_session_says_so(lab: Path, tmp_path: Path):
    r = CliRunner().invoke(
        report, ["--lab", str(lab), "--tag", "nope", "-o", str(tmp_path / "x.html")], standalone_mode=False
    )
    assert isinstance(r.exception, UsageError) and "no session 'nope'" in r.exception.message
    r = CliRunner().invoke(report, ["--lab", str(tmp_path)], standalone_mode=False)
    assert isinstance(r.exception, UsageError) and "no ledger" in r.exception.message


def test_report_of_a_session_with_a_running_experiment(tmp_path: Path):
    lab = make_dash_lab(tmp_path / "x")
    run_session(lab, steps=[{"rationale": "only one", "files": {"target.py": "raise SystemExit(1)\n"}}])
    with Ledger.for_lab(lab) as led:
        s = led.get_session("t")
        led.start_experiment(
            s.id, idx=2, parent_commit="p", seed=0, candidate=None, description="in flight", propose_s=0.0
        )
        html, png = write_report(led, tmp_path / "r.html")
    text = html.read_text()
    assert 'data-status="running"' in text and 'data-status="crash"' in text
    png_size(png)
