"""``[metric] constraints``: a run that breaks one is discarded whatever its metric; bad ones are spec errors."""

from __future__ import annotations

import re
import subprocess

import pytest
from tests.conftest import SPEC, TARGET_PY, cli_env, dashboard_client, nightlab_cmd

from nightlab.constraints import broken, parse, parse_all
from nightlab.engine import Engine
from nightlab.errors import SpecError
from nightlab.researchers import Context
from nightlab.spec import load_spec
from nightlab.types import Candidate, Status

MEM_PY = TARGET_PY.replace('print(f"seed:', 'print(f"mem: {MEM}")\nprint(f"seed:').replace(
    "Y = 0.0", "Y = 0.0\nMEM = 100")


class Steps:
    name = "steps"

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def propose(self, ctx: Context) -> Candidate:
        return Candidate(parent=ctx.parent, rationale=f"step {ctx.idx}", files={"target.py": self.texts[ctx.idx - 1]})

    def observe(self, e: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_parse_is_a_grammar_not_eval():
    c = parse("peak_vram_mb <= 4e4")
    assert (c.figure, c.op, c.bound) == ("peak_vram_mb", "<=", 40000.0) and str(c) == "peak_vram_mb <= 40000"
    assert parse(" x!=1_000 ").bound == 1000
    for bad in ["__import__('os').system('id') <= 1", "x <= y", "x =< 1", "x <= 1 or True", "<= 3", "x <= nan",
                "x <= 1e999", ""]:
        with pytest.raises(ValueError):
            parse(bad)
    with pytest.raises(ValueError, match="not a recorded figure"):
        parse_all(["vram <= 1"], ["score"])
    limits = parse_all(["mem <= 100", "run_s < 60"], ["score", "mem"])
    assert broken(limits, {"mem": 100.0, "run_s": 1.0}) == ""
    assert broken(limits, {"mem": 101.0, "run_s": 1.0}) == "constraint: mem <= 100 (got 101)"
    assert "did not report mem" in broken(limits, {"run_s": 1.0})
    assert broken(limits, {"mem": float("nan"), "run_s": 1.0}).startswith("constraint: mem")


@pytest.mark.parametrize("expr, why", [("mem <= lots", "not 'FIGURE OP NUMBER'"),
                                       ("vram_mb <= 4", "not a recorded figure")])
def test_a_bad_constraint_is_a_spec_error_with_exit_2(make_lab, expr, why):
    spec = SPEC.replace('secondary = ["seed"]', f'secondary = ["seed", "mem"]\nconstraints = ["{expr}"]')
    lab = make_lab(files={"target.py": MEM_PY}, spec=spec)
    with pytest.raises(SpecError, match=why):
        load_spec(lab)
    res = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--tag", "c"), capture_output=True, text=True,
                         env=cli_env())
    assert res.returncode == 2 and why in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "[metric] constraints" in res.stderr


def test_a_better_run_that_breaks_a_constraint_is_discarded(make_lab):
    spec = SPEC.replace('secondary = ["seed"]', 'secondary = ["seed", "mem"]\nconstraints = ["mem <= 150"]')
    lab = make_lab(files={"target.py": MEM_PY}, spec=spec)
    better_but_big = MEM_PY.replace("X = 3.0", "X = 1.0").replace("MEM = 100", "MEM = 400")
    a_bit_better = MEM_PY.replace("X = 3.0", "X = 2.0").replace("MEM = 100", "MEM = 150")
    eng = Engine(lab, tag="c", researcher=Steps([better_but_big, a_bit_better]), sandbox_mode="none",
                 max_experiments=2)
    session = eng.run()
    by = {e.idx: e for e in eng.ledger.experiments(session.id)}
    eng.close()
    assert by[1].metric == pytest.approx(4.5) and by[1].metric < by[0].metric
    assert by[1].status is Status.DISCARD and by[1].reason == "constraint: mem <= 150 (got 400)"
    assert by[1].evidence["constraint"] == "mem <= 150 (got 400)"
    assert by[2].status is Status.KEEP and session.incumbent_commit == by[2].commit


def test_the_session_page_draws_a_pareto_view(make_lab):
    pytest.importorskip("fastapi")

    from nightlab.ledger import Ledger
    from nightlab.web.app import create_app
    from nightlab.web.security import Access

    spec = SPEC.replace('secondary = ["seed"]', 'secondary = ["seed", "mem"]')
    lab = make_lab(files={"target.py": MEM_PY}, spec=spec)
    texts = [MEM_PY.replace("X = 3.0", f"X = {x}").replace("MEM = 100", f"MEM = {mem}")
             for x, mem in ((2.0, 300), (1.5, 50), (2.5, 20))]
    eng = Engine(lab, tag="pa", researcher=Steps(texts), sandbox_mode="none", max_experiments=3)
    eng.run()
    eng.close()
    with Ledger.for_lab(lab) as led:
        client = dashboard_client(create_app(led, lab, Access.make("127.0.0.1", "tok")), base_url="http://127.0.0.1")
        full = client.get("/s/pa?pareto=mem").text
        assert 'id="pareto"' in full and "<b>mem</b>" in full
        page = full[full.index('class="nl-pareto"'):]
        page = page[:page.index("</svg>")]
        circles = dict(re.findall(r'<circle data-idx="(\d+)" data-status="(\w+)"', page))
        assert circles == {"0": "keep", "1": "keep", "2": "keep", "3": "discard"}, circles
        # the front: #3 (mem 20), #2 (mem 50, better score); #0 and #1 are dominated by #2
        assert 'class="front"' in page
        assert re.search(r'data-idx="2"[^>]*stroke="#1a9850"', page) and re.search(r'data-idx="3"[^>]*stroke=', page)
        assert not re.search(r'data-idx="1"[^>]*stroke=', page)
        default = client.get("/s/pa").text  # the first secondary figure by default; run_s always offered
        assert "<b>seed</b>" in default and "pareto=run_s" in default
