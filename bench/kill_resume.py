"""Resume torture: K random SIGKILLs of a real ``nightlab run``, each followed by ``--resume``.

    python bench/kill_resume.py [--kills 200] [--sandbox none|required] [--seed 0] [--max-delay 4]

A fast lab (a scripted researcher cycling through random constants; each run takes 0.1-0.6 s and
leaves background children every way a process can: ``setsid``, ``nohup``, a double fork; the setup
command leaves one too) runs under a real ``nightlab run`` subprocess. After a random delay (0.2 s
to ``--max-delay``) the harness's process group is SIGKILLed (the harness and its git children; the
runs live in their own sessions), and the next ``nightlab run --resume`` starts. After K kills a
last resume (with a STOP file) recovers and stops. Counted, independently of nightlab's own tags
(children are found by a marker in their command line):

- rows lost: commits nightlab made (``refs/nightlab/<tag>/<idx>`` or a commit message
  ``nightlab <tag> #<idx>``) with no ledger row, plus rows still ``running`` at the end;
- survivors: run processes alive after a resume finished its recovery (checked after every resume
  that got that far, and at the end);
- leaked worktrees: folders under ``.nightlab/worktrees`` plus registrations in ``.git/worktrees``
  (locked or not) at the end;
- the branch versus the ledger's incumbent, and ``nightlab audit verify``'s verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")

SPEC = """\
[files]
editable = ["target.py"]

[run]
setup = "setsid sleep {marker}9 >/dev/null 2>&1 &"
command = "python target.py"
budget_s = 5
timeout_s = 20
kill_grace_s = 0.5

[metric]
name = "score"
direction = "minimize"

[stop]
max_experiments = 100000

[researcher]
kind = "scripted"
steps = "steps.json"
cycle = true
"""

TARGET = """\
import os, subprocess, time
M = "{marker}"
subprocess.Popen(f"setsid sleep {{M}}1 &", shell=True)
subprocess.Popen(f"nohup sleep {{M}}2 >/dev/null 2>&1 &", shell=True)
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        os.execvp("sleep", ["sleep", M + "3"])
    os._exit(0)
X = {x}
time.sleep({sleep})
print("---")
print(f"score: {{(X - 1) ** 2 + 0.5:.6f}}")
"""


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def make_lab(root: Path, marker: str, rng: random.Random) -> Path:
    lab = root / "lab"
    lab.mkdir()
    git(lab, "init", "-q", "-b", "main")
    (lab / "nightlab.toml").write_text(SPEC.format(marker=marker))
    (lab / "target.py").write_text(TARGET.format(marker=marker, x=3.0, sleep=0.2))
    steps = [{"rationale": f"x={x:.3f}", "files": {"target.py": TARGET.format(marker=marker, x=round(x, 3),
                                                                               sleep=round(rng.uniform(0.1, 0.6), 2))}}
             for x in (rng.uniform(-2, 4) for _ in range(500))]
    (lab / "steps.json").write_text(json.dumps(steps))
    git(lab, "add", "-A")
    git(lab, "commit", "-qm", "lab")
    return lab


def marked(marker: str) -> dict[int, int]:
    """pid -> start time of live processes whose command line carries ``marker``."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if marker.encode() in cmd and fields[0] not in (b"Z", b"X"):
            out[int(entry.name)] = int(fields[19])
    return out


def still_alive(pids: dict[int, int], marker: str) -> dict[int, int]:
    now = marked(marker)
    return {p: s for p, s in pids.items() if now.get(p) == s}


def cli(lab: Path, sandbox: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nightlab", "run", "--lab", str(lab), "--plain", "--sandbox", sandbox, *args]


def resumes_done(lab: Path) -> int:
    """How many resumes got past recovery (their ``session.resume`` audit record)."""
    try:
        return (lab / ".nightlab" / "audit.jsonl").read_bytes().count(b'"kind":"session.resume"')
    except OSError:
        return 0


def has_session(lab: Path) -> bool:
    db = lab / ".nightlab" / "ledger.db"
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db) as con:
            found = con.execute("select 1 from sessions where tag='kr'").fetchone() is not None
        con.close()
        return found
    except sqlite3.Error:
        return False


def torture(kills: int, sandbox: str, seed: int, max_delay: float, keep: bool, src: str = SRC) -> dict[str, object]:
    rng = random.Random(seed)
    marker = f"{1000 + rng.randrange(8000)}.{rng.randrange(10**6):06d}"
    tmp = tempfile.mkdtemp(prefix="nightlab-kill-resume-")
    lab = make_lab(Path(tmp), marker, rng)
    env = {**os.environ, "PYTHONPATH": src}
    survived_resume: set[tuple[int, int]] = set()
    orphans: set[tuple[int, int]] = set()
    checked = 0
    harness_errors = 0
    t0 = time.monotonic()
    for i in range(kills):
        before = marked(marker)
        done = resumes_done(lab)
        args = ["--resume"] if has_session(lab) else ["--tag", "kr"]
        proc = subprocess.Popen(cli(lab, sandbox, *args), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(rng.uniform(0.2, max_delay))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode not in (-signal.SIGKILL,):
            harness_errors += 1
            print(f"  kill {i}: the harness exited {proc.returncode} before the kill: "
                  f"{err.decode(errors='replace')[-400:]}", file=sys.stderr)
        if resumes_done(lab) > done:  # this resume finished recovering: nothing older may live
            checked += 1
            orphans |= set(before.items())
            survived_resume |= set(still_alive(before, marker).items())
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{kills} kills, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    (lab / ".nightlab" / "STOP").write_text("")
    final = subprocess.run(cli(lab, sandbox, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    survivors_end = marked(marker)
    db = lab / ".nightlab" / "ledger.db"
    with sqlite3.connect(db) as con:
        rows = con.execute('select idx, status, "commit" from experiments').fetchall()
        inc = con.execute("select incumbent_commit from sessions where tag='kr'").fetchone()[0]
    con.close()
    ledger_idx = {r[0] for r in rows}
    running = sum(1 for r in rows if r[1] == "running")
    refs = git(lab, "for-each-ref", "--format=%(refname)", "refs/nightlab/kr/").split()
    ref_idx = {int(r.rsplit("/", 1)[1]) for r in refs}
    msgs = git(lab, "log", "--all", "--format=%s").splitlines()
    msg_idx = {int(m.split("#", 1)[1].split(":", 1)[0]) for m in msgs if m.startswith("nightlab kr #")}
    lost = len((ref_idx | msg_idx) - ledger_idx)
    wt_dirs = list((lab / ".nightlab" / "worktrees").glob("*")) if (lab / ".nightlab" / "worktrees").exists() else []
    admin = lab / ".git" / "worktrees"
    registrations = list(admin.iterdir()) if admin.exists() else []
    branch = git(lab, "rev-parse", "refs/heads/nightlab/kr").strip()
    verify = subprocess.run([sys.executable, "-m", "nightlab", "audit", "verify", "--lab", str(lab)], env=env,
                            capture_output=True, text=True)
    for pid in survivors_end:  # leave the machine clean whatever the result
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r[1]] = statuses.get(r[1], 0) + 1
    result = {
        "sandbox": sandbox, "kills": kills, "seed": seed, "max_delay_s": max_delay,
        "wall_s": round(time.monotonic() - t0, 1), "experiments": len(rows), "statuses": statuses,
        "rows_lost": lost, "rows_running": running, "final_resume_exit": final.returncode,
        "resumes_checked": checked, "orphans_before_those_resumes": len(orphans),
        "survived_a_resume": len(survived_resume), "survivors_at_end": len(survivors_end),
        "leaked_worktree_dirs": len(wt_dirs), "leaked_registrations": len(registrations),
        "branch_matches_ledger": branch == inc, "harness_errors": harness_errors,
        "audit_verify_exit": verify.returncode, "audit_verify": verify.stdout.strip().splitlines()[:1],
        "lab": str(lab) if keep else None,
    }
    if final.returncode != 0:
        result["final_resume_output"] = (final.stdout + final.stderr)[-1500:]
    if not keep:
        subprocess.run(["rm", "-rf", tmp], check=False)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--sandbox", default="none", choices=["none", "required"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=4.0, help="longest wait before a kill (seconds)")
    ap.add_argument("--keep", action="store_true", help="keep the lab folder for inspection")
    ap.add_argument("--src", default=SRC, help="the nightlab source tree to torture (e.g. another checkout's src)")
    args = ap.parse_args()
    res = torture(args.kills, args.sandbox, args.seed, args.max_delay, args.keep, args.src)
    print(json.dumps(res, indent=2))
    bad = (res["rows_lost"] or res["rows_running"] or res["survived_a_resume"] or res["survivors_at_end"]
           or res["leaked_worktree_dirs"] or res["leaked_registrations"] or not res["branch_matches_ledger"]
           or res["audit_verify_exit"] or res["final_resume_exit"])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
