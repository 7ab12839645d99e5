"""Attacks by a hostile run on the night itself (issue 11, items 6-9 and "Also").

Each one went through the real loop on main and stopped or hung the session: metric files that
crash the JSON reader or block it (a FIFO), file names and output that are not UTF-8, unbounded
logs, absurd metrics and duplicate keys. Real git, real subprocesses (``nightlab run`` in a child
process, so a hang fails the test instead of freezing it), real FIFOs and sockets, real bwrap,
SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.conftest import SPEC, cli_env, nightlab_cmd

from nightlab import sandbox
from nightlab.engine import Engine
from nightlab.measure import measure
from nightlab.researchers.scripted import ScriptedResearcher
from nightlab.spec import MetricSpec
from nightlab.types import Candidate, Status

HAVE_BWRAP = shutil.which("bwrap") is not None
MODES = ["none", pytest.param("required", marks=pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed"))]

STEPS_SPEC = SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"').replace(
    "max_experiments = 3", "max_experiments = 3\nmax_crashes_in_row = 0")
JSON_SPEC = STEPS_SPEC.replace('secondary = ["seed"]', 'source = "json"\nfile = "out/metrics.json"')

WRITE_OK = """
import json, os
os.makedirs("out", exist_ok=True)
json.dump({"score": SCORE}, open("out/metrics.json", "w"))
"""


def attack(body: str) -> str:
    return "import os, socket\nos.makedirs('out', exist_ok=True)\nM = 'out/metrics.json'\n" + body + "\n"


# (name, run code, words the crash reason must contain)
METRIC_FILE_ATTACKS = [
    ("int400", "open(M, 'w').write('{\"score\": ' + '9' * 400 + '}')", "not a finite number"),
    ("int5000", "open(M, 'w').write('{\"score\": ' + '9' * 5000 + '}')", "not a finite number"),
    ("nesting", "open(M, 'w').write('{\"score\": 1, \"x\": ' + '[' * 200000 + ']' * 200000 + '}')", "nests deeper"),
    ("not_utf8", "open(M, 'wb').write(b'{\"score\": 1.0, \"\\xff\": 2}')", "not valid UTF-8"),
    ("not_object", "open(M, 'w').write('[0.1]')", "JSON object"),
    ("fifo", "os.mkfifo(M)", "named pipe"),
    ("fifo_symlink", "os.mkfifo('out/p'); os.symlink('p', M)", "symlink"),
    ("dev_zero", "os.symlink('/dev/zero', M)", "symlink"),
    ("directory", "os.mkdir(M)", "directory"),
    ("socket", "socket.socket(socket.AF_UNIX).bind(M)", "socket"),
    ("huge", "open(M, 'w').write('{\"score\": 1, \"pad\": \"' + 'x' * 3000000 + '\"}')", "larger than"),
    ("nan", "open(M, 'w').write('{\"score\": NaN}')", "not a finite number"),
]


@pytest.mark.parametrize("mode", MODES)
def test_hostile_metric_files_are_crashes_and_the_night_goes_on(make_lab, mode):
    steps = [{"rationale": name, "files": {"target.py": attack(code)}} for name, code, _ in METRIC_FILE_ATTACKS]
    steps.append({"rationale": "honest", "files": {"target.py": WRITE_OK.replace("SCORE", "1.5")}})
    lab = make_lab(spec=JSON_SPEC, files={"target.py": WRITE_OK.replace("SCORE", "8.5"),
                                          "steps.json": json.dumps(steps)})
    n = len(steps)
    proc = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--tag", "a", "--plain", "--sandbox", mode,
                                       "--max-experiments", str(n)),
                          env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    db = sqlite3.connect(lab / ".nightlab" / "ledger.db")
    rows = db.execute("SELECT idx, status, reason FROM experiments ORDER BY idx").fetchall()
    db.close()
    assert len(rows) == n + 1 and rows[0][1] == "keep"
    for (idx, status, reason), (name, _, why) in zip(rows[1:-1], METRIC_FILE_ATTACKS, strict=True):
        assert status == "crash" and why in reason, (idx, name, status, reason)
    assert rows[-1][1] == "keep"  # the night went on and still keeps honest improvements


def _measure_in_child(lab: Path, timeout: float = 30) -> str:
    """measure() in another process, so a blocking open fails the test instead of hanging it."""
    code = ("import sys; from pathlib import Path; from nightlab.measure import measure; "
            "from nightlab.spec import MetricSpec; "
            "m = measure(MetricSpec(name='score', source='json', file='out/m.json'), Path('/nonexistent'), "
            "Path(sys.argv[1])); print(m.error)")
    out = subprocess.run([sys.executable, "-c", code, str(lab)], env=cli_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()


SPECIAL = [
    ("fifo", _fifo, "named pipe"),
    ("socket", _socket, "a socket"),
    ("directory", lambda p: p.mkdir(), "a directory"),
    ("devzero", lambda p: p.symlink_to("/dev/zero"), "symlink"),
    ("fifo_link", lambda p: (os.mkfifo(p.with_name("pipe")), p.symlink_to("pipe")), "symlink"),
    ("dir_link", lambda p: (p.parent.rename(p.parent.with_name("real")), p.parent.symlink_to("real"),
                            os.mkfifo(p)), "symlink"),
]


@pytest.mark.parametrize("name,make,why", SPECIAL, ids=[s[0] for s in SPECIAL])
def test_special_metric_files_never_block(tmp_path, name, make, why):
    (tmp_path / "out").mkdir()
    make(tmp_path / "out" / "m.json")
    assert why in _measure_in_child(tmp_path)


def printing(*lines: str) -> str:
    return "print('---')\n" + "".join(f"print({line!r})\n" for line in lines)


def test_duplicate_keys_and_absurd_metrics_are_visible(make_lab):
    lab = make_lab(spec=STEPS_SPEC, files={"steps.json": json.dumps([
        {"rationale": "dup", "files": {"target.py": printing("score: 9.0", "score: 4.0")}},
        {"rationale": "absurd", "files": {"target.py": printing("score: -1e308")}},
        {"rationale": "far", "files": {"target.py": printing("score: -10000")}},
    ])})
    run = subprocess.run(nightlab_cmd("run", "--lab", str(lab), "--plain", "--sandbox", "none",
                                      "--max-experiments", "3"), env=cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "inf%" not in run.stdout
    db = sqlite3.connect(lab / ".nightlab" / "ledger.db")
    rows = db.execute("SELECT idx, status, metric, reason, evidence_json FROM experiments ORDER BY idx").fetchall()
    db.close()
    dup, absurd, far = rows[1], rows[2], rows[3]
    assert dup[1] == "keep" and dup[2] == 4.0  # the last value counts, as documented
    assert "duplicate key 'score'" in json.loads(dup[4])["warnings"][0]
    assert absurd[1] == "crash" and absurd[2] is None and "absurd metric refused" in absurd[3]
    assert "-1e+308" in json.loads(absurd[4])["warnings"][-1]  # the refused value stays visible
    assert far[1] == "crash" and "max_ratio" in far[3]
    show = subprocess.run(nightlab_cmd("show", "1", "--lab", str(lab)), env=cli_env(), capture_output=True,
                          text=True, timeout=60)
    assert show.returncode == 0 and "warning" in show.stdout and "duplicate key" in show.stdout
    show = subprocess.run(nightlab_cmd("show", "2", "--lab", str(lab)), env=cli_env(), capture_output=True,
                          text=True, timeout=60)
    assert "absurd metric refused" in show.stdout and "-1e+308" in show.stdout
    log = subprocess.run(nightlab_cmd("log", "--lab", str(lab)), env=cli_env(), capture_output=True, text=True,
                         timeout=60)
    assert log.returncode == 0 and "⚠" in log.stdout and "measurement warnings" in log.stdout


def test_absurd_metric_kept_when_the_bound_is_off_prints_sanely(make_lab):
    spec = SPEC.replace('secondary = ["seed"]', "max_abs = 0\nmax_ratio = 0")
    lab = make_lab(spec=spec)
    eng = Engine(lab, tag="off", sandbox_mode="none", max_experiments=2, researcher=ScriptedResearcher([
        {"rationale": "huge", "files": {"target.py": printing("score: -1e308")}},
        {"rationale": "other end", "files": {"target.py": printing("score: 1e308")}}]))
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert exps[1].status is Status.KEEP and exps[1].metric == -1e308  # documented: kept when the bound is off
    for cmd in (("status",), ("log",), ("show", "1"), ("show", "2")):
        out = subprocess.run(nightlab_cmd(*cmd, "--lab", str(lab)), env=cli_env(), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert "inf%" not in out.stdout and "0" * 100 not in out.stdout, out.stdout


# -- file names and output that are not UTF-8 (item 8) ----------------------------------------------

EVAL_SPEC = SPEC.replace("[stop]", '[evaluate]\ncommand = "python evaluate.py"\noutputs = []\n\n[stop]')
EVALUATE_PY = "print('---')\nprint('score: 2.0')\n"
NASTY_RUN = """
import os, sys
open(b"\\xff\\xfe.py", "wb").write(b"x = 1\\n")
sys.stdout.buffer.write(b"bytes \\xff\\xfe\\x00 and NUL\\n")
sys.stdout.flush()
print("---")
print("score: 1.0")
"""


def _nasty_candidate(ctx) -> Candidate:
    # a researcher (an agent, say) whose edit adds a file named b"\xff\xfe.py" holding a latin-1 byte
    return Candidate(parent=ctx.parent, rationale="latin-1 \udce9 rationale",
                     files={"\udcff\udcfe.py": "s = '\udce9'\n", "target.py": NASTY_RUN})


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("mode", MODES)
def test_non_utf8_names_and_output_are_stored_escaped(make_lab, request, backend, mode):
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    spec = EVAL_SPEC.replace('editable = ["target.py"]', 'editable = ["target.py", "??.py"]')
    lab = make_lab(spec=spec, files={"evaluate.py": EVALUATE_PY, "ab.py": "x = 0\n"})
    eng = Engine(lab, tag="u", sandbox_mode=mode, db_url=url, max_experiments=2, researcher=ScriptedResearcher([
        {"rationale": "run creates a file named b'\\xff\\xfe.py'", "files": {"target.py": NASTY_RUN}},
        _nasty_candidate]))
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    assert session.status == "finished" and len(exps) == 3
    run_made, cand_made = exps[1], exps[2]
    for e in (run_made, cand_made):
        assert e.status.is_finished() and e.status is not Status.INTERRUPTED, (e.status, e.reason)
        for text in (e.reason, e.log_tail, e.diff, e.rationale, json.dumps(e.evidence)):
            text.encode("utf-8")  # no lone surrogates came back
            assert "\x00" not in text
    # the run's own output: every byte kept as an escape, nothing replaced by U+FFFD
    assert "bytes \\xff\\xfe\\x00 and NUL" in run_made.log_tail
    # a reason naming the run-created file names it escaped (the evaluator refuses planted modules)
    if "\\xff\\xfe.py" in run_made.reason or run_made.status is Status.REJECTED:
        assert "\\xff\\xfe.py" in run_made.reason
    # the researcher's file was committed under its exact bytes; the stored diff shows git's quoting
    assert cand_made.commit
    names = subprocess.run(["git", "ls-tree", "-r", "-z", "--name-only", cand_made.commit], cwd=lab,
                           capture_output=True, check=True).stdout.split(b"\0")
    assert b"\xff\xfe.py" in names
    assert '"b/\\377\\376.py"' in cand_made.diff
    assert "\\xe9" in cand_made.diff and cand_made.rationale == "latin-1 \\xe9 rationale"
    # the audit log holds the same escaped text and still verifies
    db = ["--db", url] if url else []
    audit = subprocess.run(nightlab_cmd("audit", "verify", "--lab", str(lab), *db), env=cli_env(),
                           capture_output=True, text=True, timeout=60)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    for cmd in (("show", "1"), ("show", "2"), ("log",), ("diff", "2")):
        out = subprocess.run(nightlab_cmd(*cmd, "--lab", str(lab), *db), env=cli_env(), capture_output=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr


# -- run logs are capped (item 9) ---------------------------------------------------------------------

FLOOD = """
import sys
for i in range(200000):
    print(f"line {i:06d} " + "x" * 90)
print("---")
print("score: 0.5")
"""


def test_a_flooding_run_keeps_head_tail_and_summary(make_lab):
    spec = SPEC.replace("kill_grace_s = 0.5", "kill_grace_s = 0.5\nmax_log_mb = 0.25")
    lab = make_lab(spec=spec)
    eng = Engine(lab, tag="flood", sandbox_mode="none", max_experiments=1,
                 researcher=ScriptedResearcher([{"rationale": "flood", "files": {"target.py": FLOOD}}]))
    session = eng.run()
    exp = eng.ledger.experiments(session.id)[1]
    eng.close()
    assert exp.status is Status.KEEP and exp.metric == 0.5  # the summary block survived the cut
    log = lab / ".nightlab" / "artifacts" / "flood" / str(exp.idx) / "run.log"
    data = log.read_bytes()
    assert len(data) <= 0.25 * 1024 * 1024 + 300  # ~20 MB written, the cap kept
    assert data.startswith(b"line 000000 ")
    assert b"[nightlab] log capped ([run] max_log_mb): " in data and b"bytes cut here, of 2" in data
    assert data.endswith(b"---\nscore: 0.5\n")
    assert "score: 0.5" in exp.log_tail


def _run_in_thread(fn, timeout: float):
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout}s: the harness would hang"
    return box["r"]


@pytest.mark.parametrize("mode", MODES)
def test_log_cap_at_the_sandbox(tmp_path, mode):
    """sandbox.run itself: 50 MB from a shell pipeline, a 64 KiB file, the tail and its summary kept."""
    pol = sandbox.SandboxPolicy(mode=sandbox.resolve_mode(mode), writable=(tmp_path,), max_log_bytes=64 * 1024)
    log = tmp_path / "run.log"
    res = _run_in_thread(lambda: sandbox.run(
        "head -c 50000000 /dev/zero | tr '\\0' 'a' | fold -w 99; printf -- '\\n---\\nscore: 0.25\\n'",
        cwd=tmp_path, env={"PATH": os.environ["PATH"]}, policy=pol, timeout_s=120, log_path=log), 150)
    assert res.exit_code == 0
    assert log.stat().st_size <= 64 * 1024 + 300
    assert measure(MetricSpec(name="score"), log, tmp_path).metric == 0.25
    text = log.read_text()
    assert text.startswith("a" * 99 + "\n") and "bytes cut here, of 50" in text


def test_a_straggler_holding_the_log_pipe_does_not_hold_the_harness(tmp_path):
    """Unsandboxed, a setsid child outlives the process-group kill with the log pipe open."""
    pol = sandbox.SandboxPolicy(mode="none")
    pidfile = tmp_path / "pid"
    cmd = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & sleep 0.2; echo done"
    try:
        res = _run_in_thread(lambda: sandbox.run(cmd, cwd=tmp_path, env={"PATH": os.environ["PATH"]}, policy=pol,
                                                 timeout_s=60, log_path=tmp_path / "run.log"), 45)
        assert res.exit_code == 0 and not res.timed_out
        assert "done" in (tmp_path / "run.log").read_text()
    finally:
        deadline = time.monotonic() + 5
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_hostile_agent_transcript_gives_no_usage_instead_of_an_error():
    """The agent researcher's output is untrusted too: its usage lines are parsed, never trusted to parse."""
    from nightlab.researchers.agent import parse_usage

    lines = [
        '{"type": "result", "usage": {"input_tokens": "many"}}',
        '{"type": "result", "usage": [1, 2]}',
        '{"type": "result", "usage": {"input_tokens": ' + "9" * 5000 + "}}",
        '{"type": "result", "usage": {"output_tokens": 1e999}}',
        '{"type": "result", "total_cost_usd": NaN}',
        '{"type": "item.completed", "item": "x"}',
        "{" + "[" * 100_000 + "}",
        "Tokens: 1.2.3k sent, 3 received.",
        '{"type": "turn.completed", "usage": {"input_tokens": 7, "output_tokens": 2}}',
    ]
    t_in, t_out, _, cost, _ = parse_usage("\n".join(lines))
    assert (t_in, t_out, cost) == (7, 2, None)
