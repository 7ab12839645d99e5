"""The pool's leaderboard: per worker, verified gain, claims by outcome, compute, strikes, trust.

Verified gain of a worker = the sum over its accepted claims of the improvement each made over the incumbent
before it, in % of the pool baseline (stored per claim as ``gain_pct`` when the host accepts it). Compute is
what workers *claim* (seconds), counted for valid claims only (accepted, checked, unconfirmed, or credited
unchecked): rejected, contradicted, duplicate and pending claims earn none; ``verified_compute_fraction`` is
the share of it whose claims the host re-ran. Whatever it claims, a worker is credited at most
``[pool] max_parallel`` times the seconds from its invite to its latest claim (``claimed_compute_s`` keeps
the claim).
``verification_fraction`` in the totals is the host's verification seconds over the workers' claimed seconds:
the measured price of "cheap to verify".
"""

from __future__ import annotations

from typing import Any

from nightlab.ledger import Ledger
from nightlab.pool import store, trust

RERUN = ("accepted", "checked", "unconfirmed", "contradicted")  # the host ran these
INVALID = ("rejected", "contradicted")
VALID = ("accepted", "checked", "unconfirmed", "credited")  # decided, and compute that counts
EMPTY: dict[str, Any] = {"workers": [], "totals": {"worker_compute_s": 0.0, "verification_s": 0.0,
                                                   "verification_fraction": None, "claims": 0, "accepted": 0}}


def leaderboard(ledger: Ledger, pool: str, policy: trust.PoolPolicy) -> dict[str, Any]:
    workers = store.list_workers(ledger, pool)
    claims = store.list_claims(ledger, pool)
    rows: list[dict[str, Any]] = []
    for w in workers:
        mine = [c for c in claims if c.worker == w.name]
        claimed = sum(c.compute_s for c in mine if c.status in VALID)
        verified = sum(c.compute_s for c in mine if c.status in VALID and c.status in RERUN)
        # a worker cannot have computed longer than max_parallel runs since its invite, whatever it claims
        last = max((c.received_at for c in mine), default=w.created_at)
        compute = min(claimed, max(0.0, last - w.created_at) * policy.max_parallel)
        rows.append({
            "worker": w.name,
            "verified_gain_pct": round(sum(c.gain_pct or 0.0 for c in mine if c.status == "accepted"), 6),
            "accepted": sum(c.status == "accepted" for c in mine),
            "rejected": sum(c.status in INVALID for c in mine),
            "pending": sum(c.status in store.OPEN for c in mine),
            "credited": sum(c.status == "credited" for c in mine),
            "duplicates": sum(c.status == "duplicate" for c in mine),
            "compute_s": round(compute, 3),
            "claimed_compute_s": round(claimed, 3),
            "verified_compute_fraction": round(verified / claimed, 4) if claimed > 0 else None,
            "strikes": w.record.strikes,
            "trust": trust.trust_label(w.record, policy),
            "check_probability": round(trust.check_probability(w.record, policy), 4),
            "quarantined": w.record.quarantined,
            "revoked": w.revoked,
        })
    rows.sort(key=lambda r: (-r["verified_gain_pct"], -r["accepted"], -r["compute_s"], r["worker"]))
    for k, row in enumerate(rows, 1):
        row["rank"] = k
    worker_s = sum(r["compute_s"] for r in rows)  # a cheater's claimed hours count for nothing
    verify_s = sum(c.verify_s for c in claims)
    return {"workers": [{"rank": r.pop("rank"), **r} for r in rows],
            "totals": {"worker_compute_s": round(worker_s, 3), "verification_s": round(verify_s, 3),
                       "verification_fraction": round(verify_s / worker_s, 4) if worker_s > 0 else None,
                       "claims": len(claims), "accepted": sum(c.status == "accepted" for c in claims)}}
