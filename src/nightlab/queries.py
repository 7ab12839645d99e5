"""Read-only queries for the dashboard, its JSON API and the report.

They read the ledger's tables directly (SQLAlchemy Core, portable SQL) and are shaped for
pages of a session with 100,000 experiments: tables paginate in SQL, aggregates are
computed in SQL, and the progress chart is downsampled in Python from three narrow
columns. Every function opens one short read transaction (WAL readers never block the
writer, and the writer never blocks them).

Nothing here writes. Nothing here knows about HTTP.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from nightlab.ledger import Ledger, candidates, experiments, sessions
from nightlab.types import Session, Status, Usage

T = TypeVar("T")
Row3 = tuple[int, float | None, str]  # (idx, metric, status)
E = experiments.c
C = candidates.c

SORTS: dict[str, Any] = {
    "idx": E.idx,
    "status": E.status,
    "metric": E.metric,
    "started": E.started_at,
    "propose_s": E.propose_s,
    "run_s": E.run_s,
    "overhead_s": E.overhead_s,
    "researcher": E.sort_researcher,  # the candidate's, copied onto the experiment (ledger schema v4)
    "cost": E.sort_cost_usd,
    "tokens": E.sort_tokens,
}
"""Columns the experiments table may be sorted by (the ``sort=`` names): each has an index
``(session_id, column, idx)`` (:data:`DASHBOARD_INDEXES`), so a page of any sort, at any page,
walks one index instead of sorting the session."""

MAX_LIMIT = 500

DASHBOARD_INDEXES = {
    # every column the chart, the counts, the timing sums and the table's sorts read: these
    # scans never touch the wide rows (log tails, diffs)
    "ix_dash_experiments_cover": ("experiments", "session_id, idx, status, metric, started_at, finished_at, "
                                                 "propose_s, run_s, overhead_s"),
    "ix_dash_candidates_cover": ("candidates", "experiment_id, researcher, cost_usd, tokens_in, tokens_out, "
                                               "tokens_cached"),
    # the sessions list's spend and last activity per session, read from one index
    "ix_dash_session_spend": ("experiments", "session_id, sort_cost_usd, sort_tokens, finished_at, started_at"),
    # one per sort column of the experiments table (SORTS), the idx last: the tie-break, so SQLite walks
    # the index in the page's order (EXPLAIN QUERY PLAN: no temporary B-tree)
    **{f"ix_dash_sort_{name}": ("experiments", f"session_id, {name}, idx")
       for name in ("status", "metric", "started_at", "propose_s", "run_s", "overhead_s", "sort_researcher",
                    "sort_cost_usd", "sort_tokens")},
}
"""Covering indexes for the dashboard's reads of big sessions, as plain DDL (they are not
part of the ledger's Table objects). Created by :func:`ensure_indexes` until a ledger
migration owns them."""

POSTGRES_INDEXES = {
    # A page sorted in descending order puts NULLs last (``DESC NULLS LAST``). PostgreSQL walks the plain
    # indexes above backwards only as ``DESC NULLS FIRST``: for the sort columns that may be NULL it sorted
    # the whole session instead (EXPLAIN: Seq Scan + top-N heapsort). These match the ORDER BY. SQLite walks
    # the plain index for either NULLS order (EXPLAIN QUERY PLAN: no temporary B-tree) and needs none.
    f"ix_dash_sort_{name}_desc": ("experiments", f"session_id, {name} DESC NULLS LAST, idx DESC")
    for name in ("metric", "sort_researcher", "sort_cost_usd", "sort_tokens")
}
"""Extra dashboard indexes on PostgreSQL (:func:`ensure_indexes`)."""


def engine_of(ledger: Ledger) -> Engine:
    """The ledger's SQLAlchemy engine (``ledger.engine``, or the early private name)."""
    eng = getattr(ledger, "engine", None) or getattr(ledger, "_engine", None)
    if not isinstance(eng, Engine):
        raise TypeError(f"{ledger!r} has no SQLAlchemy engine")
    return eng


@contextmanager
def reading(ledger: Ledger) -> Iterator[Connection]:
    """One short read transaction."""
    with engine_of(ledger).connect() as conn, conn.begin():
        yield conn


def ensure_indexes(ledger: Ledger) -> None:
    """Create :data:`DASHBOARD_INDEXES` (and on PostgreSQL :data:`POSTGRES_INDEXES`) where missing
    (``CREATE INDEX IF NOT EXISTS``).

    The only write here. It runs once when the dashboard starts; on a ledger of 100,000
    experiments it takes about a second, and later calls cost a catalogue look-up.
    """
    with engine_of(ledger).connect() as conn:
        conn.execution_options(nightlab_write=True)
        extra = POSTGRES_INDEXES if conn.dialect.name == "postgresql" else {}
        with conn.begin():
            for name, (table, columns) in {**DASHBOARD_INDEXES, **extra}.items():
                conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"))


# --------------------------------------------------------------------------- memo

_memo: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_memo_lock = threading.Lock()
MEMO_SIZE = 64


def version(ledger: Ledger, session_id: int | None) -> tuple[Any, ...]:
    """A cheap signature that changes whenever the engine changes a session's data: an
    experiment starts (count), finishes (running count), a keep moves the incumbent or the
    session's row changes (``updated_at``). Answered from indexes in a few milliseconds."""
    where = [E.session_id == session_id] if session_id is not None else []
    q = sa.select(sa.func.count(), sa.func.max(E.id)).select_from(experiments).where(*where)
    rq = sa.select(sa.func.count()).select_from(experiments).where(*where, E.status == Status.RUNNING.value)
    sq = sa.select(sa.func.count(), sa.func.max(sessions.c.updated_at))
    if session_id is not None:
        sq = sq.where(sessions.c.id == session_id)
    with reading(ledger) as conn:
        return (*conn.execute(q).one(), conn.execute(rq).scalar_one(), *conn.execute(sq).one())


def memoized(ledger: Ledger, session_id: int | None, name: str, compute: Callable[[], T], *args: Any) -> T:
    """``compute()``, reused while :func:`version` of the session is unchanged.

    Big sessions change once per experiment (seconds to minutes apart) but their pages are
    read far more often; the signature costs one index scan instead of the aggregate.
    """
    key = (id(engine_of(ledger)), session_id, name, args, version(ledger, session_id))
    with _memo_lock:
        if key in _memo:
            _memo.move_to_end(key)
            return cast(T, _memo[key])
    value = compute()
    with _memo_lock:
        _memo[key] = value
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)
    return value


# --------------------------------------------------------------------------- incremental aggregates

_inc: dict[tuple[Any, ...], tuple[Any, int, frozenset[int], Any]] = {}
_inc_lock = threading.Lock()


def incremental(ledger: Ledger, session_id: int, name: str, columns: Sequence[Any],
                fold: Callable[[Any, list[Any]], Any], start: Callable[[], Any],
                joined: bool = False) -> tuple[Any, list[Any]]:
    """An aggregate of a session's *finished* experiments, kept up to date by reading only what changed.

    A finished experiment's row is final for these columns (the engine writes a row's figures once,
    when it finishes; later writes touch its evidence only), so the aggregate over them is cached with
    the highest row id it has seen and the ids that were still running then; each call reads only
    the rows after that id and those that were running, folds the ones finished since
    (``fold(state, rows) -> new state``, never mutating ``state``) and returns ``(state, rows still
    running)``. The first load after a new experiment then costs a few rows, not 100,000.
    """
    eng = engine_of(ledger)
    key = (id(eng), str(eng.url), session_id, name)
    with reading(ledger) as conn:
        # the session row's creation time tells a cache of another ledger (same id, same url) from this one's
        born = conn.execute(sa.select(sessions.c.created_at).where(sessions.c.id == session_id)).scalar()
        with _inc_lock:
            cached = _inc.get(key)
        max_id, running, state = cached[1:] if cached is not None and cached[0] == born else (0, frozenset(), None)
        if state is None:
            state = start()
        cond = E.id > max_id
        if running:
            cond = sa.or_(cond, E.id.in_(sorted(running)))
        q = (sa.select(E.id, E.status, *columns).select_from(_joined() if joined else experiments)
             .where(E.session_id == session_id, cond).order_by(E.id))
        rows = conn.execute(q).all()
    done = [r for r in rows if r[1] != Status.RUNNING.value]
    still = [r for r in rows if r[1] == Status.RUNNING.value]
    if done:
        state = fold(state, done)
    new_max = max([max_id, *(int(r[0]) for r in rows)])
    with _inc_lock:
        _inc[key] = (born, new_max, frozenset(int(r[0]) for r in still), state)
        while len(_inc) > MEMO_SIZE:
            _inc.pop(next(iter(_inc)))
    return state, still


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class ExperimentRow:
    """One line of the experiments table: no diff, no log, no rationale (those are per experiment)."""

    idx: int
    status: str
    metric: float | None
    trust: str
    description: str
    reason: str
    researcher: str
    commit: str | None
    started_at: float
    finished_at: float | None
    propose_s: float
    run_s: float
    overhead_s: float
    cost_usd: float
    tokens_in: int
    tokens_out: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Page:
    rows: list[ExperimentRow]
    total: int  # rows matching the filters
    limit: int
    offset: int


@dataclass(frozen=True)
class SessionSummary:
    session: Session
    counts: dict[str, int]  # status -> experiments
    total: int
    cost_usd: float
    tokens: int
    last_activity: float


def _row_columns() -> list[Any]:
    return [
        E.idx, E.status, E.metric, E.trust, E.description, sa.func.substr(E.reason, 1, 300).label("reason"),
        C.researcher, E.commit, E.started_at, E.finished_at, E.propose_s, E.run_s, E.overhead_s,
        C.cost_usd, C.tokens_in, C.tokens_out,
    ]


def _joined() -> Any:
    return experiments.outerjoin(candidates, C.experiment_id == E.id)


def _row(r: Any) -> ExperimentRow:
    return ExperimentRow(
        idx=int(r.idx), status=r.status, metric=r.metric, trust=r.trust, description=r.description,
        reason=r.reason or "", researcher=r.researcher or "", commit=r.commit, started_at=float(r.started_at),
        finished_at=r.finished_at, propose_s=float(r.propose_s), run_s=float(r.run_s),
        overhead_s=float(r.overhead_s), cost_usd=float(r.cost_usd or 0.0), tokens_in=int(r.tokens_in or 0),
        tokens_out=int(r.tokens_out or 0),
    )


# --------------------------------------------------------------------------- sessions


def session_summaries(ledger: Ledger) -> list[SessionSummary]:
    """See ``_session_summaries``; memoized per session version (:func:`memoized`)."""
    return memoized(ledger, None, "session_summaries", lambda: _session_summaries(ledger))


def _session_summaries(ledger: Ledger) -> list[SessionSummary]:
    """Every session, newest first, with its experiment counts by status and its spend."""
    with reading(ledger) as conn:
        rows = conn.execute(sa.select(sessions.c.id).order_by(sessions.c.id.desc())).all()
        counts: dict[int, dict[str, int]] = {}
        for sid, status, n in conn.execute(
            sa.select(E.session_id, E.status, sa.func.count()).group_by(E.session_id, E.status)
        ):
            counts.setdefault(int(sid), {})[status] = int(n)
        spend: dict[int, tuple[float, int, float]] = {}
        for sid, cost, tokens, last in conn.execute(  # the candidates' figures, copied (ledger schema v4)
            sa.select(
                E.session_id,
                sa.func.coalesce(sa.func.sum(E.sort_cost_usd), 0.0),
                sa.func.coalesce(sa.func.sum(E.sort_tokens), 0),
                sa.func.max(sa.func.coalesce(E.finished_at, E.started_at)),
            ).group_by(E.session_id)
        ):
            spend[int(sid)] = (float(cost), int(tokens), float(last or 0.0))
    out = []
    by_id = {s.id: s for s in ledger.list_sessions()}
    for (sid,) in rows:
        s = by_id.get(int(sid))
        if s is None:
            continue
        c = counts.get(s.id, {})
        cost, tokens, last = spend.get(s.id, (0.0, 0, 0.0))
        out.append(SessionSummary(s, c, sum(c.values()), cost, tokens, max(last, s.updated_at)))
    return out


def spec_json(ledger: Ledger, session_id: int) -> dict[str, Any]:
    """The spec the session ran with, as stored (``{}`` when unreadable)."""
    with reading(ledger) as conn:
        text = conn.execute(sa.select(sessions.c.spec_json).where(sessions.c.id == session_id)).scalar()
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def status_counts(ledger: Ledger, session_id: int) -> dict[str, int]:
    """See ``_status_counts``; memoized per session version (:func:`memoized`)."""
    return memoized(ledger, session_id, "status_counts", lambda: _status_counts(ledger, session_id))


def _status_counts(ledger: Ledger, session_id: int) -> dict[str, int]:
    q = sa.select(E.status, sa.func.count()).where(E.session_id == session_id).group_by(E.status)
    with reading(ledger) as conn:
        return {s: int(n) for s, n in conn.execute(q)}


def researchers(ledger: Ledger, session_id: int) -> list[str]:
    """See ``_researchers``; memoized per session version (:func:`memoized`)."""
    return memoized(ledger, session_id, "researchers", lambda: _researchers(ledger, session_id))


def _researchers(ledger: Ledger, session_id: int) -> list[str]:
    """The researchers that proposed the session's candidates (for the table's filter); incremental."""
    seen, live = incremental(ledger, session_id, "researchers", (C.researcher,),
                             lambda acc, rows: acc | {r[2] for r in rows if r[2]}, frozenset, joined=True)
    return sorted(seen | {r[2] for r in live if r[2]})


ParetoPoint = tuple[int, float, float, str]  # (idx, x, metric, status)


def _front(points: Sequence[ParetoPoint], minimize: bool) -> list[ParetoPoint]:
    """The non-dominated points (lower x, better metric); as ``web.figures.front``."""
    sign = 1.0 if minimize else -1.0
    out: list[ParetoPoint] = []
    best = math.inf
    for p in sorted(points, key=lambda p: (p[1], sign * p[2])):
        if sign * p[2] < best:
            out.append(p)
            best = sign * p[2]
    return out


def pareto_points(ledger: Ledger, session_id: int, figure: str, run_s: bool, minimize: bool = True,
                  limit: int = 2000) -> list[ParetoPoint]:
    """``(idx, x, metric, status)`` of the kept or discarded experiments with a metric and a finite
    ``figure`` (a secondary figure's name, or the run time with ``run_s``), for drawing: every keep and
    every point of the front, and the others thinned to about ``limit`` (evenly by idx). Incremental
    (:func:`incremental`): the points and the front are kept, and only new experiments are read --
    the front of all points is the front of (the old front + the new points)."""
    def fold(acc: tuple[list[ParetoPoint], list[ParetoPoint]], rows: list[Any]
             ) -> tuple[list[ParetoPoint], list[ParetoPoint]]:
        new: list[ParetoPoint] = []
        for _id, status, idx, metric, secs, secondary in rows:
            if status not in (Status.KEEP.value, Status.DISCARD.value) or metric is None:
                continue
            if run_s:
                x = secs
            else:
                try:
                    x = json.loads(secondary or "{}").get(figure)
                except (ValueError, AttributeError):
                    continue
            if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
                new.append((int(idx), float(x), float(metric), str(status)))
        return acc[0] + new, _front(acc[1] + new, minimize)

    (pts, front), _ = incremental(ledger, session_id, f"pareto:{int(run_s)}:{int(minimize)}:{figure}",
                                  (E.idx, E.metric, E.run_s, E.secondary_json), fold, lambda: ([], []))
    if len(pts) <= limit:
        return list(pts)
    special = {p[0] for p in front}
    stride = math.ceil(len(pts) / limit)
    return [p for k, p in enumerate(pts) if p[3] == Status.KEEP.value or p[0] in special or k % stride == 0]


# --------------------------------------------------------------------------- experiments


def experiments_page(
    ledger: Ledger,
    session_id: int,
    *,
    statuses: Sequence[str] = (),
    researcher: str | None = None,
    sort: str = "idx",
    order: str = "desc",
    limit: int = 50,
    offset: int = 0,
    since: int | None = None,
) -> Page:
    """One page of a session's experiments, filtered and sorted in SQL.

    ``statuses``: keep only these statuses (unknown names raise ValueError). ``since``:
    only experiments with ``idx > since`` (what a live page has not seen yet). Metrics
    that are NULL sort last either way. ``limit`` is clamped to 1..MAX_LIMIT.
    """
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {sorted(SORTS)}, not {sort!r}")
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
    wanted = [Status(s).value for s in statuses]
    limit = max(1, min(int(limit), MAX_LIMIT))
    offset = max(0, int(offset))
    where = [E.session_id == session_id]
    if wanted:
        where.append(E.status.in_(wanted))
    if researcher:
        where.append(E.sort_researcher == researcher)
    if since is not None:
        where.append(E.idx > since)
    col = SORTS[sort]
    key = col.asc() if order == "asc" else col.desc()
    # NULLS LAST only where there can be NULLs: PostgreSQL walks a plain index backwards as DESC NULLS FIRST,
    # which a NOT NULL column's DESC NULLS LAST would not match (POSTGRES_INDEXES serve the nullable ones)
    key = key.nulls_last() if col.nullable else key
    tiebreak = E.idx.asc() if order == "asc" else E.idx.desc()
    # phase 1 reads one index of the experiments table (the sort column's); phase 2 fetches the page's rows
    ids_q = sa.select(E.id).select_from(experiments).where(*where)
    ids_q = ids_q.order_by(key, tiebreak) if sort != "idx" else ids_q.order_by(tiebreak)
    ids_q = ids_q.limit(limit).offset(offset)
    cq = sa.select(sa.func.count()).select_from(experiments).where(*where)
    with reading(ledger) as conn:
        ids = [i for (i,) in conn.execute(ids_q)]
        found = {r.id: r for r in conn.execute(
            sa.select(E.id, *_row_columns()).select_from(_joined()).where(E.id.in_(ids))
        )} if ids else {}
        total = int(conn.execute(cq).scalar_one())
    rows = [_row(found[i]) for i in ids if i in found]
    return Page(rows, total, limit, offset)


# --------------------------------------------------------------------------- the chart


@dataclass(frozen=True)
class Point:
    idx: int
    metric: float | None
    status: str
    holdout: float | None = None


@dataclass(frozen=True)
class ChartData:
    """What the progress chart draws. ``points`` is every experiment unless ``downsampled``."""

    points: list[Point]
    total: int
    downsampled: bool
    best: list[tuple[int, float]]  # the running best: (idx, metric) at each keep
    last_idx: int
    baseline: float | None
    direction: str
    metric_name: str


def _holdout(evidence_json: str | None) -> float | None:
    if not evidence_json or "holdout" not in evidence_json:
        return None
    try:
        ev = json.loads(evidence_json)
    except ValueError:
        return None
    value = ev.get("holdout") if isinstance(ev, dict) else None
    if isinstance(value, dict):
        value = value.get("metric")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def chart_data(ledger: Ledger, session: Session, max_points: int = 2000) -> ChartData:
    """See ``_chart_data``; memoized per session version (:func:`memoized`)."""
    return memoized(ledger, session.id, "chart_data", lambda: _chart_data(ledger, session, max_points),
                    max_points)


def _chart_data(ledger: Ledger, session: Session, max_points: int = 2000) -> ChartData:
    """Every experiment as a point (idx, metric, status), the running best and the baseline.

    Over ``max_points`` experiments the points are downsampled: every keep and every
    running experiment stays; the rest are cut into ``max_points // 3`` buckets by idx and
    each bucket keeps its lowest and highest metric and one experiment without a metric.
    The running best is computed from the keeps and is exact either way. A holdout figure
    is read from a keep's evidence (``evidence["holdout"]``, a number or ``{"metric": x}``).
    """
    settled, live = incremental(
        ledger, session.id, "chart_rows", (E.idx, E.metric), lambda acc, new: acc + [(r[2], r[3], r[1]) for r in new],
        list)
    rows: list[Row3] = sorted([*settled, *((r[2], r[3], r[1]) for r in live)], key=lambda r: r[0])
    with reading(ledger) as conn:
        kept_ev = dict(conn.execute(
            sa.select(E.idx, E.evidence_json).where(E.session_id == session.id, E.status == Status.KEEP.value)
        ).all())
    holdouts = {int(i): h for i, ev in kept_ev.items() if (h := _holdout(ev)) is not None}
    keep, running = Status.KEEP.value, Status.RUNNING.value
    better = session.direction.better
    best: list[tuple[int, float]] = []
    for idx, metric, status in rows:
        if status == keep and metric is not None and (not best or better(metric, best[-1][1])):
            best.append((idx, metric))
    total = len(rows)
    last_idx = int(rows[-1][0]) if rows else 0
    downsampled = total > max_points
    if downsampled:
        rows = _downsample(rows, max_points, keep, running)
        best = _thin_steps(best, last_idx, max_points)
    points = [Point(i, m, st, holdouts.get(i)) for i, m, st in rows]
    return ChartData(
        points=points, total=total, downsampled=downsampled, best=best,
        last_idx=last_idx, baseline=session.baseline_metric,
        direction=session.direction.value, metric_name=session.metric_name,
    )


def _decimate(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` items spread evenly, the first and the last always among them."""
    if len(items) <= n:
        return items
    step = (len(items) - 1) / max(1, n - 1)
    return [items[round(k * step)] for k in range(n)]


def _downsample(rows: list[Row3], max_points: int, keep: str, running: str) -> list[Row3]:
    special = [r for r in rows if r[2] == keep or r[2] == running or r[0] == 0]
    chosen = {r[0]: r for r in _decimate(special, max_points // 3)}
    rest = [r for r in rows if r[2] != keep and r[2] != running and r[0] != 0]
    n_buckets = max(1, (max_points - len(chosen)) // 3)
    size = max(1, math.ceil(len(rest) / n_buckets))
    for start in range(0, len(rest), size):
        bucket = rest[start:start + size]
        with_metric = [r for r in bucket if r[1] is not None]
        if with_metric:
            lo = min(with_metric, key=_metric_key)
            hi = max(with_metric, key=_metric_key)
            chosen[lo[0]] = lo
            chosen[hi[0]] = hi
        without = next((r for r in bucket if r[1] is None), None)
        if without is not None:
            chosen[without[0]] = without
    return [chosen[i] for i in sorted(chosen)]


def _metric_key(r: Row3) -> float:
    return r[1] if r[1] is not None else math.nan


def _thin_steps(best: list[tuple[int, float]], last_idx: int, max_points: int) -> list[tuple[int, float]]:
    """The running best with at most about ``max_points`` steps: per x bucket, its last step."""
    if len(best) <= max_points:
        return best
    width = max(1, math.ceil((last_idx + 1) / max_points))
    out: dict[int, tuple[int, float]] = {}
    for step in best:
        out[step[0] // width] = step
    return [best[0], *[out[k] for k in sorted(out) if out[k] != best[0]]]


# --------------------------------------------------------------------------- cost and latency


@dataclass(frozen=True)
class Timing:
    """Where a session's time and money went."""

    n: int
    propose_s: float
    run_s: float
    overhead_s: float
    first_start: float | None
    last_end: float | None
    cost_usd: float
    tokens_in: int
    tokens_out: int
    tokens_cached: int
    slots: int
    usage_s: float = 0.0  # seconds the researchers reported for proposing (their own clock)

    @property
    def span_s(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return max(0.0, self.last_end - self.first_start)

    @property
    def duty_cycle(self) -> float | None:
        """Share of the slots' wall time spent running experiments (None before any ran)."""
        span = self.span_s
        return min(1.0, self.run_s / (span * self.slots)) if span > 0 else None

    @property
    def busy_cycle(self) -> float | None:
        """Share of the slots' wall time spent proposing, running or in overhead."""
        span = self.span_s
        busy = self.propose_s + self.run_s + self.overhead_s
        return min(1.0, busy / (span * self.slots)) if span > 0 else None


    def usage(self) -> Usage:
        return Usage(self.tokens_in, self.tokens_out, self.tokens_cached, self.cost_usd, self.usage_s)


@dataclass(frozen=True)
class Bucket:
    t0: float  # seconds since the session's first experiment started
    n: int
    keeps: int
    cost_usd: float
    propose_s: float
    run_s: float
    overhead_s: float


@dataclass(frozen=True)
class CostSeries:
    width_s: float
    buckets: list[Bucket] = field(default_factory=list)


def _slots(spec: dict[str, Any]) -> int:
    places = (("executor", "slots"), ("run", "slots"), ("run", "parallel"), ("executor", "parallel"))
    for section, key in places:
        value = (spec.get(section) or {}).get(key) if isinstance(spec.get(section), dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return 1


def timing(ledger: Ledger, session_id: int) -> Timing:
    """See ``_timing``; memoized per session version (:func:`memoized`)."""
    return memoized(ledger, session_id, "timing", lambda: _timing(ledger, session_id))


_TIMING_COLUMNS = (E.propose_s, E.run_s, E.overhead_s, E.started_at, sa.func.coalesce(E.finished_at, E.started_at),
                   C.cost_usd, C.tokens_in, C.tokens_out, C.tokens_cached, C.usage_s)
_NO_TIMING: tuple[Any, ...] = (0, 0.0, 0.0, 0.0, None, None, 0.0, 0, 0, 0, 0.0)


def _fold_timing(acc: tuple[Any, ...], rows: list[Any]) -> tuple[Any, ...]:
    """Add rows ``(id, status, propose_s, run_s, overhead_s, started_at, last, cost, t_in, t_out, t_cached,
    usage_s)`` to the sums ``(n, propose, run, overhead, first start, last end, cost, in, out, cached, usage)``."""
    n, prop, run, over, first, last, cost, t_in, t_out, t_cached, usage_s = acc
    for r in rows:
        n += 1
        prop, run, over = prop + (r[2] or 0.0), run + (r[3] or 0.0), over + (r[4] or 0.0)
        if r[5] is not None:
            first = r[5] if first is None else min(first, r[5])
        if r[6] is not None:
            last = r[6] if last is None else max(last, r[6])
        cost, t_in, t_out = cost + (r[7] or 0.0), t_in + (r[8] or 0), t_out + (r[9] or 0)
        t_cached, usage_s = t_cached + (r[10] or 0), usage_s + (r[11] or 0.0)
    return (n, prop, run, over, first, last, cost, t_in, t_out, t_cached, usage_s)


def _timing(ledger: Ledger, session_id: int) -> Timing:
    settled, running = incremental(ledger, session_id, "timing", _TIMING_COLUMNS, _fold_timing,
                                   lambda: _NO_TIMING, joined=True)
    n, prop, run, over, first, last, cost, t_in, t_out, t_cached, usage_s = _fold_timing(settled, running)
    first_start = float(first) if first is not None else None
    return Timing(
        int(n), float(prop), float(run), float(over), first_start, float(last) if last is not None else None,
        float(cost), int(t_in), int(t_out), int(t_cached), _slots(spec_json(ledger, session_id)),
        float(usage_s),
    )


def cost_series(ledger: Ledger, session_id: int, buckets: int = 60) -> CostSeries:
    """See ``_cost_series``; memoized per session version (:func:`memoized`)."""
    return memoized(ledger, session_id, "cost_series", lambda: _cost_series(ledger, session_id, buckets),
                    buckets)


def _cost_series(ledger: Ledger, session_id: int, buckets: int = 60) -> CostSeries:
    """Experiments bucketed by start time: count, keeps, spend and seconds per bucket (in SQL)."""
    with reading(ledger) as conn:
        first, last = conn.execute(
            sa.select(sa.func.min(E.started_at), sa.func.max(sa.func.coalesce(E.finished_at, E.started_at)))
            .where(E.session_id == session_id)
        ).one()
        if first is None:
            return CostSeries(0.0, [])
        width = max((float(last) - float(first)) / max(1, buckets), 1e-6)
        scaled = (E.started_at - float(first)) / width
        if conn.dialect.name != "sqlite":  # SQLite's CAST truncates (values are >= 0); others round
            scaled = sa.func.floor(scaled)
        b = sa.cast(scaled, sa.Integer).label("b")
        q = (
            sa.select(
                b, sa.func.count(),
                sa.func.sum(sa.case((E.status == Status.KEEP.value, 1), else_=0)),
                sa.func.coalesce(sa.func.sum(C.cost_usd), 0.0),
                sa.func.sum(E.propose_s), sa.func.sum(E.run_s), sa.func.sum(E.overhead_s),
            ).select_from(_joined()).where(E.session_id == session_id).group_by(b).order_by(b)
        )
        rows = conn.execute(q).all()
    out = [
        Bucket(min(int(i), buckets - 1) * width, int(n), int(k or 0), float(c), float(p), float(r), float(o))
        for i, n, k, c, p, r, o in rows
    ]
    # the last experiment's start can fall exactly on the upper edge: merge it into the last bucket
    merged: dict[float, Bucket] = {}
    for bk in out:
        prev = merged.get(bk.t0)
        merged[bk.t0] = bk if prev is None else Bucket(
            bk.t0, prev.n + bk.n, prev.keeps + bk.keeps, prev.cost_usd + bk.cost_usd,
            prev.propose_s + bk.propose_s, prev.run_s + bk.run_s, prev.overhead_s + bk.overhead_s,
        )
    return CostSeries(width, [merged[k] for k in sorted(merged)])
