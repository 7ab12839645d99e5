"""[notify]: webhooks, ntfy and a command get the night's news from real sessions, over real HTTP on loopback;
a receiver that fails and recovers gets the message after retries; delivery never fails an experiment."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import SPEC, TARGET_PY

from nightlab import notify
from nightlab.engine import Engine
from nightlab.errors import SpecError
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.spec import load_spec
from nightlab.types import Status


class Receiver:
    """A loopback HTTP server that records every POST; the first ``fail`` requests get HTTP 500."""

    def __init__(self, fail: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail = fail
        self.seen = 0
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rec.seen += 1
                if rec.seen <= rec.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                rec.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def json_posts(self) -> list[dict[str, Any]]:
        return [json.loads(p["body"]) for p in self.posts if p["headers"].get("Content-Type") == "application/json"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def _make(fail: int = 0) -> Receiver:
        made.append(Receiver(fail))
        return made[-1]

    yield _make
    for r in made:
        r.close()


def target(x: float) -> str:
    return TARGET_PY.replace("X = 3.0", f"X = {x}")


def step(x: float) -> dict[str, Any]:
    return {"rationale": f"move X to {x}", "files": {"target.py": target(x)}}


def crash() -> dict[str, Any]:
    return {"rationale": "break it", "files": {"target.py": "raise SystemExit(3)\n"}}


def run_session(lab: Path, steps: list[dict[str, Any]]) -> Engine:
    eng = Engine(lab, tag="n1", researcher=ScriptedResearcher(steps), sandbox_mode="none")
    eng.run()
    eng.close()
    return eng


def test_a_session_sends_new_best_crash_streak_and_stop_to_webhook_ntfy_and_command(make_lab, receiver, tmp_path):
    hook, topic = receiver(), receiver()
    out = tmp_path / "cmd-events.jsonl"
    script = tmp_path / "sink.py"
    script.write_text(f"import sys\nopen({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')\n")
    spec = SPEC.replace("max_experiments = 3", "max_experiments = 4\nmax_crashes_in_row = 0") + f"""
[notify]
webhooks = ["{hook.url}/services/T000/B000/SECRETPATH"]
ntfy = "{topic.url}/my-night"
command = "{sys.executable} {script}"
events = ["new_best", "session_stopped", "crash_streak"]
crash_streak = 2
"""
    lab = make_lab(spec=spec)
    eng = run_session(lab, [step(2.0), crash(), crash(), step(1.5)])
    assert eng.notifier is not None and eng.notifier.delivery.failed == 0

    kinds = [p["event"]["kind"] for p in hook.json_posts()]
    assert kinds == ["new_best", "crash_streak", "new_best", "session_stopped"], kinds
    first = hook.json_posts()[0]
    assert first["text"] == first["content"] and "new best" in first["text"] and first["event"]["experiment"] == 1
    assert hook.posts[0]["path"] == "/services/T000/B000/SECRETPATH"
    stop = hook.json_posts()[-1]
    assert stop["event"]["status"] == "finished" and "max_experiments" in stop["event"]["reason"]

    assert [p["headers"]["Tags"] for p in topic.posts] == kinds  # ntfy: plain text, kind as a tag
    assert topic.posts[0]["path"] == "/my-night" and b"kept" in topic.posts[0]["body"]
    assert "new best" in topic.posts[0]["headers"]["Title"]

    lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert [x["event"]["kind"] for x in lines] == kinds


def test_a_failing_receiver_recovers_and_a_dead_one_never_fails_the_night(make_lab, receiver, tmp_path):
    flaky = receiver(fail=2)  # two HTTP 500s, then fine: the retries deliver it
    spec = SPEC + f"""
[notify]
webhooks = ["{flaky.url}/flaky", "http://127.0.0.1:9/dead/SECRET-TOKEN-123"]
events = ["new_best", "session_stopped"]
retries = 2
backoff_s = 0.05
"""
    lab = make_lab(spec=spec)
    eng = run_session(lab, [step(2.0), step(1.5), step(1.2)])
    d = eng.notifier.delivery if eng.notifier else None
    assert d is not None
    kinds = [p["event"]["kind"] for p in flaky.json_posts()]
    assert kinds == ["new_best", "new_best", "new_best", "session_stopped"]
    assert flaky.seen == 2 + 4  # two refused tries, then every message once
    assert d.failed == 4 and d.sent == 4  # the dead receiver: given up after the retries, counted
    assert all("SECRET-TOKEN-123" not in e and "/dead" not in e for e in d.errors), d.errors
    assert any("http://127.0.0.1/…" in e for e in d.errors), d.errors
    with_ledger = Engine(lab, tag="n1", resume=True, researcher=ScriptedResearcher([]), sandbox_mode="none")
    try:
        exps = with_ledger.ledger.experiments(with_ledger.session.id)
        assert [e.status for e in exps] == [Status.KEEP] * 4  # the dead receiver changed nothing
    finally:
        with_ledger.close()


def test_delivery_is_off_the_hot_path():
    gate = threading.Event()
    got: list[notify.Message] = []

    def slow(msg: notify.Message) -> None:
        gate.wait(10)
        got.append(msg)

    n = notify.Notifier([("slow", slow)], kinds=notify.KINDS, max_queue=2)
    n.emit("session.start", tag="t")
    for i in range(5):  # emit returns at once even though the target blocks; the queue is bounded
        n.emit("decision", experiment=i + 1, status="keep", metric=1.0 / (i + 1))
    assert got == [] and n.delivery.dropped >= 2
    gate.set()
    n.close()
    assert [m.kind for m in got][:1] == ["new_best"] and n.delivery.sent == len(got)


def test_env_references_expand_and_urls_are_never_shown():
    assert notify.expand("https://hooks.example/${NL_HOOK}", {"NL_HOOK": "abc"}) == "https://hooks.example/abc"
    assert notify.expand("https://x/${MISSING}", {}) == "https://x/${MISSING}"
    assert notify.safe_url("https://hooks.slack.com/services/T/B/xyz?token=1") == "https://hooks.slack.com/…"
    assert "xyz" not in notify._scrub("cannot reach https://hooks.slack.com/services/T/B/xyz: refused")


@pytest.mark.parametrize("bad, key", [
    ('webhooks = ["ftp://x"]', "webhooks"),
    ('events = ["sometimes"]', "events"),
    ("crash_streak = 0", "crash_streak"),
])
def test_bad_notify_config_is_a_spec_error_naming_the_key(make_lab, bad, key):
    lab = make_lab(spec=SPEC + f"\n[notify]\n{bad}\n")
    with pytest.raises(SpecError) as e:
        load_spec(lab)
    assert f"[notify] {key}" in e.value.message


def test_user_config_notify_applies_when_the_spec_has_none(make_lab, receiver, tmp_path, monkeypatch):
    hook = receiver()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[notify]\nwebhooks = ["{hook.url}/u"]\nevents = ["session_stopped"]\n')
    monkeypatch.setenv("NIGHTLAB_CONFIG", str(cfg))
    lab = make_lab()
    run_session(lab, [step(2.0)])
    assert [p["event"]["kind"] for p in hook.json_posts()] == ["session_stopped"]
