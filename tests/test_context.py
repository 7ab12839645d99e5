"""Context building: sections, history compression, the trimming order, secrets."""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import replace
from pathlib import Path

from tests.conftest import SPEC, TARGET_PY

from nightlab.context import (
    ContextOptions,
    build_prompt,
    count_tokens,
    estimate_tokens,
    history_section,
    redact,
    secret_values,
)
from nightlab.researchers import Context
from nightlab.spec import parse_spec
from nightlab.types import Direction, Experiment, Status, Usage

STATUSES = [Status.DISCARD, Status.KEEP, Status.CRASH, Status.DISCARD, Status.INVALID]


def exp(idx: int, status: Status, metric: float | None, rationale: str = "", reason: str = "",
        log_tail: str = "") -> Experiment:
    return Experiment(
        id=idx + 1, session_id=1, idx=idx, status=status, parent_commit="p" * 40, commit=None, metric=metric,
        secondary={}, trust="inline", description=rationale[:50], reason=reason, log_tail=log_tail, seed=0,
        started_at=0.0, finished_at=1.0, propose_s=0.0, run_s=1.0, overhead_s=0.0, exit_code=0, evidence={},
        researcher="llm", rationale=rationale, diff="", params={}, usage=Usage(),
    )


def history(n: int) -> tuple[Experiment, ...]:
    out = [exp(0, Status.KEEP, 8.5, "baseline")]
    for i in range(1, n + 1):
        st = STATUSES[i % len(STATUSES)]
        metric = None if st in (Status.CRASH, Status.INVALID) else 8.0 - i * 0.01
        out.append(exp(i, st, metric, f"idea number {i}: " + "tweak the constant " * 20,
                       reason=f"reason {i}", log_tail="\n".join(f"log line {k}" for k in range(50))
                       if st is Status.CRASH else ""))
    return tuple(out)


def ctx(n: int = 30, program: str = "# Program\n" + "Be bold. " * 400, files: dict | None = None) -> Context:
    spec = parse_spec(Path("nightlab.toml"), tomllib.loads(SPEC))
    return Context(spec=spec, lab_dir=Path("."), program=program, parent="a" * 40,
                   files=files or {"target.py": TARGET_PY}, history=history(n), metric_name="score",
                   direction=Direction.MINIMIZE, incumbent_metric=7.9, baseline_metric=8.5, idx=n + 1)


ORDER = ["history detail", "log tail", "history lines", "program.md", "files"]


def test_everything_is_there_when_the_budget_allows():
    p = build_prompt(ctx(), ContextOptions(budget_tokens=100_000))
    assert p.trimmed == ()
    assert "SEARCH" in p.system and "Be bold." in p.user and "X = 3.0" in p.user
    assert "score, lower is better" in p.user and "protected, never edit: evaluate.py" in p.user
    assert "score: baseline 8.5, best so far" in p.user and "this is experiment #31" in p.user
    # stable -> changing, so that a prefix cache covers program.md, the lab and the files
    heads = ["# Research program", "# The lab", "# Current editable files", "# History", "# Last failure",
             "# Now", "# Your task"]
    at = [p.user.index(h) for h in heads]
    assert at == sorted(at) and "experiment #31" not in p.user[:at[3]] and "7.9" not in p.user[:at[3]]
    assert "#30 " in p.user and "Last 40 lines of its log" in p.user and "log line 49" in p.user
    assert p.tokens == estimate_tokens(p.system + p.user) > count_tokens(p.system + p.user)


def test_trimming_follows_the_stated_order_and_fits_the_budget():
    c = ctx(files={"target.py": TARGET_PY, "big.py": "x = 1\n" * 5000})
    full = build_prompt(c, ContextOptions(budget_tokens=10**6))
    seen_groups: list[list[str]] = []
    for budget in range(full.tokens, 800, -400):
        p = build_prompt(c, ContextOptions(budget_tokens=budget))
        assert p.tokens <= budget or p.trimmed[-1] == "over budget"
        groups = [next(g for g in ORDER if t.startswith(g)) for t in p.trimmed if t != "over budget"]
        # each trimmed prompt applied a prefix of the one deterministic sequence
        assert groups == sorted(groups, key=ORDER.index)
        seen_groups.append(groups)
        # never trimmed: the edit format and the spec summary
        assert "<<<<<<< SEARCH" in p.system and "metric: score" in p.user
        assert build_prompt(c, ContextOptions(budget_tokens=budget)) == p  # deterministic
    # tighter budgets trim at least as far
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(seen_groups))
    assert set(seen_groups[-1]) == set(ORDER)
    tight = build_prompt(c, ContextOptions(budget_tokens=3000))
    assert "log line" not in tight.user and "[... " in tight.user  # log dropped, files cut with a marker


def test_history_compression_policy():
    h = history(60)
    text = history_section(h, detail=8, max_lines=40, metric="score", direction=Direction.MINIMIZE)
    lines = text.splitlines()
    # 60 tried: 8 detailed (3 lines each at most), 40 one-liners, the oldest 12 in one summary line
    assert lines[0].startswith("#1-#12: 12 experiments (") and "best score 7.89 at #11" in lines[0]
    assert "(3 crash, 4 discard, 2 invalid, 3 keep)" in lines[0]
    one_liners = [ln for ln in lines if ln.startswith("#") and "rationale" not in ln][1:]
    assert one_liners[0].startswith("#13 ") and len([ln for ln in lines if ln.startswith("#5")]) >= 1
    assert sum(1 for ln in lines if ln.startswith("  rationale: ")) == 8
    assert "#60 " in text and "outcome: reason 60" in text
    assert len(text.split("\n#53 ")[1].split("\n")[0]) < 30  # detailed: the rationale on its own line
    assert text.split("\n#52 ")[1].split("\n")[0].endswith("tweak th")  # one-liner: 100 chars of it
    assert history_section(h[:1], 8, 40, "score", Direction.MINIMIZE).startswith("(no experiments yet")


def test_secrets_are_redacted_from_the_prompt():
    env = {"OPENAI_API_KEY": "sk-abcdefgh12345678", "GITHUB_TOKEN": "ghp_secretsecret", "HOME": "/root",
           "SHORT_TOKEN": "abc"}
    secrets = secret_values(env, extra=["anthropic-key-value-xyz"])
    assert "/root" not in secrets and "abc" not in secrets and len(secrets) == 3
    c = ctx(program="keys: sk-abcdefgh12345678 ghp_secretsecret anthropic-key-value-xyz /root")
    p = build_prompt(c, secrets=secrets)
    assert "sk-abcdefgh" not in p.text() and "ghp_secret" not in p.text() and "anthropic-key" not in p.text()
    assert p.text().count("[REDACTED]") == 3 and "/root" in p.user
    assert redact("a sk-abcdefgh12345678 b", secrets) == "a [REDACTED] b"


def test_agent_prompt_leaves_out_files_and_the_edit_format():
    p = build_prompt(ctx(), ContextOptions(include_files=False, agent=True))
    assert p.system == "" and "X = 3.0" not in p.user and "do not commit" in p.user


def test_the_last_invalid_answer_is_shown_with_its_error_and_failed_search():
    h = list(history(4))  # #2 crash, #4 invalid (more recent)
    h[4] = replace(h[4], reason="no usable edit: block 1: target.py: the SEARCH text was not found",
                   rationale="my own idea", params={"failed_search": "X = 7.0"})
    c = replace(ctx(4), history=tuple(h))
    p = build_prompt(c, ContextOptions(budget_tokens=100_000))
    fail = p.user.split("# Last failure")[1].split("# Now")[0]
    assert "#2 ended crash" in fail and "log line 49" in fail  # the crash and its log stay
    assert "#4 was invalid" in fail and "SEARCH text was not found" in fail and "X = 7.0" in fail
    assert "my own idea" in p.user  # its rationale is in the history, not replaced by the error
    # a crash after the invalid one supersedes it
    h.append(exp(5, Status.CRASH, None, "boom", reason="exit code 1"))
    fail = build_prompt(replace(c, history=tuple(h))).user.split("# Last failure")[1]
    assert "#5 ended crash" in fail and "was invalid" not in fail.split("# Now")[0]


def test_trimming_uses_the_tokenizer_when_given():
    calls: list[int] = []

    def count(text: str) -> int:
        calls.append(len(text))
        return len(text) // 2  # a tokenizer that counts twice the estimate

    c = ctx()
    est = build_prompt(c, ContextOptions(budget_tokens=6000))
    real = build_prompt(c, ContextOptions(budget_tokens=6000, count=count))
    assert real.counted_by == "tokenizer" and est.counted_by == "estimate" and calls
    assert real.tokens <= 6000 and len(real.trimmed) > len(est.trimmed)
