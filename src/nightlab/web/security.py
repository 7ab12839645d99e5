"""Who may read and who may act on the dashboard, and what it must never show.

Rules (issue 6, "Safety"):

* Every request needs the token, loopback too: ``X-Nightlab-Token`` or ``Authorization:
  Bearer`` headers, the ``nightlab_token`` cookie, or ``?token=`` once (which sets the cookie,
  SameSite=Strict, HttpOnly, and redirects to the same URL without it). ``nightlab ui`` prints its
  URL with the token. On loopback without ``--token`` the token is random per process. Not "anyone on
  this machine may read": an agent researcher runs on this machine with the network, and the
  dashboard shows holdout scores (an overfitting channel) and, with ``--home``, every lab's work.
* Bound to loopback, requests whose ``Host`` header is not a loopback name are refused (a
  DNS-rebinding page cannot read the dashboard or its token).
* Acting (POST: approve, reject) always needs the token in the ``X-Nightlab-Token`` header
  (a cross-site form cannot set a header; a cross-site script needs CORS, which is never
  granted), and an ``Origin`` / ``Sec-Fetch-Site`` that say same-origin when present; the
  pages carry the token to their buttons, and a page of another origin cannot read it.
* Secrets: env values whose name looks secret are masked in the spec, and any such value
  (or an API-key-shaped string) is masked in every text shown: logs, diffs, rationales.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|AUTH)", re.I)
MASK = "••••••"
TOKEN_HEADER = "x-nightlab-token"
TOKEN_COOKIE = "nightlab_token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

_KEY_SHAPES = re.compile(
    r"(sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[baprs]-[A-Za-z0-9-]{10,})"
)
_ASSIGN = re.compile(
    r"\b([A-Za-z0-9_]*(?:API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD)[A-Za-z0-9_]*)(\s*[=:]\s*)(\S+)", re.I
)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``; ``[::1]:80`` -> ``::1``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def same_token(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(str(given).encode(), token.encode())


@dataclass(frozen=True)
class Access:
    """The dashboard's access settings."""

    token: str
    public: bool  # bound to a non-loopback address: any Host header is answered, and the token was given

    @classmethod
    def make(cls, host: str, token: str | None) -> Access:
        """Loopback: token optional (random when absent). Elsewhere: ValueError without one."""
        public = not is_loopback(host)
        if public and not token:
            raise ValueError("a token is required to bind the dashboard to a non-loopback address")
        return cls(token=token or secrets.token_urlsafe(24), public=public)


@dataclass(frozen=True)
class Redactor:
    """Masks secret values and key-shaped strings in text."""

    values: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_env(cls, extra: Iterable[str] = ()) -> Redactor:
        vals = [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6]
        vals += [v for v in extra if v and len(v) >= 6]
        return cls(tuple(sorted(set(vals), key=len, reverse=True)))

    def with_values(self, extra: Iterable[str]) -> Redactor:
        more = [v for v in extra if v and len(v) >= 6]
        return Redactor(tuple(sorted(set(self.values) | set(more), key=len, reverse=True))) if more else self

    def text(self, s: str | None) -> str:
        if not s:
            return s or ""
        for v in self.values:
            if v in s:
                s = s.replace(v, MASK)
        s = _KEY_SHAPES.sub(MASK, s)
        return _ASSIGN.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", s)

    def data(self, value: Any, key: str = "") -> Any:
        """A JSON-like value with secret-named keys masked and every string redacted."""
        if isinstance(value, dict):
            return {k: self.data(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v, key) for v in value]
        if isinstance(value, str):
            return MASK if key and SECRET_NAME.search(key) and value else self.text(value)
        return value


def spec_secrets(spec: dict[str, Any]) -> list[str]:
    """The values of secret-named keys anywhere in a spec (e.g. ``[run.env] OPENAI_API_KEY``)."""
    found: list[str] = []

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, str(k))
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif isinstance(v, str) and SECRET_NAME.search(key):
            found.append(v)

    walk(spec, "")
    return found
