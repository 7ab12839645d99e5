"""The dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Skipped, with the reason, where Chromium or the playwright package is missing: a browser
cannot be downloaded here, so the system one is used.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the ui extra is not installed")

from tests.dashlab import make_dash_lab, run_session, target  # noqa: E402

from nightlab import approvals  # noqa: E402
from nightlab.engine import Engine  # noqa: E402
from nightlab.ledger import Ledger  # noqa: E402
from nightlab.researchers.scripted import ScriptedResearcher  # noqa: E402
from nightlab.web.app import create_app  # noqa: E402
from nightlab.web.security import Access  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lab = make_dash_lab(tmp_path_factory.mktemp("browser"))
    run_session(lab)
    return lab


ACCESS = Access.make("127.0.0.1", None)  # what `nightlab ui` makes: a random token, in the URL it prints


@pytest.fixture(scope="module")
def server(lab: Path) -> Iterator[tuple[str, Ledger]]:
    ledger = Ledger.for_lab(lab)
    port = free_port()
    app = create_app(ledger, lab, ACCESS, poll_ms=250)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", ledger
    srv.should_exit = True
    th.join(10)
    ledger.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):  # type: ignore[no-untyped-def]
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the dashboard's CSP forbids
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    # as after opening the URL `nightlab ui` printed (?token=…): the cookie (test_approve_button… opens it)
    ctx.add_cookies([{"name": "nightlab_token", "value": ACCESS.token, "url": server[0]}])
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors


def test_session_chart_has_one_point_per_experiment_and_a_screenshot(server, page):
    url, ledger = server
    n = ledger.count_experiments(ledger.get_session("t").id)
    page.goto(f"{url}/s/t")
    points = page.locator("svg.nl-chart circle[data-idx]")
    assert points.count() == n == 5
    assert page.locator("svg.nl-chart path.best").count() == 1
    assert page.locator("#exp-table tbody tr[data-idx]").count() == n
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "session.png"), full_page=True)
    assert (ARTIFACTS / "session.png").stat().st_size > 10_000
    # a point links to its experiment
    page.locator('svg.nl-chart circle[data-idx="1"]').click()
    page.wait_for_url("**/s/t/e/1")
    assert page.locator(".diff .hl").count() == 1


def test_a_running_session_adds_a_point_without_reload(server, page, lab: Path):
    url, ledger = server
    n = ledger.count_experiments(ledger.get_session("t").id)
    page.goto(f"{url}/s/t")
    page.evaluate("window.__not_reloaded = true")
    assert page.locator("svg.nl-chart circle[data-idx]").count() == n
    # the real engine resumes the session in the background and runs one more experiment
    step = {"rationale": "fine-tune X", "files": {"target.py": target(1.1, 2.0)}}
    eng = Engine(
        lab,
        tag="t",
        resume=True,
        researcher=ScriptedResearcher([step]),
        sandbox_mode="none",
        max_experiments=n,
    )
    th = threading.Thread(target=eng.run)
    th.start()
    try:
        page.wait_for_function(
            f"document.querySelectorAll('svg.nl-chart circle[data-idx]').length > {n}", timeout=15_000
        )
    finally:
        th.join(30)
        eng.close()
    assert page.evaluate("window.__not_reloaded") is True
    page.wait_for_selector(f'#exp-table tr[data-idx="{n}"]', timeout=10_000)
    page.wait_for_function(
        f"document.querySelector('svg.nl-chart circle[data-idx=\"{n}\"]').dataset.status === 'discard'",
        timeout=10_000,
    )
    assert page.evaluate("window.__not_reloaded") is True
    assert ledger.count_experiments(ledger.get_session("t").id) == n + 1


def test_approve_button_answers_the_waiting_request(server, page):
    url, ledger = server
    s = ledger.get_session("t")
    aid = approvals.request(
        ledger, s.id, 42, "keep", diff="--- a/t\n+++ b/t\n@@ -1 +1 @@\n-a\n+b\n", rationale="keep this?"
    )
    other = approvals.request(ledger, s.id, 43, "run", rationale="and this?")
    # a local process (an agent researcher has the network) gets nothing over real HTTP without the token
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{url}/approvals", timeout=10)
    assert denied.value.code == 401 and ACCESS.token not in denied.value.read().decode()
    page.context.clear_cookies()
    page.goto(f"{url}/approvals?token={ACCESS.token}")  # the printed URL: a cookie, then the page's token
    assert page.url == f"{url}/approvals"  # the token left the address bar
    card = page.locator(f"#approval-{aid}")
    card.locator("input.why").fill("looks right")
    card.locator("button.approve").click()
    page.wait_for_function(f"document.getElementById('approval-{aid}').dataset.status === 'approved'")
    row = approvals.get(ledger, aid)
    assert row is not None and row["status"] == "approved" and row["why"] == "looks right"
    page.locator(f"#approval-{other} button.reject").click()
    page.wait_for_function(f"document.getElementById('approval-{other}').dataset.status === 'rejected'")
    assert approvals.get(ledger, other)["status"] == "rejected"  # type: ignore[index]
