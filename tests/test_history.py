"""The session's history in bounded memory (issue 13): researchers see the ledger's rows, the engine holds few."""

from __future__ import annotations

import gc
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from tests.conftest import SPEC, TARGET_PY

from nightlab import history as history_mod
from nightlab import prune
from nightlab.context import ContextOptions, build_prompt, failure_section, history_section, spec_now
from nightlab.engine import Engine
from nightlab.history import History
from nightlab.ledger import Ledger
from nightlab.researchers import Context
from nightlab.researchers import scripted as scripted_mod
from nightlab.spec import PruneSpec, parse_spec
from nightlab.types import Candidate, Direction, Experiment, Status, Usage

KINDS = [Status.DISCARD, Status.KEEP, Status.CRASH, Status.DISCARD, Status.INVALID, Status.TIMEOUT]


def fill(ledger: Ledger, n: int) -> int:
    """A session of ``n`` finished experiments of every kind (texts long enough to tell rows apart)."""
    s = ledger.create_session(tag="h", branch="nightlab/h", base_commit="0" * 40, metric_name="score",
                              direction=Direction.MINIMIZE, sandbox="none", spec_hash="x", spec_json="{}",
                              lab_path="/tmp/lab", machine={}, researcher="llm")
    for i in range(n):
        st = Status.KEEP if i == 0 else KINDS[i % len(KINDS)]
        cand = None if i == 0 else Candidate(
            parent="p" * 40, rationale=f"idea {i}: " + "tweak the constant " * (i % 7 + 1), diff=f"+X = {i}\n",
            params={"failed_search": f"old text {i}"} if st is Status.INVALID else {"X": i},
            usage=Usage(tokens_in=i, cost_usd=i / 1000))
        eid = ledger.start_experiment(s.id, idx=i, parent_commit="p" * 40, seed=0, candidate=cand,
                                      description=f"idea {i}", propose_s=0.1)
        metric = None if st in (Status.CRASH, Status.INVALID, Status.TIMEOUT) else 9.0 - (i % 13) * 0.1
        ledger.finish_experiment(eid, status=st, metric=metric, reason=f"reason {i}",
                                 log_tail="\n".join(f"log {i} line {k}" for k in range(30)), run_s=1.0,
                                 evidence={"n": i})
    return s.id


def context(hist, spec_text: str = SPEC) -> Context:
    spec = parse_spec(Path("nightlab.toml"), tomllib.loads(spec_text))
    return Context(spec=spec, lab_dir=Path("."), program="# Program\nBe bold.\n", parent="a" * 40,
                   files={"target.py": TARGET_PY}, history=hist, metric_name="score",
                   direction=Direction.MINIMIZE, incumbent_metric=8.0, baseline_metric=9.0, idx=len(hist))


def test_a_ledger_backed_history_shows_the_researcher_what_the_full_rows_showed(tmp_path, monkeypatch):
    """Every position, slice and iteration yields the ledger's row; the prompt is the same to the character
    (summary, one-line and detailed rows, the last failure's log, the last invalid answer), while at most
    RECENT rows are held in memory."""
    monkeypatch.setattr(history_mod, "RECENT", 10)
    monkeypatch.setattr(history_mod, "PAGE", 7)  # iteration crosses page boundaries
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    sid = fill(ledger, 130)
    rows = tuple(ledger.experiments(sid))
    loaded = History.load(ledger, sid)
    appended = History.of(ledger, rows)
    for h in (loaded, appended):
        assert len(h) == 130
        assert list(h) == list(rows) and list(reversed(h)) == list(reversed(rows))
        assert h[0] == rows[0] and h[-1] == rows[-1] and h[57] == rows[57]
        assert h[-40:] == rows[-40:] and h[3:90:4] == rows[3:90:4]
        with pytest.raises(IndexError):
            h[130]
        for detail, lines in ((8, 40), (0, 15), (3, 0), (200, 200)):
            assert history_section(h, detail, lines, "score", Direction.MINIMIZE) == \
                history_section(rows, detail, lines, "score", Direction.MINIMIZE)
        for lines in (0, 5, 50):
            assert failure_section(h, lines) == failure_section(rows, lines)
        assert spec_now(context(h)) == spec_now(context(rows))
        full = ContextOptions(budget_tokens=100_000)
        assert build_prompt(context(h), full) == build_prompt(context(rows), full)
        tight = ContextOptions(budget_tokens=900)  # the trimming steps run on the ledger-backed history too
        assert build_prompt(context(h), tight) == build_prompt(context(rows), tight)
        assert context(h).last_failure == context(rows).last_failure
    assert len(appended._s.recent) == 10 and not loaded._s.recent
    # the prompt's summary really covers older rows: a history that hid them would print fewer
    assert "#1-#" in history_section(loaded, 8, 40, "score", Direction.MINIMIZE)
    ledger.close()


def test_a_view_is_a_snapshot_and_read_only(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    sid = fill(ledger, 6)
    rows = ledger.experiments(sid)
    h = History.of(ledger, rows[:4])
    v = h.view()
    h.append(rows[4])
    assert len(v) == 4 and len(h) == 5 and list(v) == rows[:4] and v[-1] == rows[3]
    assert [(b.idx, b.status, b.metric) for b in h.brief()] == [(e.idx, e.status, e.metric) for e in rows[:5]]
    with pytest.raises(TypeError):
        v.append(rows[5])
    ledger.close()


def _live_experiments() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Experiment)


def test_a_long_session_holds_a_bounded_number_of_rows(make_lab, monkeypatch):
    """Through the real engine: at the last proposal of a 40-experiment session, the researcher's history has
    every experiment (the ledger's rows), yet the process holds at most a few full rows (before: all of them,
    in the engine's history list and the scripted researcher's)."""
    monkeypatch.setattr(history_mod, "RECENT", 4)
    monkeypatch.setattr(scripted_mod, "OBSERVED", 4)
    n = 40
    lab = make_lab(spec=SPEC.replace("max_experiments = 3", f"max_experiments = {n}"))
    seen: dict[int, tuple[int, int, Context]] = {}

    def step(ctx: Context) -> Candidate:
        seen[ctx.idx] = (_live_experiments(), len(ctx.history), ctx)
        x = 1.0 + 1.0 / ctx.idx if ctx.idx % 3 == 0 else 9.0 + ctx.idx
        src = TARGET_PY.replace("X = 3.0", f"X = {x}") if ctx.idx % 7 else "raise SystemExit(3)\n"
        return Candidate(parent=ctx.parent, rationale=f"step {ctx.idx}", files={"target.py": src})

    eng = Engine(lab, tag="t", researcher=scripted_mod.ScriptedResearcher([step]), sandbox_mode="none")
    session = eng.run()
    rows = eng.ledger.experiments(session.id)
    assert len(rows) == n + 1 and {Status.KEEP, Status.DISCARD, Status.CRASH} <= {e.status for e in rows}
    live, length, last = seen[n]
    assert length == n and list(last.history) == rows[:n]  # everything before the last proposal, in full
    assert build_prompt(last) == build_prompt(replace(last, history=tuple(rows[:n])))
    assert live <= 12, f"{live} experiment rows alive at the last proposal of {n}"
    eng.close()


def test_no_pruning_study_grows_without_a_pruner(tmp_path):
    """``[prune] pruner = "none"``: the runs' curves are still stored, but no Optuna trial is made per run."""
    p = prune.Pruner(PruneSpec(), "loss", Direction.MINIMIZE)
    assert not p.enabled
    import threading
    for i in range(5):
        log = tmp_path / f"{i}.log"
        log.write_text("nightlab: step=1 loss=2.0\nnightlab: step=2 loss=1.5\n")
        w = p.watch(log, threading.Event(), True)
        w.close()
        assert w.finish(Status.DISCARD, 1.5, 1.0) == {"curve": [[1, 2.0], [2, 1.5]]}
    assert p.study.trials == [] and p.full_runs_s == []
