"""The scheduler: ``[executor] slots`` experiments at once, the next proposal made while they run
(pipelining, ``[researcher] prefetch``), requeued combinations of stale winners first."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from nightlab import staging
from nightlab.history import History
from nightlab.session import SessionLifecycle
from nightlab.staging import Staged
from nightlab.types import Candidate, Experiment, Session, Status

RECORD_WAIT_S = 2.0  # the longest a proposal waits for the result of a run that is over to be recorded
# Proposing ahead -- one result behind -- buys the slot the time it would wait for the proposal and its git work;
# when that time is a small share of a run, the proposal waits for the result in flight instead and sees it. The
# share below which it waits: the researcher's ``ahead_share`` (0 for one that needs no results: random search),
# else this.
AHEAD_SHARE = 0.01


class Scheduler(SessionLifecycle):
    """Slots, pipelining, prefetch: :meth:`_loop` keeps the slots busy until a stop rule fires."""

    def _prefetch(self) -> int:
        """``[researcher] prefetch``: proposals made ahead, concurrently (researchers that allow it only)."""
        n = getattr(self.researcher, "prefetch", 0)
        return int(n) if isinstance(n, int) and n > 0 and getattr(self.researcher, "concurrent", False) else 0

    def _loop(self, history: History) -> Session:
        """Keep ``[executor] slots`` experiments running, and the next proposal ready.

        With ``pipeline``, the next proposal is made while experiments run, so no slot waits for
        the researcher -- as long as proposing is quicker than running (measured: moving averages
        of both). When proposing takes longer, the proposal waits for the result in flight instead,
        so that it sees the current history (it would leave the slot idle either way). It waits too
        when what it would save is negligible: when recording a result, proposing and staging the next
        candidate take less than the researcher's ``ahead_share`` of a run (``AHEAD_SHARE``, 1 %, by
        default: a search proposal next to a 5-minute run): a proposal that sees one more result is worth
        more than 1 % of a run. A band of 25 % either side of the share keeps a gap near it from switching at
        every run.
        With ``[researcher] prefetch = N`` (researchers that allow concurrent proposals), up to N
        proposals are made at once, ahead of the runs, each on the history of its start.
        A proposal made while every slot is busy has its git work (worktree, files, commit, guard) done at
        once, on a thread of its own (:meth:`stage_ahead`): when the slot frees, the run starts sooner.
        A slot frees when its run and measurement are over (the evaluator's included; a lab with a holdout
        check: after the decision, which may run it): the experiment's decision and records are written on
        its thread while the slot's next run goes, after that run's spawn (the ``quiet`` events). The next
        proposal waits for them (up to ``RECORD_WAIT_S``), so that it sees every result but those in flight.
        Stops when a stop rule fires, after the experiments in flight finish (a cancel makes them
        stop at once, ``interrupted``); proposals made for nothing are dropped, their usage recorded.
        """
        ex = self.spec.executor
        cap = self.spec.stop.max_experiments
        free = list(range(ex.slots))
        inflight: dict[Future[Experiment], int] = {}  # experiments not yet observed, and their slots
        # experiments still holding their slot: each hands it back (the future) once its run and measurement are
        # done, before its decision and records (pipeline.py, _release): the next run starts while they finish
        holding: dict[Future[Experiment], Future[None]] = {}
        quiet: dict[Future[Experiment], threading.Event] = {}  # set: the experiment may write its records now
        after: dict[int, threading.Event] = {}  # slot -> the quiet event its next run sets once spawned
        handed_at: dict[Future[Experiment], float] = {}  # when each finishing experiment handed its slot back
        prepared: tuple[int, Candidate, float] | None = None
        next_idx = self.ledger.next_idx(self.session.id)
        invalid_row, reason, busy_s = 0, "", 0.0
        t_loop = time.monotonic()
        # a slot's finishing experiment and the one after it run at once: two threads per slot
        pool = ThreadPoolExecutor(max_workers=2 * ex.slots, thread_name_prefix="nightlab-slot")
        prefetch = self._prefetch()
        ppool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="nightlab-propose") if prefetch else None
        spool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nightlab-stage",
                                   initializer=staging.background) if ex.pipeline else None
        staged: Future[Staged] | None = None  # the prepared candidate's git work, started while the slots are busy
        queue: deque[tuple[int, Future[tuple[Candidate | None, float]]]] = deque()
        est: dict[str, float] = {}  # moving averages: "propose", "run", "stage", "record" seconds
        ahead_shown: bool | None = None
        share = getattr(self.researcher, "ahead_share", None)  # None: no preference
        share = float(share) if isinstance(share, (int, float)) and share >= 0 else AHEAD_SHARE

        def learn(what: str, seconds: float) -> None:
            est[what] = seconds if what not in est else 0.7 * est[what] + 0.3 * seconds

        def ahead_ok() -> bool:
            nonlocal ahead_shown
            if not ex.pipeline:
                return False
            # before any candidate's run is timed, the share rule takes the baseline's run (the other rule does
            # not: a baseline can be much quicker than its candidates, and a slow proposal would then never go ahead)
            run_s = est.get("run", base_run)
            if "propose" not in est or run_s is None:
                return True
            # what the slot would wait for: the result's records, the proposal, its git work
            gap = est.get("record", 0.0) + est["propose"] + est.get("stage", 0.0)
            slow = "run" in est and est["propose"] > est["run"]
            # a band of +-25 % around the share, so that a gap near it does not switch at every run
            ok = not slow and gap >= share * run_s * (0.8 if ahead_shown in (None, True) else 1.25)
            if ok != ahead_shown:
                if ahead_shown is not None or not ok:
                    why = (f"proposing takes {est['propose']:.1f}s, running {run_s:.1f}s; recording, proposing "
                           f"and staging {100 * gap / max(run_s, 1e-9):.2g}% of a run (ahead from "
                           f"{100 * share:.2g}%)")
                    how = "proposing ahead" if ok else "waiting for the result in flight before proposing"
                    self.events.emit("scheduler", pipeline_ahead=ok, propose_s=round(est["propose"], 3),
                                     run_s=round(run_s, 3), gap_s=round(gap, 3), ahead_share=share)
                    self.reporter.message(f"{how}: {why}")
                ahead_shown = ok
            return ok

        def has_work() -> bool:
            """A researcher that waits for work from outside (the pool's claim feeder) says whether it has any:
            while it has none, the loop collects the results in flight instead of blocking in propose()."""
            probe = getattr(self.researcher, "has_work", None)
            return not inflight or not callable(probe) or bool(probe())

        def handoff_ok() -> bool:
            """Hand slots back at the run's end (pipelining only): while runs last longer than recording an
            experiment and proposing the next -- else the next proposal, which waits for the records, would
            come after the slot's next run ended, too late to be staged ahead (runs of a few ms)."""
            if not ex.pipeline:
                return False
            return "run" not in est or est["run"] >= 2 * (est.get("record", 0.0) + est.get("propose", 0.0))

        def recorded() -> bool:
            """No result is being recorded, so a proposal sees them all; one that takes longer than
            ``RECORD_WAIT_S`` (a keep waiting for a human's approval) is not waited for."""
            now = time.monotonic()
            return all(f in holding or now - handed_at.get(f, now) > RECORD_WAIT_S for f in inflight)

        def timed(idx: int, hist: History) -> tuple[Candidate | None, float]:
            t0 = time.monotonic()
            return self._propose(idx, hist), time.monotonic() - t0

        for e in history[-64:]:  # a moving average: older runs weigh < 0.7**64
            if e.idx > 0 and e.run_s > 0:  # candidates' runs (the baseline may be unlike them)
                learn("run", e.run_s)
                learn("stage", _stage_s(e))
        base_run = next((e.run_s for e in reversed(history) if e.idx == 0 and e.run_s > 0), None)
        try:
            while True:
                if not reason:
                    reason = self.stop_reason(history)
                if reason and after:  # no next run is coming: the experiments before write their records now
                    for g in after.values():
                        g.set()
                    after.clear()
                if reason and not inflight:
                    break
                tried = self.tally(history).tried
                budget = (cap - tried - len(inflight) - (prepared is not None) - len(queue)) if cap else 1
                if ppool is not None:
                    if not reason and budget > 0 and len(queue) < prefetch:
                        queue.append((next_idx, ppool.submit(timed, next_idx, history.view())))
                        next_idx += 1
                        continue
                    if not reason and prepared is None and queue and queue[0][1].done():
                        idx, pfut = queue.popleft()
                        cand, secs = pfut.result()
                        learn("propose", secs)
                        if cand is not None:
                            prepared = (idx, cand, secs)
                        continue
                elif (not reason and prepared is None and budget > 0 and (free or ahead_ok()) and has_work()
                      and recorded()):
                    cand, secs = timed(next_idx, history)
                    learn("propose", secs)
                    if cand is not None:
                        prepared = (next_idx, cand, secs)
                        next_idx += 1
                    continue
                if not reason and prepared is not None and free:
                    slot = free.pop(0)
                    handed: Future[None] = Future()
                    gate = threading.Event()

                    def release(h: Future[None] = handed, g: threading.Event = gate) -> threading.Event:
                        h.set_result(None)
                        return g

                    fut = pool.submit(self.run_experiment, *prepared, slot=slot, staged=staged,
                                      release=release if handoff_ok() else None, spawned=after.pop(slot, None))
                    inflight[fut], holding[fut], quiet[fut] = slot, handed, gate
                    prepared, staged = None, None
                    continue
                if not reason and prepared is not None and staged is None and spool is not None:
                    staged = spool.submit(self.stage_ahead, prepared[0], prepared[1])
                if not inflight and not queue:  # nothing to run and nothing running: the stop rules decide
                    reason = reason or self.stop_reason(history) or "nothing left to run"
                    continue
                waiting: list[Future[Any]] = [*inflight, *holding.values(), *(f for _, f in queue)]
                done, _ = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in [f for f, h in holding.items() if h in done and f not in done]:
                    del holding[fut]  # its run is over: the slot takes the next one while it is recorded
                    free.append(inflight[fut])
                    handed_at[fut] = time.monotonic()
                    if prepared is not None and not reason:  # its records wait for the next run's spawn
                        after[inflight[fut]] = quiet.pop(fut)
                    else:
                        quiet.pop(fut).set()
                for fut in [f for f in inflight if f in done]:  # finished proposals are taken above
                    slot = inflight.pop(fut)
                    quiet.pop(fut, None)
                    if (at := handed_at.pop(fut, None)) is not None:
                        learn("record", time.monotonic() - at)
                    if holding.pop(fut, None) is not None:
                        free.append(slot)
                    exp = fut.result()
                    busy_s += exp.run_s
                    if exp.idx > 0 and exp.run_s > 0:
                        learn("run", exp.run_s)
                        learn("stage", _stage_s(exp))
                    history.append(exp)
                    self.researcher.observe(exp)  # type: ignore[union-attr]
                    self.reporter.experiment_finished(exp, self.session)
                    invalid_row = invalid_row + 1 if exp.status in (Status.INVALID, Status.REJECTED) else 0
                    if invalid_row >= 20 and not reason:
                        reason = f"{invalid_row} invalid or rejected candidates in a row"
                free.sort()
        except BaseException:
            self.stop.interrupt(self.stop.cancel_reason or "harness error")
            raise
        finally:
            for g in [*quiet.values(), *after.values()]:
                g.set()
            self._closing = True  # proposals still in progress give up (their usage is recorded)
            pool.shutdown(wait=True)
            if ppool is not None:
                ppool.shutdown(wait=True)
            if spool is not None:
                spool.shutdown(wait=True)
            if staged is not None:  # staged for a slot it never got: its worktree goes, it is dropped below
                self.unstage(staged)
            left = [(i, f.result()[0]) for i, f in queue if f.done() and f.exception() is None]
            if prepared is not None:
                left.append((prepared[0], prepared[1]))
            for i, c in left:
                if c is not None:
                    self._drop(i, c, reason or "stopped")
            self._closing = False
            wall = time.monotonic() - t_loop
            if wall > 0 and busy_s > 0:
                stats = {"slots": ex.slots, "pipeline": ex.pipeline, "wall_s": round(wall, 3),
                         "busy_s": round(busy_s, 3), "duty_cycle": round(busy_s / (ex.slots * wall), 4)}
                if est:
                    stats.update({f"{k}_s_avg": round(v, 3) for k, v in est.items()})
                self.verifier._save_noise(executor=stats)
                self.reporter.message(f"duty cycle {100 * stats['duty_cycle']:.1f}% over {ex.slots} slot(s)")
        status = "stopped" if self.stop.cancel.is_set() or self.stop.graceful or reason == "STOP file" \
            else "finished"
        return self._close(status, reason)


def _stage_s(exp: Experiment) -> float:
    """The candidate's git work (guard, worktree, commit): what a slot waits for when it is not staged ahead."""
    timing = exp.evidence.get("timing") or {}
    return float(timing.get("guard", 0.0) + timing.get("worktree", 0.0))
