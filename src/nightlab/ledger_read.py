"""A read-only view of a SQLite ledger with the standard library's ``sqlite3``, for the read commands.

``nightlab status/log/show/diff/export`` answer in a fraction of the time it takes to import
SQLAlchemy (see README, Performance). The schema is still the one :mod:`nightlab.ledger`
defines and migrates: this module only reads it, opens the file read-only, and is used only
when the database is at exactly :data:`SCHEMA_VERSION` — anything else (an older ledger that
needs a migration, PostgreSQL, an unreadable file) goes through :class:`nightlab.ledger.Ledger`.
``tests/test_ledger_read.py`` checks that both give equal sessions and experiments.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from nightlab.errors import LedgerError
from nightlab.types import Direction, Experiment, Session, Status, Usage

SCHEMA_VERSION = 4  # the ledger schema this reader knows; tests check it is the ledger's current one

_EXPERIMENT = (
    "SELECT e.*, c.researcher AS c_researcher, c.rationale, c.diff, c.params_json, c.tokens_in, c.tokens_out, "
    "c.tokens_cached, c.cost_usd, c.usage_s FROM experiments e LEFT OUTER JOIN candidates c "
    "ON c.experiment_id = e.id WHERE e.session_id = ?"
)


class LedgerReads(Protocol):
    """What the read commands and exports need of a ledger (both readers provide it)."""

    @property
    def shown(self) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> LedgerReads: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def get_session(self, tag: str) -> Session | None: ...
    def latest_session(self) -> Session | None: ...
    def list_sessions(self) -> list[Session]: ...
    def session_json(self, session_id: int) -> tuple[str, dict[str, Any]]: ...
    def get_experiment(self, session_id: int, idx: int) -> Experiment | None: ...
    def experiments(self, session_id: int, *, status: Status | None = None, limit: int | None = None,
                    offset: int = 0, order: str = "asc") -> list[Experiment]: ...
    def count_experiments(self, session_id: int, status: Status | None = None) -> int: ...
    def count_by_status(self, session_id: int) -> dict[Status, int]: ...
    def usage_totals(self, session_id: int) -> Usage: ...


class SqliteReader:
    """Read-only ``sqlite3`` access to a ledger file at :data:`SCHEMA_VERSION`. Use :func:`open_fast`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        self._con.row_factory = sqlite3.Row

    @property
    def shown(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> SqliteReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def schema_version(self) -> int | None:
        row = self._con.execute("SELECT max(version) FROM schema_version").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # -- sessions

    def _session(self, where: str, args: tuple[Any, ...]) -> Session | None:
        row = self._con.execute(f"SELECT * FROM sessions {where}", args).fetchone()
        return _session(row) if row is not None else None

    def get_session(self, tag: str) -> Session | None:
        return self._session("WHERE tag = ?", (tag,))

    def latest_session(self) -> Session | None:
        return self._session("ORDER BY id DESC LIMIT 1", ())

    def list_sessions(self) -> list[Session]:
        return [_session(r) for r in self._con.execute("SELECT * FROM sessions ORDER BY id")]

    def session_json(self, session_id: int) -> tuple[str, dict[str, Any]]:
        row = self._con.execute("SELECT spec_json, noise_json FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no session with id {session_id} in {self.shown}")
        return row["spec_json"], json.loads(row["noise_json"] or "{}")

    # -- experiments

    def get_experiment(self, session_id: int, idx: int) -> Experiment | None:
        row = self._con.execute(_EXPERIMENT + " AND e.idx = ?", (session_id, idx)).fetchone()
        return _experiment(row) if row is not None else None

    def experiments(self, session_id: int, *, status: Status | None = None, limit: int | None = None,
                    offset: int = 0, order: str = "asc") -> list[Experiment]:
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        sql = _EXPERIMENT
        args: list[Any] = [session_id]
        if status is not None:
            sql += " AND e.status = ?"
            args.append(Status(status).value)
        sql += f" ORDER BY e.idx {order.upper()} LIMIT ? OFFSET ?"
        args += [-1 if limit is None else limit, offset]
        return [_experiment(r) for r in self._con.execute(sql, args)]

    def count_experiments(self, session_id: int, status: Status | None = None) -> int:
        if status is None:
            row = self._con.execute("SELECT count(*) FROM experiments WHERE session_id = ?", (session_id,))
        else:
            row = self._con.execute("SELECT count(*) FROM experiments WHERE session_id = ? AND status = ?",
                                    (session_id, Status(status).value))
        return int(row.fetchone()[0])

    def count_by_status(self, session_id: int) -> dict[Status, int]:
        rows = self._con.execute("SELECT status, count(*) FROM experiments WHERE session_id = ? GROUP BY status",
                                 (session_id,))
        return {Status(s): int(n) for s, n in rows}

    def usage_totals(self, session_id: int) -> Usage:
        row = self._con.execute(
            "SELECT coalesce(sum(c.tokens_in), 0), coalesce(sum(c.tokens_out), 0), coalesce(sum(c.tokens_cached), 0), "
            "coalesce(sum(c.cost_usd), 0.0), coalesce(sum(c.usage_s), 0.0) FROM candidates c "
            "JOIN experiments e ON e.id = c.experiment_id WHERE e.session_id = ?", (session_id,)).fetchone()
        dropped = self._con.execute(  # proposals dropped at a stop (Ledger.record_spend)
            "SELECT coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0), coalesce(sum(tokens_cached), 0), "
            "coalesce(sum(cost_usd), 0.0), coalesce(sum(usage_s), 0.0) FROM spend WHERE session_id = ?",
            (session_id,)).fetchone()
        return (Usage(int(row[0]), int(row[1]), int(row[2]), float(row[3]), float(row[4]))
                + Usage(int(dropped[0]), int(dropped[1]), int(dropped[2]), float(dropped[3]), float(dropped[4])))


def open_fast(path: Path) -> SqliteReader | None:
    """A reader of the SQLite ledger at ``path``, or None when it cannot serve (missing, other schema)."""
    if not path.is_file():
        return None
    try:
        reader = SqliteReader(path)
    except sqlite3.Error:
        return None
    try:
        if reader.schema_version() == SCHEMA_VERSION:
            return reader
    except sqlite3.Error:
        pass
    reader.close()
    return None


def _experiment(r: sqlite3.Row) -> Experiment:
    return Experiment(
        id=r["id"], session_id=r["session_id"], idx=r["idx"], status=Status(r["status"]),
        parent_commit=r["parent_commit"], commit=r["commit"], metric=r["metric"],
        secondary=json.loads(r["secondary_json"] or "{}"), trust=r["trust"], description=r["description"],
        reason=r["reason"], log_tail=r["log_tail"], seed=r["seed"], started_at=r["started_at"],
        finished_at=r["finished_at"], propose_s=r["propose_s"], run_s=r["run_s"], overhead_s=r["overhead_s"],
        exit_code=r["exit_code"], evidence=json.loads(r["evidence_json"] or "{}"),
        researcher=r["c_researcher"] or "", rationale=r["rationale"] or "", diff=r["diff"] or "",
        params=json.loads(r["params_json"] or "{}"),
        usage=Usage(int(r["tokens_in"] or 0), int(r["tokens_out"] or 0), int(r["tokens_cached"] or 0),
                    float(r["cost_usd"] or 0.0), float(r["usage_s"] or 0.0)),
        pid=r["pid"], pid_start=r["pid_start"], worktree=r["worktree"],
    )


def _session(r: sqlite3.Row) -> Session:
    return Session(
        id=r["id"], tag=r["tag"], branch=r["branch"], base_commit=r["base_commit"],
        incumbent_commit=r["incumbent_commit"], incumbent_metric=r["incumbent_metric"],
        baseline_metric=r["baseline_metric"], metric_name=r["metric_name"], direction=Direction(r["direction"]),
        status=r["status"], stop_reason=r["stop_reason"], sandbox=r["sandbox"], created_at=r["created_at"],
        updated_at=r["updated_at"], spec_hash=r["spec_hash"], lab_path=r["lab_path"],
        machine=json.loads(r["machine_json"] or "{}"), researcher=r["researcher"],
    )
