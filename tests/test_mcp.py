"""`nightlab mcp`: a coding agent drives nightlab over the Model Context Protocol — the official SDK's own
client talks to a real `nightlab mcp` process over stdio; sessions run as real `nightlab run` processes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import SPEC, SRC, TARGET_PY

pytest.importorskip("mcp", reason="needs the mcp extra: pip install 'nightlab[mcp]'")

from mcp import Client, StdioServerParameters

APPROVE_KEEP = """
[autonomy]
level = "approve-keep"
poll_s = 0.1
agents_may_approve = {allow}

[sandbox]
mode = "none"
"""


def target(x: float) -> str:
    return TARGET_PY.replace("X = 3.0", f"X = {x}")


def lab_with_steps(make_lab, xs: list[float], allow: bool) -> Path:
    spec = SPEC.replace('kind = "scripted"', 'kind = "scripted"\nsteps = "steps.json"') + APPROVE_KEEP.format(
        allow="true" if allow else "false")
    lab = make_lab(spec=spec)
    steps = [{"rationale": f"move X to {x}", "files": {"target.py": target(x)}} for x in xs]
    (lab / "steps.json").write_text(json.dumps(steps))
    from tests.conftest import commit_all

    commit_all(lab, "steps")
    return lab


class Agent:
    """A scripted MCP client: each call returns the tool's JSON result, or raises with its error text."""

    def __init__(self, client: Client) -> None:
        self.c = client

    async def __call__(self, tool: str, **args: Any) -> Any:
        r = await self.c.call_tool(tool, args)
        if r.is_error:
            raise RuntimeError(" ".join(getattr(x, "text", "") for x in r.content))
        data = r.structured_content
        return data["result"] if isinstance(data, dict) and set(data) == {"result"} else data

    async def until(self, tool: str, pred: Any, timeout: float = 60, **args: Any) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = await self(tool, **args)
            if pred(got):
                return got
            await asyncio.sleep(0.2)
        raise AssertionError(f"{tool}{args} never satisfied the condition; last: {got}")


def server(lab: Path, registry: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "nightlab", "mcp", "--lab", str(lab), "--registry", str(registry)],
                                 env={"PYTHONPATH": SRC}, cwd=str(lab))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=240))


@pytest.mark.slow
def test_an_agent_lists_reads_approves_and_stops_a_session(make_lab, tmp_path):
    lab = lab_with_steps(make_lab, [2.0, 1.0, 2.5], allow=True)

    async def script() -> None:
        async with Client(server(lab, tmp_path / "labs.toml")) as client:
            agent = Agent(client)
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"list_labs", "status", "log", "experiment", "pending", "answer_approval", "start_session",
                    "stop_session", "audit_state", "list_sessions"} <= tools
            labs = await agent("list_labs")
            assert [(x["path"], x["state"]) for x in labs] == [(str(lab), "idle")]

            started = await agent("start_session", tag="m1", max_experiments=3)
            assert started["pid"] > 0 and "--tag m1" in started["command"]
            waiting = await agent.until("pending", lambda rows: len(rows) == 1)
            assert waiting[0]["n"] == 1 and waiting[0]["kind"] == "keep" and "X = 2.0" in waiting[0]["diff"]
            st = await agent("status")
            assert st["state"] == "waiting" and st["pending_approvals"] == 1 and st["metric"] == "score"
            ok = await agent("answer_approval", n=1, approve=True, why="the agent checked the diff")
            assert ok["status"] == "approved"
            await agent.until("pending", lambda rows: [r["n"] for r in rows] == [2])
            with pytest.raises(RuntimeError, match="a rejection needs a reason"):
                await agent("answer_approval", n=2, approve=False)
            await agent("answer_approval", n=2, approve=False, why="too good to be true")
            # #3 is worse than the incumbent: discarded without asking; the session ends by itself
            sessions = await agent.until("list_sessions", lambda s: s and s[0]["status"] != "running")
            assert sessions[0]["status"] == "finished", sessions
            rows = await agent("log")
            assert [(r["n"], r["status"]) for r in rows] == [(0, "keep"), (1, "keep"), (2, "discard"), (3, "discard")]
            exp = await agent("experiment", n=1)
            assert exp["status"] == "keep" and "X = 2.0" in exp["diff"] and exp["rationale"] == "move X to 2.0"
            assert "score" in exp["log_tail"]
            audit = await agent("audit_state")
            assert audit["ok"] is True and audit["records"] > 10

            # a second session, stopped by the agent while it waits for an approval
            await agent("start_session", tag="m2", max_experiments=3)
            await agent.until("pending", lambda rows: any(r["session"] == "m2" for r in rows))
            stop = await agent("stop_session")
            assert Path(stop["stop_file"]).name == "STOP"
            await agent.until("list_sessions", lambda s: len(s) == 2 and s[1]["status"] == "stopped")
            with pytest.raises(RuntimeError, match=r"no lab named 'nope'.*use one of"):
                await agent("status", lab="nope")

    run(script())


def test_agents_may_not_approve_unless_the_lab_allows_it(make_lab, tmp_path):
    lab = lab_with_steps(make_lab, [1.0], allow=False)

    async def script() -> None:
        async with Client(server(lab, tmp_path / "labs.toml")) as client:
            agent = Agent(client)
            with pytest.raises(RuntimeError, match=r"agents may not answer approvals.*agents_may_approve = true"):
                await agent("answer_approval", n=1, approve=True, why="please")
            with pytest.raises(RuntimeError, match="no nightlab session"):
                await agent("status")

    run(script())
