"""The dashboard: pages (Jinja2, server-rendered SVG, a little vanilla JS) and a JSON API.

``create_app(ledger, lab_dir, access)`` returns an ASGI app; ``nightlab ui`` serves it with
uvicorn. Every asset comes from this package (no CDN). Reads go through
:mod:`nightlab.queries` (short WAL read transactions; tables paginate in SQL); the only
write is answering an approval (:mod:`nightlab.approvals`). Access rules and secret
masking: :mod:`nightlab.web.security`.

Pages: ``/`` sessions, ``/s/<tag>`` session (chart, summary, experiments table),
``/s/<tag>/e/<idx>`` experiment, ``/s/<tag>/costs`` cost and latency, ``/audit``,
``/approvals``. API: ``/api/sessions``, ``/api/sessions/<tag>``,
``/api/sessions/<tag>/experiments`` (``status``, ``researcher``, ``sort``, ``order``,
``limit``, ``offset``, ``since``), ``/api/sessions/<tag>/experiments/<idx>``,
``/api/sessions/<tag>/chart``, ``/api/sessions/<tag>/costs``, ``/api/audit``,
``/api/approvals`` (GET) and ``/api/approvals/<id>`` (POST ``{"approved": bool, "why": str}``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer
from starlette.exceptions import HTTPException as StarletteHTTPException

from nightlab import __version__, approvals, prune, queries
from nightlab.constraints import RUN_S
from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.types import Session, Status
from nightlab.web import charts
from nightlab.web import figures as figures_mod
from nightlab.web.audit_view import audit_status
from nightlab.web.security import (
    TOKEN_COOKIE,
    TOKEN_HEADER,
    Access,
    Redactor,
    host_name,
    is_loopback,
    same_token,
    spec_secrets,
)

HERE = Path(__file__).parent
STATUSES = [s.value for s in Status]
PAGE_SIZE = 50
CHART_POINTS = 2000
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class AnswerIn(BaseModel):
    approved: bool
    why: str = Field("", max_length=2000)
    who: str = Field("", max_length=200)


def improvement_pct(s: Session) -> float | None:
    return s.direction.improvement_pct(s.incumbent_metric, s.baseline_metric)


def ago(t: float | None) -> str:
    if not t:
        return "—"
    d = max(0.0, time.time() - t)
    for unit, secs in (("d", 86400), ("h", 3600), ("min", 60)):
        if d >= secs:
            return f"{d / secs:.0f} {unit} ago"
    return f"{d:.0f} s ago"


def duration(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def time_unit(span_s: float) -> tuple[str, float]:
    """The unit a time axis of ``span_s`` seconds reads best in."""
    if span_s < 120:
        return "seconds", 1.0
    return ("minutes", 60.0) if span_s < 7200 else ("hours", 3600.0)


WARM_SESSIONS = 3  # the newest sessions whose aggregates are built before the dashboard serves


def create_app(ledger: Ledger, lab_dir: Path | None = None, access: Access | None = None, *,
               poll_ms: int = 2000, root: str = "", home: str = "", pool: Any = None) -> FastAPI:
    """The dashboard for ``ledger`` (and the audit log of ``lab_dir``), with ``access`` rules.

    Live pages poll the JSON API every ``poll_ms`` milliseconds. ``root`` is the path the app is mounted
    under (``/labs/<name>`` on the many-labs home page, :mod:`nightlab.web.home`); every link and fetch is
    prefixed with it. ``home`` is the home page's URL, shown in the navigation when set. ``pool`` (a
    :class:`nightlab.pool.host.PoolHost`) mounts the research pool's API under ``/api/pool``: those paths
    authenticate workers by their own tokens, the dashboard's access rules apply to everything else."""
    access = access or Access.make("127.0.0.1", None)
    queries.ensure_indexes(ledger)
    warmers: list[Callable[[], None]] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        for warm in warmers:  # before the server accepts its first request
            warm()
        yield

    app = FastAPI(title="nightlab", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.access = access  # who may read and act (the token the caller prints, or a test sends)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["metric"] = lambda v: "—" if v is None else charts.fmt(float(v))
    env.filters["ago"] = ago
    env.filters["duration"] = duration
    env.filters["clock"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"
    env.filters["money"] = lambda v: f"${(v or 0):,.4f}" if (v or 0) < 10 else f"${v:,.2f}"
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.0f}%"
    env.globals["statuses"] = STATUSES
    env.globals["token"] = access.token  # every page was asked for with it (install_guard)
    env.globals["version"] = __version__
    env.globals["poll_ms"] = int(poll_ms)
    env.globals["root"] = root
    env.globals["home"] = home
    if pool is not None:
        env.globals["pool_nav"] = True
    else:
        from nightlab.pool import store as pool_store

        env.globals["pool_nav"] = pool_store.has_tables(ledger)
    redactor = Redactor.from_env()
    formatter = HtmlFormatter(cssclass="hl")
    pygments_css = formatter.get_style_defs(".hl")
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    install_guard(app, access, open_prefix="/api/pool/" if pool is not None else "")
    if pool is not None:
        from nightlab.pool import api as pool_api

        app.include_router(pool_api.router(pool))

    # ------------------------------------------------------------------ errors: pages get pages, /api gets JSON

    def _is_page(request: Request) -> bool:
        return not request.url.path.startswith(("/api/", "/static"))

    def error_page(request: Request, code: int, message: str) -> Response:
        title = {404: "not found", 422: "not found"}.get(code, "error")
        return templates.TemplateResponse(request, "error.html", {"code": code, "title": title, "message": message},
                                          status_code=code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not _is_page(request):
            return await http_exception_handler(request, exc)
        message = str(exc.detail) if exc.status_code != 404 or exc.detail != "Not Found" else \
            f"no page at {request.url.path}"
        return error_page(request, exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        if not _is_page(request):
            return await request_validation_exception_handler(request, exc)
        # a page address with a malformed part (an experiment number that is not a number) is a page
        # that does not exist
        return error_page(request, 404, f"no page at {request.url.path}")

    # ------------------------------------------------------------------ helpers

    def session_or_404(tag: str) -> Session:
        s = ledger.get_session(tag)
        if s is None:
            raise HTTPException(404, f"no session {tag!r}")
        return s

    def redactor_for(s: Session) -> tuple[Redactor, dict[str, Any]]:
        spec = queries.spec_json(ledger, s.id)
        return redactor.with_values(spec_secrets(spec)), spec

    def session_dict(s: Session) -> dict[str, Any]:
        d = asdict(s)
        d["direction"] = s.direction.value
        d["improvement_pct"] = improvement_pct(s)
        return d

    def table_args(status: list[str] | None, researcher: str | None, sort: str, order: str) -> dict[str, Any]:
        bad = [x for x in status or [] if x not in STATUSES]
        if bad:
            raise HTTPException(422, f"unknown status {bad[0]!r}; one of {STATUSES}")
        if sort not in queries.SORTS:
            raise HTTPException(422, f"unknown sort {sort!r}; one of {sorted(queries.SORTS)}")
        if order not in ("asc", "desc"):
            raise HTTPException(422, "order must be asc or desc")
        statuses = [x for x in status or [] if x]
        return dict(statuses=statuses, researcher=researcher or None, sort=sort, order=order)

    def cursor(s: Session, rows: list[queries.ExperimentRow], since: int | None) -> int:
        running = [r.idx for r in rows if r.status == Status.RUNNING.value]
        if running:
            return min(running) - 1
        top = max((r.idx for r in rows), default=since if since is not None else -1)
        return top if since is None else max(top, since)

    def chart_svg(s: Session, links: bool = True) -> str:
        data = queries.chart_data(ledger, s, CHART_POINTS)
        href = (lambda i: f"{root}/s/{s.tag}/e/{i}") if links else None
        return charts.progress_svg(data, href=href)

    def summary_ctx(s: Session) -> dict[str, Any]:
        counts = queries.status_counts(ledger, s.id)
        t = queries.timing(ledger, s.id)
        n_pruned, saved = prune.savings(ledger.experiments(s.id, status=Status.PRUNED)) if counts.get("pruned") \
            else (0, 0.0)
        return dict(s=s, counts=counts, total=sum(counts.values()), timing=t, improvement=improvement_pct(s),
                    pending=len(approvals.pending(ledger, s.id)), pruned=n_pruned, saved_s=saved)

    def pareto_ctx(s: Session, spec: dict[str, Any], figure: str | None) -> dict[str, Any]:
        figures = [str(f) for f in (spec.get("metric") or {}).get("secondary") or []] + [RUN_S]
        x = figure if figure in figures else figures[0]
        minimize = s.direction.value == "minimize"
        pts = [figures_mod.Point(i, fx, m, st) for i, fx, m, st in queries.pareto_points(ledger, s.id, x, x == RUN_S,
                                                                                         minimize)]
        svg = figures_mod.pareto_svg(pts, x_label=x, y_label=s.metric_name, minimize=minimize,
                                     href=lambda i: f"{root}/s/{s.tag}/e/{i}")
        return dict(pareto=svg, pareto_figures=figures, pareto_x=x)

    def table_ctx(request: Request, s: Session, args: dict[str, Any], page: int) -> dict[str, Any]:
        pg = queries.experiments_page(ledger, s.id, **args, limit=PAGE_SIZE, offset=page * PAGE_SIZE)
        pages = max(1, math.ceil(pg.total / PAGE_SIZE))
        base = [(k, v) for k, v in request.query_params.multi_items() if k not in ("page", "sort", "order")]

        def url(**kw: Any) -> str:
            params = base + [(k, str(v)) for k, v in kw.items()]
            return f"{root}/s/{s.tag}?{urlencode(params)}#experiments"

        def sort_url(col: str) -> str:
            order = "asc" if args["sort"] == col and args["order"] == "desc" else "desc"
            return url(sort=col, order=order)

        return dict(page=pg, pageno=page, pages=pages, args=args, url=url, sort_url=sort_url,
                    researchers=queries.researchers(ledger, s.id), red=redactor_for(s)[0],
                    default_view=(page == 0 and args["sort"] == "idx" and args["order"] == "desc"
                                  and not args["statuses"] and not args["researcher"]))

    def page(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, ctx)

    def warm_caches() -> None:
        """Build the newest sessions' incremental aggregates (queries.incremental) at server start, so the first
        session page does not pay for reading every row: 2.2 s at 100k experiments (bench/dashboard.py)."""
        newest = sorted(ledger.list_sessions(), key=lambda x: x.created_at, reverse=True)[:WARM_SESSIONS]
        for s in newest:
            try:
                chart_svg(s)
                summary_ctx(s)
                pareto_ctx(s, queries.spec_json(ledger, s.id), None)
                queries.researchers(ledger, s.id)
            except Exception:  # a cache that cannot be warmed is built by the first request instead
                continue

    warmers.append(warm_caches)

    # ------------------------------------------------------------------ pages

    @app.get("/", response_class=HTMLResponse)
    def sessions_page(request: Request) -> HTMLResponse:
        return page(request, "sessions.html", summaries=queries.session_summaries(ledger),
                    improvement=improvement_pct, nav="sessions")

    @app.get("/pool", response_class=HTMLResponse)
    def pool_page(request: Request) -> HTMLResponse:
        from nightlab.pool import board, store
        from nightlab.spec import PoolSpec, load_spec

        policy = PoolSpec()
        if pool is not None:
            policy = pool.policy
        elif lab_dir is not None and (lab_dir / "nightlab.toml").exists():
            with contextlib.suppress(UsageError):
                policy = load_spec(lab_dir, check_paths=False).pool
        tag = f"pool-{policy.name}"
        exists = pool is not None or store.has_tables(ledger)  # a read never creates the pool's tables
        claims = store.list_claims(ledger, policy.name)[-50:][::-1] if exists else []
        lb = board.leaderboard(ledger, policy.name, policy) if exists else board.EMPTY
        return page(request, "pool.html", pool=policy.name, board=lb, claims=claims,
                    session=tag if ledger.get_session(tag) else None, nav="pool")

    @app.get("/compare", response_class=HTMLResponse)
    def comparisons_page(request: Request) -> HTMLResponse:
        import json as _json

        from nightlab import compare as cmp

        rows = []
        for c in cmp.list_comparisons(ledger):
            cfg = _json.loads(c["config_json"])
            rows.append(dict(name=c["name"], status=c["status"], created_at=c["created_at"], seeds=cfg["seeds"],
                             arms=[a["name"] for a in cfg["arms"]], budget=f"{cfg['budget'][0]}={cfg['budget'][1]:g}"))
        return page(request, "comparisons.html", rows=rows, nav="compare")

    @app.get("/compare/{name}", response_class=HTMLResponse)
    def compare_page(request: Request, name: str) -> HTMLResponse:
        from nightlab import compare as cmp
        from nightlab.web import compare_view

        try:
            report = cmp.load_report(ledger, name)
        except UsageError as e:
            raise HTTPException(404, e.message) from None
        return page(request, "compare.html", nav="compare", **compare_view.context(report))

    @app.get("/api/compare/{name}")
    def api_compare(name: str) -> dict[str, Any]:
        from nightlab import compare as cmp

        try:
            return dict(redactor.data(cmp.load_report(ledger, name).as_dict()))
        except UsageError as e:
            raise HTTPException(404, e.message) from None

    @app.get("/s/{tag}", response_class=HTMLResponse)
    def session_page(request: Request, tag: str, status: list[str] | None = Query(None),
                     researcher: str | None = None, sort: str = "idx", order: str = "desc",
                     page_: int = Query(0, alias="page", ge=0), pareto: str | None = None) -> HTMLResponse:
        s = session_or_404(tag)
        args = table_args(status, researcher, sort, order)
        red, spec = redactor_for(s)
        rows = queries.experiments_page(ledger, s.id, limit=1, order="asc", statuses=[Status.RUNNING.value])
        since = rows.rows[0].idx - 1 if rows.rows else ledger.next_idx(s.id) - 1
        return page(request, "session.html", chart=chart_svg(s), since=since, spec=red.data(spec),
                    machine=red.data(s.machine), nav="session", **summary_ctx(s), **pareto_ctx(s, spec, pareto),
                    **table_ctx(request, s, args, page_))

    @app.get("/s/{tag}/fragment/{part}", response_class=HTMLResponse)
    def session_fragment(request: Request, tag: str, part: str, status: list[str] | None = Query(None),
                         researcher: str | None = None, sort: str = "idx", order: str = "desc",
                         page_: int = Query(0, alias="page", ge=0)) -> Response:
        s = session_or_404(tag)
        if part == "chart":
            return HTMLResponse(chart_svg(s))
        if part == "summary":
            return page(request, "_summary.html", **summary_ctx(s))
        if part == "table":
            args = table_args(status, researcher, sort, order)
            return page(request, "_table.html", s=s, **table_ctx(request, s, args, page_))
        raise HTTPException(404, f"no fragment {part!r}")

    @app.get("/s/{tag}/e/{idx}", response_class=HTMLResponse)
    def experiment_page(request: Request, tag: str, idx: int) -> HTMLResponse:
        s = session_or_404(tag)
        e = ledger.get_experiment(s.id, idx)
        if e is None:
            raise HTTPException(404, f"no experiment {idx} in session {tag!r}")
        red, _ = redactor_for(s)
        diff_html = highlight(red.text(e.diff), DiffLexer(), formatter) if e.diff else ""
        base = ledger.get_experiment(s.id, 0) if idx else None
        figure = (queries.spec_json(ledger, s.id).get("prune") or {}).get("figure") or s.metric_name
        curve = figures_mod.curve_svg(e.evidence.get("curve") or [], str(figure),
                                      reference=(base.evidence.get("curve") or []) if base else [],
                                      pruned_at=e.evidence.get("pruned_at"))
        return page(request, "experiment.html", s=s, e=e, red=red, diff_html=diff_html, nav="session", curve=curve,
                    secondary=red.data(e.secondary), evidence=red.data(e.evidence), params=red.data(e.params),
                    stages=figures_mod.stage_rows(e.evidence.get("timing")),
                    has_prev=idx > 0, has_next=ledger.get_experiment(s.id, idx + 1) is not None)

    @app.get("/s/{tag}/costs", response_class=HTMLResponse)
    def costs_page(request: Request, tag: str) -> HTMLResponse:
        s = session_or_404(tag)
        t = queries.timing(ledger, s.id)
        series = queries.cost_series(ledger, s.id)
        unit, div = time_unit(t.span_s)
        hours = [b.t0 / div for b in series.buckets]
        x_label = f"{unit} since start"
        cum, acc = [], 0.0
        for b in series.buckets:
            acc += b.cost_usd
            cum.append(acc)
        spend = charts.line_svg(hours, cum, x_label=x_label, y_label="spend (USD, cumulative)")
        secs = charts.stacked_svg(
            hours, {"proposing": [b.propose_s for b in series.buckets],
                    "running": [b.run_s for b in series.buckets],
                    "overhead": [b.overhead_s for b in series.buckets]},
            {"proposing": "#fdae61", "running": "#2b83ba", "overhead": "#bbbbbb"},
            x_label=x_label, y_label="seconds",
        )
        rate = charts.stacked_svg(
            hours, {"keep": [b.keeps for b in series.buckets],
                    "other": [b.n - b.keeps for b in series.buckets]},
            {"keep": charts.STATUS_COLOURS["keep"], "other": "#cccccc"},
            x_label=x_label, y_label="experiments",
        )
        return page(request, "costs.html", s=s, t=t, spend_svg=spend, secs_svg=secs, rate_svg=rate,
                    nav="session", usage=t.usage() + ledger.spend_totals(s.id))  # dropped proposals too

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, page_: int = Query(0, alias="page", ge=0)) -> HTMLResponse:
        st = audit_status(lab_dir, page_)
        entries = [redactor.data(e) for e in st.entries]
        return page(request, "audit.html", st=st, entries=entries, nav="audit")

    @app.get("/approvals", response_class=HTMLResponse)
    def approvals_page(request: Request, session: str | None = None) -> HTMLResponse:
        sid = session_or_404(session).id if session else None
        items = []
        by_id = {x.id: x for x in ledger.list_sessions()}
        for a in approvals.pending(ledger, sid):
            s = by_id.get(a["session_id"])
            red = redactor_for(s)[0] if s else redactor
            diff_html = highlight(red.text(a["diff"]), DiffLexer(), formatter) if a["diff"] else ""
            tag = s.tag if s else "?"
            items.append(dict(a, tag=tag, rationale=red.text(a["rationale"]), diff_html=diff_html))
        done = [dict(a, tag=by_id[a["session_id"]].tag if a["session_id"] in by_id else "?")
                for a in approvals.recent(ledger, sid, 20)]
        return page(request, "approvals.html", items=items, done=done, session=session, nav="approvals")

    @app.get("/static-gen/pygments.css")
    def pygments_style() -> Response:
        return Response(pygments_css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------------ API

    @app.get("/api/sessions")
    def api_sessions() -> list[dict[str, Any]]:
        return [dict(session_dict(x.session), counts=x.counts, experiments=x.total, cost_usd=x.cost_usd,
                     tokens=x.tokens, last_activity=x.last_activity)
                for x in queries.session_summaries(ledger)]

    @app.get("/api/sessions/{tag}")
    def api_session(tag: str) -> dict[str, Any]:
        s = session_or_404(tag)
        red, spec = redactor_for(s)
        t = queries.timing(ledger, s.id)
        d = session_dict(s)
        d["machine"] = red.data(s.machine)
        return dict(d, spec=red.data(spec), counts=queries.status_counts(ledger, s.id),
                    usage=asdict(t.usage()),
                    timing=dict(asdict(t), span_s=t.span_s, duty_cycle=t.duty_cycle, busy_cycle=t.busy_cycle),
                    pending_approvals=len(approvals.pending(ledger, s.id)))

    @app.get("/api/sessions/{tag}/experiments")
    def api_experiments(tag: str, status: list[str] | None = Query(None), researcher: str | None = None,
                        sort: str = "idx", order: str = "asc", limit: int = Query(PAGE_SIZE, ge=1, le=500),
                        offset: int = Query(0, ge=0), since: int | None = None) -> dict[str, Any]:
        s = session_or_404(tag)
        args = table_args(status, researcher, sort, order)
        pg = queries.experiments_page(ledger, s.id, **args, limit=limit, offset=offset, since=since)
        red = redactor_for(s)[0]
        rows = [red.data(r.as_dict()) for r in pg.rows]
        return dict(session=dict(tag=s.tag, status=s.status, updated_at=s.updated_at,
                                 incumbent_metric=s.incumbent_metric, baseline_metric=s.baseline_metric),
                    total=pg.total, limit=pg.limit, offset=pg.offset, cursor=cursor(s, pg.rows, since),
                    experiments=rows)

    @app.get("/api/sessions/{tag}/experiments/{idx}")
    def api_experiment(tag: str, idx: int) -> dict[str, Any]:
        s = session_or_404(tag)
        e = ledger.get_experiment(s.id, idx)
        if e is None:
            raise HTTPException(404, f"no experiment {idx} in session {tag!r}")
        d = asdict(e)
        d["status"] = e.status.value
        return dict(redactor_for(s)[0].data(d))

    @app.get("/api/sessions/{tag}/chart")
    def api_chart(tag: str, max_points: int = Query(CHART_POINTS, ge=10, le=200_000)) -> dict[str, Any]:
        s = session_or_404(tag)
        data = queries.chart_data(ledger, s, max_points)
        d = asdict(data)
        d["points"] = [[p.idx, p.metric, p.status, p.holdout] for p in data.points]
        d["point_fields"] = ["idx", "metric", "status", "holdout"]
        return d

    @app.get("/api/sessions/{tag}/costs")
    def api_costs(tag: str, buckets: int = Query(60, ge=1, le=1000)) -> dict[str, Any]:
        s = session_or_404(tag)
        t = queries.timing(ledger, s.id)
        series = queries.cost_series(ledger, s.id, buckets)
        return dict(timing=dict(asdict(t), span_s=t.span_s, duty_cycle=t.duty_cycle, busy_cycle=t.busy_cycle),
                    usage=asdict(t.usage()), bucket_s=series.width_s,
                    buckets=[asdict(b) for b in series.buckets])

    @app.get("/api/audit")
    def api_audit(page_: int = Query(0, alias="page", ge=0)) -> dict[str, Any]:
        st = audit_status(lab_dir, page_)
        d = st.as_dict()
        d["entries"] = [redactor.data(e) for e in st.entries]
        return d

    @app.get("/api/approvals")
    def api_approvals(session: str | None = None) -> dict[str, Any]:
        sid = session_or_404(session).id if session else None
        return dict(pending=[redactor.data(a) for a in approvals.pending(ledger, sid)],
                    recent=[redactor.data(a) for a in approvals.recent(ledger, sid, 50)])

    @app.post("/api/approvals/{approval_id}")
    def api_answer(approval_id: int, body: AnswerIn) -> dict[str, Any]:
        try:
            row = approvals.answer(ledger, approval_id, body.approved, body.why, body.who or "dashboard")
        except UsageError as e:
            raise HTTPException(409 if "already" in e.message else 404, e.message) from None
        return dict(redactor.data(row))

    return app


def install_guard(app: FastAPI, access: Access, open_prefix: str = "") -> None:
    """The access rules of :mod:`nightlab.web.security` as middleware (the lab dashboard and the home page).

    Paths under ``open_prefix`` (the research pool's API) skip them: they check worker tokens themselves."""

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if open_prefix and request.url.path.removeprefix(request.scope.get("root_path", "")).startswith(open_prefix):
            return _secure(await call_next(request))
        host = host_name(request.headers.get("host", ""))
        if not access.public and not is_loopback(host):
            return PlainTextResponse(f"host {host!r} is not allowed: this dashboard answers on loopback only",
                                     status_code=421)
        given = (request.headers.get(TOKEN_HEADER) or _bearer(request) or request.cookies.get(TOKEN_COOKIE))
        if not same_token(given, access.token):  # loopback too: an agent researcher on this machine has the network
            q = request.query_params.get("token")
            if same_token(q, access.token) and request.method == "GET":
                # the printed URL, opened once: a cookie from then on, and the token leaves the address bar
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                resp = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), status_code=303)
                resp.set_cookie(TOKEN_COOKIE, access.token, httponly=True, samesite="strict")
                return _secure(resp)
            return _secure(_deny(request, 401, "a token is required: open the URL that `nightlab ui` printed "
                                               "(…?token=…) or send the X-Nightlab-Token header"))
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            if not same_token(request.headers.get(TOKEN_HEADER), access.token):
                why = ("acting needs the dashboard token: open the URL that `nightlab ui` printed (…?token=…) "
                       "in this browser, or send the X-Nightlab-Token header")
                return _secure(_deny(request, 403, why))
            origin = request.headers.get("origin")
            if origin and origin != "null" and host_name(origin.split("://", 1)[-1]) != host:
                return _secure(_deny(request, 403, f"cross-origin request refused (Origin {origin})"))
            if origin == "null":
                return _secure(_deny(request, 403, "cross-origin request refused (Origin null)"))
            site = request.headers.get("sec-fetch-site")
            if site and site not in ("same-origin", "none"):
                return _secure(_deny(request, 403, f"cross-site request refused (Sec-Fetch-Site {site})"))
        return _secure(await call_next(request))


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _deny(request: Request, code: int, message: str) -> Response:
    if "/api/" in request.url.path:
        return JSONResponse({"detail": message}, status_code=code)
    return PlainTextResponse(message, status_code=code)


def _secure(resp: Response) -> Response:
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("Cache-Control", "no-store")
    return resp
