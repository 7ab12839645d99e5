"""The research pool, host side (issue 14): trust rules, store, snapshot bundle, HTTP intake, verification."""

from __future__ import annotations

import random

import pytest
from tests.conftest import dashboard_client

from nightlab.pool import trust
from nightlab.spec import PoolSpec
from nightlab.types import Direction

POLICY = PoolSpec()


# --------------------------------------------------------------------------- trust


def test_pool_defaults_follow_the_contract() -> None:
    p = PoolSpec()
    assert (p.name, p.max_strikes, p.max_diff_kb, p.max_log_kb, p.max_samples, p.max_pending) == \
        ("main", 3, 64, 16, 64, 20)
    assert (p.spot_check_min, p.trust_after, p.compute_ratio, p.tolerance_sd) == (0.1, 5, 4.0, 3.0)


def test_new_workers_are_always_checked_then_sampled_adaptively() -> None:
    r = trust.Record()
    for _ in range(POLICY.trust_after):
        assert trust.check_probability(r, POLICY) == 1.0
        r = trust.after_result(r, True, POLICY)
    assert r.valid_streak == 5
    assert trust.check_probability(r, POLICY) == 1.0  # trust_after / streak = 1
    r = trust.Record(valid_streak=10)
    assert trust.check_probability(r, POLICY) == 0.5
    assert trust.check_probability(trust.Record(valid_streak=1000), POLICY) == POLICY.spot_check_min
    # one invalid result resets trust and adds a strike
    bad = trust.after_result(trust.Record(valid_streak=1000), False, POLICY)
    assert bad == trust.Record(valid_streak=0, strikes=1, quarantined=False)
    assert trust.check_probability(bad, POLICY) == 1.0


def test_quarantine_at_max_strikes() -> None:
    r = trust.Record()
    for k in range(POLICY.max_strikes):
        assert not r.quarantined
        r = trust.after_result(r, False, POLICY)
        assert r.strikes == k + 1
    assert r.quarantined
    assert trust.after_result(r, True, POLICY).quarantined  # a valid result does not lift it


def test_must_verify_claims_that_beat_the_best() -> None:
    assert trust.must_verify(1.0, None, Direction.MINIMIZE)
    assert trust.must_verify(0.9, 1.0, Direction.MINIMIZE)
    assert not trust.must_verify(1.0, 1.0, Direction.MINIMIZE)
    assert not trust.must_verify(1.1, 1.0, Direction.MINIMIZE)
    assert trust.must_verify(1.1, 1.0, Direction.MAXIMIZE)
    assert trust.must_verify(float("nan"), 1.0, Direction.MAXIMIZE)


def test_contradicted_beyond_the_noise_floor_only() -> None:
    d = Direction.MINIMIZE
    assert trust.contradicted(1.0, None, d, 0.1, POLICY)  # the re-run crashed
    assert not trust.contradicted(1.0, 1.0, d, None, POLICY)
    assert not trust.contradicted(1.2, 1.0, d, None, POLICY)  # claimed worse than measured: modest, fine
    assert trust.contradicted(0.9, 1.0, d, None, POLICY)  # no noise measured: exact
    assert not trust.contradicted(0.9, 1.0, d, 0.05, POLICY)  # within 3 sd
    assert trust.contradicted(0.8, 1.0, d, 0.05, POLICY)  # beyond 3 sd
    assert trust.contradicted(1.3, 1.0, Direction.MAXIMIZE, 0.05, POLICY)
    # the best of many noisy runs is optimistic in good faith (winner's curse): the tolerance grows with n
    assert trust.contradicted(0.8, 1.0, d, 0.05, POLICY, experiments=1)
    assert not trust.contradicted(0.8, 1.0, d, 0.05, POLICY, experiments=100)
    assert trust.contradicted(0.5, 1.0, d, 0.05, POLICY, experiments=10**12)  # capped: at most ~5.3 sd more
    assert not trust.contradicted(1.0 - 1e-12, 1.0, d, None, POLICY)  # float round-off across machines


def test_compute_inflated() -> None:
    assert not trust.compute_inflated(40.0, 10, 2.0, POLICY)  # 4 s per experiment vs 2 s
    assert trust.compute_inflated(100.0, 10, 2.0, POLICY)  # 10 s per experiment vs 2 s: > 4x
    assert not trust.compute_inflated(3.0, 1, 0.05, POLICY)  # tiny runs count as MIN_RUN_S
    assert trust.compute_inflated(1e6, 1, 0.05, POLICY)
    assert trust.compute_inflated(float("inf"), 1, 0.05, POLICY)
    assert trust.compute_inflated(-1.0, 1, 0.05, POLICY)


def test_the_claimed_experiment_count_is_believed_only_as_far_as_the_clock_allows() -> None:
    # the count widens the metric tolerance (best of n) and divides the claimed seconds: a worker that claims a
    # million experiments a minute after its invite is inflating compute, and its tolerance stays that of 1,920
    d = Direction.MINIMIZE
    assert trust.plausible_experiments(60.0, 1.0, POLICY) == 8 * 60 * 4  # max_parallel x 60 s / (1 s / ratio 4)
    assert trust.plausible_experiments(60.0, 10.0, POLICY) == 8 * 60 * 4 // 10
    assert trust.plausible_experiments(0.0, 1.0, POLICY) == 1
    assert trust.credible_experiments(10**6, 0, 60.0, 1.0, POLICY) == 1920
    assert trust.credible_experiments(50, 1900, 60.0, 1.0, POLICY) == 20  # earlier claims used the rest
    assert trust.credible_experiments(50, 0, 60.0, 1.0, POLICY) == 50  # an honest count is believed
    assert not trust.compute_inflated(10**6 * 1.0, 10**6, 1.0, POLICY)  # per experiment it looks fine ...
    assert not trust.compute_inflated(10**6 * 1.0, 10**6, 1.0, POLICY, claimed_before=0, elapsed_s=10**6)
    assert trust.compute_inflated(10**6 * 1.0, 10**6, 1.0, POLICY, claimed_before=0, elapsed_s=60.0)
    assert not trust.compute_inflated(50.0, 50, 1.0, POLICY, claimed_before=0, elapsed_s=60.0)
    # the lie that the count was meant to excuse: 8 sd better than the re-run
    n = trust.credible_experiments(10**6, 0, 60.0, 1.0, POLICY)
    assert not trust.contradicted(0.6, 1.0, d, 0.05, POLICY, experiments=10**6)
    assert trust.contradicted(0.6, 1.0, d, 0.05, POLICY, experiments=n)


def test_spot_check_rate_of_a_trusted_worker_is_near_its_probability() -> None:
    rng = random.Random(7)
    r = trust.Record(valid_streak=50)
    p = trust.check_probability(r, POLICY)
    hits = sum(rng.random() < p for _ in range(4000))
    assert p == pytest.approx(0.1)
    assert 300 < hits < 500


# --------------------------------------------------------------------------- store (SQLite and PostgreSQL)


def _store_conformance(url: str) -> None:
    import sqlalchemy as sa

    from nightlab.errors import UsageError
    from nightlab.ledger import Ledger
    from nightlab.pool import store

    with Ledger(url) as led:
        version = led.schema_version()
        token = store.invite(led, "main", "alice")
        assert token.startswith("nlp_") and len(token) > 40
        with pytest.raises(UsageError, match="already invited"):
            store.invite(led, "main", "alice")
        with pytest.raises(UsageError, match="bad worker name"):
            store.invite(led, "main", "../x")
        # stored hashed: the token itself is nowhere in the table
        with led.transaction() as conn:
            rows = [tuple(map(str, r)) for r in conn.execute(sa.select(store.workers)).all()]
        assert rows and not any(token in cell for row in rows for cell in row)
        assert any(store.hash_token(token) in row for row in rows)
        w = store.authenticate(led, "main", token)
        assert w is not None and w.name == "alice" and not w.revoked
        assert store.authenticate(led, "main", token + "x") is None
        assert store.authenticate(led, "other-pool", token) is None
        common: dict = dict(pool="main", worker="alice", parent="a" * 40, metric=1.5, samples=[1.5, 1.6],
                            log_tail="ok", seed=3, hardware="cpu", compute_s=10.0, experiments=2, researcher="search")
        c, new = store.add_claim(led, claim_id="1" * 32, diff="diff --git a/x b/x\n+1\n", status="queued",
                                 must_verify=True, **common)
        assert new and c.status == "queued" and c.samples == (1.5, 1.6) and c.must_verify
        again, new = store.add_claim(led, claim_id="1" * 32, diff="other", status="credited", **common)
        assert not new and again == c  # idempotent: the stored claim, unchanged
        assert store.pending_count(led, "main", "alice") == 1
        # the same change written with other positions and index lines is the same normalised diff
        assert store.first_with_diff(led, "main", "diff --git a/x b/x\nindex 1..2\n@@ -3 +3 @@\n+1\r\n") == c
        upd = store.update_claim(led, "main", "alice", "1" * 32, status="accepted", measured=1.4, experiment=3,
                                 commit="b" * 40, verify_s=0.5, gain_pct=2.0)
        assert (upd.status, upd.measured, upd.experiment, upd.commit) == ("accepted", 1.4, 3, "b" * 40)
        assert upd.decided_at is not None and store.pending_count(led, "main", "alice") == 0
        assert upd.public()["claimed"] == 1.5
        assert [x.claim_id for x in store.list_claims(led, "main", statuses=["accepted"])] == ["1" * 32]
        rec = store.strike(led, "main", "alice", PoolSpec(max_strikes=1))
        assert rec.quarantined and store.get_worker(led, "main", "alice").record == rec  # type: ignore[union-attr]
        store.revoke(led, "main", "alice")
        w = store.authenticate(led, "main", token)
        assert w is not None and w.revoked  # known but revoked: the API answers 403
        with pytest.raises(UsageError, match="no worker"):
            store.revoke(led, "main", "bob")
        token2 = store.invite(led, "main", "alice")  # re-invited: a new token, the record kept
        assert store.authenticate(led, "main", token) is None
        w2 = store.authenticate(led, "main", token2)
        assert w2 is not None and not w2.revoked and w2.record.quarantined
        assert led.schema_version() == version  # the pool's tables do not bump the ledger's schema


def test_store_sqlite(tmp_path) -> None:
    _store_conformance(f"sqlite:///{tmp_path / 'ledger.db'}")


@pytest.mark.postgres
def test_store_postgres(pg_url: str) -> None:
    _store_conformance(pg_url)


# --------------------------------------------------------------------------- snapshot bundle

SECRET = "HOLDOUT-7f3a9c-LABELS"  # bytes that must never leave the host
HOLDOUT_PY = f'print("---")\nprint("holdout_score: 1.0")  # {SECRET}-in-the-command\n'


def _holdout_lab(make_lab):
    from conftest import SPEC, commit_all

    spec = SPEC.replace("[metric]", '[evaluate]\noutputs = []\n\n[holdout]\ncommand = "python holdout.py"\n'
                        'metric = "holdout_score"\nfiles = ["secret/*.txt"]\n\n[notify]\n'
                        'webhooks = ["https://hooks.example.invalid/T0/SECRETHOOK"]\n\n[metric]')
    spec = spec.replace('protected = ["evaluate.py"]', 'protected = ["evaluate.py", "holdout.py"]')
    spec = spec.replace("[executor]", '[sandbox]\nhide = ["private"]\n\n[executor]')
    lab = make_lab(files={"holdout.py": HOLDOUT_PY, "secret/labels.txt": SECRET + "\n",
                          "private/notes.txt": SECRET + "-private\n", "data.txt": "public data\n"}, spec=spec)
    # an older holdout file, deleted since: it lives in history only
    (lab / "secret" / "old.txt").write_text(SECRET + "-old\n")
    commit_all(lab, "old holdout")
    (lab / "secret" / "old.txt").unlink()
    commit_all(lab, "drop it")
    return lab


def test_bundle_has_no_holdout_bytes(make_lab, tmp_path) -> None:
    import subprocess
    import tomllib

    from conftest import git
    from nightlab.pool import snapshot
    from nightlab.spec import load_spec
    from nightlab.workspace import Workspace

    lab = _holdout_lab(make_lab)
    ws = Workspace(lab)
    head = ws.head()
    spec = load_spec(lab)
    refs_before = git(lab, "for-each-ref")
    snap = snapshot.build(ws, spec, head, tmp_path / "bundles")
    assert sorted(snap.excluded) == ["holdout.py", "private/notes.txt", "secret/labels.txt"]
    assert git(lab, "for-each-ref") == refs_before  # the lab's repository gains no ref
    heads = git(lab, "bundle", "list-heads", str(snap.bundle)).split()
    assert heads == [snap.commit, "HEAD", snap.commit, "refs/heads/pool"]
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(snap.bundle), str(clone))
    assert git(clone, "rev-parse", "HEAD").strip() == snap.commit
    assert head in git(clone, "log", "-1", "--format=%B")
    assert git(clone, "rev-list", "--count", "HEAD").strip() == "1"  # no history
    blob = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=clone, capture_output=True,
                          check=True).stdout
    assert SECRET.encode() not in blob and b"SECRETHOOK" not in blob
    assert b"public data" in blob  # the search passes on what it should
    files = sorted(git(clone, "ls-files").split())
    assert files == ["data.txt", "evaluate.py", "nightlab.toml", "program.md", "target.py"]
    data = tomllib.loads((clone / "nightlab.toml").read_text())
    assert "holdout" not in data and "notify" not in data and data["metric"]["name"] == "score"
    load_spec(clone)  # the worker's lab is a valid lab
    # a claim that touches a holdout file (or the hidden holdout command) is refused by the guard: a strike
    from nightlab.guard import Guard

    guard = Guard(spec, ws)
    for path in ("secret/labels.txt", "holdout.py"):
        assert (guard.check_paths([path]) or "").startswith("protected"), path
    # deterministic: the same head gives the same snapshot commit
    again = snapshot.build(ws, spec, head, tmp_path / "again")
    assert again.commit == snap.commit


def test_sanitised_spec_refuses_an_inline_holdout() -> None:
    from nightlab.errors import UsageError
    from nightlab.pool.snapshot import sanitised_spec

    assert "holdout" not in sanitised_spec('[run]\ncommand = "x"\n[holdout]\ncommand = "h"\n[holdout.x]\na = 1\n')
    with pytest.raises(UsageError, match="holdout"):
        sanitised_spec('holdout = { command = "python h.py" }\n[run]\ncommand = "x"\n')


# --------------------------------------------------------------------------- intake over HTTP and verification

POOL_SPEC_EXTRA = "\n[pool]\nmax_strikes = 2\nmax_pending = 3\n"


def xy_diff(x0: str, y0: str, x1: str, y1: str) -> str:
    """A git diff of target.py (conftest's TARGET_PY) changing X and Y."""
    return ("diff --git a/target.py b/target.py\n--- a/target.py\n+++ b/target.py\n@@ -1,4 +1,4 @@\n"
            f" import os, sys\n-X = {x0}\n-Y = {y0}\n+X = {x1}\n+Y = {y1}\n"
            " score = (X - 1) ** 2 + (Y - 2) ** 2 + 0.5\n")


def score(x: float, y: float) -> float:
    return (x - 1) ** 2 + (y - 2) ** 2 + 0.5


def claim_body(parent: str, diff: str, metric: float, cid: str | None = None, **kw) -> dict:
    import hashlib

    cid = cid or hashlib.sha256(f"{parent}|{diff}|{metric}|{kw}".encode()).hexdigest()[:32]
    return {"claim_id": cid, "parent": parent, "diff": diff, "metric": metric, "samples": [metric],
            "log_tail": "score: ...", "seed": 1, "hardware": "test cpu", "compute_s": kw.pop("compute_s", 1.0),
            "experiments": kw.pop("experiments", 1), "researcher": "search", **kw}


@pytest.fixture
def pool_lab(make_lab):
    from conftest import SPEC

    return make_lab(spec=SPEC + POOL_SPEC_EXTRA)


def _client(host):

    from nightlab.web.app import create_app

    return dashboard_client(create_app(host.ledger, host.lab_dir, pool=host), base_url="http://127.0.0.1")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_intake_rules_one_by_one(pool_lab) -> None:
    import json

    from nightlab.pool import store
    from nightlab.pool.serve import open_pool

    engine, host, _ = open_pool(pool_lab, sandbox_mode="none")  # opens the session: the pool branch exists
    try:
        led = host.ledger
        head = host.head()
        assert head is not None and host.branch == "nightlab/pool-main"
        alice, bob, eve = (store.invite(led, "main", n) for n in ("alice", "bob", "eve"))
        c = _client(host)
        win = xy_diff("3.0", "0.0", "1.0", "0.0")
        # 401: no token, an unknown token
        assert c.get("/api/pool/info").status_code == 401
        assert c.post("/api/pool/claims", json=claim_body(head, win, 4.5), headers=_auth("nlp_nope")).status_code == 401
        info = c.get("/api/pool/info", headers=_auth(alice)).json()
        assert info["head"] == head and info["worker"] == "alice" and info["metric"] == \
            {"name": "score", "direction": "minimize"} and info["limits"]["max_pending"] == 3
        # 422: malformed bodies
        for bad in ({**claim_body(head, win, 4.5), "claim_id": "xyz"}, {**claim_body(head, win, 4.5), "extra": 1},
                    {k: v for k, v in claim_body(head, win, 4.5).items() if k != "metric"},
                    {**claim_body(head, win, 4.5), "compute_s": -1},
                    {**claim_body(head, win, 4.5), "hardware": "gpu\x1b]0;pwned\x07"}):
            r = c.post("/api/pool/claims", json=bad, headers=_auth(alice))
            assert r.status_code == 422, (bad, r.text)
        r = c.post("/api/pool/claims", content=json.dumps(claim_body(head, win, 4.5)).replace("4.5", "NaN"),
                   headers=_auth(alice))
        assert r.status_code == 422
        assert c.post("/api/pool/claims", content=b"{not json", headers=_auth(alice)).status_code == 422
        # 422: a parent outside the pool branch's history, a diff that does not apply
        r = c.post("/api/pool/claims", json=claim_body("f" * 40, win, 4.5), headers=_auth(alice))
        assert r.status_code == 422 and "not a commit of the pool branch" in r.json()["detail"]
        r = c.post("/api/pool/claims", json=claim_body(head, xy_diff("9.0", "9.0", "1.0", "0.0"), 4.5),
                   headers=_auth(alice))
        assert r.status_code == 422 and "does not apply" in r.json()["detail"]
        # 413: over the size caps (the body, the diff, the samples)
        assert c.post("/api/pool/claims", content=b"x" * 200_000, headers=_auth(alice)).status_code == 413
        big = claim_body(head, win + "+" + "y" * 70_000 + "\n", 4.5)
        assert c.post("/api/pool/claims", json=big, headers=_auth(alice)).status_code == 413
        many = {**claim_body(head, win, 4.5), "samples": [4.5] * 65}
        assert c.post("/api/pool/claims", json=many, headers=_auth(alice)).status_code == 413
        assert store.list_claims(led, "main") == []  # nothing refused was stored
        # 202 queued: it claims a new best (there is none yet); the same claim_id again: 200, the same claim
        body = claim_body(head, win, 4.5)
        r = c.post("/api/pool/claims", json=body, headers=_auth(alice))
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        r2 = c.post("/api/pool/claims", json={**body, "metric": 0.1}, headers=_auth(alice))
        assert r2.status_code == 200 and r2.json() == r.json()
        assert len(store.list_claims(led, "main")) == 1 and store.pending_count(led, "main", "alice") == 1
        got = c.get(f"/api/pool/claims/{body['claim_id']}", headers=_auth(alice)).json()
        assert got["claimed"] == 4.5 and got["status"] == "queued" and got["worker"] == "alice"
        assert c.get(f"/api/pool/claims/{body['claim_id']}", headers=_auth(bob)).status_code == 404  # not bob's
        # duplicate: the same change (with an index line, CRLF endings) by bob is credited to alice only
        dup = win.replace("--- a/", "index 1234567..89abcde 100644\n--- a/")
        r = c.post("/api/pool/claims", json=claim_body(head, dup, 4.4), headers=_auth(bob))
        assert r.status_code == 202 and r.json()["status"] == "duplicate", r.text
        # rejected + a strike: a protected file (and the spec), then quarantine at max_strikes = 2 -> 403
        prot = "diff --git a/evaluate.py b/evaluate.py\n--- a/evaluate.py\n+++ b/evaluate.py\n@@ -1 +1 @@\n" \
               "-print('protected')\n+print('mine')\n"
        r = c.post("/api/pool/claims", json=claim_body(head, prot, 0.1), headers=_auth(eve))
        assert r.status_code == 202 and r.json()["status"] == "rejected" and "protected" in r.json()["reason"]
        assert store.get_worker(led, "main", "eve").record.strikes == 1  # type: ignore[union-attr]
        spec_diff = "diff --git a/nightlab.toml b/nightlab.toml\n--- a/nightlab.toml\n+++ b/nightlab.toml\n" \
                    "@@ -1 +1 @@\n-[files]\n+[files]\n"
        r = c.post("/api/pool/claims", json=claim_body(head, spec_diff, 0.1), headers=_auth(eve))
        assert r.json()["status"] == "rejected"
        assert store.get_worker(led, "main", "eve").record.quarantined  # type: ignore[union-attr]
        r = c.post("/api/pool/claims", json=claim_body(head, win, 0.2), headers=_auth(eve))
        assert r.status_code == 403 and "quarantined" in r.json()["detail"]
        assert c.get("/api/pool/bundle", headers=_auth(eve)).status_code == 403
        assert c.get("/api/pool/me", headers=_auth(eve)).json()["quarantined"] is True  # it may still read
        # 429: max_pending = 3 claims of one worker waiting
        for k, x in enumerate(("1.5", "2.0", "2.5")):
            r = c.post("/api/pool/claims", json=claim_body(head, xy_diff("3.0", "0.0", x, "0.0"), 1.0 + k),
                       headers=_auth(bob))
            assert r.status_code == 202 and r.json()["status"] == "queued", r.text  # new workers: always checked
        r = c.post("/api/pool/claims", json=claim_body(head, xy_diff("3.0", "0.0", "0.5", "0.0"), 1.0),
                   headers=_auth(bob))
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        # revoked: 403 everywhere
        store.revoke(led, "main", "bob")
        assert c.get("/api/pool/info", headers=_auth(bob)).status_code == 403
        # the bundle: the snapshot of the head, named in a header
        r = c.get("/api/pool/bundle", headers=_auth(alice))
        assert r.status_code == 200 and r.headers["x-nightlab-pool-head"] == head
        assert r.content.startswith(b"# v2 git bundle") or r.content.startswith(b"# v3 git bundle")
        # not a new best: a trusted worker's claim is credited unless sampled; a new worker's is always checked
        import random

        from nightlab.pool.trust import Record

        led.update_session(engine.session.id, incumbent_metric=8.5, baseline_metric=8.5)
        store.set_record(led, "main", "alice", Record(valid_streak=1000))
        host.rng = random.Random(1)  # its first draws: 0.134, 0.847, 0.764 (all above the 0.1 spot-check rate)
        for k, x in enumerate(("4.0", "5.0")):
            r = c.post("/api/pool/claims", json=claim_body(head, xy_diff("3.0", "0.0", x, "0.0"), 9.0 + k),
                       headers=_auth(alice))
            assert r.status_code == 202 and r.json()["status"] == "credited", r.text
        carol = store.invite(led, "main", "carol")
        r = c.post("/api/pool/claims", json=claim_body(head, xy_diff("3.0", "0.0", "6.0", "0.0"), 25.5),
                   headers=_auth(carol))
        assert r.json()["status"] == "queued" and "spot check (probability 1.00)" in r.json()["reason"]
        # the pool API answers workers on any Host (behind a proxy); the dashboard stays loopback-only, and a
        # worker token opens nothing of it
        from starlette.testclient import TestClient

        from nightlab.web.app import create_app
        from nightlab.web.security import Access

        remote = TestClient(create_app(led, host.lab_dir, pool=host), base_url="http://pool.example.org")
        assert remote.get("/api/pool/info", headers=_auth(alice)).status_code == 200
        assert remote.get("/pool", headers=_auth(alice)).status_code == 421
        public = TestClient(create_app(led, host.lab_dir, Access.make("0.0.0.0", "dash-secret"), pool=host),
                            base_url="http://pool.example.org")
        assert public.get("/api/sessions", headers=_auth(alice)).status_code == 401
        assert public.get("/api/pool/me", headers=_auth(alice)).json()["credited"] == 2
        # the dashboard's own rules still hold elsewhere; the pool page shows the board
        page = c.get("/pool")
        assert page.status_code == 200 and "alice" in page.text and "Verification cost" in page.text
    finally:
        engine.close()
        host.ledger.close()


def _wait_decided(led, worker: str, cid: str, timeout: float = 90.0):
    import time

    from nightlab.pool import store

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c = store.get_claim(led, "main", worker, cid)
        if c is not None and c.status not in store.OPEN:
            return c
        time.sleep(0.05)
    raise AssertionError(f"claim {cid} of {worker} was not decided in {timeout}s")


@pytest.mark.slow
def test_verification_session_accepts_contradicts_and_quarantines(make_lab, tmp_path) -> None:
    import json
    import random
    import subprocess
    import threading

    from conftest import SPEC, cli_env, git, nightlab_cmd
    from nightlab.audit import read_records
    from nightlab.pool import store
    from nightlab.pool.serve import open_pool

    notes = tmp_path / "notify.jsonl"  # [notify] command: each pool_claim_accepted event, as JSON on stdin
    pool_lab = make_lab(spec=SPEC + POOL_SPEC_EXTRA + f'\n[notify]\ncommand = "tee -a {notes}"\n'
                        'events = ["pool_claim_accepted"]\n')
    engine, host, feeder = open_pool(pool_lab, poll_s=0.05)
    host.rng = random.Random(0)
    led = host.ledger
    base = host.head()
    assert base is not None
    tokens = {n: store.invite(led, "main", n) for n in ("alice", "bob", "carol", "dave", "erin", "frank")}
    c = _client(host)
    outcome: dict = {}
    t = threading.Thread(target=lambda: outcome.setdefault("session", engine.run()), daemon=True)
    t.start()
    try:
        def post(who: str, body: dict) -> dict:
            r = c.post("/api/pool/claims", json=body, headers=_auth(tokens[who]))
            assert r.status_code == 202, r.text
            return r.json()

        # a winning claim, sent while the baseline may still run: it waits, then is accepted
        a = claim_body(base, xy_diff("3.0", "0.0", "1.5", "0.0"), score(1.5, 0.0), compute_s=2.0)
        assert post("alice", a)["status"] == "queued"
        ca = _wait_decided(led, "alice", a["claim_id"])
        assert ca.status == "accepted", ca.reason
        assert ca.measured == pytest.approx(score(1.5, 0.0))
        assert ca.commit == host.head() != base, (git(pool_lab, "log", "--format=%H %s", host.branch),
                                                 [(e.idx, e.status, e.commit, e.reason) for e in led.experiments(
                                                     led.get_session("pool-main").id)])
        assert ca.gain_pct == pytest.approx(100 * (score(3, 0) - score(1.5, 0)) / score(3, 0), rel=1e-4)
        assert "X = 1.5" in git(pool_lab, "show", f"{host.head()}:target.py")
        # an inflated metric on a change that really is better: the re-run contradicts the claim -> a strike,
        # and the lie is never kept: the branch does not move
        head1 = host.head()
        b = claim_body(head1, xy_diff("1.5", "0.0", "1.5", "1.0"), 0.01)
        assert post("bob", b)["status"] == "queued"
        cb = _wait_decided(led, "bob", b["claim_id"])
        assert cb.status == "contradicted" and cb.strike and "metric contradicted" in cb.reason
        assert score(1.5, 1.0) < score(1.5, 0.0)  # the change itself is better
        assert cb.measured == pytest.approx(score(1.5, 1.0)) and host.head() == head1
        refused = led.get_experiment(engine.session.id, cb.experiment)
        assert refused.status.value == "discard" and "a lie is never kept" in refused.reason  # type: ignore[union-attr]
        assert store.get_worker(led, "main", "bob").record.strikes == 1  # type: ignore[union-attr]
        # a stale winning claim (on the base, not the head): kept as its measured tree on top of the head
        s3 = claim_body(base, xy_diff("3.0", "0.0", "3.0", "2.0"), score(3.0, 2.0))
        assert post("carol", s3)["status"] == "queued"
        cc = _wait_decided(led, "carol", s3["claim_id"])
        assert cc.status == "accepted", cc.reason
        assert git(pool_lab, "rev-parse", f"{cc.commit}^").strip() == head1  # the branch fast-forwarded
        kept = git(pool_lab, "show", f"{cc.commit}:target.py")
        assert "X = 3.0" in kept and "Y = 2.0" in kept  # exactly the measured tree
        # honest compute, not a new best, new worker: always spot-checked -> checked
        d1 = claim_body(head1, xy_diff("1.5", "0.0", "1.5", "-1.0"), score(1.5, -1.0), compute_s=1.5)
        assert post("dave", d1)["status"] == "queued"
        assert _wait_decided(led, "dave", d1["claim_id"]).status == "checked"
        # huge compute claimed for no work: caught by the check -> contradicted (compute inflated)
        d2 = claim_body(head1, xy_diff("1.5", "0.0", "1.5", "-2.0"), score(1.5, -2.0), compute_s=1e6)
        assert post("dave", d2)["status"] == "queued"
        cd = _wait_decided(led, "dave", d2["claim_id"])
        assert cd.status == "contradicted" and "compute inflated" in cd.reason
        # bob's second strike quarantines him (max_strikes = 2): 403 from then on
        b2 = claim_body(head1, xy_diff("1.5", "0.0", "1.5", "5.0"), 0.02)
        post("bob", b2)
        assert _wait_decided(led, "bob", b2["claim_id"]).status == "contradicted"
        assert store.get_worker(led, "main", "bob").record.quarantined  # type: ignore[union-attr]
        r = c.post("/api/pool/claims", json=claim_body(head1, xy_diff("1.5", "0.0", "1.0", "2.0"), 0.5),
                   headers=_auth(tokens["bob"]))
        assert r.status_code == 403
        # the leaderboard: alice and carol gained, the cheaters did not
        lb = c.get("/api/pool/leaderboard", headers=_auth(tokens["alice"])).json()
        rows = {w["worker"]: w for w in lb["workers"]}
        assert rows["alice"]["verified_gain_pct"] > 0 and rows["carol"]["verified_gain_pct"] > 0
        assert rows["bob"]["verified_gain_pct"] == 0 and rows["bob"]["quarantined"] and rows["bob"]["strikes"] == 2
        assert rows["dave"]["rejected"] == 1 and rows["dave"]["verified_compute_fraction"] == 1.0
        assert rows["dave"]["compute_s"] == 1.5 and lb["totals"]["worker_compute_s"] < 100  # the 1e6 s: nothing
        assert lb["totals"]["verification_s"] > 0 and lb["totals"]["accepted"] == 2
        me = c.get("/api/pool/me", headers=_auth(tokens["carol"])).json()
        assert me["worker"] == "carol" and me["accepted"] == 1
        # two claims of a new best, honest both; the first accepted makes the second no longer the best: the
        # re-run agrees with it, the policy does not keep it -> unconfirmed, no strike
        import time

        while [x for x in led.experiments(engine.session.id) if not x.status.is_finished()]:
            time.sleep(0.05)  # the combination the engine made of carol's stale change, if any, has run
        head = host.head()
        cur = git(pool_lab, "show", f"{head}:target.py").splitlines()
        x0, y0 = cur[1].split(" = ")[1], cur[2].split(" = ")[1]
        with feeder._lock:  # the feeder takes neither claim before both are in: frank's is the older
            f = claim_body(head, xy_diff(x0, y0, "1.0", "2.0"), score(1.0, 2.0))
            assert post("frank", f)["status"] == "queued"
            e = claim_body(head, xy_diff(x0, y0, "1.1", "2.0"), score(1.1, 2.0))
            assert post("erin", e)["status"] == "queued"
        assert _wait_decided(led, "frank", f["claim_id"]).status == "accepted"
        ce = _wait_decided(led, "erin", e["claim_id"])
        assert ce.status == "unconfirmed" and not ce.strike, ce.reason
        assert store.get_worker(led, "main", "erin").record == trust.Record(valid_streak=1)  # type: ignore[union-attr]
    finally:
        engine.stop.graceful = "test done"
        host.wake.set()
        t.join(timeout=60)
        engine.close()
    assert not t.is_alive() and outcome["session"].status == "stopped"
    # provenance on the experiment and in `nightlab show`
    exp = led.get_experiment(outcome["session"].id, ca.experiment)
    assert exp is not None and exp.evidence["pool"]["worker"] == "alice"
    assert exp.evidence["pool"]["claim_id"] == a["claim_id"] and exp.evidence["pool"]["claimed"] == a["metric"]
    assert exp.evidence["pool"]["verification"]["status"] == "accepted"
    out = subprocess.run(nightlab_cmd("show", str(ca.experiment), "--lab", str(pool_lab), "--tag", "pool-main"),
                         env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pool" in out.stdout and a["claim_id"] in out.stdout and "alice" in out.stdout
    lb_cli = subprocess.run(nightlab_cmd("pool", "leaderboard", "--json", "--lab", str(pool_lab)), env=cli_env(),
                            capture_output=True, text=True)
    assert lb_cli.returncode == 0
    ranked = json.loads(lb_cli.stdout)["workers"]
    gains = [w["verified_gain_pct"] for w in ranked]
    assert gains == sorted(gains, reverse=True) and {w["worker"] for w in ranked if w["verified_gain_pct"] > 0} == \
        {"alice", "carol", "frank"}
    # `nightlab ui` of the lab shows the pool's page too, linked from the navigation

    from nightlab.web.app import create_app

    ui = dashboard_client(create_app(led, pool_lab), base_url="http://127.0.0.1")
    page = ui.get("/pool").text
    assert 'href="/pool"' in ui.get("/").text
    assert "alice" in page and "carol" in page and f"/s/pool-main/e/{ca.experiment}" in page
    assert "Verification cost" in page and "3 claims accepted" in page
    # the audit log holds every claim, check, verification and decision
    kinds = [r.get("kind") for r in read_records(pool_lab / ".nightlab" / "audit.jsonl")]
    for k in ("pool.claim", "pool.check", "pool.verify", "pool.verified", "pool.decision", "pool.strike",
              "pool.accept"):
        assert k in kinds, k
    assert kinds.count("pool.claim") == 8 and kinds.count("pool.accept") == 3
    text, sent, dec = notes.read_text(), [], json.JSONDecoder()
    while text.strip():  # one JSON object per event, back to back
        obj, end = dec.raw_decode(text.lstrip())
        sent.append(obj)
        text = text.lstrip()[end:]
    assert [m["event"]["kind"] for m in sent] == ["pool_claim_accepted"] * 3
    assert {m["event"]["worker"] for m in sent} == {"alice", "carol", "frank"}, sent[0]
    assert "pool claim accepted" in sent[0]["text"] and a["claim_id"] in sent[0]["text"]
    led.close()


# --------------------------------------------------------------------------- the CLI, with a real server process


def test_serve_refuses_a_public_host_without_a_proxy(pool_lab) -> None:
    import subprocess

    from conftest import cli_env, nightlab_cmd

    r = subprocess.run(nightlab_cmd("pool", "serve", "--lab", str(pool_lab), "--host", "0.0.0.0"), env=cli_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "without TLS" in r.stderr and "--behind-proxy" in r.stderr and "docs/pool.md" in r.stderr
    assert not (pool_lab / ".nightlab" / "ledger.db").exists()  # refused before anything started


@pytest.mark.slow
def test_pool_serve_process_verifies_a_claim_over_http(pool_lab) -> None:
    import os
    import re
    import signal
    import subprocess
    import time

    import httpx

    from conftest import cli_env, git, nightlab_cmd

    inv = subprocess.run(nightlab_cmd("pool", "invite", "alice", "--lab", str(pool_lab)), env=cli_env(),
                         capture_output=True, text=True, timeout=60)
    assert inv.returncode == 0, inv.stderr
    token = re.search(r"^(nlp_\S+)$", inv.stdout, re.M).group(1)  # type: ignore[union-attr]
    again = subprocess.run(nightlab_cmd("pool", "invite", "alice", "--lab", str(pool_lab)), env=cli_env(),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already invited" in again.stderr and "Traceback" not in again.stderr
    assert token.encode() not in (pool_lab / ".nightlab" / "ledger.db").read_bytes()  # stored hashed
    assert git(pool_lab, "status", "--porcelain") == ""  # .nightlab/ is kept out of git
    proc = subprocess.Popen(nightlab_cmd("pool", "serve", "--lab", str(pool_lab), "--port", "0", "-q"),
                            env={**cli_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/api/pool", line).group(1)  # type: ignore[union-attr]
        h = {"Authorization": f"Bearer {token}"}
        info = httpx.get(f"{url}/api/pool/info", headers=h, timeout=10).json()
        body = claim_body(info["head"], xy_diff("3.0", "0.0", "1.0", "0.0"), score(1.0, 0.0))
        r = httpx.post(f"{url}/api/pool/claims", json=body, headers=h, timeout=10)
        assert r.status_code == 202 and r.json()["status"] == "queued"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            got = httpx.get(f"{url}/api/pool/claims/{body['claim_id']}", headers=h, timeout=10).json()
            if got["status"] not in ("queued", "verifying"):
                break
            time.sleep(0.1)
        assert got["status"] == "accepted" and got["measured"] == pytest.approx(score(1.0, 0.0)), got
        bundle = httpx.get(f"{url}/api/pool/bundle", headers=h, timeout=30)
        assert bundle.headers["x-nightlab-pool-head"] == got["commit"]  # the pool head moved to the claim
        # the token is revoked from another process: 403 at once
        rv = subprocess.run(nightlab_cmd("pool", "revoke", "alice", "--lab", str(pool_lab)), env=cli_env(),
                            capture_output=True, text=True, timeout=60)
        assert rv.returncode == 0, rv.stderr
        assert httpx.get(f"{url}/api/pool/info", headers=h, timeout=10).status_code == 403
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "pool session pool-main: stopped" in out
    # a restart resumes the same session: no new baseline, the head where it was, claims verified again
    bob = re.search(r"^(nlp_\S+)$", subprocess.run(nightlab_cmd("pool", "invite", "bob", "--lab", str(pool_lab)),
                    env=cli_env(), capture_output=True, text=True, timeout=60).stdout, re.M).group(1)  # type: ignore[union-attr]
    proc = subprocess.Popen(nightlab_cmd("pool", "serve", "--lab", str(pool_lab), "--port", "0", "-q"),
                            env={**cli_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/api/pool", proc.stdout.readline()).group(1)  # type: ignore[union-attr]
        h = {"Authorization": f"Bearer {bob}"}
        info = httpx.get(f"{url}/api/pool/info", headers=h, timeout=10).json()
        assert info["head"] == got["commit"] and info["head_metric"] == pytest.approx(score(1.0, 0.0))
        body = claim_body(info["head"], xy_diff("1.0", "0.0", "1.0", "2.0"), score(1.0, 2.0))
        assert httpx.post(f"{url}/api/pool/claims", json=body, headers=h, timeout=10).status_code == 202
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            got2 = httpx.get(f"{url}/api/pool/claims/{body['claim_id']}", headers=h, timeout=10).json()
            if got2["status"] not in ("queued", "verifying"):
                break
            time.sleep(0.1)
        assert got2["status"] == "accepted", got2
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    st = subprocess.run(nightlab_cmd("pool", "status", "--lab", str(pool_lab)), env=cli_env(), capture_output=True,
                        text=True, timeout=60)
    assert st.returncode == 0 and "claims: 2 (accepted 2)" in st.stdout and "1 revoked" in st.stdout, st.stdout
    lb = subprocess.run(nightlab_cmd("pool", "leaderboard", "--lab", str(pool_lab)), env=cli_env(),
                        capture_output=True, text=True, timeout=60)
    assert lb.returncode == 0 and "alice" in lb.stdout and "verification:" in lb.stdout


def test_the_pool_page_of_a_lab_without_a_pool_creates_nothing(make_lab) -> None:

    from nightlab.ledger import Ledger
    from nightlab.pool import store
    from nightlab.web.app import create_app

    lab = make_lab()
    with Ledger.for_lab(lab) as led:
        ui = dashboard_client(create_app(led, lab), base_url="http://127.0.0.1")
        assert 'href="/pool"' not in ui.get("/").text
        page = ui.get("/pool")
        assert page.status_code == 200 and "No worker has joined" in page.text
        assert not store.has_tables(led)


def test_leaderboard_credits_at_most_max_parallel_times_the_time_since_the_invite(tmp_path) -> None:
    from nightlab.ledger import Ledger
    from nightlab.pool import board, store

    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as led:
        store.invite(led, "main", "mallory")
        store.invite(led, "main", "honest")
        common: dict = dict(pool="main", parent="a" * 40, metric=1.0, samples=[], log_tail="", seed=0,
                            hardware="", researcher="")
        store.add_claim(led, worker="mallory", claim_id="1" * 32, diff="d1", compute_s=1e9, experiments=10**6,
                        status="credited", **common)
        store.add_claim(led, worker="honest", claim_id="2" * 32, diff="d2", compute_s=0.0, experiments=1,
                        status="checked", **common)
        w = store.get_worker(led, "main", "mallory")
        c = store.get_claim(led, "main", "mallory", "1" * 32)
        assert w is not None and c is not None
        data = board.leaderboard(led, "main", PoolSpec())
        row = next(r for r in data["workers"] if r["worker"] == "mallory")
        assert row["claimed_compute_s"] == 1e9
        assert row["compute_s"] == pytest.approx(8.0 * (c.received_at - w.created_at), abs=1e-3)
        assert row["compute_s"] < 60
        assert data["totals"]["worker_compute_s"] == row["compute_s"]


@pytest.mark.slow
def test_with_two_slots_a_claim_is_decided_without_waiting_for_the_next(pool_lab) -> None:
    import threading

    from nightlab.pool import store
    from nightlab.pool.serve import open_pool

    engine, host, _ = open_pool(pool_lab, poll_s=0.05, slots=2)
    led = host.ledger
    token = store.invite(led, "main", "alice")
    c = _client(host)
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("s", engine.run()), daemon=True)
    t.start()
    try:
        base = host.head()
        assert base is not None
        a = claim_body(base, xy_diff("3.0", "0.0", "2.0", "0.0"), score(2.0, 0.0))
        assert c.post("/api/pool/claims", json=a, headers=_auth(token)).json()["status"] == "queued"
        # one claim only: a free slot must not keep the loop in propose() while its result waits
        assert _wait_decided(led, "alice", a["claim_id"], timeout=60).status == "accepted"
    finally:
        engine.stop.graceful = "test done"
        host.wake.set()
        t.join(timeout=60)
        engine.close()
        led.close()
    assert not t.is_alive()


def test_a_keep_is_judged_as_the_record_of_its_whole_session_on_that_head(pool_lab) -> None:
    # a greedy keep is the best of every run of the worker's session on that pool head, not only of the runs since
    # its previous claim: the tolerance counts the worker's claimed experiments on the same parent (bench/pool.py:
    # honest greedy workers quarantined 17/60 -> 0/60); claims on another head do not widen it
    import time

    from nightlab.ledger import Ledger
    from nightlab.pool import store
    from nightlab.pool.host import PoolHost

    with Ledger.for_lab(pool_lab, None) as led:
        host = PoolHost(pool_lab, led)
        host.noise_sd = lambda: 1.0  # type: ignore[method-assign]
        store.invite(led, "main", "ann")
        with led.transaction(write=True) as conn:  # invited an hour ago: the clock since then bounds the counts
            conn.execute(store.workers.update().where(store.workers.c.name == "ann")
                         .values(created_at=time.time() - 3600))

        def add(cid: str, parent: str, experiments: int, metric: float) -> store.Claim:
            return store.add_claim(led, pool="main", worker="ann", claim_id=cid, parent=parent, diff=cid, metric=metric,
                                   samples=[metric], log_tail="", seed=0, hardware="", compute_s=0.0,
                                   experiments=experiments, researcher="search", status="queued")[0]

        # 4.5 sd better than the host's re-run, one experiment behind it: beyond 3 sd, a strike
        lone = add("c1", "a" * 40, 1, 5.5)
        assert "metric contradicted" in host.refutation(lone, 10.0, 0.001)
        # the same claim from a session that had run 99 experiments on that head before: within 3 + sqrt(2 ln 100)
        add("c2", "b" * 40, 99, 9.0)
        late = add("c3", "b" * 40, 1, 5.5)
        assert host.refutation(late, 10.0, 0.001) == ""
        # experiments on another head are another session
        other = add("c4", "c" * 40, 1, 5.5)
        assert "metric contradicted" in host.refutation(other, 10.0, 0.001)
