"""A run's environment is an allowlist, and what it leaves out is redacted wherever text is stored.

Issue 11, item 5: ``DATABASE_URL`` (with its password), ``GH_PAT`` and ``NIGHTLAB_DB`` reached the
run and were stored in the ledger's log tail. Real engine, real git, real SQLite, real bwrap where
installed, the LLM researcher against the loopback fake server (so a prompt is stored).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.conftest import SPEC, TARGET_PY

from nightlab import runenv
from nightlab.engine import Engine
from nightlab.errors import SpecError, UsageError
from nightlab.fakellm import FakeLLMServer, Turn
from nightlab.redaction import env_secrets, redact
from nightlab.spec import load_spec
from nightlab.types import Status

HAVE_BWRAP = shutil.which("bwrap") is not None
MODES = ["none", pytest.param("required", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed"))]
KEY = "sk-fake-run-env-key-0123456789"
GOOD = ("Move X to its optimum.\n\n"
        "target.py\n```python\n<<<<<<< SEARCH\nX = 3.0\n=======\nX = 1.0\n>>>>>>> REPLACE\n```\n")

DATABASE_URL = "postgresql://lab:pg-Pa55word-7781@db.internal:5432/lab"
GH_PAT = "ghp_R3alLooking0Pat0Value0123456789abcd"
SERVICE_URL = "https://svc:svc-pw-44711@internal.example/api"  # a left-out variable the run finds in a file

# Prints its whole environment, writes it to a file, then prints a file that holds a secret value.
DUMP = '''\
import json, os
for k, v in sorted(os.environ.items()):
    print(f"ENV {k}={v}")
with open("env.json", "w") as f:
    json.dump(dict(os.environ), f)
print(open("env.json").read())
print("LEAK", open("leak.txt").read().strip())
'''


def _spec(srv: FakeLLMServer) -> str:
    spec = SPEC.replace('[researcher]\nkind = "scripted"\n', "")
    spec = spec.replace('kill_grace_s = 0.5\n', 'kill_grace_s = 0.5\npass_env = ["MYLAB_*"]\n'
                        'env = { FROM_SPEC = "spec-value" }\n')
    return spec + f'''
[researcher]
kind = "llm"
provider = "openai"
model = "fake-model"
base_url = "{srv.base_url}"
api_key_env = "NIGHTLAB_TEST_KEY"
max_retries = 0
timeout_s = 10
'''


@pytest.mark.parametrize("mode", MODES)
def test_left_out_variables_never_reach_the_run_nor_what_is_stored(make_lab, monkeypatch, tmp_path, mode):
    nightlab_db = f"sqlite:///{tmp_path}/ledger-nl-db-9931.db"
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("GH_PAT", GH_PAT)
    monkeypatch.setenv("NIGHTLAB_DB", nightlab_db)  # the harness's own ledger URL: not the run's business
    monkeypatch.setenv("SERVICE_URL", SERVICE_URL)
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-secret-under-an-allowed-prefix")
    monkeypatch.setenv("MYLAB_VISIBLE", "passed-by-pass-env")
    monkeypatch.setenv("NIGHTLAB_TEST_KEY", KEY)
    secrets = [DATABASE_URL, GH_PAT, nightlab_db, SERVICE_URL, "nvapi-secret-under-an-allowed-prefix", KEY]
    program = "# test\nconnection strings: " + " ".join(secrets[:4]) + "\n"
    with FakeLLMServer("openai", [Turn(text=GOOD)]) as srv:
        lab = make_lab(files={"target.py": DUMP + TARGET_PY, "leak.txt": SERVICE_URL + "\n", "program.md": program},
                       spec=_spec(srv))
        eng = Engine(lab, tag="t", sandbox_mode=mode, max_experiments=1)
        session = eng.run()
    assert eng.ledger.url == nightlab_db  # the harness used it
    exps = eng.ledger.experiments(session.id)
    assert [e.status for e in exps] == [Status.KEEP, Status.KEEP], [(e.status, e.reason) for e in exps]
    for e in exps:
        run_log = (lab / ".nightlab" / "artifacts" / "t" / str(e.idx) / "run.log").read_text()
        got = dict(line[4:].split("=", 1) for line in run_log.splitlines() if line.startswith("ENV "))
        # 1. none reached the run: not in its environment, not in what it printed or wrote
        for s in secrets[:3] + secrets[4:]:
            assert s not in run_log, s
        for name in ("DATABASE_URL", "GH_PAT", "NIGHTLAB_DB", "SERVICE_URL", "NVIDIA_API_KEY", "NIGHTLAB_TEST_KEY",
                     "PYTHONPATH"):
            assert name not in got, name
        # what it should get, it got: allowlist, pass_env, [run] env, nightlab's own variables
        assert got["MYLAB_VISIBLE"] == "passed-by-pass-env" and got["FROM_SPEC"] == "spec-value"
        assert got["NIGHTLAB_SEED"] == "0" and got["NIGHTLAB_EXPERIMENT"] == str(e.idx) and "PATH" in got
        assert "HOME" in got
        # 2. the run found SERVICE_URL's value in a file and printed it: the stored tail is redacted
        assert SERVICE_URL in run_log
        assert "LEAK [REDACTED]" in e.log_tail
        for s in secrets:
            assert s not in e.log_tail and s not in e.reason, s
    # 3. the stored prompt (and the request sent) hold none of them; program.md had four
    folder = lab / ".nightlab" / "artifacts" / "t" / str(exps[1].idx)
    stored = "".join((folder / n).read_text() for n in ("prompt.txt", "response.txt", "llm.json"))
    sent = json.dumps(srv.requests[0]["body"])
    assert "connection strings:" in stored and "connection strings:" in sent
    # 4. the audit log holds none of them
    audit = (lab / ".nightlab" / "audit.jsonl").read_text()
    assert '"kind":"decision"' in audit
    for s in secrets:
        assert s not in stored and s not in sent and s not in audit, s
    eng.close()


def test_allowlist() -> None:
    env = {"PATH": "/usr/bin", "HOME": "/root", "LC_ALL": "C", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "4",
           "NVIDIA_API_KEY": "nvapi-x", "NIGHTLAB_DB": "postgresql://u:p@h/d", "NIGHTLAB_SEED": "9",
           "PYTHONPATH": "/src", "PYTHONHASHSEED": "0", "AWS_SECRET_ACCESS_KEY": "x", "WANDB_API_KEY": "w",
           "WANDB_MODE": "offline", "HF_HOME": "/data/hf", "SSH_AUTH_SOCK": "/run/ssh.sock", "TMPDIR": "/var/tmp"}
    assert set(runenv.filter_env(env)) == {"PATH", "HOME", "LC_ALL", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                                           "PYTHONHASHSEED"}
    passed = runenv.filter_env(env, ["WANDB_*", "HF_HOME"])
    assert {"WANDB_API_KEY", "WANDB_MODE", "HF_HOME"} <= set(passed)  # asked for by name: passed, key included
    assert "NIGHTLAB_DB" not in passed and "NIGHTLAB_SEED" not in passed  # nightlab sets its own, later


def test_redaction_rule(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin", "DATABASE_URL": DATABASE_URL, "GH_PAT": GH_PAT, "PWD": str(tmp_path),
           "HISTSIZE": "100000", "DEBIAN_FRONTEND": "noninteractive", "MY_TOKEN": "abcdef",
           "SHORT": "x1", "BOX_ID": "box-7f3a9c", "LD_PATHS": f"{tmp_path}:/usr/lib", "HOSTNAME": "gpu-node-17"}
    found = dict(env_secrets(env))
    assert found == {DATABASE_URL: "DATABASE_URL", GH_PAT: "GH_PAT", "abcdef": "MY_TOKEN", "box-7f3a9c": "BOX_ID"}
    # passed by pass_env: no longer a left-out value (a secret-looking name is redacted all the same)
    assert dict(env_secrets(env, passed=["PATH", "BOX_ID", "MY_TOKEN"])).keys() == {DATABASE_URL, GH_PAT, "abcdef"}
    text = f"cd {tmp_path} && step 100000 noninteractive {DATABASE_URL} on box-7f3a9c"
    assert redact(text, env_secrets(env)) == f"cd {tmp_path} && step 100000 noninteractive [REDACTED] on [REDACTED]"
    assert redact("x" + GH_PAT, env_secrets(env), mark=lambda n: f"<{n}>") == "x<GH_PAT>"


def test_pass_env_and_readonly_mistakes_are_clear(make_lab, tmp_path) -> None:
    lab = make_lab(spec=SPEC.replace("kill_grace_s = 0.5\n", 'kill_grace_s = 0.5\npass_env = ["BAD-NAME"]\n'))
    with pytest.raises(SpecError, match="pass_env") as e:
        load_spec(lab)
    assert "BAD-NAME" in str(e.value)
    lab = make_lab(spec=SPEC + f'\n[sandbox]\nreadonly = ["{tmp_path}/absent-data"]\n')
    eng = Engine(lab, tag="ro", sandbox_mode="none")
    with pytest.raises(UsageError, match=r"\[sandbox\] readonly") as u:
        eng.sandbox_policy(lab)
    assert "absent-data" in str(u.value) and u.value.fix
    eng.close()
