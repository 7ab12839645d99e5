"""The requeue, persisted: combinations of stale changes (keep.py) survive a kill and ``--resume``.

The engine keeps the queue in memory (``Engine._requeue``) and mirrors it in the ledger's
``requeue`` table (created by :meth:`Ledger.ensure_tables`, beside the versioned schema, like
``approvals``), one row per queued combination, each write one transaction:

- :func:`add` when a combination is queued; its tip commit is pinned by the ref
  ``refs/nightlab/<tag>/requeue/<row id>`` so that no ``git gc`` takes it;
- :func:`take` when it is proposed, with the experiment index it is proposed as;
- :func:`drop` when it is dropped unrun (it conflicts with, or adds nothing to, the incumbent).

On ``--resume``, :func:`restore` gives back, oldest first, every row that was queued, or taken
for an experiment that never measured it (no row: killed before the run started; or
``interrupted``), and deletes the rest: combinations whose experiment ran (done), whose source
experiment predates the session's latest re-baseline, or whose tip commit is gone.
Not thread-safe on one row; the engine adds and takes each row from one thread.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa

from nightlab.keep import Requeued
from nightlab.ledger import Ledger
from nightlab.types import Status
from nightlab.workspace import Workspace

_meta = sa.MetaData()
requeue = sa.Table(
    "requeue",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.Integer, nullable=False),
    sa.Column("source_idx", sa.Integer, nullable=False),
    sa.Column("tip", sa.String(64), nullable=False),
    sa.Column("rationale", sa.Text, nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
    sa.Column("taken_idx", sa.Integer, nullable=True),  # NULL: queued
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_requeue_session", "session_id"),
    sqlite_autoincrement=True,
)


def _ref(tag: str, key: int) -> str:
    return f"refs/nightlab/{tag}/requeue/{key}"


def add(ledger: Ledger, ws: Workspace, session_id: int, tag: str, item: Requeued) -> Requeued:
    """Persist a queued combination; returns it with its row id as ``key``."""
    ledger.ensure_tables(_meta)
    with ledger.transaction(write=True) as conn:
        pk = conn.execute(requeue.insert().values(
            session_id=session_id, source_idx=item.source_idx, tip=item.tip, rationale=item.rationale,
            params_json=json.dumps(item.params, sort_keys=True), taken_idx=None, created_at=time.time(),
        )).inserted_primary_key
    assert pk is not None
    key = int(pk[0])
    ws.git("update-ref", _ref(tag, key), item.tip)
    return Requeued(item.source_idx, item.rationale, item.tip, dict(item.params), key=key)


def take(ledger: Ledger, item: Requeued, idx: int) -> None:
    """``item`` is proposed as experiment ``idx`` (it stays restorable until that experiment measures it)."""
    if item.key:
        ledger.ensure_tables(_meta)
        with ledger.transaction(write=True) as conn:
            conn.execute(requeue.update().where(requeue.c.id == item.key).values(taken_idx=idx))


def drop(ledger: Ledger, ws: Workspace, tag: str, item: Requeued) -> None:
    """Forget a combination for good (dropped unrun, or done)."""
    if item.key:
        ledger.ensure_tables(_meta)
        with ledger.transaction(write=True) as conn:
            conn.execute(requeue.delete().where(requeue.c.id == item.key))
        ws._run(["update-ref", "-d", _ref(tag, item.key)], check=False)


def restore(ledger: Ledger, ws: Workspace, session_id: int, tag: str,
            epoch: int) -> tuple[list[Requeued], list[tuple[Requeued, str]]]:
    """The combinations to queue again on ``--resume`` (oldest first), and those dropped, with why.

    Call after the orphaned experiments are marked ``interrupted`` (``recover``) and before any new one.
    """
    ledger.ensure_tables(_meta)
    with ledger.transaction() as conn:
        rows = conn.execute(sa.select(requeue).where(requeue.c.session_id == session_id)
                            .order_by(requeue.c.id)).all()
    keep_: list[Requeued] = []
    dropped: list[tuple[Requeued, str]] = []
    for r in rows:
        params: dict[str, Any] = json.loads(r.params_json)
        item = Requeued(int(r.source_idx), str(r.rationale), str(r.tip), params, key=int(r.id))
        why = ""
        if r.source_idx < epoch:
            why = "its experiment predates the session's latest re-baseline"
        elif ws.resolve(item.tip) is None:
            why = "its commit is gone from the repository"
        elif r.taken_idx is not None:
            exp = ledger.get_experiment(session_id, int(r.taken_idx))
            if exp is not None and exp.status is not Status.INTERRUPTED:
                drop(ledger, ws, tag, item)  # done: it ran as experiment taken_idx
                continue
        if why:
            drop(ledger, ws, tag, item)
            dropped.append((item, why))
            continue
        if r.taken_idx is not None:
            with ledger.transaction(write=True) as conn:
                conn.execute(requeue.update().where(requeue.c.id == item.key).values(taken_idx=None))
        keep_.append(item)
    return keep_, dropped
