"""The claim feeder: the researcher of the pool's session, which proposes the claims that need a host run.

:meth:`ClaimFeeder.propose` blocks (polling ``ctx.should_stop``) until a claim is queued, then hands it to the
engine as an ordinary candidate on the claim's parent (a commit of the pool branch: ``chooses_parent``), so
the engine guards, runs, measures and decides it exactly as a local candidate, against the *current*
incumbent (a stale winner keeps its measured tree, keep.py). Order: claims of a new best first, oldest first;
then spot checks, oldest first.

:meth:`ClaimFeeder.observe` maps the finished experiment (params ``{"pool_claim": id}``, researcher
``pool:<worker>``) back to its claim and records the outcome:

- ``accepted``: kept on the pool branch (its gain over the incumbent before it goes to the leaderboard);
- ``checked``: the re-run agrees with the claim (within the noise) and it was not a claim of a new best;
- ``unconfirmed``: a claim of a new best that the re-run agrees with but the policy did not keep (no strike);
- ``contradicted`` (a strike): the claim is better than the re-run beyond the noise floor, the re-run produced
  no metric, or the claimed compute is inflated (:func:`trust.compute_inflated` against the run's seconds).
  The pool's engine (pool/engine.py) discards such a run before the policy sees it: a lie is never kept;
- ``rejected``: refused by the engine's guard (a strike for protected or forbidden paths).

Each outcome updates the worker's record (trust.after_result: streak, strikes, quarantine), stores the
host's verification seconds, writes ``evidence["pool"]`` (provenance: worker, claim, claimed metric,
verification) on the experiment, and goes to the audit log (``pool.verified``, ``pool.decision``,
``pool.strike``; ``pool.accept`` also notifies ``pool_claim_accepted``).
"""

from __future__ import annotations

import threading
from typing import Any

from nightlab.permissions import rule_of
from nightlab.pool import store, trust
from nightlab.pool.host import STRIKE_RULES, PoolHost
from nightlab.researchers import Context
from nightlab.types import Candidate, Experiment, Status

PREFIX = "pool:"


class ClaimFeeder:
    """A :class:`~nightlab.researchers.Researcher` whose proposals are the pool's queued claims."""

    name = "pool"
    chooses_parent = True  # its candidates are based on the claim's parent, a commit of the pool branch

    def __init__(self, host: PoolHost, poll_s: float = 0.2) -> None:
        self.host = host
        self.poll_s = poll_s
        self._handed: set[tuple[str, str]] = set()  # (worker, claim_id) proposed, not yet observed
        self._lock = threading.Lock()
        self._reset_done = False

    # ------------------------------------------------------------------ propose

    def _next(self) -> store.Claim | None:
        queued = store.list_claims(self.host.ledger, self.host.name, statuses=["queued"])
        queued = [c for c in queued if (c.worker, c.claim_id) not in self._handed]
        if not queued:
            return None
        gone = {w.name for w in store.list_workers(self.host.ledger, self.host.name)
                if w.revoked or w.record.quarantined}
        for c in [c for c in queued if c.worker in gone]:  # not worth the host's time any more; no strike
            store.update_claim(self.host.ledger, self.host.name, c.worker, c.claim_id, status="rejected",
                               reason="its worker was quarantined or revoked before the host ran it")
            self.host.emit("pool.decision", worker=c.worker, claim_id=c.claim_id, status="rejected",
                           reason="worker quarantined or revoked", strike=False)
        queued = [c for c in queued if c.worker not in gone]
        if not queued:
            return None
        return sorted(queued, key=lambda c: (not c.must_verify, c.seq))[0]

    def has_work(self) -> bool:
        """True when a queued claim waits (the scheduler asks while runs are in flight, so that it collects
        their results instead of blocking in :meth:`propose`)."""
        with self._lock:
            return any((c.worker, c.claim_id) not in self._handed
                       for c in store.list_claims(self.host.ledger, self.host.name, statuses=["queued"]))

    def _reset_orphans(self) -> None:
        """Claims left ``verifying`` by a host that stopped before their run: queued again (once, at start,
        after the history's replay has decided those whose run did finish)."""
        for c in store.list_claims(self.host.ledger, self.host.name, statuses=["verifying"]):
            if (c.worker, c.claim_id) not in self._handed:
                store.update_claim(self.host.ledger, self.host.name, c.worker, c.claim_id, status="queued")
        self._reset_done = True

    def propose(self, ctx: Context) -> Candidate:
        if not self._reset_done:
            self._reset_orphans()
        while True:
            if ctx.should_stop is not None and ctx.should_stop():
                return Candidate(parent=ctx.parent, rationale="pool: stopping", researcher=self.name,
                                 error="the pool is stopping")
            self.host.wake.clear()
            with self._lock:
                claim = self._next()
                if claim is not None:
                    self._handed.add((claim.worker, claim.claim_id))
            if claim is not None:
                store.update_claim(self.host.ledger, self.host.name, claim.worker, claim.claim_id,
                                   status="verifying")
                self.host.emit("pool.verify", experiment=ctx.idx, worker=claim.worker, claim_id=claim.claim_id,
                               parent=claim.parent, claimed=claim.metric, must_verify=claim.must_verify,
                               incumbent=ctx.incumbent_metric)
                what = "a new best" if claim.must_verify else "a spot check"
                return Candidate(
                    parent=claim.parent, diff=claim.diff, params={"pool_claim": claim.claim_id},
                    researcher=PREFIX + claim.worker,
                    rationale=f"pool claim {claim.claim_id} by {claim.worker} ({what}): claimed "
                              f"{self.host.spec.metric.name} = {claim.metric:.6g} "
                              f"({claim.experiments} experiments, {claim.compute_s:.0f}s on {claim.hardware or '?'})")
            self.host.wake.wait(self.poll_s)

    # ------------------------------------------------------------------ observe

    def observe(self, experiment: Experiment) -> None:
        cid = experiment.params.get("pool_claim") if isinstance(experiment.params, dict) else None
        if not isinstance(cid, str) or not experiment.researcher.startswith(PREFIX):
            return  # the baseline, or a combination the engine made of a stale claim (keep.py)
        worker = experiment.researcher[len(PREFIX):]
        key = (worker, cid)
        with self._lock:
            self._handed.discard(key)
        claim = store.get_claim(self.host.ledger, self.host.name, worker, cid)
        if claim is None or claim.status not in store.OPEN:
            return  # decided already (a resumed session replays its history)
        self._decide(claim, experiment)

    def _decide(self, claim: store.Claim, e: Experiment) -> None:
        host, policy = self.host, self.host.policy
        led, pool = host.ledger, host.name
        if e.status in (Status.INTERRUPTED, Status.LOST):
            store.update_claim(led, pool, claim.worker, claim.claim_id, status="queued",
                               reason=f"the host's run was {e.status.value}: queued again")
            return
        verify_s = max(0.0, (e.finished_at - e.started_at) if e.finished_at else e.run_s)
        noise_sd = host.noise_sd()
        measured = e.metric if e.status in (Status.KEEP, Status.DISCARD) else None
        strike = False
        gain: float | None = None
        if e.status in (Status.REJECTED, Status.INVALID):
            status, reason = "rejected", e.reason
            strike = rule_of(e.reason) in STRIKE_RULES
        elif e.status is Status.PRUNED and not claim.must_verify:
            status, reason = "checked", f"the host stopped the re-run early as hopeless: {e.reason}"
        elif why := host.refutation(claim, measured, e.run_s, ran=e.status.was_run()):
            status, strike = "contradicted", True
            reason = why if measured is not None else f"{why} ({e.status.value}: {e.reason[:200]})"
            if e.status is Status.KEEP:  # only when the noise floor moved between the run and now
                reason += "; kept on its measured merit, credited to nobody"
        elif e.status is Status.KEEP:
            status, reason = "accepted", f"kept on the pool branch: {e.reason}"
            gain = self._gain(e)
        elif claim.must_verify:
            status, reason = "unconfirmed", f"the re-run agrees within the noise, but was not kept: {e.reason}"
        else:
            status, reason = "checked", "the re-run agrees with the claim"
        w = store.get_worker(led, pool, claim.worker)
        rec = trust.after_result(w.record if w else trust.Record(), not strike, policy)
        if w is not None:
            store.set_record(led, pool, claim.worker, rec)
        commit = e.commit if e.status is Status.KEEP else None
        done = store.update_claim(led, pool, claim.worker, claim.claim_id, status=status, reason=reason,
                                  measured=e.metric, experiment=e.idx, commit=commit, verify_s=round(verify_s, 4),
                                  gain_pct=gain, strike=strike)
        provenance: dict[str, Any] = {
            "worker": claim.worker, "claim_id": claim.claim_id, "claimed": claim.metric,
            "samples": list(claim.samples)[:16], "seed": claim.seed, "hardware": claim.hardware,
            "compute_s": claim.compute_s, "experiments": claim.experiments, "researcher": claim.researcher,
            "parent": claim.parent,
            "verification": {"status": status, "measured": e.metric, "run_s": e.run_s, "verify_s": round(verify_s, 4),
                             "noise_sd": noise_sd, "must_verify": claim.must_verify, "reason": reason,
                             "gain_pct": gain, "strike": strike},
        }
        stored = led.get_experiment(e.session_id, e.idx)
        led.update_experiment(e.id, evidence={**(stored or e).evidence, "pool": provenance})
        host.emit("pool.verified", experiment=e.idx, worker=claim.worker, claim_id=claim.claim_id,
                  run_status=e.status.value, claimed=claim.metric, measured=e.metric, verify_s=round(verify_s, 4))
        host.emit("pool.decision", experiment=e.idx, worker=claim.worker, claim_id=claim.claim_id, status=status,
                  reason=reason, strike=strike, commit=commit, gain_pct=gain)
        if strike:
            host.emit("pool.strike", experiment=e.idx, worker=claim.worker, claim_id=claim.claim_id, reason=reason,
                      strikes=rec.strikes, quarantined=rec.quarantined)
        if status == "accepted":
            host.emit("pool.accept", experiment=e.idx, worker=claim.worker, claim_id=claim.claim_id,
                      commit=commit or "", metric=e.metric if e.metric is not None else "",
                      message=f"#{e.idx}: claim {claim.claim_id} of {claim.worker} accepted, "
                              f"{host.spec.metric.name} = {e.metric:.6g}"
                              + (f" ({gain:+.3f}% of the baseline)" if gain is not None else ""))
        assert done.status == status

    def _gain(self, e: Experiment) -> float | None:
        """The kept experiment's improvement over the incumbent before it, in % of the pool baseline."""
        host = self.host
        s = host.ledger.get_session_by_id(e.session_id)
        if s is None or e.metric is None:
            return None
        before = [x for x in host.ledger.experiments(e.session_id)
                  if x.idx < e.idx and x.status is Status.KEEP and x.metric is not None]
        if not before:
            return None
        d = host.spec.metric.direction
        new, old = d.improvement_pct(e.metric, s.baseline_metric), d.improvement_pct(before[-1].metric,
                                                                                      s.baseline_metric)
        return None if new is None or old is None else round(new - old, 6)

    def close(self) -> None:
        """Claims proposed but never run (dropped at a stop) wait in the queue for the next serve."""
        with self._lock:
            left, self._handed = list(self._handed), set()
        for worker, cid in left:
            c = store.get_claim(self.host.ledger, self.host.name, worker, cid)
            if c is not None and c.status == "verifying":
                store.update_claim(self.host.ledger, self.host.name, worker, cid, status="queued")
