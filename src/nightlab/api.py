"""The Python API: what the CLI does, importable (notebooks, scripts, the MCP server).

    from nightlab.api import Lab

    lab = Lab("path/to/lab")                  # a folder with nightlab.toml (its ledger: .nightlab/ledger.db)
    session = lab.run(tag="nov26", max_experiments=20)     # blocking, in this process (like `nightlab run`)
    handle = lab.start(tag="nov27")           # in the background (a `nightlab run` process), like `&`
    lab.stop()                                # stop after the experiment in flight (.nightlab/STOP)
    for e in lab.experiments():               # every experiment of the latest session, in order
        print(e.idx, e.status.value, e.metric, e.description)   # also e.diff, e.rationale, e.params, e.usage
    commit, metric = lab.incumbent()          # the best verified commit and its metric
    print(lab.diff(3))                        # experiment 3's diff
    lab.approve(4, why="looks right")         # answer a pending approval ([autonomy])

Every method opens the ledger for the call and closes it again, so a ``Lab`` is cheap to keep and
safe to use while a session runs in another process. Errors are :class:`~nightlab.errors.NightlabError`
with ``message`` and ``fix``, as on the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nightlab.errors import UsageError

if TYPE_CHECKING:
    from nightlab.ledger import Ledger
    from nightlab.spec import Spec
    from nightlab.types import Experiment, Session, Status

DB_ENV = "NIGHTLAB_DB"


@dataclass(frozen=True)
class RunHandle:
    """A session started in the background by :meth:`Lab.start`."""

    pid: int
    log: Path
    argv: tuple[str, ...]

    def running(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie (exited, not yet reaped) is not running
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
        except OSError:
            return True

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until the process exits (True) or ``timeout_s`` passes (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.running():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True


class Lab:
    """One lab: a folder with ``nightlab.toml``, its ledger and its audit log."""

    def __init__(self, path: Path | str = ".", db: str | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "nightlab.toml").is_file():
            raise UsageError(f"{self.path} has no nightlab.toml", f"run `nightlab init` in {self.path} first")
        self.db = db or os.environ.get(DB_ENV) or None

    def __repr__(self) -> str:
        return f"Lab({str(self.path)!r})"

    # ------------------------------------------------------------------ reading

    @property
    def spec(self) -> Spec:
        from nightlab.spec import load_spec

        return load_spec(self.path)

    @contextmanager
    def ledger(self) -> Iterator[Ledger]:
        """The lab's ledger, opened for a ``with`` block (never created by reading)."""
        from nightlab.ledger import Ledger

        if self.db is None and not (self.path / ".nightlab" / "ledger.db").is_file():
            raise UsageError(f"no nightlab session in {self.path / '.nightlab'}", "run `nightlab run`")
        led = Ledger.for_lab(self.path, self.db)
        try:
            yield led
        finally:
            led.close()

    def has_sessions(self) -> bool:
        try:
            return bool(self.sessions())
        except UsageError:
            return False

    def sessions(self) -> list[Session]:
        with self.ledger() as led:
            return [s for s in led.list_sessions() if not self.db or s.lab_path == str(self.path)]

    def session(self, tag: str | None = None) -> Session:
        """Session ``tag``, or the latest one."""
        sessions = self.sessions()
        if tag is not None:
            found = next((s for s in sessions if s.tag == tag), None)
            if found is None:
                known = ", ".join(s.tag for s in sessions) or "none"
                raise UsageError(f"no session '{tag}' in {self.path}", f"sessions: {known}")
            return found
        if not sessions:
            raise UsageError(f"no nightlab session in {self.path / '.nightlab'}", "run `nightlab run`")
        return max(sessions, key=lambda s: s.created_at)

    def experiments(self, tag: str | None = None, status: Status | str | None = None) -> list[Experiment]:
        from nightlab.types import Status

        s = self.session(tag)
        with self.ledger() as led:
            return led.experiments(s.id, status=Status(status) if status else None)

    def experiment(self, n: int, tag: str | None = None) -> Experiment:
        s = self.session(tag)
        with self.ledger() as led:
            e = led.get_experiment(s.id, n)
        if e is None:
            raise UsageError(f"session {s.tag} has no experiment {n}", "list them with `nightlab log`")
        return e

    def diff(self, n: int, tag: str | None = None) -> str:
        """Experiment ``n``'s diff, as recorded (every attempt's diff is kept)."""
        return self.experiment(n, tag).diff

    def incumbent(self, tag: str | None = None) -> tuple[str, float | None]:
        """The best verified commit of the session and its metric."""
        s = self.session(tag)
        return s.incumbent_commit, s.incumbent_metric

    def status(self, tag: str | None = None) -> dict[str, Any]:
        """What ``nightlab status`` shows, as a dict."""
        from nightlab.labs import LabEntry, lab_state

        s = self.session(tag)
        with self.ledger() as led:
            counts = {k.value: v for k, v in led.count_by_status(s.id).items()}
            usage = led.usage_totals(s.id)
        st = lab_state(LabEntry(self.path.name, str(self.path), self.db or ""), tag=s.tag)
        return {
            "tag": s.tag, "branch": s.branch, "status": s.status, "state": st.state, "stop_reason": s.stop_reason,
            "metric": s.metric_name, "direction": s.direction.value, "baseline": st.baseline,
            "incumbent_commit": s.incumbent_commit, "incumbent": s.incumbent_metric,
            "improvement_pct": st.improvement_pct, "experiments": counts, "sandbox": s.sandbox,
            "researcher": s.researcher, "tokens_in": usage.tokens_in, "tokens_out": usage.tokens_out,
            "cost_usd": usage.cost_usd, "pending_approvals": len(st.pending),
        }

    def pending(self, tag: str | None = None) -> list[dict[str, Any]]:
        """Requests waiting for a human (all sessions, or ``tag``'s)."""
        from nightlab import approvals

        sid = self.session(tag).id if tag else None
        with self.ledger() as led:
            return approvals.pending(led, sid)

    def answer(self, n: int, approved: bool, why: str = "", who: str = "", tag: str | None = None) -> dict[str, Any]:
        """Approve or reject experiment ``n``'s pending request (as ``nightlab approve/reject``)."""
        from nightlab import approvals

        s = self.session(tag)
        with self.ledger() as led:
            row = approvals.find_pending(led, s.id, n)
            if row is None:
                raise UsageError(f"experiment {n} of session {s.tag} has no pending approval",
                                 "list the queue with `nightlab pending`")
            return approvals.answer(led, row["id"], approved, why, who or "api")

    def approve(self, n: int, why: str = "", who: str = "", tag: str | None = None) -> dict[str, Any]:
        return self.answer(n, True, why, who, tag)

    def reject(self, n: int, why: str, who: str = "", tag: str | None = None) -> dict[str, Any]:
        return self.answer(n, False, why, who, tag)

    def audit(self) -> dict[str, Any]:
        """The audit chain's state (what ``nightlab audit verify`` checks)."""
        from nightlab.audit import verify_lab

        with self.ledger() as led:
            res, note = verify_lab(self.path / ".nightlab", led)
        return {"ok": res.ok, "records": res.count, "first_bad_seq": res.first_bad_seq, "reason": res.reason,
                "anchored": res.anchored, "signed_checkpoints": res.signed_checkpoints, "note": note}

    # ------------------------------------------------------------------ acting

    def run(self, tag: str | None = None, *, resume: bool = False, max_experiments: int | None = None,
            **engine_options: Any) -> Session:
        """Run a session in this process until a stop rule fires (``nightlab run``); returns the final session.
        ``engine_options`` go to :class:`nightlab.engine.Engine` (researcher, sandbox_mode, autonomy, ...)."""
        from nightlab.engine import Engine

        eng = Engine(self.path, tag=tag, resume=resume, db_url=self.db, max_experiments=max_experiments,
                     **engine_options)
        try:
            return eng.run()
        finally:
            eng.close()

    def start(self, tag: str | None = None, *, resume: bool = False, max_experiments: int | None = None,
              extra_args: tuple[str, ...] = ()) -> RunHandle:
        """Start ``nightlab run`` in the background (its own process and session; survives this one)."""
        argv = [sys.executable, "-m", "nightlab", "run", "--lab", str(self.path), "--plain"]
        if tag:
            argv += ["--tag", tag]
        if resume:
            argv.append("--resume")
        if max_experiments is not None:
            argv += ["--max-experiments", str(max_experiments)]
        if self.db:
            argv += ["--db", self.db]
        argv += list(extra_args)
        state = self.path / ".nightlab"
        state.mkdir(exist_ok=True)
        log = state / f"background-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
            proc = subprocess.Popen(argv, cwd=self.path, stdin=devnull, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        return RunHandle(proc.pid, log, tuple(argv))

    def stop(self) -> Path:
        """Ask the running session to stop after the experiment in flight (writes ``.nightlab/STOP``)."""
        state = self.path / ".nightlab"
        state.mkdir(exist_ok=True)
        stop = state / "STOP"
        stop.write_text(f"stopped through the API at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        return stop


def open_lab(path: Path | str = ".", db: str | None = None) -> Lab:
    return Lab(path, db)
