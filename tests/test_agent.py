"""The agent researcher with fake agent CLIs (small scripts): the diff comes from git, never the agent."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from tests.conftest import SPEC

from nightlab.engine import Engine
from nightlab.researchers.agent import parse_usage
from nightlab.types import Status

HAVE_BWRAP = shutil.which("bwrap") is not None
MODES = ["none", pytest.param("auto", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed"))]

# A fake Claude Code (tests/fake_agent.py): reads the prompt file, edits a file, prints a result JSON.
# It is copied outside /tmp because bwrap gives the agent a private /tmp (and CI may check out under /tmp).
_HOST_DIR = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="nightlab-agent-test-"))
FAKE_AGENT = _HOST_DIR / "fake_agent.py"
shutil.copy(Path(__file__).with_name("fake_agent.py"), FAKE_AGENT)


@pytest.fixture(scope="module", autouse=True)
def _cleanup_host_dir():
    yield
    shutil.rmtree(_HOST_DIR, ignore_errors=True)


def agent_spec(script: Path, args: str, mode: str) -> str:
    spec = SPEC.replace('[researcher]\nkind = "scripted"\n', "")
    return spec + f'''
[researcher]
kind = "agent"
command = "{sys.executable} {script} {{prompt_file}} {args}"
sandbox = "{mode}"
timeout_s = 30
pass_env = ["NIGHTLAB_TEST_KEY"]
'''


def run_agent(make_lab, tmp_path: Path, args: str, mode: str, n: int = 1):
    lab = make_lab(spec=agent_spec(FAKE_AGENT, args, mode))
    eng = Engine(lab, tag="t", sandbox_mode="none", max_experiments=n)
    session = eng.run()
    return eng, lab, eng.ledger.experiments(session.id)


@pytest.mark.parametrize("mode", MODES)
def test_an_agent_edit_is_taken_from_git_and_kept_on_its_metric(make_lab, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("NIGHTLAB_TEST_KEY", "sk-agent-secret-123456789")
    eng, lab, exps = run_agent(make_lab, tmp_path, "target.py 'X = 3.0' 'X = 1.0'", mode)
    exp = exps[1]
    assert exp.status is Status.KEEP and exp.metric == pytest.approx(4.5)
    assert exp.researcher == "agent" and exp.rationale == "I moved X X = 1.0"
    assert "+X = 1.0" in exp.diff
    assert (exp.usage.tokens_in, exp.usage.tokens_out, exp.usage.tokens_cached) == (1000, 120, 100)
    assert exp.usage.cost_usd == pytest.approx(0.0125) and exp.usage.seconds > 0
    folder = lab / ".nightlab" / "artifacts" / "t" / str(exp.idx)
    transcript = (folder / "transcript.txt").read_text()
    assert "working... key=[REDACTED]" in transcript and "sk-agent-secret" not in transcript
    assert "Research program" in (folder / "prompt.txt").read_text()
    assert json.loads((folder / "agent.json").read_text())["exit_code"] == 0
    # the agent's scratch worktree, prompt and log are gone; the lab checkout is untouched
    assert sorted(p.name for p in (lab / ".nightlab" / "worktrees").iterdir()) == []
    assert "X = 3.0" in (lab / "target.py").read_text()
    eng.close()


def test_a_worse_agent_edit_is_discarded(make_lab, tmp_path):
    eng, _, exps = run_agent(make_lab, tmp_path, "target.py 'X = 3.0' 'X = 9.0'", "none")
    assert exps[1].status is Status.DISCARD and exps[1].metric == pytest.approx(68.5)
    eng.close()


@pytest.mark.parametrize("mode", MODES)
def test_an_agent_that_edits_a_protected_file_is_rejected(make_lab, tmp_path, mode):
    eng, lab, exps = run_agent(make_lab, tmp_path, "evaluate.py protected gamed", mode)
    assert exps[1].status is Status.REJECTED and exps[1].reason == "policy: protected (evaluate.py is a protected file)"
    assert (lab / "evaluate.py").read_text() == "print('protected')\n"
    eng.close()


def test_an_untracked_new_file_is_part_of_the_change(make_lab, tmp_path):
    eng, _, exps = run_agent(make_lab, tmp_path, "target.py 'X = 3.0' 'X = 1.0' extra", "none")
    # notes.txt is not editable: the whole candidate is rejected by the guard
    assert exps[1].status is Status.REJECTED and "notes.txt" in exps[1].reason
    eng.close()


def test_an_agent_that_changes_nothing_is_invalid(make_lab, tmp_path):
    eng, _, exps = run_agent(make_lab, tmp_path, "target.py 'no such text' 'X = 1.0'", "none")
    assert exps[1].status is Status.INVALID and exps[1].reason.startswith("the agent changed nothing")
    eng.close()


@pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed")
def test_the_agent_cannot_write_outside_its_worktree_under_bwrap(make_lab, tmp_path):
    escape = _HOST_DIR / f"escaped-{tmp_path.name}.txt"  # a real, writable host path, visible read-only
    lab = make_lab(spec=agent_spec(FAKE_AGENT, f"target.py 'X = 3.0' 'X = 1.0' {escape}", "required"))
    eng = Engine(lab, tag="t", sandbox_mode="none", max_experiments=1)
    try:
        exps = eng.ledger.experiments(eng.run().id)
        assert not escape.exists() and exps[1].status is Status.KEEP
        transcript = (lab / ".nightlab" / "artifacts" / "t" / "1" / "transcript.txt").read_text()
        assert "refused: [Errno 30] Read-only file system" in transcript
    finally:
        escape.unlink(missing_ok=True)
        eng.close()


def test_usage_parsers_for_codex_and_aider_transcripts():
    codex = "\n".join(json.dumps(e) for e in [
        {"type": "turn.completed",
         "usage": {"input_tokens": 500, "cached_input_tokens": 200, "output_tokens": 40}},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "Raised the LR."}},
        {"type": "turn.completed",
         "usage": {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 10}},
    ])
    assert parse_usage(codex) == (600, 50, 200, None, "Raised the LR.")
    aider = ("Applied edit to train.py\n"
             "Tokens: 2.5k sent, 310 received. Cost: $0.01 message, $0.01 session.\n\n"
             "Tokens: 1.0k sent, 90 received. Cost: $0.0040 message, $0.014 session.\n")
    t_in, t_out, _, cost, _ = parse_usage(aider)
    assert (t_in, t_out) == (3500, 400) and cost == pytest.approx(0.014)
