"""The dashboard in process (Starlette TestClient) against a ledger filled by a real session."""

from __future__ import annotations

import json
import random
import re
import sys
import time
import types
from pathlib import Path

import pytest
from tests.conftest import dashboard_client

pytest.importorskip("fastapi", reason="the ui extra is not installed")
pytest.importorskip("httpx", reason="httpx (TestClient) is not installed")

from click.testing import CliRunner
from fastapi.testclient import TestClient
from tests.dashlab import SECRET, make_dash_lab, run_session

from nightlab import approvals, queries
from nightlab.cli.ui import ui
from nightlab.ledger import Ledger, candidates, experiments, fill_sort_columns
from nightlab.types import STAGES, Candidate, Direction, Status, Usage
from nightlab.web.app import create_app
from nightlab.web.security import Access

BASE = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lab = make_dash_lab(tmp_path_factory.mktemp("dash"))
    run_session(lab)
    return lab


@pytest.fixture
def ledger(lab: Path):
    led = Ledger.for_lab(lab)
    yield led
    led.close()


@pytest.fixture
def client(lab: Path, ledger: Ledger) -> TestClient:
    return dashboard_client(create_app(ledger, lab, Access.make("127.0.0.1", "tok-123")), base_url=BASE)


def pages(ledger: Ledger) -> list[str]:
    n = ledger.count_experiments(ledger.get_session("t").id)
    return [
        "/",
        "/s/t",
        "/s/t?status=keep&status=discard&sort=metric&order=asc",
        "/s/t?researcher=scripted&page=0",
        "/s/t/costs",
        "/audit",
        "/approvals",
        "/approvals?session=t",
        "/s/t/fragment/chart",
        "/s/t/fragment/summary",
        "/s/t/fragment/table",
    ] + [f"/s/t/e/{i}" for i in range(n)]


API = [
    "/api/sessions",
    "/api/sessions/t",
    "/api/sessions/t/experiments",
    "/api/sessions/t/experiments?since=1",
    "/api/sessions/t/experiments/1",
    "/api/sessions/t/chart",
    "/api/sessions/t/costs",
    "/api/audit",
    "/api/approvals",
    "/api/approvals?session=t",
]


def test_every_page_and_endpoint_answers_and_never_shows_the_secret(client: TestClient, ledger: Ledger):
    for url in pages(ledger) + API + ["/static/app.js", "/static/style.css", "/static-gen/pygments.css"]:
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:300])
        assert SECRET not in r.text, url
        assert "Zq8wS3cret" not in r.text, url
        if not url.startswith("/static"):
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    for url in API:
        json.loads(client.get(url).text)


def test_pages_reference_no_outside_asset(client: TestClient, ledger: Ledger):
    for url in pages(ledger):
        html = client.get(url).text
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs or "fragment" in url, url
        assert not [u for u in refs if u.startswith(("http:", "https:", "//"))], url


def test_session_page_chart_table_and_summary(client: TestClient, ledger: Ledger):
    s = ledger.get_session("t")
    exps = ledger.experiments(s.id)
    html = client.get("/s/t").text
    idxs = [int(i) for i in re.findall(r'<circle class="pt[^"]*"[^>]*data-idx="(\d+)"', html)]
    assert sorted(idxs) == [e.idx for e in exps]
    assert 'class="best"' in html and 'class="baseline"' in html
    # the table: newest first, every experiment linked
    rows = [int(i) for i in re.findall(r'<tr data-idx="(\d+)"', html)]
    assert rows == sorted((e.idx for e in exps), reverse=True)
    assert f'data-since="{exps[-1].idx}"' in html
    assert "+94.12%" in html  # 8.5 -> 0.5
    # the spec is shown with the secret masked and the plain value visible
    assert "visible-value" in html and "OPENAI_API_KEY" in html


def test_experiment_page_shows_diff_rationale_log_measurement_usage(client: TestClient, ledger: Ledger):
    html = client.get("/s/t/e/1").text
    assert 'class="hl"' in html and '<span class="gi">+X = 1.0</span>' in html  # pygments-highlighted diff
    assert "The score is quadratic in X." in html
    assert "score: 4.500000" in html  # the log tail
    # the secret the run printed: redacted when stored ([REDACTED]) and masked when shown (••••••)
    assert "training with key [REDACTED]" in html or "training with key ••••••" in html
    assert "&#34;policy&#34;: &#34;greedy&#34;" in html or '"policy": "greedy"' in html
    assert "tokens" not in html or "in ·" in html
    crash = client.get("/s/t/e/3").text
    assert "crash" in crash and "exit code 3" in crash


def test_experiment_page_shows_where_the_time_went(client: TestClient, ledger: Ledger):
    """The stages the engine timed (evidence ``timing``) in the pipeline's order, with their seconds."""
    e = ledger.get_experiment(ledger.get_session("t").id, 1)
    assert e is not None and e.evidence.get("timing")
    html = client.get("/s/t/e/1").text
    assert 'id="stages"' in html
    shown = re.findall(r"<tr><th>(\w+)</th><td>([0-9.]+) s</td>", html.split('id="stages"')[1].split("</table>")[0])
    assert [k for k, _ in shown] == [k for k in STAGES if k in e.evidence["timing"]]
    assert all(abs(float(v) - e.evidence["timing"][k]) <= 0.0006 for k, v in shown)


def test_table_filters_sorts_and_paginates_on_the_server(client: TestClient, ledger: Ledger):
    html = client.get("/s/t?status=keep&sort=metric&order=asc").text
    rows = [int(i) for i in re.findall(r'<tr data-idx="(\d+)"', html)]
    assert rows == [4, 1, 0]  # keeps by score: 0.5, 4.5, 8.5
    assert client.get("/s/t?status=bogus").status_code == 422
    assert client.get("/s/t?sort=password").status_code == 422
    html = client.get("/s/t?researcher=nobody").text
    assert "no experiments match" in html


def test_api_experiments_cursor_sort_filter(client: TestClient, ledger: Ledger):
    s = ledger.get_session("t")
    d = client.get("/api/sessions/t/experiments").json()
    assert d["total"] == ledger.count_experiments(s.id) == 5
    assert [e["idx"] for e in d["experiments"]] == [0, 1, 2, 3, 4]
    assert d["cursor"] == 4
    assert client.get("/api/sessions/t/experiments?since=4").json()["experiments"] == []
    d = client.get("/api/sessions/t/experiments?sort=metric&order=asc").json()
    metrics = [e["metric"] for e in d["experiments"]]
    assert metrics[:4] == sorted(m for m in metrics if m is not None) and metrics[-1] is None  # NULL last
    d = client.get("/api/sessions/t/experiments?status=crash").json()
    assert [e["idx"] for e in d["experiments"]] == [3] and d["total"] == 1
    d = client.get("/api/sessions/t/experiments?limit=2&offset=2").json()
    assert [e["idx"] for e in d["experiments"]] == [2, 3] and d["total"] == 5
    assert client.get("/api/sessions/nope/experiments").status_code == 404
    assert client.get("/api/sessions/t/experiments/99").status_code == 404
    one = client.get("/api/sessions/t/experiments/1").json()
    assert one["status"] == "keep" and one["metric"] == pytest.approx(4.5) and "+X = 1.0" in one["diff"]
    info = client.get("/api/sessions/t").json()
    assert info["spec"]["run"]["env"]["OPENAI_API_KEY"] == "••••••"
    assert info["spec"]["run"]["env"]["PLAIN_SETTING"] == "visible-value"
    assert info["counts"] == {"keep": 3, "discard": 1, "crash": 1}
    assert info["timing"]["n"] == 5 and info["timing"]["run_s"] > 0
    chart = client.get("/api/sessions/t/chart").json()
    assert len(chart["points"]) == 5 and [i for i, _ in chart["best"]] == [0, 1, 4]


def test_a_new_experiment_is_seen_through_the_cursor(lab: Path, tmp_path: Path):
    # a copy of the session's ledger, so the shared one stays as the session left it
    led = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    src = Ledger.for_lab(lab)
    s0 = src.get_session("t")
    s = led.create_session(
        tag="live",
        branch="b",
        base_commit="0" * 40,
        metric_name="score",
        direction=Direction.MINIMIZE,
        sandbox="none",
        spec_hash="h",
        spec_json="{}",
        lab_path=str(lab),
        machine={},
        researcher="scripted",
    )
    src.close()
    c = dashboard_client(create_app(led, None), base_url=BASE)
    assert client_cursor(c) == -1
    eid = led.start_experiment(
        s.id, idx=0, parent_commit="p", seed=0, candidate=None, description="baseline", propose_s=0.0
    )
    d = c.get("/api/sessions/live/experiments?since=-1").json()
    assert [e["status"] for e in d["experiments"]] == ["running"] and d["cursor"] == -1  # re-sent until done
    assert 'data-idx="0"' in c.get("/s/live/fragment/chart").text
    led.finish_experiment(eid, status=Status.KEEP, metric=3.0, incumbent=("c", 3.0))
    d = c.get("/api/sessions/live/experiments?since=-1").json()
    assert [e["status"] for e in d["experiments"]] == ["keep"] and d["cursor"] == 0
    assert s0.tag == "t"
    led.close()


def client_cursor(c: TestClient) -> int:
    return int(c.get("/api/sessions/live/experiments").json()["cursor"])


# ------------------------------------------------------------------ approvals and access


def test_approve_needs_the_token_and_same_origin(client: TestClient, ledger: Ledger):
    s = ledger.get_session("t")
    aid = approvals.request(
        ledger, s.id, 9, "run", diff="--- a/t\n+++ b/t\n@@ -1 +1 @@\n-a\n+b\n", rationale="ok?"
    )
    # loopback too, every request needs the token: a local process — an agent researcher has the network —
    # can neither read the queue (nor the holdout scores) nor lift the token from a page to approve its own run
    bare = TestClient(client.app, base_url=BASE)
    assert bare.get("/approvals").status_code == 401 and "tok-123" not in bare.get("/approvals").text
    assert bare.get("/api/sessions").status_code == 401 and bare.get("/approvals?token=wrong").status_code == 401
    r = bare.get("/approvals?token=tok-123", follow_redirects=False)  # the URL `nightlab ui` printed
    assert r.status_code == 303 and r.headers["location"] == "/approvals" and "nightlab_token" in r.cookies
    html = bare.get("/approvals").text  # the cookie now
    assert f'id="approval-{aid}"' in html and 'name="nightlab-token" content="tok-123"' in html
    url = f"/api/approvals/{aid}"
    assert client.post(url, json={"approved": True}).status_code == 403
    # a wrong token in the header is not the cookie's: refused as unauthenticated
    assert client.post(url, json={"approved": True}, headers={"X-Nightlab-Token": "wrong"}).status_code == 401
    # a cookie or a query token is not enough to act
    client.cookies.set("nightlab_token", "tok-123")
    assert client.post(url + "?token=tok-123", json={"approved": True}).status_code == 403
    client.cookies.clear()
    hdr = {"X-Nightlab-Token": "tok-123"}
    assert (
        client.post(
            url, json={"approved": True}, headers={**hdr, "Origin": "http://evil.example"}
        ).status_code
        == 403
    )
    assert client.post(url, json={"approved": True}, headers={**hdr, "Origin": "null"}).status_code == 403
    assert (
        client.post(url, json={"approved": True}, headers={**hdr, "Sec-Fetch-Site": "cross-site"}).status_code
        == 403
    )
    assert approvals.get(ledger, aid)["status"] == "pending"
    r = client.post(
        url,
        json={"approved": False, "why": "too risky"},
        headers={**hdr, "Origin": BASE, "Sec-Fetch-Site": "same-origin"},
    )
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    row = approvals.get(ledger, aid)
    assert row["status"] == "rejected" and row["why"] == "too risky" and row["answered_at"] is not None
    assert client.post(url, json={"approved": True}, headers=hdr).status_code == 409  # answered once
    assert client.post("/api/approvals/999999", json={"approved": True}, headers=hdr).status_code == 404
    assert aid not in [a["id"] for a in client.get("/api/approvals", headers=hdr).json()["pending"]]


def test_loopback_refuses_foreign_host_headers(client: TestClient):
    assert client.get("/", headers={"Host": "evil.example:8765"}).status_code == 421
    assert client.get("/api/sessions", headers={"Host": "localhost:8765"}).status_code == 200
    assert client.get("/api/sessions", headers={"Host": "[::1]:8765"}).status_code == 200


def test_off_loopback_every_request_needs_the_token(lab: Path, ledger: Ledger):
    with pytest.raises(ValueError):
        Access.make("0.0.0.0", None)
    c = TestClient(
        create_app(ledger, lab, Access.make("0.0.0.0", "s3cr3t-token")), base_url="http://10.1.2.3:8765"
    )
    assert c.get("/").status_code == 401
    assert c.get("/api/sessions").status_code == 401
    assert c.get("/api/sessions", headers={"X-Nightlab-Token": "nope"}).status_code == 401
    assert c.get("/api/sessions", headers={"X-Nightlab-Token": "s3cr3t-token"}).status_code == 200
    assert c.get("/api/sessions", headers={"Authorization": "Bearer s3cr3t-token"}).status_code == 200
    r = c.get("/s/t?token=s3cr3t-token&page=0", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/s/t?page=0"
    assert (
        "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    )
    assert c.get("/s/t").status_code == 200  # the cookie now


def test_ui_command_refuses_a_public_host_without_a_token(lab: Path):
    r = CliRunner().invoke(ui, ["--lab", str(lab), "--host", "0.0.0.0"], standalone_mode=False)
    assert r.exception is not None and getattr(r.exception, "exit_code", None) == 2
    assert "--token" in str(r.exception)


# ------------------------------------------------------------------ audit


def test_audit_page_without_the_audit_module(client: TestClient, lab: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "nightlab.audit", None)  # import fails
    assert "audit log not available" in client.get("/audit").text
    assert client.get("/api/audit").json()["available"] is False


def test_audit_page_shows_verification_and_entries(
    client: TestClient, lab: Path, monkeypatch: pytest.MonkeyPatch
):
    # the audit module is another engineer's; its planned interface, given here in a few lines
    log = lab / ".nightlab" / "audit.jsonl"
    entries = [
        {
            "seq": i,
            "time": time.time(),
            "kind": "experiment.finished",
            "prev_hash": f"h{i - 1}",
            "hash": f"h{i}",
            "experiment": i,
            "data": {"status": "keep", "key": SECRET},
        }
        for i in range(250)
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    verdict = {"ok": False, "count": 250, "first_bad_seq": 7, "reason": "hash mismatch"}
    fake = types.SimpleNamespace(verify=lambda path: types.SimpleNamespace(**verdict))
    monkeypatch.setitem(sys.modules, "nightlab.audit", fake)
    try:
        html = client.get("/audit").text
        assert "chain broken at entry 7" in html and "hash mismatch" in html and SECRET not in html
        seqs = [int(x) for x in re.findall(r'<tr[^>]*><td class="num">(\d+)</td>', html)]
        assert seqs == list(range(249, 149, -1))  # newest first, 100 a page
        html2 = client.get("/audit?page=2").text
        assert [int(x) for x in re.findall(r'<tr[^>]*><td class="num">(\d+)</td>', html2)] == list(
            range(49, -1, -1)
        )
        verdict.update(ok=True, first_bad_seq=None, reason="")
        log.write_text(
            log.read_text() + json.dumps({**entries[0], "seq": 250}) + "\n"
        )  # new size: re-verified
        assert "chain verified: 250 entries" in client.get("/audit").text
    finally:
        log.unlink()


# ------------------------------------------------------------------ queries at scale (synthetic rows)


def _fill(led: Ledger, n: int, seed: int = 1) -> int:
    s = led.create_session(
        tag="big",
        branch="b",
        base_commit="0" * 40,
        metric_name="loss",
        direction=Direction.MINIMIZE,
        sandbox="none",
        spec_hash="h",
        spec_json="{}",
        lab_path="/x",
        machine={},
        researcher="mix",
    )
    rng = random.Random(seed)
    best, exps = 10.0, []
    for i in range(n):
        r = rng.random()
        metric = None if r < 0.1 else best + rng.uniform(-0.05, 1.0)
        status = "crash" if metric is None else ("keep" if metric < best or i == 0 else "discard")
        best = metric if status == "keep" and metric is not None else best
        exps.append(
            dict(
                session_id=s.id,
                idx=i,
                status=status,
                parent_commit="p",
                commit=None,
                metric=metric,
                secondary_json="{}",
                trust="evaluator",
                description=f"d{i}",
                reason="",
                log_tail="",
                seed=0,
                started_at=1000.0 + i,
                finished_at=1000.5 + i,
                propose_s=0.1,
                run_s=0.3,
                overhead_s=0.1,
                exit_code=0,
                evidence_json="{}",
                pid=None,
                pid_start=None,
                worktree="",
            )
        )
    with queries.engine_of(led).begin() as conn:
        conn.execute(experiments.insert(), exps)
        ids = [r.id for r in conn.execute(experiments.select().where(experiments.c.session_id == s.id))]
        conn.execute(
            candidates.insert(),
            [
                dict(
                    experiment_id=eid,
                    researcher=("a", "b")[k % 3 == 0],
                    rationale="",
                    diff="",
                    params_json="{}",
                    tokens_in=10,
                    tokens_out=1,
                    tokens_cached=0,
                    cost_usd=0.01 * (k % 5),
                    usage_s=0.1,
                )
                for k, eid in enumerate(ids)
            ],
        )
        fill_sort_columns(conn)  # rows inserted past start_experiment: the sort columns from the candidates
    return s.id


def test_pages_sort_filter_like_python_would(tmp_path: Path):
    led = Ledger(f"sqlite:///{tmp_path / 'big.db'}")
    sid = _fill(led, 700)
    queries.ensure_indexes(led)
    rows = led.experiments(sid)
    page = queries.experiments_page(
        led,
        sid,
        sort="metric",
        order="desc",
        statuses=["discard", "keep"],
        researcher="b",
        limit=50,
        offset=50,
    )
    want = sorted(
        (e for e in rows if e.status.value in ("discard", "keep") and e.researcher == "b"),
        key=lambda e: (-(e.metric or 0), -e.idx),
    )
    assert page.total == len(want)
    assert [r.idx for r in page.rows] == [e.idx for e in want[50:100]]
    by_cost = queries.experiments_page(led, sid, sort="cost", order="asc", limit=500)
    costs = [r.cost_usd for r in by_cost.rows]
    assert costs == sorted(costs)
    led.close()


def test_chart_downsampling_keeps_every_keep_and_the_exact_best(tmp_path: Path):
    led = Ledger(f"sqlite:///{tmp_path / 'big.db'}")
    sid = _fill(led, 3000)
    s = led.get_session_by_id(sid)
    full = queries.chart_data(led, s, 10_000)
    small = queries.chart_data(led, s, 600)
    assert not full.downsampled and len(full.points) == 3000
    assert small.downsampled and len(small.points) <= 600 and small.total == 3000
    keeps = {p.idx for p in full.points if p.status == "keep"}
    assert 20 < len(keeps) < 200 and keeps <= {p.idx for p in small.points}  # under a third: all stay
    tiny = queries.chart_data(led, s, 30)  # more keeps than a third of the budget: spread, ends kept
    tiny_keeps = [p.idx for p in tiny.points if p.status == "keep"]
    assert len(tiny_keeps) <= 10 and tiny_keeps[0] == 0 and tiny_keeps[-1] == max(keeps)
    assert small.best == full.best
    metrics = [p.metric for p in full.points if p.metric is not None]
    shown = [p.metric for p in small.points if p.metric is not None]
    assert min(shown) == min(metrics) and max(shown) == max(metrics)  # extremes survive
    assert any(p.metric is None for p in small.points)
    led.close()


def test_usage_and_timing_aggregate(tmp_path: Path):
    led = Ledger(f"sqlite:///{tmp_path / 'u.db'}")
    s = led.create_session(
        tag="u",
        branch="b",
        base_commit="0",
        metric_name="m",
        direction=Direction.MAXIMIZE,
        sandbox="none",
        spec_hash="h",
        spec_json='{"executor": {"slots": 2}}',
        lab_path="/x",
        machine={},
        researcher="llm",
    )
    for i in range(4):
        eid = led.start_experiment(
            s.id,
            idx=i,
            parent_commit="p",
            seed=0,
            description="d",
            propose_s=1.0,
            started_at=100.0 + 10 * i,
            candidate=Candidate(parent="p", rationale="r", usage=Usage(100, 10, 5, 0.25, 1.0)),
        )
        led.finish_experiment(
            eid, status=Status.DISCARD, metric=1.0, run_s=4.0, overhead_s=1.0, finished_at=106.0 + 10 * i
        )
    t = queries.timing(led, s.id)
    assert (t.n, t.propose_s, t.run_s, t.overhead_s, t.slots) == (4, 4.0, 16.0, 4.0, 2)
    assert t.span_s == pytest.approx(36.0) and t.duty_cycle == pytest.approx(16.0 / 72.0)
    assert t.usage() == led.usage_totals(s.id)
    series = queries.cost_series(led, s.id, buckets=4)
    assert sum(b.n for b in series.buckets) == 4 and sum(b.cost_usd for b in series.buckets) == pytest.approx(
        1.0
    )
    led.close()
