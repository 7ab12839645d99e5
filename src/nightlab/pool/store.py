"""The pool's tables in the lab's ledger: workers (tokens stored as sha256 only, their trust record) and claims.

The tables live in the ledger's database next to approvals and comparisons (created with
:meth:`Ledger.ensure_tables`, so the ledger's schema version is untouched), on SQLite and PostgreSQL alike.
Every function is one transaction; :func:`add_claim` is idempotent by ``(pool, worker, claim_id)`` even when two
requests race (the primary key decides, the loser reads the winner's row).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.pool.trust import Record

STATUSES = ("queued", "credited", "verifying", "accepted", "checked", "unconfirmed", "contradicted", "rejected",
            "duplicate")
OPEN = ("queued", "verifying")  # waiting for (or in) a host run
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKEN_PREFIX = "nlp_"

_meta = sa.MetaData()
workers = sa.Table(
    "pool_workers",
    _meta,
    sa.Column("pool", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.Column("valid_streak", sa.Integer, nullable=False, default=0),
    sa.Column("strikes", sa.Integer, nullable=False, default=0),
    sa.Column("quarantined", sa.Integer, nullable=False, default=0),
)
claims = sa.Table(
    "pool_claims",
    _meta,
    sa.Column("pool", sa.String(64), primary_key=True),
    sa.Column("worker", sa.String(64), primary_key=True),
    sa.Column("claim_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),  # arrival order (microseconds since the epoch)
    sa.Column("parent", sa.String(64), nullable=False),
    sa.Column("diff", sa.Text, nullable=False),
    sa.Column("diff_sha256", sa.String(64), nullable=False),  # of the normalised diff (duplicates)
    sa.Column("metric", sa.Double, nullable=False),  # claimed
    sa.Column("samples_json", sa.Text, nullable=False),
    sa.Column("log_tail", sa.Text, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("hardware", sa.Text, nullable=False),
    sa.Column("compute_s", sa.Double, nullable=False),
    sa.Column("experiments", sa.Integer, nullable=False),
    sa.Column("researcher", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("must_verify", sa.Integer, nullable=False, default=0),  # claims a new best
    sa.Column("measured", sa.Double, nullable=True),
    sa.Column("experiment", sa.Integer, nullable=True),  # idx in the pool session
    sa.Column("commit", sa.String(64), nullable=True),  # the pool commit it became (accepted)
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("decided_at", sa.Double, nullable=True),
    sa.Column("verify_s", sa.Double, nullable=False, default=0.0),  # host seconds spent verifying it
    sa.Column("gain_pct", sa.Double, nullable=True),  # accepted: gain over the incumbent before, % of baseline
    sa.Column("strike", sa.Integer, nullable=False, default=0),  # this claim cost its worker a strike
    sa.Index("ix_pool_claims_status", "pool", "status"),
    sa.Index("ix_pool_claims_diff", "pool", "diff_sha256"),
)


@dataclass(frozen=True)
class Worker:
    pool: str
    name: str
    created_at: float
    revoked_at: float | None
    record: Record

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Claim:
    pool: str
    worker: str
    claim_id: str
    seq: int
    parent: str
    diff: str
    diff_sha256: str
    metric: float
    samples: tuple[float, ...]
    log_tail: str
    seed: int
    hardware: str
    compute_s: float
    experiments: int
    researcher: str
    status: str
    reason: str
    must_verify: bool
    measured: float | None
    experiment: int | None
    commit: str | None
    received_at: float
    decided_at: float | None
    verify_s: float
    gain_pct: float | None
    strike: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The contract's ``GET /api/pool/claims/{id}`` body."""
        return {"claim_id": self.claim_id, "worker": self.worker, "status": self.status, "reason": self.reason,
                "claimed": self.metric, "measured": self.measured, "experiment": self.experiment,
                "commit": self.commit}


def ensure_tables(ledger: Ledger) -> None:
    ledger.ensure_tables(_meta)


def has_tables(ledger: Ledger) -> bool:
    """True when this ledger holds a pool (read-only: creates nothing)."""
    with ledger.transaction() as conn:
        return sa.inspect(conn).has_table(workers.name)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def normalise_diff(diff: str) -> str:
    """The change a diff makes, without what varies between equal changes: ``index`` lines, hunk positions,
    line endings and trailing blanks."""
    out = []
    for line in diff.replace("\r\n", "\n").split("\n"):
        if line.startswith(("index ", "@@")) or not line.strip():
            continue
        out.append(line.rstrip())
    return "\n".join(out)


def diff_digest(diff: str) -> str:
    return hashlib.sha256(normalise_diff(diff).encode("utf-8", "surrogatepass")).hexdigest()


# ------------------------------------------------------------------------------------------- workers


def _worker(r: Any) -> Worker:
    return Worker(pool=r.pool, name=r.name, created_at=r.created_at, revoked_at=r.revoked_at,
                  record=Record(valid_streak=r.valid_streak, strikes=r.strikes, quarantined=bool(r.quarantined)))


def invite(ledger: Ledger, pool: str, name: str) -> str:
    """A new worker ``name`` (or a new token for a revoked one); returns its token, which is stored hashed only."""
    if not NAME.fullmatch(name):
        raise UsageError(f"bad worker name {name!r}",
                         "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    ensure_tables(ledger)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with ledger.transaction(write=True) as conn:
        row = conn.execute(sa.select(workers).where(workers.c.pool == pool, workers.c.name == name)).first()
        if row is not None and row.revoked_at is None:
            raise UsageError(f"worker {name!r} is already invited to pool {pool!r}",
                             f"give the new worker another name, or `nightlab pool revoke {name}` first")
        if row is None:
            conn.execute(workers.insert().values(pool=pool, name=name, token_sha256=hash_token(token),
                                                 created_at=time.time(), revoked_at=None, valid_streak=0,
                                                 strikes=0, quarantined=0))
        else:  # re-invited after a revoke: a new token, its record (strikes, quarantine) kept
            conn.execute(workers.update().where(workers.c.pool == pool, workers.c.name == name)
                         .values(token_sha256=hash_token(token), revoked_at=None))
    return token


def revoke(ledger: Ledger, pool: str, name: str) -> None:
    ensure_tables(ledger)
    with ledger.transaction(write=True) as conn:
        n = conn.execute(workers.update().where(workers.c.pool == pool, workers.c.name == name,
                                                workers.c.revoked_at.is_(None))
                         .values(revoked_at=time.time())).rowcount
    if not n:
        w = get_worker(ledger, pool, name)
        if w is None:
            raise UsageError(f"no worker {name!r} in pool {pool!r}", "see `nightlab pool leaderboard` for the names")


def authenticate(ledger: Ledger, pool: str, token: str) -> Worker | None:
    """The worker whose token this is (revoked ones included: the caller answers 403), or None."""
    ensure_tables(ledger)
    digest = hash_token(token)
    with ledger.transaction() as conn:
        r = conn.execute(sa.select(workers).where(workers.c.pool == pool, workers.c.token_sha256 == digest)).first()
    if r is None or not secrets.compare_digest(r.token_sha256, digest):
        return None
    return _worker(r)


def get_worker(ledger: Ledger, pool: str, name: str) -> Worker | None:
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        r = conn.execute(sa.select(workers).where(workers.c.pool == pool, workers.c.name == name)).first()
    return _worker(r) if r is not None else None


def list_workers(ledger: Ledger, pool: str) -> list[Worker]:
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        rows = conn.execute(sa.select(workers).where(workers.c.pool == pool).order_by(workers.c.name)).all()
    return [_worker(r) for r in rows]


def set_record(ledger: Ledger, pool: str, name: str, record: Record) -> None:
    with ledger.transaction(write=True) as conn:
        conn.execute(workers.update().where(workers.c.pool == pool, workers.c.name == name).values(
            valid_streak=record.valid_streak, strikes=record.strikes, quarantined=int(record.quarantined)))


def strike(ledger: Ledger, pool: str, name: str, policy: Any) -> Record:
    """One invalid result for ``name`` (trust.after_result), stored; returns the new record."""
    from nightlab.pool.trust import after_result

    w = get_worker(ledger, pool, name)
    assert w is not None
    rec = after_result(w.record, False, policy)
    set_record(ledger, pool, name, rec)
    return rec


# ------------------------------------------------------------------------------------------- claims


def _claim(r: Any) -> Claim:
    return Claim(pool=r.pool, worker=r.worker, claim_id=r.claim_id, seq=int(r.seq), parent=r.parent, diff=r.diff,
                 diff_sha256=r.diff_sha256, metric=r.metric, samples=tuple(json.loads(r.samples_json)),
                 log_tail=r.log_tail, seed=int(r.seed), hardware=r.hardware, compute_s=r.compute_s,
                 experiments=r.experiments, researcher=r.researcher, status=r.status, reason=r.reason,
                 must_verify=bool(r.must_verify), measured=r.measured, experiment=r.experiment, commit=r.commit,
                 received_at=r.received_at, decided_at=r.decided_at, verify_s=r.verify_s or 0.0,
                 gain_pct=r.gain_pct, strike=bool(r.strike))


def add_claim(ledger: Ledger, *, pool: str, worker: str, claim_id: str, parent: str, diff: str, metric: float,
              samples: Iterable[float], log_tail: str, seed: int, hardware: str, compute_s: float, experiments: int,
              researcher: str, status: str, reason: str = "", must_verify: bool = False,
              strike: bool = False) -> tuple[Claim, bool]:
    """Store a claim; ``(claim, True)`` when new, ``(the stored claim, False)`` when this id was seen before."""
    if status not in STATUSES:
        raise ValueError(f"claim status must be one of {STATUSES}, not {status!r}")
    ensure_tables(ledger)
    now = time.time()
    values = dict(pool=pool, worker=worker, claim_id=claim_id, seq=time.time_ns() // 1000, parent=parent, diff=diff,
                  diff_sha256=diff_digest(diff), metric=metric, samples_json=json.dumps(list(samples)),
                  log_tail=log_tail, seed=seed, hardware=hardware, compute_s=compute_s, experiments=experiments,
                  researcher=researcher, status=status, reason=reason, must_verify=int(must_verify),
                  measured=None, experiment=None, commit=None, received_at=now,
                  decided_at=None if status in OPEN else now, verify_s=0.0, gain_pct=None, strike=int(strike))
    try:
        with ledger.transaction(write=True) as conn:
            conn.execute(claims.insert().values(**values))
    except exc.IntegrityError:
        old = get_claim(ledger, pool, worker, claim_id)
        assert old is not None
        return old, False
    new = get_claim(ledger, pool, worker, claim_id)
    assert new is not None
    return new, True


def get_claim(ledger: Ledger, pool: str, worker: str, claim_id: str) -> Claim | None:
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        r = conn.execute(sa.select(claims).where(claims.c.pool == pool, claims.c.worker == worker,
                                                 claims.c.claim_id == claim_id)).first()
    return _claim(r) if r is not None else None


def first_with_diff(ledger: Ledger, pool: str, diff: str) -> Claim | None:
    """The earliest claim (not itself a duplicate) of the same normalised diff."""
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        r = conn.execute(sa.select(claims).where(claims.c.pool == pool, claims.c.diff_sha256 == diff_digest(diff),
                                                 claims.c.status != "duplicate")
                         .order_by(claims.c.seq).limit(1)).first()
    return _claim(r) if r is not None else None


def experiments_before(ledger: Ledger, pool: str, worker: str, seq: int) -> int:
    """The experiments a worker claimed in its claims that arrived before claim ``seq`` (any status)."""
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(claims.c.experiments), 0)).where(
            claims.c.pool == pool, claims.c.worker == worker, claims.c.seq < seq)).scalar_one())


def experiments_on_parent(ledger: Ledger, pool: str, worker: str, parent: str, seq: int) -> int:
    """The experiments of a worker's claims on ``parent`` up to claim ``seq`` (included): its session on that pool
    head so far (a worker starts a new session when the head moves)."""
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(claims.c.experiments), 0)).where(
            claims.c.pool == pool, claims.c.worker == worker, claims.c.parent == parent,
            claims.c.seq <= seq)).scalar_one())


def pending_count(ledger: Ledger, pool: str, worker: str) -> int:
    ensure_tables(ledger)
    with ledger.transaction() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(claims).where(
            claims.c.pool == pool, claims.c.worker == worker, claims.c.status.in_(OPEN))).scalar_one())


def list_claims(ledger: Ledger, pool: str, *, statuses: Iterable[str] | None = None,
                worker: str | None = None) -> list[Claim]:
    """Claims in arrival order, optionally of some statuses or one worker."""
    ensure_tables(ledger)
    q = sa.select(claims).where(claims.c.pool == pool)
    if statuses is not None:
        q = q.where(claims.c.status.in_(list(statuses)))
    if worker is not None:
        q = q.where(claims.c.worker == worker)
    with ledger.transaction() as conn:
        rows = conn.execute(q.order_by(claims.c.seq, claims.c.worker, claims.c.claim_id)).all()
    return [_claim(r) for r in rows]


def update_claim(ledger: Ledger, pool: str, worker: str, claim_id: str, **values: Any) -> Claim:
    """Set columns of one claim (``status``, ``reason``, ``measured``, ...); a final status stamps ``decided_at``."""
    if "status" in values and values["status"] not in STATUSES:
        raise ValueError(f"claim status must be one of {STATUSES}, not {values['status']!r}")
    if values.get("status") not in (None, *OPEN):
        values.setdefault("decided_at", time.time())
    for key in ("must_verify", "strike"):
        if key in values:
            values[key] = int(values[key])
    with ledger.transaction(write=True) as conn:
        conn.execute(claims.update().where(claims.c.pool == pool, claims.c.worker == worker,
                                           claims.c.claim_id == claim_id).values(**values))
    c = get_claim(ledger, pool, worker, claim_id)
    assert c is not None
    return c
