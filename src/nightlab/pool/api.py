"""The pool's HTTP API (POOL-CONTRACT.md), a FastAPI router mounted under ``/api/pool`` in the dashboard app.

Every endpoint needs a worker token (``Authorization: Bearer <token>``, from ``nightlab pool invite``):
unknown -> 401, revoked -> 403; a quarantined worker may still read (info, its claims, the leaderboard) but
not fetch the bundle or send claims (403). The dashboard's own access rules (web/security.py) do not apply
to these paths: they authenticate workers themselves.
"""

# no `from __future__ import annotations`: FastAPI reads the local dependency aliases' annotations at runtime

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from nightlab.pool import board, store
from nightlab.pool.host import PoolHost

PREFIX = "/api/pool"


class ClaimIn(BaseModel):
    """The body of ``POST /api/pool/claims`` (version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    claim_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    parent: str = Field(pattern=r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
    diff: str = Field(min_length=1)
    metric: float = Field(allow_inf_nan=False)
    samples: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=list)
    log_tail: str = ""
    seed: int = Field(0, ge=-(2**63), lt=2**63)
    hardware: str = Field("", max_length=500)
    compute_s: float = Field(ge=0, allow_inf_nan=False)
    experiments: int = Field(1, ge=1, le=10**9)
    researcher: str = Field("", max_length=200)

    @field_validator("diff", "log_tail")
    @classmethod
    def _no_nul(cls, v: str) -> str:
        if "\0" in v:
            raise ValueError("NUL bytes are not allowed")
        return v

    @field_validator("hardware", "researcher")
    @classmethod
    def _one_plain_line(cls, v: str) -> str:  # shown in terminals, pages and commit messages
        if any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in v):
            raise ValueError("control characters are not allowed")
        return v


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def router(host: PoolHost) -> APIRouter:
    r = APIRouter(prefix=PREFIX)

    def worker(request: Request) -> store.Worker:
        token = _bearer(request)
        w = store.authenticate(host.ledger, host.name, token) if token else None
        if w is None:
            raise HTTPException(401, "unknown worker token: ask the pool's host for one (`nightlab pool invite`)",
                                headers={"WWW-Authenticate": "Bearer"})
        if w.revoked:
            raise HTTPException(403, f"worker {w.name!r}: this token was revoked")
        return w

    def active(w: Annotated[store.Worker, Depends(worker)]) -> store.Worker:
        if w.record.quarantined:
            raise HTTPException(403, f"worker {w.name!r} is quarantined after {w.record.strikes} strikes")
        return w

    Worker = Annotated[store.Worker, Depends(worker)]
    Active = Annotated[store.Worker, Depends(active)]

    @r.get("/info")
    def info(w: Worker) -> dict[str, Any]:
        s = host.session()
        return {"pool": host.name, "lab": host.lab_name,
                "metric": {"name": host.spec.metric.name, "direction": host.spec.metric.direction.value},
                "head": host.head(), "head_metric": s.incumbent_metric if s else None,
                "baseline_metric": s.baseline_metric if s else None, "limits": host.limits(), "worker": w.name}

    @r.get("/bundle")
    def bundle(w: Active) -> FileResponse:
        head = host.head()
        if head is None:
            raise HTTPException(503, "the pool has not started yet (`nightlab pool serve` opens its session)",
                                headers={"Retry-After": "10"})
        snap = host.snapshots.get(head)
        return FileResponse(snap.bundle, media_type="application/octet-stream", filename=f"pool-{head[:12]}.bundle",
                            headers={"X-Nightlab-Pool-Head": head, "X-Nightlab-Pool-Snapshot": snap.commit})

    @r.post("/claims")
    async def claim(request: Request, w: Active) -> JSONResponse:
        limit = host.max_body_bytes()
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise HTTPException(400, "bad Content-Length") from None
        if declared > limit:
            raise HTTPException(413, f"the claim is larger than {limit} bytes ([pool] size caps)")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise HTTPException(413, f"the claim is larger than {limit} bytes ([pool] size caps)")
        try:
            data = json.loads(bytes(raw))
            body = ClaimIn.model_validate(data)
        except (ValueError, UnicodeDecodeError) as e:
            detail: Any = (e.errors(include_url=False, include_context=False, include_input=False)
                           if isinstance(e, ValidationError) else f"not JSON: {e}")
            return JSONResponse({"detail": detail}, status_code=422)
        res = await run_in_threadpool(host.intake, w, body)  # git and the ledger: off the event loop
        if res.claim is None:
            headers = {"Retry-After": str(res.retry_after)} if res.retry_after else None
            return JSONResponse({"detail": res.error}, status_code=res.code, headers=headers)
        c = res.claim
        return JSONResponse({"claim_id": c.claim_id, "status": c.status, "reason": c.reason}, status_code=res.code)

    @r.get("/claims/{claim_id}")
    def get_claim(claim_id: str, w: Worker) -> dict[str, Any]:
        c = store.get_claim(host.ledger, host.name, w.name, claim_id)
        if c is None:
            raise HTTPException(404, f"no claim {claim_id} of worker {w.name!r}")
        return c.public()

    @r.get("/leaderboard")
    def leaderboard(w: Worker) -> dict[str, Any]:
        return board.leaderboard(host.ledger, host.name, host.policy)

    @r.get("/me")
    def me(w: Worker) -> dict[str, Any]:
        for row in board.leaderboard(host.ledger, host.name, host.policy)["workers"]:
            if row["worker"] == w.name:
                return dict(row)
        raise HTTPException(404, f"worker {w.name!r} is not on the leaderboard")

    return r
