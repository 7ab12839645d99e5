"""The worker's HTTP client of ``/api/pool`` and its claim queue (``<dir>/claims.db``).

:class:`PoolClient` speaks the contract's endpoints with a bearer token; what is worth retrying (connection
errors, timeouts, 5xx, 429) is :class:`Unavailable`, with the host's ``Retry-After``. :class:`ClaimQueue`
holds every claim before it is sent and what became of it; :func:`drain` sends the due ones once, with
:func:`backoff_s` (capped, jittered exponential, or ``Retry-After``) for the ones the host could not take.
A claim is ``submitted`` only on 200/202 and ``refused`` (with the host's reason) on any other 4xx.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from nightlab.errors import NightlabError, UsageError

HEAD_HEADER = "X-Nightlab-Pool-Head"
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


class Unavailable(Exception):
    """The host cannot answer now (connection error, timeout, 5xx, 429): try again later."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Claim:
    """One claim, as ``POST /api/pool/claims`` takes it (see POOL-CONTRACT / docs/pool.md)."""

    claim_id: str
    parent: str
    diff: str
    metric: float
    samples: tuple[float, ...]
    log_tail: str
    seed: int
    hardware: str
    compute_s: float
    experiments: int
    researcher: str

    def payload(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples"] = list(self.samples)
        return d


def claim_id(worker: str, parent: str, diff: str) -> str:
    """The client-chosen claim id: the same worker, parent and diff always give the same id."""
    return hashlib.sha256(f"{worker}|{parent}|{diff}".encode()).hexdigest()[:32]


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return max(0.0, float(r.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str, limit: int = 2000) -> str:
    """A host's text as the worker's terminal may show it: control characters (ESC: colours, titles, OSC 52
    clipboard writes; NUL; CR) escaped as ``\\xNN``, at most ``limit`` characters."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)[:limit])


def _reason(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return plain(r.text[:300] or r.reason_phrase)
    if isinstance(body, dict):
        for key in ("reason", "detail", "error"):
            if key in body:
                v = body[key]
                return plain(v[:300] if isinstance(v, str) else json.dumps(v)[:300])
    return plain(json.dumps(body)[:300])


MAX_RESPONSE_BYTES = 4 * 2**20  # an API answer (not the bundle) larger than this is refused: the host is untrusted


class PoolClient:
    """The worker's side of ``/api/pool`` (one httpx client, bearer token)."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                  timeout=timeout_s, transport=transport, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The response, or :class:`Unavailable` when the host could not answer (or asked to wait)."""
        req = self._http.build_request(method, f"/api/pool{path}", **kw)
        try:
            got = self._http.send(req, stream=True)
            try:
                body = bytearray()
                for chunk in got.iter_bytes():  # decoded: a gzip bomb counts at its unpacked size
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise NightlabError(f"the pool at {self.url} answered {path} with over "
                                            f"{MAX_RESPONSE_BYTES // 2**20} MiB; refused",
                                            "check that the URL is the pool's (`nightlab pool serve`)")
            finally:
                got.close()
        except httpx.TransportError as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from None
        framing = ("content-encoding", "content-length", "transfer-encoding")  # of the wire, not of `body`
        r = httpx.Response(got.status_code, headers={k: v for k, v in got.headers.items() if k.lower() not in framing},
                           content=bytes(body), request=req)
        if r.status_code == 429 or r.status_code >= 500:
            raise Unavailable(f"HTTP {r.status_code}: {_reason(r)}", _retry_after(r))
        return r

    def get_json(self, path: str) -> dict[str, Any]:
        r = self.request("GET", path)
        self._check(r)
        body = r.json()
        if not isinstance(body, dict):
            raise NightlabError(f"the pool at {self.url} answered {path} with {type(body).__name__}, not an object")
        return body

    def _check(self, r: httpx.Response) -> None:
        if r.status_code in (401, 403):
            raise UsageError(f"the pool at {self.url} refused the token (HTTP {r.status_code}: {_reason(r)})",
                             "ask the pool operator for a new invite (`nightlab pool invite NAME` on the host)")
        if r.status_code != 200:
            raise NightlabError(f"the pool at {self.url} answered {r.request.url.path} with HTTP {r.status_code}: "
                                f"{_reason(r)}", "check that the URL is the pool's (`nightlab pool serve`)")

    def info(self) -> dict[str, Any]:
        return self.get_json("/info")

    def me(self) -> dict[str, Any]:
        return self.get_json("/me")

    def claim_status(self, cid: str) -> dict[str, Any]:
        return self.get_json(f"/claims/{cid}")

    def bundle(self, dest: Path, max_bytes: int = 0) -> str:
        """Write the head's bundle to ``dest``; returns the pool head it snapshots. A bundle over ``max_bytes``
        (0: no cap) is refused mid-download: the host is not trusted with the worker's disk."""
        try:
            with self._http.stream("GET", "/api/pool/bundle") as r:
                if r.status_code == 429 or r.status_code >= 500:
                    r.read()
                    raise Unavailable(f"HTTP {r.status_code}: {_reason(r)}", _retry_after(r))
                if r.status_code != 200:
                    r.read()
                    self._check(r)
                head = r.headers.get(HEAD_HEADER, "")
                got = 0
                with open(dest, "wb") as f:
                    for chunk in r.iter_bytes():
                        got += len(chunk)
                        if max_bytes and got > max_bytes:
                            raise NightlabError(
                                f"the pool's bundle is over {max_bytes // 2**20} MiB; refused",
                                "ask the pool operator why, or raise --max-lab-mb if you trust the pool")
                        f.write(chunk)
        except httpx.TransportError as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from None
        if not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", head):
            raise NightlabError(f"the pool's bundle came without a valid {HEAD_HEADER} header ({head!r})")
        return head

    def submit(self, payload: dict[str, Any]) -> httpx.Response:
        """POST one claim; :class:`Unavailable` for what is worth retrying, else the response as it came."""
        return self.request("POST", "/claims", json=payload)


# ---------------------------------------------------------------------------------------------- the queue

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    claim_id TEXT PRIMARY KEY, payload TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    status TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0, created_at REAL NOT NULL, sent_at REAL);
CREATE TABLE IF NOT EXISTS progress (
    lab TEXT PRIMARY KEY, last_idx INTEGER NOT NULL, compute_s REAL NOT NULL, experiments INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Queued:
    claim_id: str
    payload: dict[str, Any]
    attempts: int


class ClaimQueue:
    """Claims waiting to be sent, and what became of the sent ones (``<dir>/claims.db``).

    ``state``: ``pending`` (not yet answered 200/202), ``submitted`` (the host stored it; ``status`` is
    what it said), ``refused`` (a 4xx other than 429; ``reason`` says why). Each write is one transaction
    (WAL, synchronous=FULL): a worker killed at any point resends at most a claim the host already holds,
    which the host answers idempotently.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")
        self._con.executescript(_SCHEMA)

    def close(self) -> None:
        self._con.close()

    def add(self, claim: Claim) -> bool:
        """Queue ``claim``; False when a claim with its id is already queued (or was sent)."""
        cur = self._con.execute("INSERT OR IGNORE INTO claims (claim_id, payload, created_at) VALUES (?, ?, ?)",
                                (claim.claim_id, json.dumps(claim.payload()), time.time()))
        return cur.rowcount == 1

    def due(self, now: float | None = None) -> list[Queued]:
        now = time.time() if now is None else now
        rows = self._con.execute("SELECT claim_id, payload, attempts FROM claims WHERE state = 'pending' "
                                 "AND next_at <= ? ORDER BY created_at", (now,)).fetchall()
        return [Queued(r[0], json.loads(r[1]), r[2]) for r in rows]

    def next_due_at(self) -> float | None:
        row = self._con.execute("SELECT min(next_at) FROM claims WHERE state = 'pending'").fetchone()
        return None if row[0] is None else float(row[0])

    def defer(self, cid: str, next_at: float, why: str) -> None:
        self._con.execute("UPDATE claims SET attempts = attempts + 1, next_at = ?, reason = ? WHERE claim_id = ?",
                          (next_at, why, cid))

    def settle(self, cid: str, state: str, status: str, reason: str) -> None:
        self._con.execute("UPDATE claims SET state = ?, status = ?, reason = ?, sent_at = ? WHERE claim_id = ?",
                          (state, status, reason, time.time(), cid))

    def counts(self) -> dict[str, int]:
        return dict(self._con.execute("SELECT state, count(*) FROM claims GROUP BY state").fetchall())

    def rows(self) -> list[dict[str, Any]]:
        cur = self._con.execute("SELECT claim_id, state, status, reason, attempts FROM claims ORDER BY created_at")
        return [dict(zip(("claim_id", "state", "status", "reason", "attempts"), r, strict=True)) for r in cur]

    def progress(self, lab: str) -> tuple[int, float, int]:
        """(last experiment idx read, run seconds and experiments since the last claim) of a lab copy."""
        row = self._con.execute("SELECT last_idx, compute_s, experiments FROM progress WHERE lab = ?",
                                (lab,)).fetchone()
        return (-1, 0.0, 0) if row is None else (int(row[0]), float(row[1]), int(row[2]))

    def record(self, lab: str, last_idx: int, compute_s: float, experiments: int, claim: Claim | None) -> None:
        """Advance a lab copy's progress and queue ``claim`` in one transaction."""
        with self._transaction():
            if claim is not None:
                self.add(claim)
            self._con.execute("INSERT INTO progress (lab, last_idx, compute_s, experiments) VALUES (?, ?, ?, ?) "
                              "ON CONFLICT(lab) DO UPDATE SET last_idx = excluded.last_idx, "
                              "compute_s = excluded.compute_s, experiments = excluded.experiments",
                              (lab, last_idx, compute_s, experiments))

    def _transaction(self) -> Any:
        con = self._con

        class _Tx:
            def __enter__(self) -> None:
                con.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type: object, *_: object) -> None:
                con.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()


def backoff_s(attempts: int, retry_after: float | None, rng: random.Random) -> float:
    """Seconds before the next try: ``Retry-After`` when the host gave one, else capped exponential
    backoff with full jitter (half to all of ``min(cap, base * 2**attempts)``)."""
    if retry_after is not None:
        return min(retry_after, BACKOFF_CAP_S * 4)
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempts, 16)) * rng.uniform(0.5, 1.0)


def drain(client: PoolClient, queue: ClaimQueue, say: Callable[[str], None], rng: random.Random) -> bool:
    """Send every due claim once. Returns False when the host was unreachable (the rest wait)."""
    for q in queue.due():
        try:
            r = client.submit(q.payload)
        except Unavailable as e:
            queue.defer(q.claim_id, time.time() + backoff_s(q.attempts, e.retry_after, rng), str(e))
            if e.retry_after is None or "429" not in str(e):
                return False  # the host is down or failing: the other claims wait too
            continue
        if r.status_code in (200, 202):
            try:
                body = r.json()
            except ValueError:
                body = {}
            status, reason = plain(str(body.get("status", "")), 40), plain(str(body.get("reason", "")), 300)
            queue.settle(q.claim_id, "submitted", status, reason)
            say(f"claim {q.claim_id[:12]} submitted: {status or 'stored'}" + (f" ({reason})" if reason else ""))
            continue
        reason = _reason(r)
        queue.settle(q.claim_id, "refused", str(r.status_code), reason)
        say(f"claim {q.claim_id[:12]} refused by the pool (HTTP {r.status_code}): {reason}")
        if r.status_code in (401, 403):
            raise UsageError(f"the pool at {client.url} refused the token (HTTP {r.status_code}: {reason})",
                             "ask the pool operator for a new invite (`nightlab pool invite NAME` on the host)")
    return True
