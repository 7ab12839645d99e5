"""The home page for many labs (``nightlab ui --home``): every lab you follow, one approval inbox.

``/`` lists each lab of the registry (:mod:`nightlab.labs`) and of shared ledgers (``--db``): its state
(running, waiting for you, stopped and why), incumbent and verified improvement, experiments and spend in
the last 24 hours and a sparkline of best-so-far; below, every pending approval of every lab, answerable
in place. Each lab's own dashboard is mounted at ``/labs/<name>/`` (the same app as ``nightlab ui`` in one
lab). API: ``/api/labs`` and ``POST /api/labs/<name>/approvals/<id>``. Access rules are the dashboard's
(:func:`nightlab.web.app.install_guard`): every request needs the token (the printed URL's cookie),
acting needs it in a header, cross-site requests are refused.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from nightlab import __version__, approvals
from nightlab.errors import UsageError
from nightlab.labs import LabEntry, LabState, all_labs, lab_state
from nightlab.ledger import Ledger
from nightlab.web import charts
from nightlab.web.app import AnswerIn, ago, create_app, install_guard
from nightlab.web.security import Access, Redactor

HERE = Path(__file__).parent


def sparkline_svg(values: list[float], direction: str, width: int = 120, height: int = 28) -> str:
    """Best-so-far as a small inline SVG polyline (better is up)."""
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    pts = []
    for i, v in enumerate(values):
        good = (hi - v) / span if direction == "minimize" else (v - lo) / span
        pts.append(f"{2 + i * (width - 4) / (len(values) - 1):.1f},{height - 2 - good * (height - 4):.1f}")
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="best so far"><polyline fill="none" stroke="currentColor" stroke-width="1.5" '
            f'points="{" ".join(pts)}"/></svg>')


def create_home_app(entries: list[LabEntry] | None = None, access: Access | None = None, *,
                    registry: Any = None, db_urls: list[str] | None = None, poll_ms: int = 2000) -> FastAPI:
    """The home app. Labs come from ``entries``, or (re-read on every page) from ``registry`` + ``db_urls``."""
    access = access or Access.make("127.0.0.1", None)
    app = FastAPI(title="nightlab home", version=__version__, docs_url=None, redoc_url=None)
    app.state.access = access
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["metric"] = lambda v: "—" if v is None else charts.fmt(float(v))
    env.filters["ago"] = ago
    env.filters["money"] = lambda v: f"${(v or 0):,.4f}" if (v or 0) < 10 else f"${v:,.2f}"
    env.globals.update(token=access.token, version=__version__, poll_ms=int(poll_ms), root="", home="/")
    redactor = Redactor.from_env()
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    install_guard(app, access)
    mounted: dict[str, Ledger] = {}
    lock = threading.Lock()

    def labs() -> list[LabEntry]:
        if entries is not None:
            return entries
        from nightlab.labs import Registry

        return all_labs(registry if registry is not None else Registry(), db_urls)

    def entry(name: str) -> LabEntry:
        found = next((e for e in labs() if e.name == name), None)
        if found is None:
            raise HTTPException(404, f"no lab named {name!r}")
        return found

    def mount(e: LabEntry) -> bool:
        """Mount the lab's dashboard at /labs/<name> (once its ledger exists)."""
        with lock:
            if e.name in mounted:
                return True
            if not e.db and not (Path(e.path) / ".nightlab" / "ledger.db").is_file():
                return False
            led = Ledger.for_lab(Path(e.path), e.db or None)
            mounted[e.name] = led
            sub = create_app(led, Path(e.path), access, poll_ms=poll_ms, root=f"/labs/{e.name}", home="/")
            app.mount(f"/labs/{e.name}", sub, name=f"lab-{e.name}")
            # a Mount added after start-up must come before the catch-all route below
            app.router.routes.insert(0, app.router.routes.pop())
            return True

    def states() -> list[LabState]:
        return [lab_state(e) for e in labs()]

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> HTMLResponse:
        st = states()
        inbox = [(s, {**redactor.data(a)}) for s in st for a in s.pending]
        return templates.TemplateResponse(request, "home.html", dict(
            labs=st, inbox=inbox, spark=sparkline_svg, nav="home"))

    @app.get("/labs/{name}", response_class=HTMLResponse)
    @app.get("/labs/{name}/{rest:path}", response_class=HTMLResponse)
    def lab_page(request: Request, name: str, rest: str = "") -> Any:
        e = entry(name)
        if not mount(e):
            raise HTTPException(404, f"lab {name!r} has no session yet: start one with `nightlab run` in {e.path}")
        return RedirectResponse(str(request.url), status_code=307)  # now served by the mounted dashboard

    @app.get("/api/labs")
    def api_labs() -> list[dict[str, Any]]:
        return [redactor.data(s.as_dict()) for s in states()]

    @app.get("/api/labs/inbox")
    def api_inbox() -> dict[str, Any]:
        """Pending approvals of every lab (ids are ``<lab>-<id>``: approval ids are per ledger)."""
        return {"pending": [{**redactor.data(a), "id": f"{s.name}-{a['id']}", "lab": s.name}
                            for s in states() for a in s.pending]}

    @app.post("/api/labs/{name}/approvals/{approval_id}")
    def api_answer(name: str, approval_id: int, body: AnswerIn) -> dict[str, Any]:
        e = entry(name)
        try:
            with Ledger.for_lab(Path(e.path), e.db or None) as led:
                row = approvals.answer(led, approval_id, body.approved, body.why, body.who or "dashboard (home)")
        except UsageError as err:
            raise HTTPException(409 if "already" in err.message else 404, err.message) from None
        return dict(redactor.data(row))

    app.state.ledgers = mounted  # the caller closes them (nightlab ui does, at exit)
    for e in labs():  # labs that already have a ledger are mounted at once
        mount(e)
    return app
