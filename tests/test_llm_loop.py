"""The loop around a slow researcher: adaptive pipelining, prefetch, proposals abandoned at a stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from tests.conftest import SPEC, TARGET_PY
from tests.test_llm import KEY, llm_spec

from nightlab.engine import Engine, install_signal_handlers
from nightlab.fakellm import FakeLLMServer, Turn
from nightlab.researchers import Context
from nightlab.types import Candidate, Status

pytest.importorskip("openai")


class Slow:
    """Proposes X = idx (a new value each time), ``sleep_s`` per proposal; records what it saw."""

    name = "slow"

    def __init__(self, sleep_s: float, concurrent: bool = False, prefetch: int = 0) -> None:
        self.sleep_s, self.concurrent, self.prefetch = sleep_s, concurrent, prefetch
        self.seen: dict[int, list[int]] = {}
        self.active = self.most = 0
        self.lock = threading.Lock()

    def propose(self, ctx: Context) -> Candidate:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(self.sleep_s)
        with self.lock:
            self.active -= 1
            self.seen[ctx.idx] = [e.idx for e in ctx.history]
        return Candidate(parent=ctx.parent, rationale=f"try {ctx.idx}",
                         files={"target.py": TARGET_PY.replace("X = 3.0", f"X = {ctx.idx + 10}.0")})

    def observe(self, experiment: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_proposal_slower_than_a_run_waits_for_the_result_in_flight(make_lab):
    lab = make_lab(spec=SPEC.replace("pipeline = false", "pipeline = true"))
    slow = Slow(sleep_s=1.0)  # runs take a fraction of that
    eng = Engine(lab, tag="a", researcher=slow, sandbox_mode="none", max_experiments=5)
    eng.run()
    eng.close()
    # #2 was proposed ahead (nothing measured yet) and saw the history one experiment late;
    # once proposing was measured to take longer than running, every prompt saw the result before it
    assert 1 not in slow.seen[2]
    for idx in (3, 4, 5):
        assert idx - 1 in slow.seen[idx], slow.seen


def test_prefetch_makes_several_proposals_at_once(make_lab):
    lab = make_lab(spec=SPEC.replace("pipeline = false", "pipeline = true"))
    slow = Slow(sleep_s=0.8, concurrent=True, prefetch=2)
    eng = Engine(lab, tag="b", researcher=slow, sandbox_mode="none", max_experiments=4)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert slow.most == 2
    assert [e.idx for e in exps] == [0, 1, 2, 3, 4] and all(e.status is not Status.INVALID for e in exps)


def slow_stream(n: int = 400) -> Turn:
    return Turn(text="word " * n, chunk_delay_s=0.05, tokens_in=500, tokens_out=n)


@pytest.mark.parametrize("trigger", ["STOP file", "SIGTERM", "SIGINT"])
def test_a_stop_abandons_the_proposal_closes_the_stream_and_records_its_usage(make_lab, monkeypatch, trigger):
    monkeypatch.setenv("NIGHTLAB_TEST_KEY", KEY)
    with FakeLLMServer("openai", [slow_stream()]) as srv:
        lab = make_lab(spec=llm_spec(srv, extra='structured = "off"\n'))
        eng = Engine(lab, tag="s", sandbox_mode="none", max_experiments=3)
        stop_file = Path(eng.stop_file)
        restore = install_signal_handlers(eng)

        def fire() -> None:
            while not srv.requests:
                time.sleep(0.05)
            time.sleep(1.0)  # the answer is streaming now
            if trigger == "STOP file":
                stop_file.write_text("")
            else:
                os.kill(os.getpid(), getattr(signal, trigger))

        threading.Thread(target=fire, daemon=True).start()
        try:
            session = eng.run()
        finally:
            restore()
        deadline = time.monotonic() + 10
        while not srv.disconnects and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.disconnects >= 1  # the server saw the stream closed (llama.cpp stops generating there)
        why = {"STOP file": "STOP file", "SIGTERM": "stopped by SIGTERM", "SIGINT": "interrupted (SIGINT)"}
        assert session.status == "stopped" and session.stop_reason == why[trigger]
        assert [e.idx for e in eng.ledger.experiments(session.id)] == [0]  # nothing was run for it
        spent = eng.ledger.spend_totals(session.id)
        assert spent.tokens_in > 0  # the prompt, as counted before the call
        assert 0 < spent.tokens_out < 400  # the chunks received before the stop
        assert eng.ledger.usage_totals(session.id).tokens_out == spent.tokens_out
        eng.close()


def test_a_call_past_timeout_s_is_cancelled_and_its_usage_counted(make_lab, monkeypatch):
    monkeypatch.setenv("NIGHTLAB_TEST_KEY", KEY)
    with FakeLLMServer("openai", [slow_stream()]) as srv:
        lab = make_lab(spec=llm_spec(srv, extra='structured = "off"\nrepair = false\n')
                       .replace("timeout_s = 10", "timeout_s = 1"))
        eng = Engine(lab, tag="t", sandbox_mode="none", max_experiments=1)
        exps = eng.ledger.experiments(eng.run().id)
        eng.close()
    exp = exps[1]
    assert exp.status is Status.INVALID and "no complete answer within timeout_s = 1 s" in exp.reason
    assert exp.usage.tokens_in > 0 and 0 < exp.usage.tokens_out < 400
