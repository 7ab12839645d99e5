"""``[run] setup_sandbox``: an ordinary lab's setup command in the runs' sandbox (real bwrap, a real HTTP
server on loopback, real files). Off by default: setup often downloads data."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import SPEC
from tests.test_pool_attacks import _hostile_host

from nightlab.engine import Engine
from nightlab.researchers.scripted import ScriptedResearcher

SETUP = """\
import os, pathlib, sys, urllib.request
data = pathlib.Path(os.environ["NIGHTLAB_DATA_DIR"])
def attempt(name, f):
    try:
        f()
        (data / name).write_text("yes")
    except Exception:
        pass
attempt("net", lambda: urllib.request.urlopen(sys.argv[1], timeout=3).read())
attempt("outside", lambda: pathlib.Path(sys.argv[2]).write_text("pwned"))
attempt("lab", lambda: pathlib.Path("target.py").write_text("mine"))
(data / "prepared").write_text("ok")
"""


@pytest.fixture
def server() -> Iterator[str]:
    """A real HTTP server on loopback (the pool attacks' hostile host) serving ``data``."""
    with _hostile_host(lambda path: (200, {}, b"data")) as base:
        yield f"{base}/data.bin"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
@pytest.mark.parametrize("sandboxed", [False, True])
def test_a_sandboxed_setup_reaches_no_server_and_writes_only_the_data_dir(make_lab, tmp_path: Path, server: str,
                                                                         sandboxed: bool) -> None:
    outside = tmp_path / "outside.txt"
    key = "\nsetup_sandbox = true" if sandboxed else ""
    setup = f'setup = "python setup.py {server} {outside}"{key}'
    lab = make_lab(files={"setup.py": SETUP}, spec=SPEC.replace("budget_s = 5", f"budget_s = 5\n{setup}"))
    eng = Engine(lab, tag="s", researcher=ScriptedResearcher([]), sandbox_mode="required")
    try:
        eng.run_setup()
    finally:
        eng.close()
    data = lab / ".nightlab" / "data"
    assert (data / "prepared").read_text() == "ok"  # it prepared the data either way
    # unsandboxed (the default) it reaches the loopback server and writes anywhere; sandboxed, neither
    assert (data / "net").exists() is not sandboxed
    assert outside.exists() is not sandboxed
    assert (data / "lab").exists() is not sandboxed and ("mine" in (lab / "target.py").read_text()) is not sandboxed


def test_a_session_stored_before_a_key_existed_resumes_when_the_key_is_at_its_default(tmp_path: Path) -> None:
    """A stored spec from an older nightlab lacks the keys added since (``[run] setup_sandbox``, ``[prune]
    finish_fraction``): at their defaults they are no change; set otherwise, a material one."""
    import json
    import tomllib

    from nightlab.resume import spec_changes
    from nightlab.spec import parse_spec

    now = parse_spec(tmp_path / "nightlab.toml", tomllib.loads(SPEC)).model_dump(mode="json")
    old = json.loads(json.dumps(now))
    del old["run"]["setup_sandbox"], old["prune"]["finish_fraction"]
    assert spec_changes(json.dumps(old), now) == ()
    on = parse_spec(tmp_path / "nightlab.toml", tomllib.loads(SPEC.replace("budget_s = 5", "budget_s = 5\n"
                                                                          "setup_sandbox = true")))
    changes = spec_changes(json.dumps(old), on.model_dump(mode="json"))
    assert [str(c) for c in changes] == ["[run] setup_sandbox: null -> true"] and changes[0].material
