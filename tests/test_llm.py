"""The llm researcher end to end: real openai/anthropic clients over HTTP to a loopback fake server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.conftest import SPEC, TARGET_PY, git, nightlab_cmd

from nightlab.engine import Engine
from nightlab.errors import NightlabError
from nightlab.fakellm import FakeLLMServer, Turn
from nightlab.ledger import Ledger
from nightlab.types import Status

pytest.importorskip("openai")
pytest.importorskip("anthropic")

KEY = "sk-test-NIGHTLAB-0123456789abcdef"
GOOD = ("Move X to its optimum: the score is quadratic in X.\n\n"
        "target.py\n```python\n<<<<<<< SEARCH\nX = 3.0\n=======\nX = 1.0\n>>>>>>> REPLACE\n```\n")
BAD = "Try this.\n\ntarget.py\n<<<<<<< SEARCH\nX = 7.0\n=======\nX = 1.0\n>>>>>>> REPLACE\n"
PROTOCOLS = ["openai", "anthropic"]


def llm_spec(srv: FakeLLMServer, extra: str = "", stop: str = "") -> str:
    spec = SPEC.replace('[researcher]\nkind = "scripted"\n', "")
    spec = spec.replace("[stop]\nmax_experiments = 3\n", f"[stop]\nmax_experiments = 3\n{stop}")
    return spec + f'''
[researcher]
kind = "llm"
provider = "{srv.protocol}"
model = "fake-model"
base_url = "{srv.base_url}"
api_key_env = "NIGHTLAB_TEST_KEY"
max_retries = 2
timeout_s = 10
{extra}
[researcher.price]
input = 2.0
output = 10.0
cached = 0.5
'''


def run(lab: Path, n: int = 1, tag: str = "t") -> tuple[Engine, list]:
    eng = Engine(lab, tag=tag, sandbox_mode="none", max_experiments=n)
    session = eng.run()
    return eng, eng.ledger.experiments(session.id)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("NIGHTLAB_TEST_KEY", KEY)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_good_edit_is_applied_kept_and_accounted(make_lab, protocol):
    turn = Turn(text=GOOD, tokens_in=1000, tokens_out=50, tokens_cached=400)
    with FakeLLMServer(protocol, [turn]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab)
    exp = exps[1]
    assert exp.status is Status.KEEP and exp.metric == pytest.approx(4.5)
    assert exp.researcher == "llm" and exp.rationale.startswith("Move X to its optimum")
    assert "+X = 1.0" in exp.diff
    # usage normalised across protocols; cost from the spec's price table
    assert (exp.usage.tokens_in, exp.usage.tokens_out, exp.usage.tokens_cached) == (1000, 50, 400)
    assert exp.usage.cost_usd == pytest.approx((600 * 2.0 + 400 * 0.5 + 50 * 10.0) / 1e6)
    assert exp.usage.seconds > 0
    assert eng.ledger.usage_totals(eng.session.id).tokens_in == 1000
    # the real key went over the wire, in the protocol's header
    hdr = srv.requests[0]["headers"]
    assert KEY in (hdr.get("authorization", "") + hdr.get("x-api-key", "")), sorted(hdr)
    body = srv.requests[0]["body"]
    assert body["model"] == "fake-model"
    sent = json.dumps(body)
    assert "X = 3.0" in sent and "score" in sent and "# test" in sent  # files, metric, program.md
    # prompt and response stored as artifacts, without the key
    folder = lab / ".nightlab" / "artifacts" / "t" / str(exp.idx)
    prompt = (folder / "prompt.txt").read_text()
    assert "X = 3.0" in prompt and (folder / "response.txt").read_text().count("X = 1.0") == 1
    meta = json.loads((folder / "llm.json").read_text())
    assert meta["model"] == "fake-model" and meta["calls"][0]["tokens_in"] == 1000
    for path in (lab / ".nightlab").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    eng.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_malformed_edit_is_shown_back_once_and_repaired(make_lab, protocol):
    with FakeLLMServer(protocol, [Turn(text=BAD), Turn(text=GOOD)]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab)
    assert exps[1].status is Status.KEEP and exps[1].params.get("repaired") is True
    assert len(srv.requests) == 2
    second = srv.requests[1]["body"]["messages"]
    assert second[-2]["role"] == "assistant" and "X = 7.0" in str(second[-2]["content"])
    assert "SEARCH text was not found" in str(second[-1]["content"])
    assert exps[1].usage.tokens_in == 200  # both calls counted
    eng.close()


@pytest.mark.parametrize(("structured", "why"), [
    ("off", "no usable edit: the answer has no SEARCH/REPLACE block"),
    ("auto", "no usable edit: the answer is neither the JSON object asked for (the answer has no JSON object)")])
def test_an_edit_that_fails_twice_is_invalid_not_a_crash(make_lab, structured, why):
    with FakeLLMServer("openai", [Turn(text="I would not change anything.")]) as srv:
        lab = make_lab(spec=llm_spec(srv, extra=f'structured = "{structured}"\n'))
        eng, exps = run(lab, n=2)
    assert [e.status for e in exps[1:]] == [Status.INVALID, Status.INVALID]
    assert exps[1].reason.startswith(why), exps[1].reason
    assert exps[1].params["retried"] is True and "repaired" not in exps[1].params
    assert len(srv.requests) == 4 and exps[1].usage.tokens_in == 200
    assert eng.session.status == "finished"
    eng.close()


def test_an_edit_of_a_protected_file_is_refused_by_the_precheck(make_lab):
    evil = "Game the evaluator.\n\nevaluate.py\n```python\nprint('gamed')\n```\n"
    with FakeLLMServer("openai", [Turn(text=evil)]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab)
    assert exps[1].status is Status.INVALID and "evaluate.py is not an editable file" in exps[1].reason
    assert "evaluate.py is not an editable file" in str(srv.requests[1]["body"]["messages"][-1])
    eng.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("status", [429, 503])
def test_rate_limit_and_server_errors_are_retried(make_lab, protocol, status):
    busy = Turn(status=status, headers={"retry-after-ms": "20"}, error="slow down")
    with FakeLLMServer(protocol, [busy, busy, Turn(text=GOOD)]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab)
    assert exps[1].status is Status.KEEP and len(srv.requests) == 3
    eng.close()


def test_retries_are_bounded_then_the_candidate_is_invalid(make_lab):
    busy = Turn(status=429, headers={"retry-after-ms": "10"}, error="quota")
    with FakeLLMServer("openai", [busy]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab)
    assert len(srv.requests) == 3  # 1 + max_retries
    assert exps[1].status is Status.INVALID and "HTTP 429" in exps[1].reason and "quota" in exps[1].reason
    eng.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("status", "words"), [(401, ["401", "NIGHTLAB_TEST_KEY"]),
                                               (404, ["404", "fake-model"])])
def test_auth_and_model_errors_stop_the_session_with_the_fix(make_lab, protocol, status, words):
    with FakeLLMServer(protocol, [Turn(status=status, error="invalid x-api-key")]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng = Engine(lab, tag="t", sandbox_mode="none", max_experiments=3)
        with pytest.raises(NightlabError) as ei:
            eng.run()
    assert len(srv.requests) == 1  # not retried
    text = f"{ei.value.message} {ei.value.fix}"
    assert all(w in text for w in words) and KEY not in text
    assert eng.session.status == "failed"
    eng.close()


def test_unreachable_server_stops_the_session(make_lab):
    with FakeLLMServer("openai", [Turn(text=GOOD)]) as srv:
        spec = llm_spec(srv)
    lab = make_lab(spec=spec.replace("max_retries = 2", "max_retries = 0"))
    eng = Engine(lab, tag="t", sandbox_mode="none", max_experiments=1)
    with pytest.raises(NightlabError, match="cannot reach"):
        eng.run()
    eng.close()


def test_missing_key_variable_is_a_clear_error_before_any_session_exists(make_lab, monkeypatch):
    monkeypatch.delenv("NIGHTLAB_TEST_KEY")
    with FakeLLMServer("openai", [Turn(text=GOOD)]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        with pytest.raises(NightlabError, match="NIGHTLAB_TEST_KEY") as ei:
            Engine(lab, tag="t", sandbox_mode="none", max_experiments=1)
        assert "export NIGHTLAB_TEST_KEY" in ei.value.fix
        # as a user meets it: exit 2, the variable and the fix named, no traceback
        out = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--tag", "t", "--plain", "--sandbox", "none"),
                             capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "NIGHTLAB_TEST_KEY"})
        assert out.returncode == 2, out.stdout + out.stderr
        assert "NIGHTLAB_TEST_KEY" in out.stderr and "export NIGHTLAB_TEST_KEY" in out.stderr
        assert "Traceback" not in out.stderr and not srv.requests
        # nothing was left behind to clean up: no session row, no branch; with the key, `t` then starts afresh
        with Ledger.for_lab(lab) as led:
            assert led.latest_session() is None
        assert "nightlab/" not in git(lab, "branch", "--list")
        monkeypatch.setenv("NIGHTLAB_TEST_KEY", "sk-test")
        eng, exps = run(lab, n=1)
    assert eng.session.tag == "t" and [e.idx for e in exps] == [0, 1] and len(srv.requests) == 1
    eng.close()


@pytest.mark.parametrize(("stop", "why"), [("max_cost_usd = 0.0035", "max_cost_usd"),
                                           ("max_tokens = 1300", "max_tokens")])
def test_cost_and_token_stop_rules(make_lab, stop, why):
    turn = Turn(text=GOOD.replace("X = 1.0", "X = 2.0"), tokens_in=1000, tokens_out=100)  # $0.003 per call
    with FakeLLMServer("openai", [turn, Turn(text="nothing")]) as srv:
        lab = make_lab(spec=llm_spec(srv, stop=stop + "\n"))
        eng, exps = run(lab, n=10)
    # #1: one call, 1100 tokens, $0.003; #2: no edit + repair, 2 x 120 tokens, 2 x $0.0004 -> over both limits
    assert eng.session.status == "finished" and why in eng.session.stop_reason
    assert len(exps) - 1 == 2
    eng.close()


def test_think_samples_several_and_sends_the_one_the_model_ranks_best(make_lab):
    a = GOOD.replace("X = 1.0", "X = 2.0").replace("Move X to its optimum", "Halve the distance")
    script = [Turn(text=a), Turn(text=BAD), Turn(text=GOOD), Turn(text="Proposal 2 is best.")]
    with FakeLLMServer("openai", script) as srv:
        lab = make_lab(spec=llm_spec(srv, extra="think = 3\n"))
        eng, exps = run(lab)
    exp = exps[1]
    assert exp.metric == pytest.approx(4.5)
    assert exp.params == {"think": 3, "valid": 2, "picked": 2, "structured": "json_schema"}
    seeds = [r["body"].get("seed") for r in srv.requests[:3]]
    assert None not in seeds and len(set(seeds)) == 3  # each sample its own seed
    rank_prompt = srv.requests[3]["body"]["messages"][-1]["content"]
    assert "Proposal 1" in rank_prompt and "Proposal 2" in rank_prompt and "Proposal 3" not in rank_prompt
    assert exp.usage.tokens_in == 400
    eng.close()


def test_secret_env_values_never_reach_the_model_or_the_artifacts(make_lab, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-very-secret-value-42")
    with FakeLLMServer("openai", [Turn(text=GOOD)]) as srv:
        program = f"# test\nthe token is tok-very-secret-value-42 and key {KEY}\n"
        lab = make_lab(files={"program.md": program}, spec=llm_spec(srv))
        eng, _ = run(lab)
    sent = json.dumps(srv.requests[0]["body"])
    assert "tok-very-secret-value-42" not in sent and KEY not in sent and "[REDACTED]" in sent
    for path in (lab / ".nightlab").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"tok-very-secret-value-42" not in data and KEY.encode() not in data, path
    eng.close()


def test_sweep_runs_each_setting_on_the_same_budget_and_reports_spend(make_lab, tmp_path):
    from click.testing import CliRunner

    from nightlab.cli.sweep import sweep

    worse = GOOD.replace("X = 1.0", "X = 2.0")
    with FakeLLMServer("openai", [Turn(text=worse, tokens_in=1000, tokens_out=100)]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        plot_path = tmp_path / "sweep.png"
        res = CliRunner().invoke(sweep, ["--lab", str(lab), "--knob", "think=1,2", "--experiments", "2",
                                         "--tag", "sw", "--plot", str(plot_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    think1 = next(ln for ln in lines if ln.startswith("think=1 "))
    think2 = next(ln for ln in lines if ln.startswith("think=2 "))
    assert "sw-think1" in think1 and "sw-think2" in think2
    # think=1: #1 one call, #2 the same edit no longer applies: + repair -> 3 calls of 1100 tokens
    # think=2: #1 two samples + a ranking call, #2 two samples + repair -> 6 calls, same best score
    assert think1.split()[-2] == "3300" and think2.split()[-2] == "6600"
    assert think1.split()[4] == think2.split()[4] == "5.5"
    assert float(think2.split()[-1]) == pytest.approx(6 * 0.003)
    from nightlab.ledger import Ledger

    with Ledger.for_lab(lab) as ledger:
        assert {s.tag for s in ledger.list_sessions()} == {"sw-think1", "sw-think2"}
    pytest.importorskip("matplotlib")
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_sweep_rejects_a_bad_knob_before_running(make_lab):
    from click.testing import CliRunner

    from nightlab.cli.sweep import sweep
    from nightlab.errors import SpecError

    with FakeLLMServer("openai", [Turn(text=GOOD)]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        with pytest.raises(SpecError, match=r"\[researcher\] think"):
            CliRunner().invoke(sweep, ["--lab", str(lab), "--knob", "think=1,0", "--experiments", "1"],
                               catch_exceptions=False)
    assert not srv.requests


# --------------------------------------------------------------------------- failure shapes of small models

NEAR_MISS = ("Move X.\n\ntarget.py\n<<<<<<< SEARCH\n   X = 3.0   \r\n=======\n   X = 1.0\n>>>>>>> REPLACE\n")
DUP = TARGET_PY.replace("Y = 0.0\n", "if True:\n    Z = 1\nY = 0.0\nif True:\n    Z = 1\n")
SCHEMA_ANSWER = json.dumps({"rationale": "Move X to its optimum.",
                            "edits": [{"file": "target.py", "old": "X = 3.0", "new": "X = 1.0"}]})


def test_a_near_miss_in_whitespace_applies_without_a_retry(make_lab):
    with FakeLLMServer("openai", [Turn(text=NEAR_MISS)]) as srv:
        lab = make_lab(spec=llm_spec(srv, extra='structured = "off"\n'))
        eng, exps = run(lab)
    assert exps[1].status is Status.KEEP and exps[1].metric == pytest.approx(4.5)
    assert len(srv.requests) == 1 and "retried" not in exps[1].params
    assert "X = 1.0\n" in exps[1].diff and "   X = 1.0" not in exps[1].diff  # re-indented to the file's
    eng.close()


def test_an_ambiguous_match_is_shown_back_with_its_places_then_repaired(make_lab):
    amb = "Set Z.\n\ntarget.py\n<<<<<<< SEARCH\n    Z = 1\n=======\n    Z = 2\n>>>>>>> REPLACE\n"
    with FakeLLMServer("openai", [Turn(text=amb), Turn(text=GOOD)]) as srv:
        lab = make_lab(files={"target.py": DUP}, spec=llm_spec(srv, extra='structured = "off"\n'))
        eng, exps = run(lab)
    fix = srv.requests[1]["body"]["messages"][-1]["content"]
    assert "occurs 2 times (at lines 4, 7)" in fix and "4|     Z = 1" in fix and "7|     Z = 1" in fix
    assert exps[1].status is Status.KEEP and exps[1].params["retried"] is True
    assert exps[1].usage.tokens_in == 200  # the retry counted
    eng.close()


def test_an_absent_search_is_shown_back_with_the_closest_lines(make_lab):
    with FakeLLMServer("openai", [Turn(text=BAD)]) as srv:
        lab = make_lab(spec=llm_spec(srv, extra='structured = "off"\n'))
        eng, exps = run(lab, n=2)
    fix = srv.requests[1]["body"]["messages"][-1]["content"]
    assert "SEARCH text was not found" in fix and "closest lines of target.py" in fix and "2| X = 3.0" in fix
    e1 = exps[1]
    # the model's own rationale is kept; the error is the reason; its failed SEARCH is shown next time
    assert e1.status is Status.INVALID and e1.rationale == "Try this." and "not found" in e1.reason
    assert e1.params["failed_search"] == "X = 7.0"
    nxt = srv.requests[2]["body"]["messages"][-1]["content"]
    assert "#1 was invalid" in nxt.split("# Last failure")[1] and "X = 7.0" in nxt.split("# Last failure")[1]
    eng.close()


def test_a_schema_shaped_answer_is_asked_for_and_applied(make_lab):
    with FakeLLMServer("openai", [Turn(text=SCHEMA_ANSWER)]) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab)
    body = srv.requests[0]["body"]
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["required"] == ["rationale", "edits"]
    item = rf["json_schema"]["schema"]["properties"]["edits"]["items"]["properties"]
    assert item["file"]["enum"] == ["target.py"]
    # a loopback server: "old" can only be a line that occurs once in the file (grammar-constrained)
    assert "X = 3.0" in item["old"]["enum"] and "" not in item["old"]["enum"]
    assert '"edits"' in body["messages"][0]["content"]  # the system message describes the JSON object
    assert exps[1].status is Status.KEEP and exps[1].rationale == "Move X to its optimum."
    assert exps[1].params["structured"] == "json_schema"
    eng.close()


def test_a_server_refusing_response_format_falls_back_to_text_and_remembers(make_lab):
    with FakeLLMServer("openai", [Turn(text=GOOD), Turn(text=GOOD.replace("X = 1.0", "X = 1.5")
                                                            .replace("X = 3.0", "X = 1.0"))],
                       structured=False) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab, n=2)
    # both forms tried once (OpenAI's json_schema, llama-cpp-python's json_object), then text for good
    assert [r["response_format"]["type"] for r in srv.refused] == ["json_schema", "json_object"]
    assert all("response_format" not in r["body"] for r in srv.requests)
    assert "<<<<<<< SEARCH" in srv.requests[-1]["body"]["messages"][0]["content"]  # text format asked
    assert [e.status for e in exps[1:]] == [Status.KEEP, Status.DISCARD]
    assert exps[2].params["structured"] == ""
    eng.close()


def test_llama_cpp_pythons_json_object_form_is_found_and_remembered(make_lab):
    with FakeLLMServer("openai", [Turn(text=SCHEMA_ANSWER)], structured="json_object") as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab, n=2)
    # json_schema refused with llama-cpp-python's 500 (the SDK retried it), then json_object for good
    assert {r["response_format"]["type"] for r in srv.refused} == {"json_schema"}
    assert {r["body"]["response_format"]["type"] for r in srv.requests} == {"json_object"}
    assert srv.requests[0]["body"]["response_format"]["schema"]["required"] == ["rationale", "edits"]
    assert exps[1].status is Status.KEEP and exps[2].params["structured"] == "json_object"
    eng.close()


def test_structured_on_with_a_refusing_server_stops_with_the_fix(make_lab):
    with FakeLLMServer("openai", [Turn(text=GOOD)], structured=False) as srv:
        lab = make_lab(spec=llm_spec(srv, extra='structured = "on"\n'))
        eng = Engine(lab, tag="t", sandbox_mode="none", max_experiments=1)
        with pytest.raises(NightlabError, match="refused a JSON-schema response_format") as ei:
            eng.run()
    assert 'structured = "auto"' in ei.value.fix and not srv.requests
    eng.close()


def test_the_servers_tokenizer_and_cache_counts_are_used(make_lab):
    turn = Turn(text=GOOD, tokens_in=900, timings={"cache_n": 600, "prompt_n": 300, "predicted_n": 20})
    with FakeLLMServer("openai", [turn], tokenize=True) as srv:
        lab = make_lab(spec=llm_spec(srv))
        eng, exps = run(lab)
    assert srv.tokenized  # the prompt was counted by the server's /tokenize
    meta = json.loads((lab / ".nightlab" / "artifacts" / "t" / "1" / "llm.json").read_text())
    assert meta["prompt_counted_by"] == "tokenizer" and meta["cached_share"] == pytest.approx(600 / 900, abs=1e-4)
    assert exps[1].usage.tokens_cached == 600  # llama.cpp's timings.cache_n
    eng.close()


def test_local_servers_get_local_defaults():
    from nightlab.researchers.llm import Options

    local = Options(model="m", base_url="http://127.0.0.1:8080/v1").resolved()
    hosted = Options(model="m").resolved()
    assert (local.max_tokens, local.max_retries, local.timeout_s) == (1024, 1, 600.0)
    assert (hosted.max_tokens, hosted.max_retries, hosted.timeout_s) == (4096, 5, 300.0)
    assert Options(model="m", base_url="http://localhost:1/v1", max_tokens=77).resolved().max_tokens == 77
