"""Acceptance policies: turn a measurement into keep or discard, with the evidence.

A policy only decides; it never proposes and never touches git. Every verdict carries the
numbers it rests on, stored with the experiment. ``greedy`` is autoresearch's rule (keep
when strictly better); noise-aware policies compose on top of the same interface.
"""

from __future__ import annotations

from typing import Protocol

from nightlab.errors import SpecError
from nightlab.spec import AcceptSpec
from nightlab.types import Direction, Measurement, Verdict


class AcceptancePolicy(Protocol):
    name: str

    def decide(self, measurement: Measurement, incumbent: float | None, direction: Direction) -> Verdict:
        """Keep or discard a *valid* measurement against the incumbent's metric."""
        ...


class Greedy:
    """Keep when strictly better than the incumbent (karpathy/autoresearch's rule)."""

    name = "greedy"

    def decide(self, measurement: Measurement, incumbent: float | None, direction: Direction) -> Verdict:
        assert measurement.metric is not None
        value = measurement.metric
        evidence = {"policy": self.name, "candidate": value, "incumbent": incumbent}
        if incumbent is None:
            return Verdict(True, "first valid measurement", evidence)
        delta = direction.improvement(value, incumbent)
        evidence["improvement"] = delta
        if direction.better(value, incumbent):
            return Verdict(True, f"better than the incumbent by {delta:.6g}", evidence)
        return Verdict(False, f"not better than the incumbent ({value:.6g} vs {incumbent:.6g})", evidence)


def make_policy(spec: AcceptSpec) -> AcceptancePolicy:
    if spec.policy == "greedy":
        return Greedy()
    raise SpecError(f"[accept] policy = {spec.policy!r} is not known", "use 'greedy'")
