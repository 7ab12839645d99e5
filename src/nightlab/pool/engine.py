"""The pool session's engine: an ordinary :class:`~nightlab.engine.Engine` with two pool rules.

1. **A lie is never kept.** Before the lab's policy judges a claim's run, a claimed metric that the run
   contradicts (:func:`trust.contradicted`) or claimed compute the run shows inflated
   (:func:`trust.compute_inflated`) makes the experiment a ``discard``: nothing a cheater claims advances
   the pool branch, even when its change happens to be better (the host may find it again honestly).
2. **The noise floor is measured** (``[pool] calibrate``): the session calibrates after its baseline
   (``[accept] calibrate`` runs with new seeds) even when the lab's policy does not need it, so a claim is
   judged against the run-to-run noise of the host's own hardware.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nightlab.engine import Engine
from nightlab.types import Candidate, Experiment, Measurement, RunResult, Status
from nightlab.verifier import Verifier

PREFIX = "pool:"


class _CalibratingVerifier(Verifier):
    def needs_calibration(self) -> bool:
        return "sigma" not in self.noise() or super().needs_calibration()


class PoolEngine(Engine):
    """See the module docstring. ``pool_host`` is the :class:`~nightlab.pool.host.PoolHost` of the claims."""

    def __init__(self, lab_dir: Path | str, *, pool_host: Any, **kwargs: Any) -> None:
        super().__init__(lab_dir, **kwargs)
        self.pool_host = pool_host
        if self.spec.pool.calibrate:
            self.verifier = _CalibratingVerifier(self)

    def claim_problem(self, candidate: Candidate, m: Measurement, run: RunResult) -> str:
        """Why a claim's measured run refutes the claim ("" when it does not, or it is not a claim)."""
        cid = candidate.params.get("pool_claim")
        if not isinstance(cid, str) or not candidate.researcher.startswith(PREFIX):
            return ""
        from nightlab.pool import store

        host = self.pool_host
        claim = store.get_claim(host.ledger, host.name, candidate.researcher[len(PREFIX):], cid)
        if claim is None:
            return ""
        why = host.refutation(claim, m.metric, run.wall_s)
        return f"pool: {why}: a lie is never kept" if why else ""

    def _decide(self, idx: int, exp_id: int, candidate: Candidate, commit: str, canonical: str, wt: Path,
                lab_root: Path, t0: float, res: RunResult, m: Measurement, extras: dict[str, Any]) -> Experiment:
        why = self.claim_problem(candidate, m, res)
        if why:
            return self._finish(exp_id, Status.DISCARD, t0, res, m, reason=why,
                                evidence={"pool_refused": why, **extras})
        return super()._decide(idx, exp_id, candidate, commit, canonical, wt, lab_root, t0, res, m, extras)
