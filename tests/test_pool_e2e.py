"""The research pool end to end, on loopback, with real processes only (issue 14).

A host (`nightlab pool serve`) on the quickfit lab; three honest workers (`nightlab pool join`, the search
researcher, seeds 1-3, two rounds each) that live through a host killed and restarted in the middle; then five
cheaters, each a real process speaking HTTP with the worker's own client and a forged payload:

- mallory inflates: a diff that truly improves quickfit, with a claimed metric far beyond the noise (-1);
- copycat resubmits an honest worker's claimed diff as its own;
- trudy "improves" the metric by editing the protected prepare.py;
- flo floods claims (more than ``[pool] max_pending``: 429s);
- chuck claims a huge compute for claims that needed none (the spot check of a new worker catches it).

Asserted: nothing a cheater sent advances ``nightlab/pool-main``; honest workers' verified gains do (an accepted
claim with its provenance); the cheaters are struck and quarantined (copycat and flo earn nothing: duplicates
and 429s); the leaderboard ranks every honest worker above every cheater; the claims the honest workers made
while the host was down are queued and sent once it is back, each once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.conftest import GIT_ENV, cli_env, commit_all, git, nightlab_cmd

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HONEST = {"alice": 1, "bob": 2, "carol": 3}
CHEATERS = ("mallory", "copycat", "trudy", "flo", "chuck")
POOL_SPEC = "\n[pool]\nmax_strikes = 2\nmax_pending = 4\n"
BETTER = {"LEARNING_RATE": "0.02", "MOMENTUM": "0.9", "INIT_SCALE": "1.0", "HIDDEN": "48", "EPOCHS": "60"}

CHEAT = r'''
import json, re, subprocess, sys
from pathlib import Path
from nightlab.pool.worker import PoolClient, Unavailable, claim_id

kind, url, token, work = sys.argv[1:5]
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
client = PoolClient(url, token)
me = client.info()["worker"]
work = Path(work)
work.mkdir(parents=True, exist_ok=True)
head = client.bundle(work / "head.bundle")
repo = work / "repo"
subprocess.run(["git", "clone", "-q", "-b", "pool", str(work / "head.bundle"), str(repo)], check=True)

def diff_with(path, edit):
    p = repo / path
    orig = p.read_text()
    p.write_text(edit(orig))
    d = subprocess.run(["git", "diff"], cwd=repo, capture_output=True, text=True, check=True).stdout
    p.write_text(orig)
    return d

def consts(**kv):
    def edit(src):
        for k, v in kv.items():
            src = re.sub(rf"^{k} = [^#\n]*", f"{k} = {v}  ", src, flags=re.M)
        return src
    return diff_with("fit.py", edit)

def post(diff, metric, compute_s=2.0, experiments=2, parent=head):
    cid = claim_id(me, parent, diff)
    payload = {"claim_id": cid, "parent": parent, "diff": diff, "metric": metric, "samples": [metric],
               "log_tail": "---\nval_loss: %s\n" % metric, "seed": 0, "hardware": "a cheater's laptop",
               "compute_s": compute_s, "experiments": experiments, "researcher": "search"}
    try:
        r = client.submit(payload)
        code, body = r.status_code, r.json()
    except Unavailable as e:
        code, body = (429 if "429" in str(e) else 503), str(e)
    print(json.dumps({"claim_id": cid, "code": code, "body": body}), flush=True)
    return cid

def decided(*cids):  # the host verifies asynchronously: wait for its verdicts (strikes come with them)
    import time
    for _ in range(600):
        if all(client.claim_status(c)["status"] not in ("queued", "verifying") for c in cids):
            return
        time.sleep(0.2)
    raise SystemExit("the host did not decide " + ", ".join(cids))

if kind == "inflate":  # real improvements, lied about far beyond the noise: a val_loss (an MSE) of -1
    decided(post(consts(**extra["better"]), -1.0), post(consts(**{**extra["better"], "HIDDEN": "40"}), -1.0))
    post(consts(**{**extra["better"], "HIDDEN": "44"}), -1.0)  # quarantined by now: 403
elif kind == "copy":  # another worker's claim, as its own
    post(extra["diff"], extra["metric"], parent=extra["parent"])
elif kind == "protected":  # the evaluator's data maker "improved"
    for i in range(3):
        post(diff_with("prepare.py", lambda s, i=i: s + f"\n# tuned {i}\n"), 1e-6)
elif kind == "flood":
    for i in range(12):
        post(consts(LEARNING_RATE=f"{0.0001 + i * 1e-5:.6f}"), 5.0, compute_s=0.1, experiments=1)
elif kind == "compute":  # no claim of a new best, a million seconds for it
    decided(*[post(consts(LEARNING_RATE=lr), 5.0, compute_s=1e6, experiments=1) for lr in ("0.0002", "0.0003")])
    post(consts(LEARNING_RATE="0.0004"), 5.0, compute_s=1e6, experiments=1)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_cmd() -> list[str]:
    """`nightlab pool join` once the host's CLI has it; until then the worker module's own entry point."""
    from nightlab.cli.pool import pool

    if "join" in pool.commands:
        return nightlab_cmd("pool", "join")
    return [sys.executable, "-m", "nightlab.pool.worker", "join"]


@dataclass
class Host:
    lab: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(nightlab_cmd("pool", "serve", "--lab", str(self.lab), "--port", str(self.port)),
                                     cwd=self.lab, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, token: str, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}/api/pool{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def wait_ready(self, token: str, timeout_s: float = 60.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                r = self.get(token, "/info")
                if r.status_code == 200 and r.json().get("head"):
                    return dict(r.json())
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the host did not come up: {self.log.read_text()[-3000:]}")


def make_host_lab(root: Path) -> Path:
    lab = root / "host"
    shutil.copytree(EXAMPLES / "quickfit", lab, ignore=shutil.ignore_patterns("data", "__pycache__"))
    with open(lab / "nightlab.toml", "a") as f:
        f.write(POOL_SPEC)
    git(lab, "init", "-q", "-b", "main")
    commit_all(lab, "quickfit lab")
    return lab


def invite(lab: Path, name: str) -> str:
    p = subprocess.run(nightlab_cmd("pool", "invite", name, "--lab", str(lab)), env=cli_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    tokens = [ln.strip() for ln in p.stdout.splitlines() if re.fullmatch(r"\S{24,}", ln.strip())]
    assert len(tokens) == 1, p.stdout
    return tokens[0]


def queue_rows(d: Path) -> list[dict[str, object]]:
    db = d / "claims.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        cur = con.execute("SELECT claim_id, payload, state, status, reason, attempts FROM claims")
        return [dict(zip(("claim_id", "payload", "state", "status", "reason", "attempts"), r, strict=True))
                for r in cur]


def wait_until(cond, timeout_s: float, what: str, poll_s: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def test_claim_queue_keeps_each_claim_once_across_reopen(tmp_path: Path) -> None:
    from nightlab.pool.worker import Claim, ClaimQueue, claim_id

    cid = claim_id("alice", "a" * 40, "diff --git a/fit.py b/fit.py\n")
    assert cid == claim_id("alice", "a" * 40, "diff --git a/fit.py b/fit.py\n") and len(cid) == 32
    assert cid != claim_id("bob", "a" * 40, "diff --git a/fit.py b/fit.py\n")
    claim = Claim(cid, "a" * 40, "diff --git a/fit.py b/fit.py\n", 0.5, (0.5,), "", 1, "hw", 2.0, 2, "search")
    q = ClaimQueue(tmp_path / "claims.db")
    assert q.add(claim) and not q.add(claim)
    q.defer(cid, time.time() + 3600, "HTTP 503")
    assert q.due() == [] and q.next_due_at() is not None
    q.close()
    q = ClaimQueue(tmp_path / "claims.db")  # a worker restarted: the claim is still there, still deferred
    assert q.due(now=time.time() + 7200)[0].payload == claim.payload()
    assert q.due(now=time.time() + 7200)[0].attempts == 1
    q.settle(cid, "submitted", "queued", "")
    assert q.due(now=time.time() + 7200) == [] and q.counts() == {"submitted": 1} and q.next_due_at() is None
    q.close()


def test_old_lab_copies_are_pruned_and_nothing_else(tmp_path: Path) -> None:
    from nightlab.pool.worker import prune_copies

    for name in ("lab-aaaaaaaaaaaa", "lab-bbbbbbbbbbbb", "lab-cccccccccccc", "lab-notahead", "mine"):
        (tmp_path / name / ".nightlab").mkdir(parents=True)
    (tmp_path / "session-aaaaaaaaaaaa.log").write_text("old\n")
    (tmp_path / "claims.db").write_text("")
    keep = {(tmp_path / "lab-bbbbbbbbbbbb").resolve(), (tmp_path / "lab-cccccccccccc").resolve()}
    assert [p.name for p in prune_copies(tmp_path, keep)] == ["lab-aaaaaaaaaaaa"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claims.db", "lab-bbbbbbbbbbbb", "lab-cccccccccccc",
                                                          "lab-notahead", "mine"]


@pytest.mark.slow
def test_keeps_of_a_killed_worker_are_queued_when_it_rejoins(tmp_path: Path) -> None:
    """A worker killed after its session kept something, before it queued the claim: the next join queues it
    (once), with the pool head the copy was made from as parent and the diff against its snapshot."""
    from nightlab.pool.worker import HEAD_FILE, ClaimQueue, claim_id, queue_left_keeps

    lab = make_host_lab(tmp_path)
    git(lab, "branch", "pool")
    git(lab, "bundle", "create", str(tmp_path / "b.bundle"), "pool")
    head = "ab" * 20  # the pool commit the host would name (the snapshot is another commit)
    root = tmp_path / "w"
    copy = root / f"lab-{head[:12]}"
    root.mkdir()
    git(root, "clone", "-q", "-b", "pool", str(tmp_path / "b.bundle"), str(copy))
    (copy / ".git" / HEAD_FILE).write_text(head + "\n")
    run = subprocess.run([sys.executable, "-m", "nightlab.pool.worker", "session", str(copy), "4", "0", "search",
                          "1", "-"], cwd=copy, env={**cli_env(), **GIT_ENV}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    from nightlab.api import Lab

    keeps = [e for e in Lab(copy).experiments(tag="pool") if e.status.value == "keep" and e.idx > 0]
    assert keeps  # quickfit's baseline is weak: the search keeps something in 4 experiments
    q = ClaimQueue(root / "claims.db")
    ids = queue_left_keeps(root, q, worker="alice", seed=1, hw="hw", limits={}, say=lambda m: None)
    assert len(ids) == len(keeps) and len(q.due()) == len(keeps)
    snapshot = git(copy, "rev-parse", "pool").strip()
    for e, item in zip(keeps, q.due(), strict=True):
        diff = git(copy, "diff", "--no-color", "--no-ext-diff", "--full-index", "--binary", snapshot, str(e.commit))
        assert item.payload["parent"] == head and item.payload["diff"] == diff and diff
        assert item.claim_id == claim_id("alice", head, diff) and item.payload["metric"] == e.metric
    assert queue_left_keeps(root, q, worker="alice", seed=1, hw="hw", limits={}, say=lambda m: None) == []
    q.close()


def test_backoff_is_capped_jittered_and_honours_retry_after() -> None:
    import random

    from nightlab.pool.worker import BACKOFF_BASE_S, BACKOFF_CAP_S, backoff_s

    rng = random.Random(0)
    first = [backoff_s(0, None, rng) for _ in range(200)]
    assert all(BACKOFF_BASE_S / 2 <= d <= BACKOFF_BASE_S for d in first) and len(set(first)) > 100
    late = [backoff_s(40, None, rng) for _ in range(200)]
    assert all(BACKOFF_CAP_S / 2 <= d <= BACKOFF_CAP_S for d in late)
    assert backoff_s(0, 7.0, rng) == 7.0 and backoff_s(3, 0.0, rng) == 0.0


HOSTILE_SPEC = """
[files]
editable = ["fit.py"]
[run]
command = "python fit.py"
pass_env = ["AWS_*", "OPENAI_API_KEY"]
[metric]
name = "val_loss"
[researcher]
kind = "llm"
model = "gpt-x"
base_url = "https://pool-host.example/steal"
api_key_env = "OPENAI_API_KEY"
[sandbox]
mode = "none"
network = true
readonly = ["~/.ssh", "/etc", "../other-lab", "data"]
[executor]
kind = "ray"
address = "ray://pool-host.example:10001"
[autonomy]
level = "review"
[notify]
webhooks = ["https://pool-host.example/hook"]
"""


def test_a_pool_host_cannot_reach_the_workers_secrets_through_its_spec(tmp_path: Path) -> None:
    """The spec comes from the host: the worker's session never takes its commands, URLs, paths outside the
    lab, network, environment or Ray cluster (a run's output goes back to the host in the log tails)."""
    import tomllib

    from nightlab.pool.worker import worker_spec
    from nightlab.spec import parse_spec

    spec = parse_spec(tmp_path / "nightlab.toml", tomllib.loads(HOSTILE_SPEC))
    assert spec.researcher.model_dump()["base_url"] and spec.sandbox.network and spec.run.pass_env  # hostile
    w = worker_spec(spec, researcher=None, seed=7, sandbox=None)
    assert w.researcher.kind == "search" and w.researcher.model_dump()["seed"] == 7
    assert "base_url" not in w.researcher.model_dump() and "api_key_env" not in w.researcher.model_dump()
    assert w.sandbox.mode == "required" and not w.sandbox.network and not w.permissions.run_network
    assert w.sandbox.readonly == ["data"] and w.run.pass_env == []
    assert w.executor.kind == "local" and w.executor.address == "" and w.autonomy.level == "auto"
    assert w.notify.webhooks == []
    same = worker_spec(spec, researcher="llm", seed=1, sandbox="required")  # the host's model, not its URL or key
    opts = same.researcher.model_dump()
    assert opts["model"] == "gpt-x" and "base_url" not in opts and "api_key_env" not in opts
    assert same.sandbox.mode == "required"


@pytest.mark.slow
def test_join_refuses_a_bad_token_and_names_an_unreachable_url(tmp_path: Path, procs: list) -> None:
    lab = make_host_lab(tmp_path)
    token = invite(lab, "alice")
    host = Host(lab, free_port(), tmp_path / "host.log")
    host.start()
    procs.append(host.proc)
    host.wait_ready(token)
    bad = subprocess.run([*join_cmd(), host.url, "--token", "not-a-token", "--dir", str(tmp_path / "w")],
                         env=cli_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "error: the pool at" in bad.stderr and "refused the token" in bad.stderr
    assert "fix: ask the pool operator for a new invite" in bad.stderr and "Traceback" not in bad.stderr
    host.stop()
    url = f"http://127.0.0.1:{free_port()}"
    down = subprocess.run([*join_cmd(), url, "--token", token, "--dir", str(tmp_path / "w")], env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 2 and f"cannot reach the pool at {url}" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr


@pytest.mark.slow
def test_pool_end_to_end_honest_workers_win_cheaters_do_not(tmp_path: Path, procs: list) -> None:
    lab = make_host_lab(tmp_path)
    tokens = {name: invite(lab, name) for name in (*HONEST, *CHEATERS)}
    host = Host(lab, free_port(), tmp_path / "host.log")
    host.start()
    procs.append(host.proc)
    info = host.wait_ready(tokens["alice"])
    base_head = str(info["head"])
    env = {**cli_env(), **GIT_ENV}

    # --- three honest workers; the host dies under them and comes back
    workers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name, seed in HONEST.items():
        d = tmp_path / f"w-{name}"
        out = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - the process owns it
        p = subprocess.Popen([*join_cmd(), host.url, "--token", tokens[name], "--dir", str(d), "--researcher",
                              "search", "--seed", str(seed), "--experiments", "4", "--rounds", "2"], env=env,
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        procs.append(p)
        workers[name] = (p, d)
    def started() -> bool:
        for name, (p, _d) in workers.items():
            assert p.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
        return all(any(d.glob("lab-*/.nightlab/ledger.db")) for _, d in workers.values())

    wait_until(started, 90, "the honest workers' sessions to start")
    host.kill()
    wait_until(lambda: any(r["attempts"] >= 1 and r["state"] == "pending"  # type: ignore[operator]
                           for _, d in workers.values() for r in queue_rows(d)), 90,
               "a claim made while the host is down")
    host.start()
    procs.append(host.proc)
    host.wait_ready(tokens["alice"])
    for name, (p, _) in workers.items():
        p.wait(timeout=180)
        log = (tmp_path / f"{name}.log").read_text()
        assert p.returncode == 0, log[-4000:]
        assert re.search(rf"^rank \d+  {name}: verified gain", log, re.M), log[-3000:]

    def pending() -> int:
        rows = host.get(tokens["alice"], "/leaderboard").json()["workers"]
        return sum(int(r["pending"]) for r in rows)

    wait_until(lambda: pending() == 0, 120, "the host to verify the honest claims", poll_s=0.5)

    # every claim each honest worker queued was sent and stored once; those made while the host was down too
    queued_while_down = 0
    honest_claims: dict[str, list[dict[str, object]]] = {}
    for name, (_, d) in workers.items():
        rows = queue_rows(d)
        assert all(r["state"] == "submitted" for r in rows), rows
        queued_while_down += sum(1 for r in rows if int(r["attempts"]) >= 1)  # type: ignore[call-overload]
        honest_claims[name] = []
        for r in rows:
            got = host.get(tokens[name], f"/claims/{r['claim_id']}")
            assert got.status_code == 200, got.text
            honest_claims[name].append({**got.json(), "payload": json.loads(str(r["payload"]))})
    assert queued_while_down >= 1
    board = host.get(tokens["alice"], "/leaderboard").json()
    claims_on_host = int(board["totals"]["claims"])
    assert claims_on_host == sum(len(v) for v in honest_claims.values())  # each sent claim stored exactly once

    accepted = [c for cs in honest_claims.values() for c in cs if c["status"] == "accepted"]
    assert accepted, honest_claims
    # the host took each claim in once (its audit log records a claim when it stores it), resends included
    audited = [json.loads(ln)["data"]["claim_id"] for ln in (lab / ".nightlab" / "audit.jsonl").read_text().splitlines()
               if '"kind":"pool.claim"' in ln]
    assert sorted(audited) == sorted(str(c["claim_id"]) for cs in honest_claims.values() for c in cs)
    after_honest = git(lab, "rev-parse", "nightlab/pool-main").strip()
    assert after_honest != base_head
    for c in accepted:  # provenance: the host's experiment and commit, on the pool branch
        assert c["experiment"] is not None and c["commit"]
        git(lab, "merge-base", "--is-ancestor", str(c["commit"]), "nightlab/pool-main")
        show = subprocess.run(nightlab_cmd("show", str(c["experiment"]), "--lab", str(lab), "--tag", "pool-main"),
                              env=cli_env(), capture_output=True, text=True, timeout=60)
        assert show.returncode == 0, show.stderr
        assert str(c["worker"]) in show.stdout and str(c["claim_id"]) in show.stdout, show.stdout
    # alice comes back with the same dir: her old claims are not sent again, and she follows the new head
    again = subprocess.run([*join_cmd(), host.url, "--token", tokens["alice"], "--dir", str(workers["alice"][1]),
                            "--researcher", "search", "--seed", "11", "--experiments", "1"], env=env,
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (workers["alice"][1] / f"lab-{after_honest[:12]}").is_dir(), again.stdout
    assert f"lab at pool head {after_honest[:12]}" in again.stdout
    wait_until(lambda: pending() == 0, 120, "the host to verify alice's new claims", poll_s=0.5)
    honest_claims["alice"] = [{**host.get(tokens["alice"], f"/claims/{r['claim_id']}").json(),
                               "payload": json.loads(str(r["payload"]))} for r in queue_rows(workers["alice"][1])]
    assert int(host.get(tokens["alice"], "/leaderboard").json()["totals"]["claims"]) == \
        sum(len(v) for v in honest_claims.values())
    accepted = [c for cs in honest_claims.values() for c in cs if c["status"] == "accepted"]

    # --- the cheaters
    script = tmp_path / "cheat.py"
    script.write_text(CHEAT)
    victim = next(c for c in accepted)
    extras = {
        "mallory": ("inflate", {"better": BETTER}),
        "copycat": ("copy", {"diff": victim["payload"]["diff"], "metric": victim["payload"]["metric"],  # type: ignore[index]
                             "parent": victim["payload"]["parent"]}),  # type: ignore[index]
        "trudy": ("protected", {}),
        "flo": ("flood", {}),
        "chuck": ("compute", {}),
    }
    answers: dict[str, list[dict[str, object]]] = {}
    for name, (kind, extra) in extras.items():
        p2 = subprocess.run([sys.executable, str(script), kind, host.url, tokens[name], str(tmp_path / f"c-{name}"),
                             json.dumps(extra)], env=env, capture_output=True, text=True, timeout=120)
        assert p2.returncode == 0, p2.stdout + p2.stderr
        answers[name] = [json.loads(ln) for ln in p2.stdout.splitlines() if ln.startswith("{")]
    wait_until(lambda: pending() == 0, 120, "the host to verify the cheaters' claims", poll_s=0.5)

    def statuses(name: str) -> list[str]:
        out = []
        for a in answers[name]:
            if a["code"] in (200, 202):
                out.append(str(host.get(tokens[name], f"/claims/{a['claim_id']}").json()["status"]))
        return out

    codes = {name: [int(a["code"]) for a in answers[name]] for name in answers}  # type: ignore[call-overload]
    assert statuses("mallory")[:2] == ["contradicted", "contradicted"] and codes["mallory"][2] == 403, answers
    assert statuses("copycat") == ["duplicate"], answers
    assert statuses("trudy")[:2] == ["rejected", "rejected"] and codes["trudy"][2] == 403, answers
    assert codes["flo"].count(429) >= 1 and "accepted" not in statuses("flo"), answers
    assert statuses("chuck")[:2] == ["contradicted", "contradicted"] and codes["chuck"][2] == 403, answers

    # nothing a cheater sent is on the pool branch
    from nightlab.api import Lab

    kept = [e for e in Lab(lab).experiments(tag="pool-main") if e.status.value == "keep" and e.idx > 0]
    assert kept and all(e.researcher.removeprefix("pool:") in HONEST for e in kept), \
        [(e.idx, e.researcher) for e in kept]
    branch_fit = git(lab, "show", "nightlab/pool-main:fit.py")
    assert not all(re.search(rf"^{k} = {v}\b", branch_fit, re.M) for k, v in BETTER.items())
    assert git(lab, "show", "nightlab/pool-main:prepare.py") == (lab / "prepare.py").read_text()

    # the leaderboard: strikes and quarantine for the cheaters, every honest worker above every cheater
    board = host.get(tokens["alice"], "/leaderboard").json()
    rows = {r["worker"]: r for r in board["workers"]}
    for name in ("mallory", "trudy", "chuck"):
        assert rows[name]["strikes"] >= 2 and rows[name]["quarantined"], rows[name]
    for name in ("copycat", "flo"):
        assert rows[name]["accepted"] == 0 and float(rows[name]["verified_gain_pct"]) == 0.0, rows[name]
    # every honest worker that contributed ranks above every cheater; the struck ones rank below every honest one
    contributed = [n for n in HONEST if rows[n]["accepted"] or float(rows[n]["compute_s"]) > 0]
    assert contributed and max(rows[n]["rank"] for n in contributed) < min(rows[n]["rank"] for n in CHEATERS), board
    assert max(rows[n]["rank"] for n in HONEST) < min(rows[n]["rank"] for n in ("mallory", "trudy", "chuck")), board
    assert sum(rows[n]["accepted"] for n in HONEST) == len(accepted)
    assert float(board["totals"]["verification_fraction"]) > 0.0
    host.stop()
