"""Notifications: a ping when the night needs you or has news (``[notify]``).

A :class:`Notifier` is an :class:`~nightlab.events.EventSink`: the engine's events are mapped to a
few notification kinds, and each notification is delivered off the hot path by one background
thread, with retries and backoff. Delivery never blocks and never fails an experiment: ``emit``
only puts a message on a bounded queue (a full queue drops the message and counts it).

Kinds (``events = [...]``; default: all but ``keep``):

=====================  ===================================================================
``keep``               every kept experiment, the baseline included
``new_best``           a keep after the baseline (the branch advanced to a better result)
``session_stopped``    the session ended (finished, stopped, failed), with the reason
``approval_waiting``   a candidate or a keep waits for a human (``[autonomy]``)
``crash_streak``       ``crash_streak`` crashes or timeouts in a row (once per streak)
``holdout_divergence`` the search metric's gain outran the holdout's
``pool_claim_accepted`` a research-pool claim was verified and accepted
=====================  ===================================================================

Targets: ``webhooks`` (POST JSON ``{"text": …, "content": …, "event": {…}}``, which Slack's and
Discord's incoming webhooks both accept), ``ntfy`` (a topic URL: POST the text, ``Title`` header),
``command`` (run with the event as JSON on stdin, no shell, 30 s limit). URLs may name environment
variables as ``${NAME}``, so a webhook's secret need not be in the spec. A URL is never logged:
errors name its scheme and host only.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

KINDS = ("keep", "new_best", "session_stopped", "approval_waiting", "crash_streak", "holdout_divergence",
         "pool_claim_accepted")
DEFAULT_KINDS = tuple(k for k in KINDS if k != "keep")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(url: str, env: dict[str, str] | None = None) -> str:
    """``${NAME}`` references replaced from the environment (a missing one stays as it is)."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    return _ENV_REF.sub(lambda m: env.get(m.group(1), m.group(0)), url)  # type: ignore[union-attr]


def safe_url(url: str) -> str:
    """What may be shown of a URL: scheme and host, never the path or query (webhook secrets live there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/…" if parts.scheme else "(command)"


@dataclass(frozen=True)
class Message:
    kind: str
    title: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        body = f"{self.title}\n{self.text}" if self.text else self.title
        return {"text": body, "content": body[:1900], "event": {"kind": self.kind, **self.data}}


@dataclass
class Delivery:
    """What happened to the notifications (for tests, `nightlab status` and the audit of the notifier)."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)


class Notifier:
    """Maps engine events to notifications and delivers them from a background thread.

    ``targets`` is a list of callables ``send(message) -> None`` that raise on failure; :func:`from_config`
    builds them from a ``[notify]`` table. ``close()`` waits up to ``flush_s`` for the queue to drain.
    """

    def __init__(self, targets: list[tuple[str, Callable[[Message], None]]], *, kinds: tuple[str, ...] = DEFAULT_KINDS,
                 lab: str = "", crash_streak: int = 3, retries: int = 3, backoff_s: float = 1.0,
                 max_queue: int = 1000, flush_s: float = 10.0) -> None:
        self.targets = targets
        self.kinds = frozenset(kinds)
        self.lab = lab
        self.crash_streak = crash_streak
        self.retries = retries
        self.backoff_s = backoff_s
        self.flush_s = flush_s
        self.delivery = Delivery()
        self._q: queue.Queue[Message | None] = queue.Queue(maxsize=max_queue)
        self._crashes = 0
        self._session = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="nightlab-notify", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ events -> messages

    def emit(self, kind: str, *, experiment: int | None = None, **data: Any) -> None:
        try:
            msg = self._map(kind, experiment, data)
        except Exception:  # a notifier must never break the engine
            return
        if msg is not None and msg.kind in self.kinds:
            self.notify(msg)

    def _where(self) -> str:
        return " ".join(x for x in (self.lab, self._session) if x)

    def _map(self, kind: str, idx: int | None, d: dict[str, Any]) -> Message | None:
        where = self._where()
        if kind in ("session.start", "session.resume"):
            self._session = str(d.get("tag") or "")
            return None
        if kind == "decision":
            status = str(d.get("status"))
            if status in ("crash", "timeout"):
                self._crashes += 1
                if self._crashes == self.crash_streak:
                    return Message("crash_streak", f"nightlab {self._where()}: {self._crashes} crashes in a row",
                                   f"last: #{idx} {status}: {str(d.get('reason') or '')[:300]}",
                                   {"experiment": idx, "count": self._crashes})
                return None
            if status in ("keep", "discard"):
                self._crashes = 0
            if status != "keep":
                return None
            metric = d.get("metric")
            text = f"#{idx} kept: metric {metric}" + (f" ({str(d.get('reason'))[:200]})" if d.get("reason") else "")
            data = {"experiment": idx, "metric": metric, "commit": d.get("commit")}
            if idx and idx > 0 and "new_best" in self.kinds:
                return Message("new_best", f"nightlab {where}: new best {metric}", text, data)
            return Message("keep", f"nightlab {where}: keep #{idx}", text, data)
        if kind == "session.stop":
            return Message("session_stopped", f"nightlab {where}: session {d.get('status')}",
                           f"{d.get('reason') or ''}; best {d.get('incumbent_metric')}",
                           {"status": d.get("status"), "reason": d.get("reason"),
                            "incumbent_metric": d.get("incumbent_metric")})
        if kind == "approval.request":
            what = "run" if d.get("approval_kind") == "run" else "keep"
            return Message("approval_waiting", f"nightlab {where}: #{idx} waits for your approval ({what})",
                           f"nightlab approve {idx}   or   nightlab reject {idx} --why '...'",
                           {"experiment": idx, "approval": d.get("approval"), "kind": what})
        if kind == "holdout.warning":
            return Message("holdout_divergence", f"nightlab {where}: holdout divergence",
                           str(d.get("message") or ""), {"experiment": idx})
        if kind == "pool.accept":
            plain = {k: v for k, v in d.items() if isinstance(v, str | int | float)}
            return Message("pool_claim_accepted", f"nightlab {where}: pool claim accepted",
                           str(d.get("message") or ""), plain)
        return None

    # ------------------------------------------------------------------ delivery

    def notify(self, msg: Message) -> None:
        """Queue ``msg`` for every target; never blocks (a full queue drops it and counts it)."""
        try:
            self._q.put_nowait(msg)
        except queue.Full:
            self.delivery.dropped += 1

    def _worker(self) -> None:
        while True:
            msg = self._q.get()
            try:
                if msg is None:
                    return
                for name, send in self.targets:
                    self._deliver(name, send, msg)
            finally:
                self._q.task_done()

    def _deliver(self, name: str, send: Callable[[Message], None], msg: Message) -> None:
        for attempt in range(self.retries + 1):
            try:
                send(msg)
                self.delivery.sent += 1
                return
            except Exception as e:
                if attempt == self.retries:
                    self.delivery.failed += 1
                    self.delivery.errors.append(f"{name}: {type(e).__name__}: {_scrub(str(e))}")
                    del self.delivery.errors[:-20]
                    return
                # exponential backoff; when closing, the remaining tries go at once
                self._stop.wait(0 if self._stop.is_set() else min(self.backoff_s * 2 ** attempt, 60.0))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued message was delivered or given up (True) or ``timeout_s`` passed."""
        deadline = time.monotonic() + (self.flush_s if timeout_s is None else timeout_s)
        while self._q.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self.flush()
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join(timeout=1.0)


def _scrub(text: str) -> str:
    """Error texts from urllib can carry the URL: keep only scheme and host of any URL in them."""
    return re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", lambda m: safe_url(m.group(0)), text)


# ---------------------------------------------------------------------------- targets


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> None:
    req = urllib.request.Request(url, data=body, headers={"User-Agent": "nightlab", **headers}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read(1024)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code} from {safe_url(url)}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"cannot reach {safe_url(url)}: {_scrub(str(reason))}") from None


def webhook(url: str, timeout_s: float = 10.0) -> Callable[[Message], None]:
    def send(msg: Message) -> None:
        _post(expand(url), json.dumps(msg.payload()).encode(), {"Content-Type": "application/json"}, timeout_s)
    return send


def ntfy(url: str, timeout_s: float = 10.0) -> Callable[[Message], None]:
    def send(msg: Message) -> None:
        title = msg.title.encode("ascii", "replace").decode()  # HTTP headers are latin-1; keep it ASCII
        _post(expand(url), msg.text.encode() or msg.title.encode(), {"Title": title, "Tags": msg.kind}, timeout_s)
    return send


def command(cmd: str, timeout_s: float = 30.0) -> Callable[[Message], None]:
    argv = shlex.split(cmd)

    def send(msg: Message) -> None:
        p = subprocess.run(argv, input=json.dumps(msg.payload()).encode(), capture_output=True, timeout=timeout_s,
                           check=False)
        if p.returncode != 0:
            raise RuntimeError(f"exit {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
    return send


def from_config(cfg: Any, lab: str = "") -> Notifier | None:
    """A notifier for a validated ``[notify]`` section (:class:`nightlab.spec.NotifySpec`); None when it has
    no target."""
    targets: list[tuple[str, Callable[[Message], None]]] = []
    for url in cfg.webhooks:
        targets.append((f"webhook {safe_url(expand(url))}", webhook(url, cfg.timeout_s)))
    if cfg.ntfy:
        targets.append((f"ntfy {safe_url(expand(cfg.ntfy))}", ntfy(cfg.ntfy, cfg.timeout_s)))
    if cfg.command:
        targets.append(("command", command(cfg.command)))
    if not targets:
        return None
    return Notifier(targets, kinds=tuple(cfg.events), lab=lab, crash_streak=cfg.crash_streak, retries=cfg.retries,
                    backoff_s=cfg.backoff_s)


def for_spec(spec: Any, lab_dir: Any) -> Notifier | None:
    """The notifier of a session: the spec's ``[notify]`` when it names a target, else the user's config."""
    from pydantic import ValidationError

    from nightlab.errors import UsageError
    from nightlab.spec import NotifySpec

    cfg = spec.notify
    if not cfg.has_target:
        raw = user_config()
        if not raw:
            return None
        try:
            cfg = NotifySpec.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            raise UsageError(f"user config [notify] {'.'.join(map(str, first['loc']))}: {first['msg']}",
                             "fix ~/.config/nightlab/config.toml (or $NIGHTLAB_CONFIG)") from None
    name = spec.lab.name or getattr(lab_dir, "name", "")
    return from_config(cfg, lab=str(name))


def user_config() -> dict[str, Any]:
    """``[notify]`` from the user's config file (``~/.config/nightlab/config.toml``), or ``{}``."""
    import tomllib

    base = os.environ.get("XDG_CONFIG_HOME") or str(os.path.expanduser("~/.config"))
    path = os.environ.get("NIGHTLAB_CONFIG") or os.path.join(base, "nightlab", "config.toml")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        from nightlab.errors import UsageError

        raise UsageError(f"{path}: cannot read the user config: {e}", f"fix or delete {path}") from None
    value = data.get("notify", {})
    return value if isinstance(value, dict) else {}
