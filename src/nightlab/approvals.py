"""The approval queue of the autonomy slider: a human approves or rejects a step.

When the autonomy setting asks for it, the engine files a request (``request``) before it
runs a candidate (``kind="run"``) or before it keeps one (``kind="keep"``), and waits
until ``get(...)["status"]`` is no longer ``pending``. A person answers from the dashboard
or the CLI (``answer``).

Storage: the ``approvals`` table in the ledger's database, created here on first use
(``create_all(checkfirst=True)``) until the ledger's migrations own it. Columns: id,
session_id, experiment_idx, kind ('run' | 'keep'), status ('pending' | 'approved' |
'rejected'), created_at, answered_at, why, who, diff, rationale.

Contracts: every call is one short transaction; ``answer`` changes only a pending row
(a conditional UPDATE), so two people answering at once cannot both win.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from nightlab.errors import UsageError
from nightlab.ledger import Ledger, metadata
from nightlab.queries import engine_of

KINDS = ("run", "keep")
STATUSES = ("pending", "approved", "rejected")

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("experiment_idx", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("answered_at", sa.Double, nullable=True),
    sa.Column("why", sa.Text, nullable=False, default=""),
    sa.Column("who", sa.Text, nullable=False, default=""),
    sa.Column("diff", sa.Text, nullable=False, default=""),
    sa.Column("rationale", sa.Text, nullable=False, default=""),
    sa.Index("ix_approvals_session_status", "session_id", "status"),
    sqlite_autoincrement=True,
)

_ready: set[int] = set()


def ensure_table(ledger: Ledger) -> None:
    """Create the table if this database lacks it (idempotent, cheap after the first call)."""
    eng = engine_of(ledger)
    if id(eng) in _ready:
        return
    with eng.connect() as conn:
        conn.execution_options(nightlab_write=True)
        with conn.begin():
            approvals.create(conn, checkfirst=True)
    _ready.add(id(eng))


def _write(ledger: Ledger) -> Any:
    conn = engine_of(ledger).connect()
    conn.execution_options(nightlab_write=True)  # BEGIN IMMEDIATE on SQLite (see ledger.py)
    return conn


def request(ledger: Ledger, session_id: int, experiment_idx: int, kind: str, *,
            diff: str = "", rationale: str = "") -> int:
    """File a pending request; returns its id."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    ensure_table(ledger)
    with _write(ledger) as conn, conn.begin():
        result = conn.execute(approvals.insert().values(
            session_id=session_id, experiment_idx=experiment_idx, kind=kind, status="pending",
            created_at=time.time(), answered_at=None, why="", who="", diff=diff, rationale=rationale,
        ))
        pk = result.inserted_primary_key
        assert pk is not None
        return int(pk[0])


def get(ledger: Ledger, approval_id: int) -> dict[str, Any] | None:
    ensure_table(ledger)
    with engine_of(ledger).connect() as conn, conn.begin():
        row = conn.execute(sa.select(approvals).where(approvals.c.id == approval_id)).first()
    return dict(row._mapping) if row is not None else None


def pending(ledger: Ledger, session_id: int | None = None) -> list[dict[str, Any]]:
    """Pending requests, oldest first (of one session, or of all when ``session_id`` is None)."""
    ensure_table(ledger)
    q = sa.select(approvals).where(approvals.c.status == "pending").order_by(approvals.c.id)
    if session_id is not None:
        q = q.where(approvals.c.session_id == session_id)
    with engine_of(ledger).connect() as conn, conn.begin():
        return [dict(r._mapping) for r in conn.execute(q)]


def recent(ledger: Ledger, session_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Answered requests, newest first."""
    ensure_table(ledger)
    q = sa.select(approvals).where(approvals.c.status != "pending")
    q = q.order_by(approvals.c.id.desc()).limit(limit)
    if session_id is not None:
        q = q.where(approvals.c.session_id == session_id)
    with engine_of(ledger).connect() as conn, conn.begin():
        return [dict(r._mapping) for r in conn.execute(q)]


def answer(ledger: Ledger, approval_id: int, approved: bool, why: str = "", who: str = "") -> dict[str, Any]:
    """Approve or reject a pending request; returns the row as answered.

    Raises UsageError when there is no such request or it was answered already.
    """
    ensure_table(ledger)
    status = "approved" if approved else "rejected"
    with _write(ledger) as conn, conn.begin():
        n = conn.execute(
            approvals.update()
            .where(approvals.c.id == approval_id, approvals.c.status == "pending")
            .values(status=status, answered_at=time.time(), why=why[:2000], who=who[:200])
        ).rowcount
        row = conn.execute(sa.select(approvals).where(approvals.c.id == approval_id)).first()
    if row is None:
        raise UsageError(f"no approval request {approval_id}", "see the pending ones: GET /api/approvals")
    if n == 0:
        raise UsageError(f"approval request {approval_id} was already {row.status}",
                         "nothing to do; each request is answered once")
    return dict(row._mapping)
