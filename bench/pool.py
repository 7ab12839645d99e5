"""A simulated research pool: W workers, a share of them cheating, many rounds (issue 14).

The verification rules are the real ones: :mod:`nightlab.pool.trust` (must_verify, check_probability,
contradicted, compute_inflated, after_result) with the default ``[pool]`` section, and the lab's acceptance
policy is the real :func:`nightlab.policy.make_policy` of ``[accept] policy = "repeat"`` with its defaults (threshold
screen z = 1, r = 5, Welch, alpha = 0.02), on both sides: honest workers run it locally (their session is an
ordinary nightlab session) and the host runs it when it verifies a claim. What is simulated: the metric
(minimise; one run's noise sigma = 1), the effects of candidates (as in bench/acceptance.py: 50% no effect,
30% harmful, 20% helpful and mostly smaller than the noise) and the runs (each costs 1 unit of compute on the
worker's or the host's machine). The claim status rules follow POOL-CONTRACT.md: a quarantined worker is
refused; over ``max_pending`` claims a round get 429; a diff touching a protected file is rejected with a
strike; the same diff twice is a duplicate (credited to the first, not run); a claim of a new best is always
re-run, others spot-checked at the worker's check probability; a check that contradicts the claimed metric,
or measures far less compute than claimed, is a strike.

Cheaters (cycled over the cheating share): ``inflate`` searches honestly but claims, every round, 4 sigma better than
the pool's best; ``copy`` resubmits other workers' claims as its own; ``protected`` edits the protected evaluator;
``compute`` claims 100x the compute of each claim and does no work; ``flood`` sends 100 junk claims a round;
``count`` does no work and claims a million experiments (with a million runs' compute) and a metric 6 sigma
better than the pool's best (the claimed count widens the host's tolerance by the best-of-n allowance).

    python bench/pool.py                   # the README table (about a minute)
    python bench/pool.py --rounds 20 --workers 10 --cheaters 0.3

Figures: ``false accepts``: claims that changed the pool's best to a tree whose true metric is not better
than the best it replaced (the goal is 0); ``cheater accepts``: accepted claims of cheaters; ``overstated
accepts``: accepted claims whose claimed metric was better than their truth by more than ``tolerance_sd``
sigmas (the pool's best is the host's measurement, so this costs nothing; it shows the winner's curse of a
worker's own keeps); ``verification %``: host runs over the workers' search runs (full replication: 100%);
``honest quarantined``: honest workers that collected ``max_strikes`` strikes (contradicted by noise);
``cheaters' credited compute``: their share of the compute the pool credits (claimed seconds of claims
not found invalid, capped at ``[pool] max_parallel`` runs since the invite, as the leaderboard does);
``rounds to quarantine``: the latest round in which a cheater of that kind was quarantined.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from nightlab.policy import IncumbentStats, make_policy
from nightlab.pool import trust
from nightlab.spec import AcceptSpec, PoolSpec
from nightlab.types import Direction, Measurement

SIGMA = 1.0
MIN = Direction.MINIMIZE
KINDS = ("inflate", "copy", "protected", "compute", "flood", "count")
RUN_S = 60.0  # seconds of one run (for the compute-inflation rule); the host measures the same


def effect(rng: random.Random) -> float:
    """A candidate's true change of the metric (minimise: negative is better)."""
    u = rng.random()
    if u < 0.5:
        return 0.0
    if u < 0.8:
        return abs(rng.gauss(0.0, 1.0))
    return -abs(rng.gauss(0.0, 0.5))


@dataclass
class Claim:
    worker: int
    diff: int  # an id standing for the normalised diff
    true: float  # the true metric of the claimed tree
    claimed: float
    samples: tuple[float, ...]
    compute_s: float
    experiments: int
    protected: bool = False
    head: int = -1  # the pool head it was found on (the claim's parent)


@dataclass
class Worker:
    idx: int
    kind: str  # "honest" or a cheat
    record: trust.Record = field(default_factory=trust.Record)
    quarantined_round: int | None = None
    search_runs: int = 0
    claims: int = 0
    accepted: int = 0
    credited_s: float = 0.0
    claimed_experiments: int = 0  # of all its claims the host has received (the host's clock bounds them)
    on_head: Counter[int] = field(default_factory=Counter)  # experiments of its claims per parent (its sessions)
    local: tuple[int, float, IncumbentStats] | None = None  # (pool head, true metric, stats) of its session


@dataclass
class Pool:
    best_true: float = 10.0  # the pool's baseline; its estimate below is 5 exact runs
    best: IncumbentStats = field(default_factory=lambda: IncumbentStats.of([10.0] * 5, SIGMA, 4))
    head: int = 0  # bumps on every accept
    diffs: dict[int, int] = field(default_factory=dict)  # diff id -> first worker
    host_runs: int = 0
    false_accepts: int = 0  # best changed to a tree truly not better
    overstated: int = 0
    accepted_from_cheaters: int = 0
    best_changing: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    accepted_claims: list[Claim] = field(default_factory=list)


class Sim:
    def __init__(self, workers: int, cheat_share: float, rounds: int, experiments: int, seed: int,
                 local: str = "repeat") -> None:
        self.rng = random.Random(seed)
        self.policy = PoolSpec()
        self.accept = make_policy(AcceptSpec(policy="repeat"))
        self.local_accept = make_policy(AcceptSpec(policy=local))
        self.rounds, self.experiments = rounds, experiments
        n_cheat = round(workers * cheat_share)
        self.workers = [Worker(i, KINDS[i % len(KINDS)] if i < n_cheat else "honest") for i in range(workers)]
        self.pool = Pool()
        self.next_diff = 0
        self.honest_quarantined = 0

    def run_metric(self, true: float) -> float:
        return true + self.rng.gauss(0.0, SIGMA)

    def new_diff(self) -> int:
        self.next_diff += 1
        return self.next_diff

    # ----------------------------------------------------------------- workers

    def search(self, w: Worker) -> list[Claim]:
        """An honest local session of ``experiments`` experiments from the pool head, the lab's policy."""
        p = self.pool
        since = 0
        if w.local is not None and w.local[0] == p.head:  # same head: the session resumes
            _, inc_true, inc = w.local
        else:  # a new head: a new session, whose baseline is calibrated (5 runs)
            base = [self.run_metric(p.best_true) for _ in range(5)]
            w.search_runs += 5
            since = 5
            inc_true, inc = p.best_true, IncumbentStats.of(base, SIGMA, 4)
        claims: list[Claim] = []
        for _ in range(self.experiments):
            true = inc_true + effect(self.rng)
            first = self.run_metric(true)
            w.search_runs += 1
            since += 1
            runs: list[float] = []

            def remeasure(r: int, true: float = true, runs: list[float] = runs) -> list[Measurement]:
                got = [self.run_metric(true) for _ in range(r)]
                runs.extend(got)
                return [Measurement(m) for m in got]

            v = self.local_accept.decide(Measurement(first), inc, MIN, remeasure)
            w.search_runs += len(runs)
            since += len(runs)
            if v.keep:
                samples = tuple(v.evidence.get("samples") or [first])
                inc_true, inc = true, IncumbentStats.of(samples, SIGMA, 4)
                est = float(v.evidence.get("estimate", first))
                claims.append(Claim(w.idx, self.new_diff(), true, est, samples,
                                    since * RUN_S * self.rng.uniform(0.8, 1.25), since))
                since = 0
        w.local = (p.head, inc_true, inc)
        return claims

    def claims_of(self, w: Worker, rnd: int) -> list[Claim]:
        if w.kind in ("honest", "inflate"):
            claims = self.search(w)
            if w.kind == "inflate":  # and every round a new best it did not find
                claims.append(Claim(w.idx, self.new_diff(), w.local[1] if w.local else self.pool.best_true,
                                    0.0, (), 10 * RUN_S, 10))
                for c in claims:
                    c.claimed = min(c.claimed, float(self.pool.best.metric or 0.0)) - 4 * SIGMA
                    c.samples = (c.claimed,) * 5
            return claims
        if w.kind == "copy":  # other workers' accepted diffs, their metric, some compute
            src = self.pool.accepted_claims[-3:]
            return [Claim(w.idx, c.diff, c.true, c.claimed, c.samples, 10 * RUN_S, 10) for c in src]
        if w.kind == "protected":  # "improves" the metric by editing the evaluator
            true = self.pool.best_true
            return [Claim(w.idx, self.new_diff(), true, true - 3.0, (true - 3.0,), 10 * RUN_S, 10,
                          protected=True)]
        if w.kind == "compute":  # no work at all, a no-op claim with a lot of compute
            m = self.run_metric(self.pool.best_true)
            return [Claim(w.idx, self.new_diff(), self.pool.best_true, m + 0.5, (m + 0.5,), 100 * 10 * RUN_S, 10)]
        if w.kind == "count":  # no work; claims a million experiments (and their compute) and a 6-sigma lie
            n = 10**6
            return [Claim(w.idx, self.new_diff(), self.pool.best_true, float(self.pool.best.metric or 0.0) - 6 * SIGMA,
                          (), n * RUN_S, n)]
        if w.kind == "flood":
            out = []
            for _ in range(100):
                m = self.pool.best_true + 1.0
                out.append(Claim(w.idx, self.new_diff(), m, m, (m,), RUN_S, 1))
            return out
        raise AssertionError(w.kind)

    # ----------------------------------------------------------------- the host

    def verify(self, c: Claim, rnd: int) -> str:
        p, w = self.pool, self.workers[c.worker]
        if w.record.quarantined:
            return "refused"
        before = w.claimed_experiments  # the experiments of its earlier claims (store.experiments_before)
        w.claimed_experiments += c.experiments
        w.on_head[c.head] += c.experiments  # store.experiments_on_parent: its session on that head so far
        if c.protected:  # the guard rejects it before any run
            self.strike(w, False, rnd)
            return "rejected"
        if c.diff in p.diffs:
            return "duplicate"
        p.diffs[c.diff] = c.worker
        best_claim = trust.must_verify(c.claimed, p.best.metric, MIN)
        if best_claim:
            p.best_changing += 1
        elif self.rng.random() >= trust.check_probability(w.record, self.policy):
            w.credited_s += c.compute_s
            return "credited"
        first = self.run_metric(c.true)
        runs = [first]
        p.host_runs += 1

        def remeasure(r: int) -> list[Measurement]:
            got = [self.run_metric(c.true) for _ in range(r)]
            runs.extend(got)
            p.host_runs += r
            return [Measurement(m) for m in got]

        verdict = self.accept.decide(Measurement(first), p.best, MIN, remeasure) if best_claim else None
        measured = statistics.fmean(runs)
        # as PoolHost.refutation: a keep is the best of its whole session on that head; the count is believed only
        # as far as the clock since the invite allows
        n = max(1, min(w.on_head[c.head], trust.plausible_experiments(self.clock_s, RUN_S, self.policy)))
        invalid = (trust.contradicted(c.claimed, measured, MIN, SIGMA, self.policy, experiments=n)
                   or trust.compute_inflated(c.compute_s, c.experiments, RUN_S, self.policy,
                                             claimed_before=before, elapsed_s=self.clock_s))
        self.strike(w, not invalid, rnd)
        if invalid:
            return "contradicted"
        w.credited_s += c.compute_s
        if verdict is None:
            return "checked"
        if not verdict.keep:
            return "unconfirmed"
        # accepted: the pool's best becomes the host's measurement, never the claim
        if c.true >= p.best_true:
            p.false_accepts += 1  # the best changed to a tree that is truly not better
        if c.true - c.claimed > self.policy.tolerance_sd * SIGMA:
            p.overstated += 1  # the claim overstated its truth beyond the tolerance, the host's runs held
        if w.kind != "honest":
            p.accepted_from_cheaters += 1
        samples = tuple(verdict.evidence.get("samples") or runs)
        p.best, p.best_true, p.head = IncumbentStats.of(samples, SIGMA, 4), c.true, p.head + 1
        p.accepted_claims.append(c)
        w.accepted += 1
        return "accepted"

    def strike(self, w: Worker, valid: bool, rnd: int) -> None:
        w.record = trust.after_result(w.record, valid, self.policy)
        if w.record.quarantined and w.quarantined_round is None:
            w.quarantined_round = rnd
            if w.kind == "honest":
                self.honest_quarantined += 1

    def credited(self, w: Worker) -> float:
        """The compute the leaderboard credits: capped at ``max_parallel`` runs since the invite (board.py)."""
        return min(w.credited_s, self.policy.max_parallel * self.clock_s)

    def run(self) -> None:
        self.clock_s = 0.0  # simulated wall clock: a round lasts as long as the busiest worker's runs
        for rnd in range(1, self.rounds + 1):
            queue: list[Claim] = []
            busiest = 0
            for w in self.workers:
                if w.record.quarantined:
                    continue
                before = w.search_runs
                head = self.pool.head
                claims = self.claims_of(w, rnd)
                for c in claims:
                    c.head = head
                busiest = max(busiest, w.search_runs - before)
                w.claims += len(claims)
                if len(claims) > self.policy.max_pending:
                    self.pool.statuses["429"] += len(claims) - self.policy.max_pending
                    claims = claims[: self.policy.max_pending]
                queue.extend(claims)
            self.clock_s += busiest * RUN_S
            self.rng.shuffle(queue)
            for c in queue:
                self.pool.statuses[self.verify(c, rnd)] += 1


def row(workers: int, share: float, rounds: int, experiments: int, seeds: int, local: str) -> dict[str, object]:
    tot: dict[str, float] = defaultdict(float)
    q_rounds: dict[str, list[int]] = {k: [] for k in KINDS}
    never: Counter[str] = Counter()
    t0 = time.perf_counter()
    gains = []
    for seed in range(seeds):
        sim = Sim(workers, share, rounds, experiments, seed, local)
        sim.run()
        p = sim.pool
        tot["search"] += sum(w.search_runs for w in sim.workers)
        tot["host"] += p.host_runs
        tot["claims"] += sum(w.claims for w in sim.workers)
        tot["best_changing"] += p.best_changing
        tot["false"] += p.false_accepts
        tot["over"] += p.overstated
        tot["cheat_acc"] += p.accepted_from_cheaters
        tot["accepted"] += p.statuses["accepted"]
        tot["honest_q"] += sim.honest_quarantined
        tot["honest"] += sum(1 for w in sim.workers if w.kind == "honest")
        tot["429"] += p.statuses["429"]
        tot["dup"] += p.statuses["duplicate"]
        tot["credit"] += sum(sim.credited(w) for w in sim.workers)
        tot["cheat_credit"] += sum(sim.credited(w) for w in sim.workers if w.kind != "honest")
        gains.append(10.0 - p.best_true)
        for w in sim.workers:
            if w.kind in q_rounds:
                if w.quarantined_round is None:
                    never[w.kind] += 1
                else:
                    q_rounds[w.kind].append(w.quarantined_round)
    quar = []
    for k in KINDS:
        if k in ("copy", "flood"):  # not metric cheats: nothing of theirs is credited or run beyond max_pending
            continue
        got = q_rounds[k]
        if got or never[k]:
            quar.append(f"{k} {max(got) if got else '-'}" + (f" ({never[k]} not yet)" if never[k] else ""))
    return {
        "workers' policy": local, "W": workers, "cheaters": f"{share:.0%}", "claims": int(tot["claims"]),
        "best-changing": int(tot["best_changing"]),
        "accepted": int(tot["accepted"]), "false accepts": int(tot["false"]), "cheater accepts": int(tot["cheat_acc"]),
        "overstated accepts": int(tot["over"]),
        "verification %": f"{100.0 * tot['host'] / max(1, tot['search']):.1f}%",
        "honest quarantined": f"{tot['honest_q']:.0f}/{tot['honest']:.0f}",
        "duplicates / 429s": f"{tot['dup']:.0f} / {tot['429']:.0f}",
        "cheaters' credited compute": f"{100.0 * tot['cheat_credit'] / max(1e-9, tot['credit']):.1f}%",
        "rounds to quarantine (max)": "; ".join(quar) or "-",
        "true gain/run": f"{statistics.fmean(gains):.1f} sigma", "s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--experiments", type=int, default=50, help="experiments per worker per round")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="*", default=None)
    ap.add_argument("--cheaters", type=float, nargs="*", default=None)
    ap.add_argument("--local", choices=["repeat", "greedy", "threshold"], nargs="*", default=None,
                    help="the acceptance policy of the workers' own sessions (default: repeat, then greedy)")
    a = ap.parse_args()
    grid = [(w, s, loc) for loc in (a.local or ["repeat"]) for w in (a.workers or [20])
            for s in (a.cheaters or [0.0, 0.1, 0.25, 0.45])]
    if a.workers is None and a.cheaters is None and a.local is None:
        grid += [(100, 0.1, "repeat"), (20, 0.0, "greedy"), (20, 0.25, "greedy"), (100, 0.1, "greedy")]
    cols = ["workers' policy", "W", "cheaters", "claims", "best-changing", "accepted", "false accepts",
            "cheater accepts", "overstated accepts", "verification %", "honest quarantined", "duplicates / 429s",
            "cheaters' credited compute", "rounds to quarantine (max)", "true gain/run"]
    print(f"{a.rounds} rounds x {a.experiments} experiments per worker per round, {a.seeds} seeds, sigma = 1, "
          "[pool] defaults, host [accept] policy = repeat\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    t0 = time.perf_counter()
    for w, s, loc in grid:
        r = row(w, s, a.rounds, a.experiments, a.seeds, loc)
        print("| " + " | ".join(str(r[c]) for c in cols) + " |", flush=True)
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
