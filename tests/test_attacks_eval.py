"""Attacks on the evaluator and the holdout check, as a hostile researcher would try them (issue 11).

Every session here is real: a git repo, bubblewrap (where installed), the protected evaluator and the
holdout command as real processes. The lab's truth is known: ``score = (x-1)^2 + (y-2)^2 + 0.5``
(``helper.offset()`` gives the 0.5) and ``holdout_score = (x-1)^2 + (y-2)^2 + 10``. A forged json
module answers ``x=1, y=2`` (score 0.5, holdout 10); the honest candidate has ``x=2, y=0`` (score
5.5, holdout 15). An attack works when the ledger ever shows the forged numbers.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.conftest import cli_env, nightlab_cmd

from nightlab.console import PlainReporter
from nightlab.engine import Engine
from nightlab.errors import SpecError
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.spec import load_spec
from nightlab.types import Candidate, Status

HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed")
MODE = "required" if HAVE_BWRAP else "none"

TARGET = '''\
import json, os
X = 3.0
Y = 0.0
json.dump({"x": X, "y": Y}, open("params.json", "w"))
print("---")
print("score: 0.001")  # a forged inline line: ignored in evaluator mode
'''
EVALUATE = '''\
import json
import helper
p = json.load(open("params.json"))
print("---")
print(f"score: {(p['x'] - 1) ** 2 + (p['y'] - 2) ** 2 + helper.offset():.6f}")
'''
HELPER = "def offset():\n    return 0.5\n"
HOLDOUT = '''\
import json, os
hold = json.load(open(os.path.join(os.environ["NIGHTLAB_HOLDOUT_DIR"], "hold.json")))
p = json.load(open("params.json"))
print("---")
print(f"holdout_score: {(p['x'] - 1) ** 2 + (p['y'] - 2) ** 2 + hold['base']:.6f}")
'''
SETUP = '''\
import json, os
json.dump({"base": 10.0}, open(os.path.join(os.environ["NIGHTLAB_HOLDOUT_DIR"], "hold.json"), "w"))
'''
# evaluate.py and holdout.py are NOT listed as protected: naming them in the commands protects them
SPEC = '''\
[files]
editable = ["target.py"]
protected = ["helper.py", "setup.py"]

[run]
setup = "python setup.py"
command = "python target.py"
budget_s = 5
timeout_s = 30
kill_grace_s = 0.5

[evaluate]
command = "python evaluate.py"
outputs = ["params.json", "out/*.json"]
max_output_mb = 1

[holdout]
command = "python holdout.py"
metric = "holdout_score"

[metric]
name = "score"
direction = "minimize"

[researcher]
kind = "scripted"
'''
FORGED_JSON = (
    "import importlib.util, sys\n"
    "def load(f, **k):\n    return {'x': 1.0, 'y': 2.0, 'base': 10.0}\n"
    "def loads(s, **k):\n    return load(None)\n"
    "def dump(o, f, **k):\n    f.write('{' + ', '.join(f'\"{a}\": {b!r}' for a, b in o.items()) + '}')\n"
)
PLANT = "def plant(path, text):\n    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)\n" \
        "    open(path, 'w').write(text)\n"

ATTACKS = {
    # the issue's attack: a package under __pycache__ and a directory symlink named like the module
    "pycache-package-via-dir-symlink":
        f"plant('__pycache__/advj/__init__.py', {FORGED_JSON!r})\nos.symlink('__pycache__/advj', 'json')\n",
    "plain-json-py": f"plant('json.py', {FORGED_JSON!r})\n",
    "pth-file": "plant('zz.pth', 'import sys; sys.modules[\"json\"] = None')\n",
    "sitecustomize": "plant('sitecustomize.py', 'import json; json.load = lambda f, **k: {\"x\": 1.0, \"y\": 2.0}')\n",
    "usercustomize": "plant('usercustomize.py', 'import json; json.load = lambda f, **k: {\"x\": 1.0, \"y\": 2.0}')\n",
    # a package beats a module of the same name in one folder: a helper/ package shadows helper.py
    "helper-package-via-dir-symlink":
        "plant('__pycache__/h/__init__.py', 'def offset():\\n    return -4.0\\n')\n"
        "os.symlink('__pycache__/h', 'helper')\n",
    "stale-bytecode": "plant('__pycache__/helper.cpython-311.pyc', 'garbage')\n"
                      "plant('__pycache__/json.cpython-311.pyc', 'garbage')\n",
}


def make(tmp_path: Path, spec: str = SPEC, **files: str) -> Path:
    lab = tmp_path / "lab"
    lab.mkdir()
    all_files = {"target.py": TARGET, "evaluate.py": EVALUATE, "helper.py": HELPER, "holdout.py": HOLDOUT,
                 "setup.py": SETUP, "program.md": "# attacks\n", "nightlab.toml": spec, **files}
    for name, text in all_files.items():
        (lab / name).parent.mkdir(parents=True, exist_ok=True)
        (lab / name).write_text(text)
    env = cli_env()
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                              "commit", "-qm", "lab"]):
        subprocess.run(["git", *args], cwd=lab, check=True, env=env)
    return lab


def target(x: float, y: float, attack: str = "") -> str:
    code = TARGET.replace("X = 3.0", f"X = {x}").replace("Y = 0.0", f"Y = {y}")
    return code.replace("import json, os\n", "import json, os\n" + PLANT) + attack


def session(lab: Path, attack: str, mode: str = MODE, **kw: object):
    eng = Engine(lab, tag="t", researcher=ScriptedResearcher(
        [{"rationale": "attack", "files": {"target.py": target(2.0, 0.0, attack)}}]),
        sandbox_mode=mode, max_experiments=1, **kw)
    s = eng.run()
    exps = eng.ledger.experiments(s.id)
    eng.close()
    return s, exps


# --------------------------------------------------------------------------- item 1: import hijacks


@pytest.mark.parametrize("name", list(ATTACKS))
def test_nothing_the_run_writes_is_imported_by_the_evaluator_or_the_holdout(tmp_path, name):
    lab = make(tmp_path)
    _s, exps = session(lab, ATTACKS[name])
    base, attack = exps
    assert base.status is Status.KEEP and base.metric == pytest.approx(8.5)
    assert base.secondary["holdout"] == pytest.approx(18.0)
    # the honest figures of x=2, y=0, never the forged ones (0.5 / 10)
    assert attack.status is Status.KEEP, attack.reason
    assert attack.metric == pytest.approx(5.5) and attack.trust == "evaluator"
    assert attack.secondary["holdout"] == pytest.approx(15.0), attack.evidence.get("holdout")
    assert attack.evidence["run_claimed"] == "0.001"


def test_the_issue_attack_fails_without_a_sandbox_too(tmp_path):
    lab = make(tmp_path)
    _s, (_base, attack) = session(lab, ATTACKS["pycache-package-via-dir-symlink"], mode="none")
    assert attack.status is Status.KEEP and attack.metric == pytest.approx(5.5)
    assert attack.secondary["holdout"] == pytest.approx(15.0)


def test_committed_editable_module_named_like_the_stdlib_is_not_on_the_evaluators_path(tmp_path):
    # editable = j*.py lets a candidate commit json.py; the evaluator's sys.path does not hold it
    lab = make(tmp_path, spec=SPEC.replace('editable = ["target.py"]', 'editable = ["target.py", "j*.py"]'),
               **{"jtools.py": "# helpers the researcher may edit\n"})
    eng = Engine(lab, tag="t", sandbox_mode=MODE, max_experiments=1, researcher=ScriptedResearcher(
        [{"rationale": "commit a json.py", "files": {"target.py": target(2.0, 0.0), "json.py": FORGED_JSON}}]))
    s = eng.run()
    attack = eng.ledger.experiments(s.id)[1]
    eng.close()
    assert attack.status is Status.KEEP, attack.reason
    assert attack.metric == pytest.approx(5.5) and attack.secondary["holdout"] == pytest.approx(15.0)


# --------------------------------------------------------------------------- outputs


OUTPUT_ATTACKS = {
    "symlink-to-protected": ("os.remove('params.json'); os.symlink('helper.py', 'params.json')", "is a symlink"),
    "symlink-to-host-file": ("os.remove('params.json'); os.symlink('/etc/passwd', 'params.json')", "is a symlink"),
    "hardlink-to-protected": ("os.remove('params.json'); os.link('helper.py', 'params.json')", "is a hard link"),
    "fifo": ("os.remove('params.json'); os.mkfifo('params.json')", "named pipe"),
    "folder-where-a-file-is-expected": ("os.remove('params.json'); os.makedirs('params.json/x')", "is a folder"),
    "huge-sparse-file": ("open('params.json', 'a').truncate(2**40)", "max_output_mb"),
    "just-over-the-cap": ("open('params.json', 'a').write(' ' * (2**20 + 1))", "max_output_mb"),
    "symlinked-output-folder": ("os.symlink('/etc', 'out')", "out is a symlink"),
    "symlinked-subfolder-file": ("os.makedirs('out'); os.symlink('../helper.py', 'out/a.json')", "is a symlink"),
    "too-many-files": ("os.makedirs('out')\nfor i in range(10001):\n    open(f'out/{i}.json', 'w').close()",
                       "more than 10000"),
    "non-utf8-name": ("os.makedirs('out'); os.symlink('/etc/passwd', b'out/\\xff.json')",
                      "out/\\xff.json is a symlink"),
}


@pytest.mark.parametrize("name", list(OUTPUT_ATTACKS))
def test_bad_outputs_make_a_crash_with_the_reason(tmp_path, name):
    code, why = OUTPUT_ATTACKS[name]
    lab = make(tmp_path)
    s, (base, attack) = session(lab, code + "\n")
    assert base.status is Status.KEEP
    assert attack.status is Status.CRASH, (attack.status, attack.reason)
    assert attack.reason.startswith("output rejected: ") and why in attack.reason, attack.reason
    assert attack.metric is None and s.incumbent_metric == pytest.approx(8.5)
    assert not list((lab / ".nightlab" / "eval").rglob("eval-*"))  # clean trees are removed


def test_outputs_land_as_read_only_regular_copies(tmp_path):
    writes = "os.makedirs('out', exist_ok=True); plant('out/a.json', '{}')\nplant('zz.txt', 'not an output')\n"
    lab = make(tmp_path, **{"target.py": target(3.0, 0.0, writes), "evaluate.py": EVALUATE.replace(
        "print(\"---\")", "import os, stat\nst = os.lstat('out/a.json')\n"
        "assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and not st.st_mode & 0o222, st\n"
        "assert not os.path.exists('zz.txt') and not os.path.exists('__pycache__')\nprint(\"---\")")})
    _s, (base, attack) = session(lab, writes)
    assert base.status is Status.KEEP, base.reason
    assert attack.status is Status.KEEP and attack.metric == pytest.approx(5.5), attack.reason


def test_outputs_under_a_recursive_glob_keep_their_subfolders(tmp_path):
    """``outputs = ["out/**"]`` copies the files in subfolders of out/ (a checkpoint folder tree); the
    subfolders themselves are not outputs ("is a folder where outputs expects a file" was raised for them).
    A folder named literally stays an error (test above), and a symlink among them is still refused."""
    spec = SPEC.replace('outputs = ["params.json", "out/*.json"]', 'outputs = ["params.json", "out/**"]')
    writes = "plant('out/a.json', '{}'); plant('out/ckpt/step1/m.json', '{}'); os.makedirs('out/empty')\n"
    check = EVALUATE.replace("print(\"---\")", "import os\nassert os.path.isfile('out/a.json') and "
                             "os.path.isfile('out/ckpt/step1/m.json')\nprint(\"---\")")
    for name, attack in (("good", writes), ("bad", writes + "os.symlink('/etc', 'out/ckpt/etc')\n")):
        (tmp_path / name).mkdir()
        lab = make(tmp_path / name, spec=spec, **{"evaluate.py": check, "target.py": target(3.0, 0.0, writes)})
        _s, (base, exp) = session(lab, attack)
        assert base.status is Status.KEEP, base.reason
        if name == "good":
            assert exp.status is Status.KEEP and exp.metric == pytest.approx(5.5), exp.reason
        else:
            assert exp.status is Status.CRASH and "out/ckpt/etc is a symlink" in exp.reason, exp.reason


def test_run_text_echoed_by_the_evaluator_cannot_restate_the_metric(tmp_path):
    """An evaluator that prints something the run wrote (a sample, a note) after its figure: the run puts
    a second ``score:`` line there. The last value counted (a warning only), so the run chose its metric;
    now two different values of a trusted figure are refused, and one printed twice alike is accepted."""
    echo = EVALUATE + "import os\nif os.path.exists('out/note.json'):\n    print(open('out/note.json').read())\n"
    lab = make(tmp_path, **{"evaluate.py": echo})
    s, (base, attack) = session(lab, "plant('out/note.json', 'sample text\\nscore: 0.000001\\n')\n")
    assert base.status is Status.KEEP and base.metric == pytest.approx(8.5), base.reason
    assert attack.status is Status.CRASH and attack.metric is None, (attack.status, attack.metric)
    assert "printed 'score' 2 times with different values" in attack.reason, attack.reason
    assert s.incumbent_metric == pytest.approx(8.5)
    for name, note, status in (("block", "---\nscore: 0.000001\n", Status.CRASH),  # a block of its own
                               ("same", "score: 5.500000\n", Status.KEEP)):
        (tmp_path / name).mkdir()
        lab = make(tmp_path / name, **{"evaluate.py": echo})
        _s, (_base, exp) = session(lab, f"plant('out/note.json', {note!r})\n")
        assert exp.status is status, (name, exp.status, exp.reason)
        assert exp.metric == (pytest.approx(5.5) if status is Status.KEEP else None), name


# --------------------------------------------------------------------------- item 2: auto-protection


def test_the_run_cannot_rewrite_an_unlisted_evaluator(tmp_path):
    lab = make(tmp_path)
    forged = "plant('evaluate.py', 'print(\"---\"); print(\"score: 0.0\")')\n"
    out = io.StringIO()
    s, (_base, attack) = session(lab, forged, reporter=PlainReporter(out))
    assert attack.status is Status.REJECTED and "evaluate.py: protected file changed" in attack.reason
    assert attack.metric is None and s.incumbent_metric == pytest.approx(8.5)
    # nightlab run says which files it protected on its own
    assert "protected automatically (named by [evaluate]/[holdout]): evaluate.py, holdout.py" in out.getvalue()


@pytest.mark.parametrize(("attack", "why"), [
    ("open('evaluate.py', 'a').truncate(2**40)", "evaluate.py: protected file changed"),  # 1 TB, sparse
    ("os.remove('helper.py'); os.mkfifo('helper.py')", "helper.py: protected file missing or replaced"),
    ("os.remove('helper.py'); os.symlink('/dev/zero', 'helper.py')", "helper.py: protected file missing or replaced"),
])
def test_replaced_protected_files_are_caught_without_reading_them(tmp_path, attack, why):
    lab = make(tmp_path)
    s, (_base, bad) = session(lab, attack + "\n")
    assert bad.status is Status.REJECTED and why in bad.reason, bad.reason
    assert s.incumbent_metric == pytest.approx(8.5)


def test_the_run_cannot_rewrite_an_unlisted_holdout_script(tmp_path):
    lab = make(tmp_path)
    forged = "plant('holdout.py', 'print(\"---\"); print(\"holdout_score: 10.0\")')\n"
    _s, (base, attack) = session(lab, forged)
    assert attack.status is Status.REJECTED and "holdout.py: protected file changed" in attack.reason
    assert base.secondary["holdout"] == pytest.approx(18.0) and "holdout" not in attack.secondary


def test_a_candidate_may_not_edit_an_unlisted_evaluator(tmp_path):
    lab = make(tmp_path)
    eng = Engine(lab, tag="t", sandbox_mode=MODE, max_experiments=1, researcher=ScriptedResearcher(
        [{"rationale": "edit", "files": {"evaluate.py": "print('---'); print('score: 0')\n"}}]))
    s = eng.run()
    attack = eng.ledger.experiments(s.id)[1]
    eng.close()
    assert attack.status is Status.REJECTED and attack.reason == "policy: protected (evaluate.py is a protected file)"


def cli_run(lab: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--plain", "--sandbox", "none"),
                          capture_output=True, text=True, env=cli_env(), timeout=120)


@pytest.mark.parametrize(("editable", "named", "key"), [
    ('["target.py", "evaluate.py"]', "evaluate.py", "[evaluate] command"),
    ('["*.py"]', "evaluate.py", "[evaluate] command"),
    ('["target.py", "holdout.py"]', "holdout.py", "[holdout] command"),
])
def test_an_editable_evaluator_is_refused_with_exit_2(tmp_path, editable, named, key):
    lab = make(tmp_path, spec=SPEC.replace('editable = ["target.py"]', f"editable = {editable}")
               .replace('protected = ["helper.py", "setup.py"]', "protected = []"))
    proc = cli_run(lab)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"'{named}'" in proc.stderr and key in proc.stderr and "[files] editable" in proc.stderr
    assert f"fix: remove '{named}' from [files] editable" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_command_files_are_found_by_shlex():
    from nightlab.spec import command_files

    root = Path(__file__).resolve().parent.parent / "examples" / "tinygpt"
    assert command_files("python evaluate.py ckpt.pt", root) == ["evaluate.py"]
    assert command_files("OMP_NUM_THREADS=1 python ./holdout.py --data=prepare.py", root) == \
        ["holdout.py", "prepare.py"]
    assert command_files("python -m evaluate", root) == ["evaluate.py"]
    assert command_files("sh -c 'cd . && python evaluate.py; python holdout.py'", root) == \
        ["evaluate.py", "holdout.py"]
    assert command_files("python 'unclosed", root) == []


# --------------------------------------------------------------------------- item 3: one glob matcher


def test_glob_semantics():
    from nightlab import globs

    cases = [("*.py", "a.py", True), ("*.py", "d/a.py", False), ("**/*.py", "a.py", True),
             ("**/*.py", "d/e/a.py", True), ("dir/**", "dir/a", True), ("dir/**", "dir/a/b", True),
             ("dir/**", "dir", False), ("dir/**", "dirx/a", False), ("**/x", "x", True), ("**/x", "a/b/x", True),
             ("**/x", "a/bx", False), ("a/**/b", "a/b", True), ("a/**/b", "a/c/d/b", True), ("data", "data/x", True),
             ("data", "database", False), ("*", ".hidden", True), ("dir/", "dir/a", True),
             ("[!a]*.txt", "b.txt", True), ("[!a]*.txt", "a.txt", False), ("**", ".git/config", False),
             ("*", ".nightlab/ledger.db", False), ("?.py", "a.py", True), ("?.py", "/.py", False)]
    for pat, path, want in cases:
        assert globs.match(path, [pat]) is want, (pat, path)


def test_expand_lists_files_under_dir_star_star_on_this_python(tmp_path):
    from nightlab import globs

    for rel in ("holdout/a.csv", "holdout/deep/b.csv", "x/holdout/c.csv", "top.csv", ".git/x", ".nightlab/y"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("1")
    (tmp_path / "link").symlink_to(tmp_path / "holdout")
    assert globs.expand(tmp_path, ["holdout/**"]) == ["holdout/a.csv", "holdout/deep/b.csv"]
    assert globs.expand(tmp_path, ["**/c.csv"]) == ["x/holdout/c.csv"]
    assert globs.expand(tmp_path, ["*.csv"]) == ["top.csv"]
    assert globs.expand(tmp_path, ["**"]) == ["holdout/a.csv", "holdout/deep/b.csv", "link", "top.csv",
                                              "x/holdout/c.csv"]
    assert globs.expand(tmp_path, ["link/**"]) == []  # never through a symlink
    assert globs.cover(tmp_path, ["holdout/**", "top.csv"]) == ["holdout", "top.csv"]
    # the matcher and the expander agree on every path
    every = globs.expand(tmp_path, ["**"])
    for pat in ("holdout/**", "**/c.csv", "*.csv", "**/*.csv", "holdout", "*/holdout/*"):
        assert globs.expand(tmp_path, [pat]) == [p for p in every if globs.match(p, [pat])], pat


PEEK = '''
for p in PATHS:
    try:
        print(f"read {p}: {open(p).read()!r}")
    except OSError as e:
        print(f"cannot read {p}: {type(e).__name__}")
'''


@needs_bwrap
def test_holdout_dir_star_star_and_hide_cover_the_lab_and_the_worktree_copies(tmp_path):
    spec = SPEC.replace('metric = "holdout_score"', 'metric = "holdout_score"\nfiles = ["holdout/**"]').replace(
        "[metric]", '[sandbox]\nhide = ["secret.txt"]\n\n[metric]')
    holdout = HOLDOUT.replace('print("---")', 'assert open("holdout/labels.csv").read() == "labels"\nprint("---")')
    lab = make(tmp_path, spec=spec, **{"holdout/labels.csv": "labels", "secret.txt": "secret",
                                       "holdout.py": holdout})
    paths = ["holdout/labels.csv", "secret.txt", str(lab / "holdout/labels.csv"), str(lab / "secret.txt")]
    _s, (_base, attack) = session(lab, PEEK.replace("PATHS", repr(paths)))
    log = attack.log_tail
    for p in paths:
        assert f"cannot read {p}:" in log, log
    assert "'labels'" not in log and "'secret'" not in log
    # the holdout command alone reads them, from its clean tree
    assert attack.status is Status.KEEP and attack.secondary["holdout"] == pytest.approx(15.0)


def test_a_holdout_pattern_that_matches_nothing_is_refused(tmp_path):
    lab = make(tmp_path, spec=SPEC.replace('metric = "holdout_score"', 'metric = "holdout_score"\n'
                                           'files = ["holdout/**"]'))
    proc = cli_run(lab)
    assert proc.returncode == 2 and "[holdout] files[0] = 'holdout/**' matches no file" in proc.stderr
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("change", "message"), [
    (('outputs = ["params.json", "out/*.json"]', 'outputs = ["../x"]'), "[evaluate] outputs[0] = '../x'"),
    (('outputs = ["params.json", "out/*.json"]', 'outputs = ["/etc/passwd"]'), "is absolute"),
    (('outputs = ["params.json", "out/*.json"]', 'outputs = ["*.py"]'), "[evaluate] outputs matches"),
    (('outputs = ["params.json", "out/*.json"]\n', ""), "[evaluate] outputs is missing"),
    (('command = "python target.py"', 'command = ""'), "the run command is empty"),
])
def test_spec_mistakes_about_the_evaluator_name_key_and_fix(tmp_path, change, message):
    lab = make(tmp_path, spec=SPEC.replace(*change))
    with pytest.raises(SpecError) as e:
        load_spec(lab)
    assert message in e.value.message, e.value.message
    assert e.value.fix and "see the message above" not in e.value.fix


def test_outputs_may_not_reach_holdout_files(tmp_path):
    # the worktree holds the committed holdout files: an output pattern over them would copy them
    # into the evaluator's tree
    spec = SPEC.replace('metric = "holdout_score"', 'metric = "holdout_score"\nfiles = ["holdout/**"]').replace(
        'outputs = ["params.json", "out/*.json"]', 'outputs = ["params.json", "**/*.csv"]')
    lab = make(tmp_path, spec=spec, **{"holdout/labels.csv": "labels"})
    with pytest.raises(SpecError) as e:
        load_spec(lab)
    assert "[evaluate] outputs matches 'holdout/labels.csv'" in e.value.message


def test_hidden_files_stay_out_of_the_researchers_sight(tmp_path):
    spec = SPEC.replace('editable = ["target.py"]', 'editable = ["target.py", "notes/*.txt"]').replace(
        'metric = "holdout_score"', 'metric = "holdout_score"\nfiles = ["holdout/**"]').replace(
        "[metric]", '[sandbox]\nhide = ["notes/private.txt"]\n\n[metric]')
    lab = make(tmp_path, spec=spec, **{"notes/a.txt": "ideas", "notes/private.txt": "do not show",
                                       "holdout/labels.csv": "labels"})
    seen: list[dict[str, str]] = []

    def look(ctx):
        seen.append(dict(ctx.files))
        return Candidate(parent=ctx.parent, rationale="noop", files={"target.py": target(2.0, 0.0)})

    eng = Engine(lab, tag="t", sandbox_mode="none", max_experiments=1, researcher=ScriptedResearcher([look]))
    eng.run()
    eng.close()
    assert seen and "notes/a.txt" in seen[0] and "notes/private.txt" not in seen[0]
    # an agent researcher works in a worktree of its own: both copies of hidden paths are covered there
    from nightlab.researchers import create

    agent = create(load_spec(lab).model_copy(update={"researcher": load_spec(lab).researcher.model_validate(
        {"kind": "agent", "command": "true", "sandbox": "none"})}), lab)
    wt = tmp_path / "agent-wt"
    shutil.copytree(lab, wt, ignore=shutil.ignore_patterns(".git", ".nightlab"))
    hidden = set(agent.policy(wt, tmp_path / "prompt.md").hidden)  # type: ignore[attr-defined]
    for root in (lab.resolve(), wt):
        assert {root / "holdout", root / "notes" / "private.txt"} <= hidden, hidden


@needs_bwrap
def test_hide_plus_evaluate_files_is_for_the_evaluator_only_and_holdout_stays_holdout(tmp_path):
    # labels.txt: hidden from runs, read by the evaluator; holdout/h.csv: even listed as an evaluator
    # file, the evaluator does not get it (only the holdout command does)
    spec = SPEC.replace('metric = "holdout_score"', 'metric = "holdout_score"\nfiles = ["holdout/**"]').replace(
        "[metric]", '[sandbox]\nhide = ["labels.txt"]\n\n[metric]').replace(
        'max_output_mb = 1', 'max_output_mb = 1\nfiles = ["labels.txt", "holdout/h.csv"]')
    evaluate = EVALUATE.replace('print("---")', 'import os\nassert open("labels.txt").read() == "L"\n'
                                'assert not os.path.exists("holdout/h.csv")\nprint("---")')
    lab = make(tmp_path, spec=spec, **{"labels.txt": "L", "holdout/h.csv": "H", "evaluate.py": evaluate})
    _s, (base, peek) = session(lab, PEEK.replace("PATHS", repr(["labels.txt", "holdout/h.csv"])))
    assert base.status is Status.KEEP, base.reason
    assert "cannot read labels.txt:" in peek.log_tail and "cannot read holdout/h.csv:" in peek.log_tail
    assert peek.status is Status.KEEP and peek.metric == pytest.approx(5.5), peek.reason


def test_outputs_are_data_not_modules(tmp_path):
    # an output pattern that matches no protected file but lets the run leave a top-level json.py
    spec = SPEC.replace('outputs = ["params.json", "out/*.json"]', 'outputs = ["params.json", "j*"]')
    lab = make(tmp_path, spec=spec)
    s, (base, bad) = session(lab, f"plant('json.py', {FORGED_JSON!r})\n")
    assert base.status is Status.KEEP
    assert bad.status is Status.CRASH and "json.py is a Python module" in bad.reason, bad.reason
    assert s.incumbent_metric == pytest.approx(8.5)
