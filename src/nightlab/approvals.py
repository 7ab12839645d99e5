"""The approval queue: candidates and keeps that wait for a human (``[autonomy]``).

The queue lives in the ledger (table ``approvals``), so a human answers from any process
that can open it: ``nightlab approve N`` / ``nightlab reject N --why …`` in a terminal,
``nightlab pending --interactive``, or the dashboard. The engine creates a request
(:func:`request`) and polls it (:func:`wait`); nothing that needs the answer runs meanwhile.

Rows: ``kind`` is ``run`` (review mode: may this candidate run?) or ``keep`` (approve-keep
mode: may the branch advance to it?); ``status`` is ``pending``, ``approved``, ``rejected``
or ``cancelled`` (the session stopped while it waited; set by the engine, never by a human).
An answer is final: answering a row that is no longer pending raises :class:`UsageError`.

Thread/process safety: every call is one ledger transaction; :func:`answer` only changes a
row that is still pending (a compare-and-set), so two humans answering at once cannot both win.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from nightlab.errors import UsageError
from nightlab.ledger import Ledger

KINDS = ("run", "keep")
STATUSES = ("pending", "approved", "rejected", "cancelled")

_meta = sa.MetaData()
approvals = sa.Table(
    "approvals",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.Integer, nullable=False),
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


def ensure_table(ledger: Ledger) -> None:
    """Create the table in the ledger's database when missing (idempotent, safe across processes)."""
    ledger.ensure_tables(_meta)


def _row(r: Any) -> dict[str, Any]:
    return dict(r._mapping)


def request(ledger: Ledger, session_id: int, idx: int, kind: str, diff: str = "", rationale: str = "") -> int:
    """Queue a pending approval for experiment ``idx`` of a session; returns its id."""
    if kind not in KINDS:
        raise ValueError(f"approval kind must be one of {KINDS}, not {kind!r}")
    ensure_table(ledger)
    with ledger.transaction(write=True) as conn:
        res = conn.execute(approvals.insert().values(
            session_id=session_id, experiment_idx=idx, kind=kind, status="pending", created_at=time.time(),
            answered_at=None, why="", who="", diff=diff, rationale=rationale,
        ))
        pk = res.inserted_primary_key
        assert pk is not None
        return int(pk[0])


def get(ledger: Ledger, approval_id: int) -> dict[str, Any] | None:
    ensure_table(ledger)
    with ledger.transaction() as conn:
        r = conn.execute(sa.select(approvals).where(approvals.c.id == approval_id)).first()
    return _row(r) if r is not None else None


def pending(ledger: Ledger, session_id: int | None = None) -> list[dict[str, Any]]:
    """Pending approvals of a session (of every session with ``None``), oldest first."""
    ensure_table(ledger)
    q = sa.select(approvals).where(approvals.c.status == "pending")
    if session_id is not None:
        q = q.where(approvals.c.session_id == session_id)
    with ledger.transaction() as conn:
        return [_row(r) for r in conn.execute(q.order_by(approvals.c.id)).all()]


def recent(ledger: Ledger, session_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Answered (or cancelled) requests, newest first."""
    ensure_table(ledger)
    q = sa.select(approvals).where(approvals.c.status != "pending")
    if session_id is not None:
        q = q.where(approvals.c.session_id == session_id)
    with ledger.transaction() as conn:
        return [_row(r) for r in conn.execute(q.order_by(approvals.c.id.desc()).limit(limit)).all()]


def find_pending(ledger: Ledger, session_id: int, idx: int) -> dict[str, Any] | None:
    """The pending approval of experiment ``idx`` of a session, or None."""
    ensure_table(ledger)
    q = sa.select(approvals).where(approvals.c.session_id == session_id, approvals.c.experiment_idx == idx,
                                   approvals.c.status == "pending").order_by(approvals.c.id.desc())
    with ledger.transaction() as conn:
        r = conn.execute(q).first()
    return _row(r) if r is not None else None


def answer(ledger: Ledger, approval_id: int, approved: bool, why: str = "", who: str = "") -> dict[str, Any]:
    """Approve or reject a pending approval; returns the answered row.

    Raises :class:`UsageError` when there is no such approval or it was answered already.
    """
    return _settle(ledger, approval_id, "approved" if approved else "rejected", why, who)


def cancel(ledger: Ledger, approval_id: int, why: str) -> dict[str, Any] | None:
    """Mark a still-pending approval ``cancelled`` (the engine stopped waiting). None if it was answered."""
    try:
        return _settle(ledger, approval_id, "cancelled", why, "nightlab")
    except UsageError:
        return None


def cancel_stale(ledger: Ledger, session_id: int, why: str) -> int:
    """Cancel every pending approval of a session (on resume: nobody waits for them). Returns how many."""
    ensure_table(ledger)
    with ledger.transaction(write=True) as conn:
        return int(conn.execute(
            approvals.update().where(approvals.c.session_id == session_id, approvals.c.status == "pending")
            .values(status="cancelled", answered_at=time.time(), why=why, who="nightlab")
        ).rowcount)


def _settle(ledger: Ledger, approval_id: int, status: str, why: str, who: str) -> dict[str, Any]:
    ensure_table(ledger)
    with ledger.transaction(write=True) as conn:
        n = conn.execute(
            approvals.update().where(approvals.c.id == approval_id, approvals.c.status == "pending")
            .values(status=status, answered_at=time.time(), why=why or "", who=who or "")
        ).rowcount
        r = conn.execute(sa.select(approvals).where(approvals.c.id == approval_id)).first()
    if r is None:
        raise UsageError(f"there is no approval {approval_id}", "list the queue with `nightlab pending`")
    row = _row(r)
    if n == 0:
        why = f" ({row['why']})" if row["why"] else ""
        by = row["who"] or "?"
        raise UsageError(f"approval {approval_id} was already answered: {row['status']} by {by}{why}",
                         "list the queue with `nightlab pending`")
    return row


def wait(
    ledger: Ledger,
    approval_id: int,
    *,
    poll_s: float = 1.0,
    cancel: threading.Event,
    stop: Callable[[], bool] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Block until the approval is answered; return its row.

    Returns early, with the row still ``pending``, when ``cancel`` is set, when ``stop()``
    returns true (checked every ``poll_s``) or after ``timeout_s``. The caller decides what
    an unanswered row means.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        row = get(ledger, approval_id)
        if row is None:
            raise UsageError(f"approval {approval_id} disappeared from the ledger",
                             "do not edit the ledger by hand")
        if row["status"] != "pending" or cancel.is_set() or (stop is not None and stop()):
            return row
        if deadline is not None and time.monotonic() >= deadline:
            return row
        delay = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
        cancel.wait(delay)


__all__ = [
    "answer", "approvals", "cancel", "cancel_stale", "find_pending", "get", "pending", "request", "wait",
]
