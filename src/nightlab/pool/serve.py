"""``nightlab pool serve``: one process, the pool's API in a thread and its verification session in the main one.

The session is an ordinary engine session of the lab, tag ``pool-<[pool] name>`` (branch
``nightlab/pool-<name>``), whose researcher is the :class:`~nightlab.pool.feeder.ClaimFeeder`. Its stop rules
are off (no experiment, time, patience or crash limit: a cheater's crashing claims must not stop the pool);
a run that refutes its claim is discarded before the keep decision, and the noise floor is calibrated after the
baseline (pool/engine.py);
Ctrl-C, SIGTERM and the STOP file stop it as any session. It starts (or resumes) with its baseline; claims
that arrive meanwhile wait in the queue. Proposals are not pipelined, so each claim's outcome is recorded as
soon as its run ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nightlab.engine import install_signal_handlers
from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.pool.engine import PoolEngine
from nightlab.pool.feeder import ClaimFeeder
from nightlab.pool.host import PoolHost
from nightlab.runtime import Reporter
from nightlab.spec import Spec, StopSpec, load_spec
from nightlab.types import Session

NO_LIMITS = StopSpec(max_experiments=0, max_hours=0.0, patience=0, max_crashes_in_row=0, max_policy_violations=0,
                     max_cost_usd=0.0, max_tokens=0)


def pool_spec(spec: Spec, slots: int | None = None) -> Spec:
    """The lab's spec as the pool's session runs it: no stop limits, no pipelined proposals."""
    ex: dict[str, Any] = {"pipeline": False}
    if slots:
        ex["slots"] = slots
    return spec.model_copy(update={"stop": NO_LIMITS, "executor": spec.executor.model_copy(update=ex)})


def open_pool(lab: Path | str, db: str | None = None, *, reporter: Reporter | None = None,
              sandbox_mode: str | None = None, slots: int | None = None,
              poll_s: float = 0.2) -> tuple[PoolEngine, PoolHost, ClaimFeeder]:
    """The pool's engine (session opened or resumed, branch created), its host state and its feeder."""
    lab = Path(lab).resolve()
    spec = pool_spec(load_spec(lab), slots)
    ledger = Ledger.for_lab(lab, db)
    host = PoolHost(lab, ledger, spec)
    feeder = ClaimFeeder(host, poll_s=poll_s)
    try:
        resume = ledger.get_session(host.tag) is not None
        engine = PoolEngine(lab, pool_host=host, tag=host.tag, resume=resume, db_url=db, reporter=reporter,
                            researcher=feeder, spec=spec, sandbox_mode=sandbox_mode, max_experiments=0)
    except BaseException:
        ledger.close()
        raise
    host.events = engine.events  # claims, checks and decisions go to the lab's audit log
    return engine, host, feeder


def serve(lab: Path | str, db: str | None, *, host: str, port: int, access: Any, reporter: Reporter | None = None,
          sandbox_mode: str | None = None, slots: int | None = None,
          ready: Callable[[str], None] = print) -> Session:
    """Serve the dashboard with the pool's API and run the verification session until it is stopped."""
    import uvicorn

    from nightlab.web.app import create_app

    engine, pool, _ = open_pool(lab, db, reporter=reporter, sandbox_mode=sandbox_mode, slots=slots)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        app = create_app(pool.ledger, pool.lab_dir, access, pool=pool)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, name="nightlab-pool-http", daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise UsageError(f"cannot serve the pool on {host}:{port} (is the port in use?)",
                                 "pick another --port")
            time.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{bound}")
        restore = install_signal_handlers(engine)
        try:
            return engine.run()
        finally:
            restore()
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=10)
        engine.close()
        pool.ledger.close()
