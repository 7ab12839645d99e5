"""``nightlab mcp``: nightlab for coding agents, over the Model Context Protocol (stdio).

Built on the official ``mcp`` SDK (``pip install 'nightlab[mcp]'``) and on :mod:`nightlab.api`, so an
agent sees exactly what the CLI shows. Tools:

==================  ====================================================================================
``list_labs``       the labs in the registry (``nightlab labs``) and the server's own lab, with their state
``list_sessions``   a lab's sessions
``status``          a session: state, metric, baseline, incumbent, improvement, counts, spend
``log``             the last experiments, one compact row each
``experiment``      one experiment: reason, evidence, rationale, diff and log tail (capped)
``audit_state``     whether the audit chain verifies
``pending``         approvals waiting for a human
``answer_approval`` approve or reject one — only where the lab's spec says
                    ``[autonomy] agents_may_approve = true``
``start_session``   start (or resume) ``nightlab run`` in the background
``stop_session``    stop after the experiment in flight (``.nightlab/STOP``)
==================  ====================================================================================

A ``lab`` argument is a registered lab's name or a path; empty means the lab ``nightlab mcp`` was started in.
Texts are redacted like the dashboard's (secret-looking values and key-shaped strings masked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nightlab.api import Lab
from nightlab.errors import NightlabError, UsageError

TEXT_CAP = 6000  # characters of a diff or a log tail in one tool result
INSTRUCTIONS = """nightlab runs autonomous research sessions on git repositories (labs). Read with list_labs,
status, log and experiment; a session's kept commits are on the branch nightlab/<tag>. Start or resume a session
with start_session and stop it with stop_session. Never edit a lab's protected files, nightlab.toml or .nightlab/.
Answer approvals only when the human enabled it ([autonomy] agents_may_approve = true)."""


def _cap(text: str, n: int = TEXT_CAP) -> str:
    if len(text) <= n:
        return text
    return text[: n // 2] + f"\n… [{len(text) - n} characters cut] …\n" + text[-n // 2:]


class Tools:
    """The tool implementations (plain methods, so they are testable without a transport)."""

    def __init__(self, default_lab: Path | None = None, registry: Path | None = None) -> None:
        from nightlab.web.security import Redactor

        self.default_lab = default_lab
        self.registry = registry
        self.red = Redactor.from_env()

    def _labs(self) -> list[tuple[str, Path, str]]:
        from nightlab.labs import Registry

        out = [(e.name, Path(e.path), e.db) for e in Registry(self.registry).labs]
        if self.default_lab is not None and (self.default_lab / "nightlab.toml").is_file() \
                and all(p != self.default_lab for _, p, _ in out):
            out.insert(0, (self.default_lab.name, self.default_lab, ""))
        return out

    def lab(self, lab: str = "") -> Lab:
        if not lab:
            if self.default_lab is None or not (self.default_lab / "nightlab.toml").is_file():
                names = ", ".join(n for n, _, _ in self._labs()) or "none registered"
                raise UsageError("no lab given and the server was not started in a lab", f"pass lab= one of: {names}")
            return Lab(self.default_lab)
        for name, path, db in self._labs():
            if name == lab:
                return Lab(path, db or None)
        p = Path(lab).expanduser()
        if (p / "nightlab.toml").is_file():
            return Lab(p)
        names = ", ".join(n for n, _, _ in self._labs()) or "none registered"
        raise UsageError(f"no lab named '{lab}'", f"use one of: {names} (or a path to a lab folder)")

    # ------------------------------------------------------------------ reading

    def list_labs(self) -> list[dict[str, Any]]:
        from nightlab.labs import LabEntry, lab_state

        out = []
        for name, path, db in self._labs():
            st = lab_state(LabEntry(name, str(path), db))
            out.append({"name": name, "path": str(path), "state": st.state, "detail": self.red.text(st.detail),
                        "session": st.tag, "metric": st.metric_name, "best": st.incumbent,
                        "improvement_pct": st.improvement_pct, "experiments": st.experiments,
                        "experiments_24h": st.experiments_24h, "pending_approvals": len(st.pending)})
        return out

    def list_sessions(self, lab: str = "") -> list[dict[str, Any]]:
        the = self.lab(lab)
        if not the.has_sessions():
            return []
        return [{"tag": s.tag, "status": s.status, "stop_reason": self.red.text(s.stop_reason),
                 "metric": s.metric_name, "best": s.incumbent_metric, "branch": s.branch, "created_at": s.created_at}
                for s in sorted(the.sessions(), key=lambda s: s.created_at)]

    def status(self, lab: str = "", tag: str = "") -> dict[str, Any]:
        st = self.lab(lab).status(tag or None)
        st["stop_reason"] = self.red.text(st["stop_reason"])
        return st

    def log(self, lab: str = "", tag: str = "", limit: int = 20) -> list[dict[str, Any]]:
        exps = self.lab(lab).experiments(tag or None)
        return [{"n": e.idx, "status": e.status.value, "metric": e.metric, "trust": e.trust,
                 "run_s": round(e.run_s, 2), "description": self.red.text(e.description[:160]),
                 "reason": self.red.text(e.reason[:200])} for e in exps[-max(1, min(limit, 500)):]]

    def experiment(self, n: int, lab: str = "", tag: str = "") -> dict[str, Any]:
        e = self.lab(lab).experiment(n, tag or None)  # the row carries its candidate
        return {
            "n": e.idx, "status": e.status.value, "reason": self.red.text(e.reason), "metric": e.metric,
            "trust": e.trust, "secondary": e.secondary, "commit": e.commit, "parent": e.parent_commit,
            "seed": e.seed, "run_s": e.run_s, "exit_code": e.exit_code, "evidence": self.red.data(e.evidence),
            "researcher": e.researcher, "rationale": self.red.text(_cap(e.rationale, 2000)),
            "diff": self.red.text(_cap(e.diff)), "log_tail": self.red.text(_cap(e.log_tail, 3000)),
            "usage": {"tokens_in": e.usage.tokens_in, "tokens_out": e.usage.tokens_out,
                      "tokens_cached": e.usage.tokens_cached, "cost_usd": e.usage.cost_usd,
                      "usage_s": e.usage.seconds},
        }

    def audit_state(self, lab: str = "") -> dict[str, Any]:
        return self.lab(lab).audit()

    def pending(self, lab: str = "") -> list[dict[str, Any]]:
        the = self.lab(lab)
        if not the.has_sessions():
            return []
        tags = {s.id: s.tag for s in the.sessions()}
        return [{"approval": r["id"], "session": tags.get(r["session_id"], "?"), "n": r["experiment_idx"],
                 "kind": r["kind"], "rationale": self.red.text(_cap(r["rationale"], 1500)),
                 "diff": self.red.text(_cap(r["diff"], 4000))} for r in the.pending()]

    # ------------------------------------------------------------------ acting

    def answer_approval(self, n: int, approve: bool, why: str = "", lab: str = "", tag: str = "") -> dict[str, Any]:
        the = self.lab(lab)
        if not the.spec.autonomy.agents_may_approve:
            raise UsageError("agents may not answer approvals in this lab",
                             "a human can allow it with [autonomy] agents_may_approve = true in nightlab.toml")
        if not approve and not why.strip():
            raise UsageError("a rejection needs a reason", "pass why='...'")
        row = the.answer(n, approve, why, who="mcp-agent", tag=tag or None)
        return {"approval": row["id"], "status": row["status"], "n": n}

    def start_session(self, lab: str = "", tag: str = "", resume: bool = False,
                      max_experiments: int | None = None) -> dict[str, Any]:
        the = self.lab(lab)
        h = the.start(tag or None, resume=resume, max_experiments=max_experiments)
        return {"pid": h.pid, "log": str(h.log), "command": " ".join(h.argv[2:])}

    def stop_session(self, lab: str = "") -> dict[str, Any]:
        stop = self.lab(lab).stop()
        return {"stop_file": str(stop), "note": "the session stops after the experiment in flight"}


def build_server(tools: Tools) -> Any:
    """The MCP server with every tool of ``tools`` registered (typed arguments, JSON results)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from nightlab import __version__

    server = MCPServer("nightlab", instructions=INSTRUCTIONS, version=__version__)

    def wrap(fn: Any) -> Any:
        import functools

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except NightlabError as e:  # the message and the fix reach the agent as a tool error
                raise ToolError(f"{e.message}" + (f" (fix: {e.fix})" if e.fix else "")) from None
        return call

    for name in ("list_labs", "list_sessions", "status", "log", "experiment", "audit_state", "pending",
                 "answer_approval", "start_session", "stop_session"):
        fn = getattr(tools, name)
        server.add_tool(wrap(fn), name=name, description=(fn.__doc__ or _DOCS[name]).strip())
    return server


_DOCS = {
    "list_labs": "The labs nightlab follows, each with its state (running, waiting, stopped...), best metric, "
                 "improvement and pending approvals.",
    "list_sessions": "A lab's research sessions (tag, status, stop reason, best metric, branch).",
    "status": "One session (default: the latest): state, metric, baseline, incumbent, improvement, counts, spend.",
    "log": "The session's last experiments, one compact row each (n, status, metric, trust, description).",
    "experiment": "Everything about experiment n: reason, evidence, rationale, diff and log tail (capped).",
    "audit_state": "Whether the lab's hash-chained audit log verifies against the ledger.",
    "pending": "Approvals waiting for a human ([autonomy] review or approve-keep), with diff and rationale.",
    "answer_approval": "Approve or reject experiment n's pending approval. Only allowed where the lab's spec sets "
                       "[autonomy] agents_may_approve = true; a rejection needs why.",
    "start_session": "Start (or with resume=true continue) a research session in the background.",
    "stop_session": "Stop the lab's running session after the experiment in flight.",
}


def serve(default_lab: Path | None, registry: Path | None) -> None:
    import logging

    logging.getLogger("mcp").setLevel(logging.WARNING)  # stderr is the client's log: keep it for problems
    build_server(Tools(default_lab, registry)).run("stdio")
