"""Attacks on the research pool (issue 14) in both directions, each one a test: hostile workers' claims against
the host (real git, the pool API in-process over Starlette's client), token handling, and a hostile host's
bundle and spec against a volunteer worker (real git, a real bundle over loopback HTTP, a real sandboxed session).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import dashboard_client

from conftest import SPEC, cli_env, commit_all, git

POOL = "\n[pool]\nmax_strikes = 100\nmax_pending = 100\n"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _body(parent: str, diff: str, metric: float = 0.1) -> dict:
    cid = hashlib.sha256(f"{parent}|{diff}|{metric}".encode()).hexdigest()[:32]
    return {"claim_id": cid, "parent": parent, "diff": diff, "metric": metric, "samples": [metric],
            "log_tail": "", "seed": 1, "hardware": "cpu", "compute_s": 1.0, "experiments": 1, "researcher": "x"}


def _worker_diff(lab: Path, tmp: Path, change: Callable[[Path], object], *args: str) -> str:
    """What a hostile worker's own git prints for ``change`` made in a clone of the lab (binary, full index)."""
    clone = tmp / f"w-{hashlib.sha256(repr(change.__code__.co_code).encode() + repr(args).encode()).hexdigest()[:8]}"
    if clone.exists():
        shutil.rmtree(clone)
    git(tmp, "clone", "-q", str(lab), str(clone))
    if change(clone) != "staged":
        git(clone, "add", "-A")
    return git(clone, "diff", "--cached", "--binary", "--full-index", *args, "HEAD")


@pytest.fixture
def pool(make_lab) -> Iterator[tuple]:

    from nightlab.pool.serve import open_pool
    from nightlab.web.app import create_app

    lab = make_lab(spec=SPEC + POOL)
    engine, host, _ = open_pool(lab, sandbox_mode="none")
    try:
        yield lab, host, dashboard_client(create_app(host.ledger, host.lab_dir, pool=host), base_url="http://127.0.0.1")
    finally:
        engine.close()
        host.ledger.close()


def _symlink_target(to: str) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        (repo / "target.py").unlink()
        (repo / "target.py").symlink_to(to)
    return change


def _chmod_x(name: str) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        (repo / name).chmod(0o755)
    return change


def _binary(name: str) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        (repo / name).write_bytes(b"\0\1\2binary\xff" * 50)
    return change


def _rename(src: str, dst: str) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        (repo / src).rename(repo / dst)
    return change


def _delete(name: str) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        (repo / name).unlink()
    return change


def _write(name: str, text: str) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    return change


def _gitlink(repo: Path) -> str:
    sha = git(repo, "rev-parse", "HEAD").strip()
    (repo / "target.py").unlink()
    git(repo, "rm", "-q", "--cached", "target.py")
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{sha},target.py")
    return "staged"


TARGET_HUNK = ("@@ -1,4 +1,4 @@\n import os, sys\n-X = 3.0\n+X = 1.0\n Y = 0.0\n"
               " score = (X - 1) ** 2 + (Y - 2) ** 2 + 0.5\n")


def _hand(path_a: str, path_b: str, body: str = TARGET_HUNK) -> str:
    return f"diff --git a/{path_a} b/{path_b}\n--- a/{path_a}\n+++ b/{path_b}\n{body}"


# (name, how the diff is made, what must happen: "rejected" (+ strike) or a 422)
GIT_MADE = [
    ("symlink to /etc/passwd on an editable file", _symlink_target("/etc/passwd"), (), "rejected"),
    ("symlink to the protected evaluator", _symlink_target("evaluate.py"), (), "rejected"),
    ("symlink leaving the lab", _symlink_target("../../../../root/.ssh/id_rsa"), (), "rejected"),
    ("protected file made executable", _chmod_x("evaluate.py"), (), "rejected"),
    ("binary patch of the protected file", _binary("evaluate.py"), (), "rejected"),
    ("rename of the protected file", _rename("evaluate.py", "target.py"), ("-M",), "rejected"),
    ("copy of a new file from the protected one", _write("target2.py", "print('protected')\n"),
     ("-C", "--find-copies-harder"), "rejected"),
    ("deletion of the protected file", _delete("evaluate.py"), (), "rejected"),
    ("nightlab.toml edit", _write("nightlab.toml", SPEC.replace('"target.py"', '"*"')), (), "rejected"),
    ("program.md edit", _write("program.md", "# mine\n"), (), "rejected"),
    (".gitattributes with a filter", _write(".gitattributes", "*.py filter=evil eol=crlf\n"), (), "rejected"),
    ("submodule (gitlink) in place of an editable file", _gitlink, (), "rejected"),
]

HAND_MADE = [
    ("'..' path", _hand("../outside.py", "../outside.py"), "rejected"),
    ("absolute path", "--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-root\n+evil\n", "rejected"),
    (".git/ path", "diff --git a/.git/hooks/post-checkout b/.git/hooks/post-checkout\nnew file mode 100755\n"
                   "--- /dev/null\n+++ b/.git/hooks/post-checkout\n@@ -0,0 +1 @@\n+touch /tmp/pwned\n", "rejected"),
    (".nightlab/ path", "diff --git a/.nightlab/x b/.nightlab/x\nnew file mode 100644\n--- /dev/null\n"
                        "+++ b/.nightlab/x\n@@ -0,0 +1 @@\n+x\n", "rejected"),
    ("header names target.py, ---/+++ the evaluator", "diff --git a/target.py b/target.py\n"
     "--- a/evaluate.py\n+++ b/evaluate.py\n@@ -1 +1 @@\n-print('protected')\n+print('mine')\n", "rejected"),
    ("mode header turning target.py into a symlink", "diff --git a/target.py b/target.py\nold mode 100644\n"
     "new mode 120000\n", "rejected-or-422"),
    ("mode header turning target.py into a submodule", "diff --git a/target.py b/target.py\nold mode 100644\n"
     "new mode 160000\n", "rejected-or-422"),
    ("copy header: evaluator copied onto target.py", "diff --git a/evaluate.py b/target.py\nsimilarity index 100%\n"
     "copy from evaluate.py\ncopy to target.py\n", "rejected-or-422"),
    ("huge hunk header", "diff --git a/target.py b/target.py\n--- a/target.py\n+++ b/target.py\n"
     "@@ -1,99999999999999999999 +1,99999999999999999999 @@\n import os, sys\n", "422"),
    ("a diff that changes nothing", "diff --git a/target.py b/target.py\n", "422"),
    ("a plain (non-git) diff whose new name is the evaluator", "--- target.py\n+++ evaluate.py\n"
     "@@ -1 +1 @@\n-import os, sys\n+import os, sys  # mine\n", "rejected"),
]


def test_hostile_claims_are_refused_and_never_advance_the_pool_branch(pool, tmp_path) -> None:
    """Every hostile diff is refused at intake (422, or ``rejected``; the rules a worker breaks on purpose
    add a strike) -- before any host run -- judged on what ``git apply`` (the command the verification runs)
    would change, not on what the diff's text says."""
    from nightlab.pool import store

    lab, host, c = pool
    head = host.head()
    token = store.invite(host.ledger, "main", "mallory")
    cases = [(n, _worker_diff(lab, tmp_path, f, *a), want) for n, f, a, want in GIT_MADE] + HAND_MADE
    accepted = []
    for name, diff, want in cases:
        assert diff.strip(), name
        r = c.post("/api/pool/claims", json=_body(head, diff), headers=_auth(token))
        status = r.json().get("status") if r.status_code == 202 else str(r.status_code)
        ok = {"rejected": status == "rejected", "422": status == "422",
              "rejected-or-422": status in ("rejected", "422")}[want]
        if not ok:
            accepted.append(name)
    assert not accepted, accepted
    assert host.head() == head
    assert all(cl.status == "rejected" for cl in store.list_claims(host.ledger, "main"))
    strikes = store.get_worker(host.ledger, "main", "mallory").record.strikes  # type: ignore[union-attr]
    assert strikes >= len(GIT_MADE)  # path, protected, editable and file_type rules are strikes
    # a refused diff leaves no object in the lab's repository (intake applies it in a private object folder)
    evil = b"\0\1\2binary\xff" * 50
    sha = subprocess.run(["git", "hash-object", "--stdin"], input=evil, capture_output=True, check=True,
                         cwd=lab).stdout.decode().strip()
    assert subprocess.run(["git", "cat-file", "-e", sha], cwd=lab).returncode != 0
    # and an honest claim still goes through the same intake
    honest = _hand("target.py", "target.py")
    r = c.post("/api/pool/claims", json=_body(head, honest), headers=_auth(store.invite(host.ledger, "main", "h")))
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text


def test_a_claims_parent_must_be_a_pool_commit_not_its_tree_blob_or_a_tag(pool) -> None:
    from nightlab.pool import store

    lab, host, c = pool
    head = host.head()
    token = store.invite(host.ledger, "main", "mallory")
    diff = _hand("target.py", "target.py")
    git(lab, "tag", "-a", "-m", "release", "v1", head)
    tag = git(lab, "rev-parse", "v1").strip()
    tree = git(lab, "rev-parse", f"{head}^{{tree}}").strip()
    blob = git(lab, "rev-parse", f"{head}:target.py").strip()
    assert len({tag, tree, blob, head}) == 4
    for bad in (tag, tree, blob, "0" * 40, "f" * 64):
        r = c.post("/api/pool/claims", json=_body(bad, diff), headers=_auth(token))
        assert r.status_code == 422 and "not a commit of the pool branch" in r.json()["detail"], (bad, r.text)
    assert store.list_claims(host.ledger, "main") == []
    assert c.post("/api/pool/claims", json=_body(head, diff), headers=_auth(token)).status_code == 202


def test_nul_bytes_and_oversized_hunks_are_refused(pool) -> None:
    from nightlab.pool import store

    _, host, c = pool
    head = host.head()
    token = store.invite(host.ledger, "main", "mallory")
    for diff in (_hand("target.py", "target.py").replace("X = 1.0", "X = 1.0\0"),
                 _hand("target.py", "target.py") + "+" + "x" * 70_000 + "\n"):
        r = c.post("/api/pool/claims", json=_body(head, diff), headers=_auth(token))
        assert r.status_code in (413, 422), r.text
    assert store.list_claims(host.ledger, "main") == []


def test_tokens_stay_secret_and_claims_stay_private(pool) -> None:
    """A token is never echoed in an error, never written to the audit log or the ledger (only its hash);
    one worker cannot read another's claim nor act in its name."""
    import sqlalchemy as sa

    from nightlab.pool import store

    lab, host, c = pool
    head = host.head()
    alice, bob = store.invite(host.ledger, "main", "alice"), store.invite(host.ledger, "main", "bob")
    bad = alice[:-4] + "zzzz"
    for r in (c.get("/api/pool/info", headers=_auth(bad)), c.post("/api/pool/claims", json=_body(head, "x"),
                                                                  headers=_auth(bad))):
        assert r.status_code == 401 and bad not in r.text and alice not in r.text
    body = _body(head, _hand("target.py", "target.py"))
    assert c.post("/api/pool/claims", json=body, headers=_auth(alice)).status_code == 202
    assert c.get(f"/api/pool/claims/{body['claim_id']}", headers=_auth(bob)).status_code == 404
    # bob resending alice's claim id (with her diff) makes a claim of bob's, never changes alice's
    r = c.post("/api/pool/claims", json={**body, "metric": 0.0001}, headers=_auth(bob))
    assert r.status_code == 202 and r.json()["status"] == "duplicate"
    assert store.get_claim(host.ledger, "main", "alice", body["claim_id"]).metric == body["metric"]  # type: ignore
    # a claim body cannot name its worker: the token does
    r = c.post("/api/pool/claims", json={**body, "worker": "alice"}, headers=_auth(bob))
    assert r.status_code == 422
    # the token is nowhere on disk: audit log, ledger (hash only), state folder
    state = lab / ".nightlab"
    for p in state.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert alice.encode() not in data and bob.encode() not in data, p
    with host.ledger.transaction() as conn:
        hashes = {r.token_sha256 for r in conn.execute(sa.select(store.workers)).all()}
    assert store.hash_token(alice) in hashes


# --------------------------------------------------------------------------- a hostile host against a worker


class _BundleServer:
    """A hostile pool host: answers ``GET /api/pool/bundle`` with a crafted bundle over loopback HTTP."""

    def __init__(self, bundle: bytes, head: str) -> None:
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("X-Nightlab-Pool-Head", outer.head)
                self.send_header("Content-Length", str(len(outer.bundle)))
                self.end_headers()
                self.wfile.write(outer.bundle)

            def log_message(self, *a: object) -> None:
                pass

        self.bundle, self.head = bundle, head
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _hostile_bundle(tmp: Path, name: str, build: Callable[[Path], object]) -> tuple[bytes, str]:
    repo = tmp / f"host-{name}"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "pool")
    (repo / "nightlab.toml").write_text(SPEC)
    (repo / "target.py").write_text("print('score: 1')\n")
    if build(repo) == "staged":
        git(repo, "commit", "-q", "-m", "lab")
        head = git(repo, "rev-parse", "HEAD").strip()
    else:
        head = commit_all(repo)
    git(repo, "bundle", "create", "-q", str(tmp / f"{name}.bundle"), "pool")
    return (tmp / f"{name}.bundle").read_bytes(), head


def _fetch(tmp: Path, name: str, build: Callable[[Path], object], max_bytes: int = 2**20,
           then: Callable[[], object] | None = None):
    from nightlab.pool.client import PoolClient
    from nightlab.pool.worker import fetch_lab

    data, head = _hostile_bundle(tmp, name, build)
    if then is not None:  # the worker's side from here on
        then()
    srv = _BundleServer(data, head)
    root = tmp / f"worker-{name}"
    root.mkdir()
    try:
        client = PoolClient(srv.url, "nlp_token")
        try:
            return fetch_lab(client, root, head, max_bytes)
        finally:
            client.close()
    finally:
        srv.close()


def _link(name: str, target: str) -> Callable[[Path], None]:
    def build(repo: Path) -> None:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, repo / name)
    return build


def test_a_hostile_bundle_is_refused_by_the_worker(tmp_path) -> None:
    """Symlinks out of the lab copy (chains too), a ``.nightlab`` of the host's making, a submodule, a bundle
    or a checked-out lab over the size cap: the worker refuses the lab and keeps nothing of it."""
    from nightlab.pool.worker import HostileBundle

    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY\n")

    def chain(repo: Path) -> None:
        (repo / "sub").mkdir()
        (repo / "sub" / "f").write_text("x")
        os.symlink(".", repo / "s")
        os.symlink("s/sub/../..", repo / "t")  # lexically inside, on disk outside

    def state(repo: Path) -> None:
        (repo / ".nightlab").mkdir()
        (repo / ".nightlab" / "STOP").write_text("x")

    def submodule(repo: Path) -> str:
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "a")
        sha = git(repo, "rev-parse", "HEAD").strip()
        git(repo, "update-index", "--add", "--cacheinfo", f"160000,{sha},vendored")
        return "staged"

    def big(repo: Path) -> None:
        (repo / "data.bin").write_bytes(b"\0" * (3 * 2**20))  # compresses to almost nothing in the bundle

    attacks = {
        "abs-link": (_link("data/key", str(secret)), "leaves the lab"),
        "etc-link": (_link("passwd", "/etc/passwd"), "leaves the lab"),
        "up-link": (_link("deep/up", "../../../../../.."), "leaves the lab"),
        "chain": (chain, "leaves the lab"),
        "state": (state, ".nightlab"),
        "submodule": (submodule, "submodule"),
        "big-tree": (big, "MiB of files"),
    }
    for name, (build, why) in attacks.items():
        with pytest.raises(HostileBundle, match=why):
            _fetch(tmp_path, name, build)
        assert not list((tmp_path / f"worker-{name}").glob("lab-*")), name  # nothing kept
    from nightlab.errors import NightlabError

    with pytest.raises(NightlabError, match="bundle is over"):  # the download itself is capped
        _fetch(tmp_path, "big-bundle", _write("noise.bin", os.urandom(300_000).hex()), max_bytes=100_000)
    # a symlink inside the lab is fine
    copy = _fetch(tmp_path, "inner-link", _link("alias.py", "target.py"))
    assert (copy.repo / "alias.py").is_symlink() and (copy.repo / "alias.py").read_text() == "print('score: 1')\n"


def test_the_workers_spec_requires_a_sandbox_unless_the_worker_says_otherwise(tmp_path) -> None:
    import tomllib

    from nightlab.pool.worker import worker_spec
    from nightlab.spec import parse_spec

    for mode in ("none", "auto", "required"):
        spec = parse_spec(tmp_path / "nightlab.toml", tomllib.loads(SPEC + f'\n[sandbox]\nmode = "{mode}"\n'))
        assert worker_spec(spec, researcher=None, seed=1, sandbox=None).sandbox.mode == "required"
        assert worker_spec(spec, researcher=None, seed=1, sandbox="auto").sandbox.mode == "auto"  # the worker's


SETUP_LAB = SPEC.replace('budget_s = 5', 'budget_s = 5\nsetup = "sh setup.sh"') + """
[researcher.space]
X = { range = [0.0, 4.0] }
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
@pytest.mark.parametrize("network", ["offline", "network"])
def test_the_hosts_setup_command_runs_in_the_workers_sandbox(make_lab, tmp_path, network) -> None:
    """``[run] setup`` comes from the host: on the worker it runs sandboxed -- no file outside the lab, no
    network (the host's loopback included) unless the worker passes ``--setup-network``, the lab folder
    read-only (a symlink planted there would reach the next runs through ``[sandbox] readonly``) -- yet it can
    prepare ``$NIGHTLAB_DATA_DIR``."""
    import socket

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("WORKER-SECRET\n")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    port = srv.getsockname()[1]
    setup = (f"cat {outside}/secret.txt > \"$NIGHTLAB_DATA_DIR/leaked\" 2>/dev/null\n"
             f"echo pwned > {outside}/pwned 2>/dev/null\n"
             "echo pwned > $HOME/.pwned 2>/dev/null\n"
             "rm -rf data 2>/dev/null; ln -s / data 2>/dev/null\n"
             "echo mine > target.py 2>/dev/null\n"
             "echo ok > \"$NIGHTLAB_DATA_DIR/prepared\"\n"
             f"python -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\" "
             "2>/dev/null && echo online > \"$NIGHTLAB_DATA_DIR/net\"\n"
             "true\n")
    lab = make_lab(spec=SETUP_LAB.replace("[researcher]", '[sandbox]\nreadonly = ["data"]\n\n[researcher]'),
                   files={"setup.sh": setup, "data/x.txt": "x\n"})
    home = tmp_path / "home"
    home.mkdir()
    env = {**cli_env(), "HOME": str(home)}
    try:
        p = subprocess.run([sys.executable, "-m", "nightlab.pool.worker", "session", str(lab), "1", "0", "-", "3",
                            "-", network], cwd=lab, env=env, capture_output=True, text=True, timeout=120)
    finally:
        srv.close()
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = lab / ".nightlab" / "data"
    assert (data / "prepared").read_text() == "ok\n"
    assert "WORKER-SECRET" not in (data / "leaked").read_text()
    assert not (outside / "pwned").exists() and not (home / ".pwned").exists()
    assert not (lab / "data").is_symlink() and (lab / "data" / "x.txt").is_file()
    assert "mine" not in (lab / "target.py").read_text()
    assert (data / "net").exists() == (network == "network")


def test_the_bundles_gitattributes_start_no_filter_of_the_workers_git(tmp_path, monkeypatch) -> None:
    """A worker's own git config may define filters (git-lfs does): a host's ``.gitattributes`` naming them
    must not run them on checkout, nor later in the session's worktrees."""
    marker = tmp_path / "filter-ran"
    cfg = tmp_path / "gitconfig"
    cfg.write_text(f'[filter "evil"]\n\tsmudge = "touch {marker}; cat"\n\tclean = "touch {marker}; cat"\n'
                   f'\trequired = true\n[diff "evil"]\n\ttextconv = "touch {marker}; cat"\n')
    copy = _fetch(tmp_path, "filters", _write(".gitattributes", "* filter=evil diff=evil\n"),
                  then=lambda: monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg)))
    assert not marker.exists()
    (copy.repo / "target.py").write_text("print('score: 2')\n")
    git(copy.repo, "add", "-A")
    git(copy.repo, "diff", "--cached")
    wt = tmp_path / "wt"
    git(copy.repo, "worktree", "add", "-q", "--detach", str(wt))
    assert (wt / "target.py").read_text() == "print('score: 1')\n"
    assert not marker.exists()


@contextlib.contextmanager
def _hostile_host(answer: Callable[[str], tuple[int, dict[str, str], bytes]]) -> Iterator[str]:
    """A real HTTP server on loopback answering every GET with ``answer(path)`` (status, headers, body);
    yields its base URL."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, headers, data = answer(self.path)
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_hosts_text_reaches_the_workers_terminal_escaped_and_its_head_names_no_path(tmp_path) -> None:
    """The pool's name, metric name, head and error reasons come from the host: no terminal escape sequence
    (OSC 52 writes the clipboard, others retitle or clear) gets through, and a head that is not a commit id
    never becomes part of a path on the worker's disk."""
    import json

    from nightlab.errors import NightlabError
    from nightlab.pool.worker import join

    evil = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\r"
    info = {"pool": evil, "lab": evil, "worker": "w", "metric": {"name": evil, "direction": evil},
            "head": "../../../../escaped-lab", "limits": {}}

    def answer(path: str) -> tuple[int, dict[str, str], bytes]:
        code, body = (200, info) if path.endswith("/info") else (403, {"detail": evil + "no bundle"})
        return code, {"Content-Type": "application/json"}, json.dumps(body).encode()

    said: list[str] = []
    root = tmp_path / "a" / "b" / "c" / "d" / "worker"
    with _hostile_host(answer) as url, pytest.raises(NightlabError) as err:
        join(url, "nlp_t", dir=root, rounds=1, say=said.append)
    assert said and not any(ch in m for m in said for ch in "\x1b\x07\r")
    assert "\x1b" not in str(err.value) and "no bundle" in str(err.value)
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))


def test_git_files_are_refused_even_where_everything_is_editable(make_lab) -> None:
    """With ``[files] editable = [".*"]`` a claim could otherwise add a ``.gitattributes`` naming a filter of the
    host's git config (git-lfs, with a ``.lfsconfig`` pointing at the worker's server) or a ``.gitmodules``."""

    from nightlab.pool import store
    from nightlab.pool.serve import open_pool
    from nightlab.web.app import create_app

    lab = make_lab(spec=SPEC.replace('editable = ["target.py"]', 'editable = ["target.py", ".*", "**/.*"]') + POOL,
                   files={".keep": "x\n", "sub/.keep": "x\n"})
    engine, host, _ = open_pool(lab, sandbox_mode="none")
    try:
        c = dashboard_client(create_app(host.ledger, host.lab_dir, pool=host), base_url="http://127.0.0.1")
        head = host.head()
        token = store.invite(host.ledger, "main", "mallory")
        for name, text in ((".gitattributes", "* filter=lfs\n"), (".lfsconfig", "[lfs]\n\turl = http://evil/\n"),
                           ("sub/.gitattributes", "* diff=x\n"), (".gitmodules", "[submodule \"x\"]\n")):
            diff = (f"diff --git a/{name} b/{name}\nnew file mode 100644\n--- /dev/null\n+++ b/{name}\n"
                    f"@@ -0,0 +1,{text.count(chr(10))} @@\n" + "".join(f"+{ln}\n" for ln in text.splitlines()))
            r = c.post("/api/pool/claims", json=_body(head, diff), headers=_auth(token))
            assert r.status_code == 202 and r.json()["status"] == "rejected", (name, r.text)
            assert "git's own files" in r.json()["reason"]
        ok = _hand("target.py", "target.py")
        assert c.post("/api/pool/claims", json=_body(head, ok), headers=_auth(token)).json()["status"] == "queued"
    finally:
        engine.close()
        host.ledger.close()


def test_an_oversized_api_answer_is_refused_by_the_worker(tmp_path) -> None:
    """A host answering ``/info`` with a flood (here 6 MiB of gzip-compressed JSON, a few KiB on the wire)
    cannot fill the worker's memory: the client stops reading at 4 MiB, unpacked."""
    import gzip

    from nightlab.errors import NightlabError
    from nightlab.pool.client import PoolClient

    flood = gzip.compress(b'{"pool": "' + b"x" * (6 * 2**20) + b'"}')
    small = gzip.compress(b'{"pool": "main"}')

    def answer(path: str) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, \
            flood if path.endswith("/info") else small

    with _hostile_host(answer) as url:
        client = PoolClient(url, "nlp_t")
        try:
            assert len(flood) < 64 * 1024
            with pytest.raises(NightlabError, match="over 4 MiB"):
                client.info()
            assert client.me() == {"pool": "main"}  # a normal answer still reads (decoded)
        finally:
            client.close()
