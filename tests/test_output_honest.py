"""Output that must not mislead (issue 17, item 5): real sessions, real git, the real CLI.

- ``export --format tsv``: a row that never ran has no metric and no one else's commit;
  crashes keep karpathy's ``0.000000 … crash``;
- the report's "crashed" count is what its chart marks as crashed;
- descriptions and commit subjects are cut with an ellipsis;
- a multi-line git error stays inside its plain-mode record;
- ``show`` does not print a worktree that no longer exists;
- dashboard pages answer a bad session or experiment with an HTML 404 (the /api stays JSON);
- every error reads ``error: …``, never ``Error:`` nor a ``Ledger(...)`` repr.
"""

from __future__ import annotations

import html
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import GIT_ENV, SRC, dashboard_client, git

from nightlab.cli.read import show
from nightlab.console import PlainReporter
from nightlab.engine import Engine
from nightlab.export import export
from nightlab.ledger import Ledger
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.text import clip
from nightlab.types import Candidate, Direction, Status

NUMBERS = "search(tpe): " + ", ".join(f"K{i} 0.{i}12345 -> 0.{i}98765" for i in range(12))
BAD_DIFF = """\
--- a/target.py
+++ b/target.py
@@ -1,3 +1,3 @@
 import os, sys
-X = 7.0
+X = 2.0
 Y = 0.0
@@ -5,1 +5,1 @@
-nothing here
+still nothing
"""


def _session(lab: Path, steps: list[dict[str, object]], out: io.StringIO | None = None) -> None:
    eng = Engine(lab, tag="t", researcher=ScriptedResearcher(steps), sandbox_mode="none",
                 max_experiments=len(steps), reporter=PlainReporter(out) if out is not None else None)
    try:
        eng.run()
    finally:
        eng.close()


def nightlab(lab: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV, "PYTHONPATH": SRC, "COLUMNS": "200"}
    env.pop("NIGHTLAB_DB", None)
    return subprocess.run([sys.executable, "-m", "nightlab", *args], cwd=lab, env=env, capture_output=True,
                          text=True, timeout=120)


def test_descriptions_and_commit_subjects_are_cut_with_an_ellipsis(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    _session(lab, [{"rationale": NUMBERS, "replace": {"target.py": ["X = 3.0", "X = 2.0"]}}])
    with Ledger.for_lab(lab) as led:
        e = led.get_experiment(led.get_session("t").id, 1)  # type: ignore[union-attr]
    assert e is not None and len(NUMBERS) > 200
    assert e.description.endswith("…") and len(e.description) <= 200
    assert NUMBERS.startswith(e.description[:-1])
    assert NUMBERS[len(e.description) - 1:].startswith(", ")  # cut between two changes, not inside a number
    subject = git(lab, "log", "-1", "--format=%s", "refs/nightlab/t/1").strip()
    assert subject.endswith("…") and "nightlab t #1: " in subject
    assert clip("0.123456789", 6) == "0.123…" and clip("short", 10) == "short"


def test_multi_line_git_error_stays_in_its_plain_record(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    out = io.StringIO()
    _session(lab, [{"rationale": "a diff that does not apply", "diff": BAD_DIFF}], out)
    lines = out.getvalue().splitlines()
    record = [ln for ln in lines if ln.startswith("[1] invalid")]
    assert record and "edit did not apply" in record[0], out.getvalue()
    # every line is a record of its own ([n] ..., nightlab: ...) or indented under one
    stray = [ln for ln in lines if not ln.startswith(("[", "nightlab:", "    "))]
    assert stray == [], out.getvalue()


def test_show_does_not_print_a_removed_worktree(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    _session(lab, [{"rationale": "x", "replace": {"target.py": ["X = 3.0", "X = 2.0"]}}])
    with Ledger.for_lab(lab) as led:
        e = led.get_experiment(led.get_session("t").id, 1)  # type: ignore[union-attr]
    assert e is not None and e.worktree and not Path(e.worktree).exists()
    r = CliRunner(env={"COLUMNS": "200"}).invoke(show, ["1", "--lab", str(lab)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert e.worktree not in r.output and "worktrees" not in r.output


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Ledger, str]:
    """A session with a keep, a measured discard, a crash, a stale conflict (no metric) and an invalid."""
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    base, c1, c2 = "a" * 40, "b" * 40, "c" * 40
    s = led.create_session(tag="m", branch="nightlab/m", base_commit=base, metric_name="val_loss",
                           direction=Direction.MINIMIZE, sandbox="none", spec_hash="", spec_json="{}",
                           lab_path=str(tmp_path), machine={}, researcher="search")
    rows = [
        (0, Status.KEEP, base, base, 1.0, "baseline", 0),
        (1, Status.DISCARD, base, c1, 1.2, "worse", 0),
        (2, Status.CRASH, base, c2, None, "crashed", 1),
        (3, Status.DISCARD, base, None, None, "rebase of #1: conflicts", None),
        (4, Status.INVALID, base, None, None, "edit did not apply", None),
    ]
    for idx, status, parent, commit, metric, desc, code in rows:
        cand = None if idx == 0 else Candidate(parent=parent, rationale=desc, researcher="search")
        eid = led.start_experiment(s.id, idx=idx, parent_commit=parent, seed=0, candidate=cand, description=desc,
                                   propose_s=0.0)
        led.finish_experiment(eid, status=status, metric=metric, commit=commit, exit_code=code,
                              reason="stale: conflicts with the new incumbent" if idx == 3 else "",
                              incumbent=(base, 1.0) if idx == 0 else None, finished_at=1.0)
    led.update_session(s.id, baseline_metric=1.0)
    return led, "m"


def test_tsv_rows_that_never_ran_carry_no_metric_nor_a_parents_commit(mixed: tuple[Ledger, str]) -> None:
    led, tag = mixed
    out = io.StringIO()
    s = led.get_session(tag)
    assert s is not None
    export(led, s, "tsv", out)
    rows = [ln.split("\t") for ln in out.getvalue().splitlines()[1:]]
    assert rows[2][:4] == ["c" * 7, "0.000000", "0.0", "crash"]  # karpathy's crash convention
    assert rows[3][:4] == ["", "", "", "discard"] and rows[4][:4] == ["", "", "", "invalid"]
    assert all(r[1] != "0.000000" for r in rows if r[3] != "crash")
    led.close()


def test_report_crash_count_matches_the_charts_crash_marks(mixed: tuple[Ledger, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jinja2")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    from nightlab.report import write_report

    seen: dict[str, int] = {}
    original = Figure.savefig

    def spy(self: Figure, *args: object, **kwargs: object) -> None:
        for coll in self.axes[0].collections:
            seen[str(coll.get_label())] = len(coll.get_offsets())
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    led, tag = mixed
    html_path, _ = write_report(led, tmp_path / "night.html", tag)
    page = html_path.read_text()
    m = re.search(r"(\d+) crashed", page)
    assert m is not None
    crash_marks = {k: v for k, v in seen.items() if "crash" in k}
    assert crash_marks == {"crash / timeout": int(m.group(1))} == {"crash / timeout": 1}, seen
    assert seen.get("no metric: discard, invalid") == 2, seen
    assert "1 never measured" in page
    led.close()


def test_dashboard_pages_answer_html_404_and_the_api_json(mixed: tuple[Ledger, str]) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")

    from nightlab.web.app import create_app

    led, _ = mixed
    client = dashboard_client(create_app(led), base_url="http://127.0.0.1")
    for path, words in [("/s/nosuch", "no session 'nosuch'"), ("/s/m/e/999", "no experiment 999"),
                        ("/s/m/e/abc", "no page at /s/m/e/abc"), ("/s/nosuch/costs", "no session"),
                        ("/nowhere", "no page at /nowhere")]:
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("text/html"), path
        assert "<html" in r.text and words in html.unescape(r.text), (path, r.text[:300])
    r = client.get("/api/sessions/nosuch")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"detail": "no session 'nosuch'"}
    assert client.get("/api/sessions/m/experiments/abc").status_code == 422
    led.close()


def test_errors_have_one_prefix_and_no_ledger_repr(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    _session(lab, [{"rationale": "x", "replace": {"target.py": ["X = 3.0", "X = 2.0"]}}])
    for args, words in [(("status", "--tag", "nosuch"), "error: no session 'nosuch' in "),
                        (("show", "99"), "error: no experiment 99 in session 't'"),
                        (("log", "--bogus"), "error: No such option '--bogus'"),
                        (("run", "--tag", "t"), "error: session 't' already exists"),
                        (("nosuchcommand",), "error: No such command 'nosuchcommand'")]:
        r = nightlab(lab, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr, (args, r.stderr)
        assert "Error:" not in r.stderr and "Ledger(" not in r.stderr and "Traceback" not in r.stderr
