"""The ``llm`` researcher: a chat model proposes edits, through the official SDKs.

From ``nightlab.toml``::

    [researcher]
    kind = "llm"
    provider = "openai"              # or "anthropic"
    model = "gpt-5-mini"
    base_url = "http://127.0.0.1:8000/v1"   # any OpenAI-compatible server (llama.cpp, vLLM, Ollama, ...)
    api_key_env = "OPENAI_API_KEY"   # the NAME of the variable; "" for servers without keys
    think = 2                        # sample 2 proposals per step, send the best one
    structured = "auto"              # JSON-schema answers where the server supports them
    prefetch = 0                     # proposals prepared ahead, concurrently (see the engine)

    [researcher.price]               # USD per 1M tokens (see nightlab.pricing)
    input = 0.25
    output = 2.0

Each ``propose``: build the prompt (:mod:`nightlab.context`), sample ``think`` answers, keep
those whose edits parse, apply and stay inside the editable files (the cheap pre-check), let
the model pick among several valid ones (``rank``), and, when none is valid, show the first
answer's exact error back to the model once (``repair``: the closest lines of the file for a
SEARCH text that was not found). Still nothing valid: a candidate with no edit, the model's own
rationale and an ``error``, which the engine records as ``invalid``.

**Structured answers.** ``structured = "auto"`` asks for the answer as JSON
(``{"rationale", "edits": [{"file", "old", "new"}]}``, :data:`nightlab.edits.EDITS_SCHEMA`) through
``response_format``: first OpenAI's ``json_schema`` form (OpenAI, vLLM, Ollama, llama.cpp's
server), then llama-cpp-python's ``json_object`` + ``schema`` form; a server that refuses both
(HTTP 400/422) gets SEARCH/REPLACE text from then on, and the researcher remembers that for the
session. ``"on"`` insists (a refusal stops the session with the fix), ``"off"`` never asks. An
answer is parsed as JSON first and as text blocks second, whatever was asked. Anthropic: text.
``old_lines`` (``auto``: on for a loopback server) makes the schema's ``old`` an ``enum`` of the
lines that occur once in their file: a grammar-constrained server can then only name an existing
line, so even a tiny model's edit applies (each edit replaces one line; ``new`` may be several).

**Local servers.** A ``base_url`` on loopback (``localhost``, ``127.x``, ``::1``) changes the
defaults of the keys left out: ``max_tokens`` 1024 (not 4096), ``max_retries`` 1 (not 5),
``timeout_s`` 600 (not 300: a CPU model is slow, but one abandoned request must not queue five
retries behind it). ``timeout_s`` bounds each call as a whole, streaming included.

**Cancelling.** OpenAI-protocol calls stream (``stream = "auto"``): the call runs in a worker
thread, the proposal is abandoned at once on Ctrl-C, SIGTERM or the STOP file (the engine's
``Context.should_stop``) or at ``timeout_s``, and the stream is closed so that a llama.cpp server
stops generating. The usage of an abandoned call (prompt tokens as counted, output tokens as
received) stays in the candidate, which the engine records whatever became of it.

**Seeds.** With ``seed`` set, sample ``i`` of experiment ``n`` sends ``seed + 1000 n + i``; without
it and ``think > 1``, a random base plus ``i``: the samples of one step always differ.

**Token counts for trimming.** ``tokenizer = "auto"``: the server's own ``/tokenize`` (llama.cpp)
or ``/extras/tokenize`` (llama-cpp-python) on a local ``base_url``, else ``tiktoken`` when it is
installed (OpenAI models), else characters / 4 with a 20% margin.

Faults: 429, 5xx, timeouts and dropped connections are retried by the SDK (``max_retries``,
exponential backoff with jitter, honouring ``retry-after``); when retries run out the
candidate is ``invalid``. 401/403/404 raise :class:`NightlabError` (the session stops with the
fix), and so does an unreachable server before any call succeeded. A prompt too long for a local
server's context window is ``invalid`` with the fix in its reason. The key's value never
reaches the prompt, the artifacts, the ledger or the spec: only its variable's name is stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from nightlab.context import ContextOptions, Prompt, build_prompt, redact, secret_values
from nightlab.edits import (
    EditError,
    ParsedEdits,
    apply_edits,
    edits_from_json,
    edits_schema,
    parse_edits,
    unique_lines,
)
from nightlab.errors import NightlabError, SpecError, UsageError
from nightlab.guard import IMPLICITLY_PROTECTED
from nightlab.pricing import Price, cost_usd
from nightlab.spec import matches
from nightlab.types import Candidate, Experiment, Usage

if TYPE_CHECKING:
    from nightlab.researchers import Context
    from nightlab.spec import Spec

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
# defaults of the keys left out: (hosted API, server on loopback)
DEFAULTS = {"max_tokens": (4096, 1024), "max_retries": (5, 1), "timeout_s": (300.0, 600.0)}


def is_local(base_url: str | None) -> bool:
    """True for a base_url on loopback (a model server on this machine)."""
    if not base_url:
        return False
    host = (urlsplit(base_url).hostname or "").lower()
    return host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.") or host.endswith(".localhost")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Literal["openai", "anthropic"] = "openai"
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="name of the env var with the key; '' for none")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0, description="output tokens per call (4096; 1024 on loopback)")
    max_tokens_param: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto"
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    thinking_budget: int | None = Field(None, ge=1024, description="anthropic: extended thinking tokens")
    seed: int | None = None
    timeout_s: float | None = Field(None, gt=0, description="per call, whole (300 s; 600 s on loopback)")
    max_retries: int | None = Field(None, ge=0, le=20, description="SDK retries (5; 1 on loopback)")
    context_tokens: int = Field(24000, ge=500, description="prompt budget, see nightlab.context")
    history_detail: int = Field(8, ge=0)
    history_lines: int = Field(40, ge=0)
    log_tail_lines: int = Field(40, ge=0)
    think: int = Field(1, ge=1, le=16, description="proposals sampled per step")
    rank: bool = Field(True, description="with think > 1: the model picks among the valid proposals")
    repair: bool = Field(True, description="show a failed edit's exact error back to the model once")
    structured: Literal["auto", "on", "off"] = Field("auto", description="ask for JSON edits (response_format)")
    old_lines: Literal["auto", "on", "off"] = Field(
        "auto", description="structured: 'old' must be one unique line of the file (auto: on loopback)")
    stream: Literal["auto", "on", "off"] = Field("auto", description="stream (openai: cancellable calls)")
    tokenizer: Literal["auto", "server", "tiktoken", "estimate"] = "auto"
    prefetch: int = Field(0, ge=0, le=16, description="proposals prepared ahead, concurrently")
    price: Price | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields per request")

    def resolved(self) -> Options:
        """The options with the local/hosted defaults filled in (see the module docstring)."""
        k = 1 if is_local(self.base_url) else 0
        upd = {name: pair[k] for name, pair in DEFAULTS.items() if getattr(self, name) is None}
        return self.model_copy(update=upd)


@dataclass(frozen=True)
class Reply:
    text: str
    tokens_in: int
    tokens_out: int
    tokens_cached: int
    seconds: float
    note: str = ""  # "stopped", "timed out" for an abandoned call


class _Transient(Exception):
    """Retries ran out, or the provider refused this one request: an invalid candidate."""

    def __init__(self, message: str, status: int | None = None, partial: Reply | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.partial = partial


class _Stopped(Exception):
    """The proposal was abandoned (stop requested); ``partial`` is what the call used so far."""

    def __init__(self, partial: Reply) -> None:
        super().__init__("stopped")
        self.partial = partial


@dataclass
class _Flight:
    """One call in a worker thread: what it received so far, and how to cut it off."""

    pieces: list[str] = field(default_factory=list)
    chunks: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None
    error: BaseException | None = None
    abandoned: bool = False
    closer: Callable[[], None] | None = None

    def abandon(self) -> None:
        self.abandoned = True
        if self.closer is not None:
            with contextlib.suppress(Exception):  # closing a stream from another thread: best effort
                self.closer()


# --------------------------------------------------------------------------- providers


class _Chat:
    """One provider's chat call, with its errors mapped to nightlab's."""

    def __init__(self, o: Options, key: str, key_env: str) -> None:
        self.o, self.key_env = o, key_env
        self.ok_once = False
        assert o.timeout_s is not None and o.max_retries is not None
        self.stream = o.stream == "on" or (o.stream == "auto" and o.provider == "openai")
        if o.provider == "openai":
            import openai

            self.sdk: Any = openai
            self.client: Any = openai.OpenAI(api_key=key or "no-key", base_url=o.base_url,
                                             max_retries=o.max_retries, timeout=o.timeout_s)
        else:
            import anthropic

            self.sdk = anthropic
            self.client = anthropic.Anthropic(api_key=key or "no-key", base_url=o.base_url,
                                              max_retries=o.max_retries, timeout=o.timeout_s)

    def __call__(self, system: str, messages: list[dict[str, str]], max_tokens: int | None = None, *,
                 seed: int | None = None, response_format: dict[str, Any] | None = None,
                 should_stop: Callable[[], bool] | None = None, prompt_tokens: int = 0) -> Reply:
        """One call in a worker thread, abandoned on ``should_stop()`` or after ``timeout_s``.

        Raises :class:`_Stopped` or :class:`_Transient` (with the partial usage) when abandoned.
        """
        t0 = time.monotonic()
        flight = _Flight()

        def work() -> None:
            try:
                flight.reply = self._call(system, messages, max_tokens, seed, response_format, flight)
            except BaseException as e:  # handed to the waiting thread
                flight.error = e
            finally:
                flight.done.set()

        threading.Thread(target=work, name="nightlab-llm-call", daemon=True).start()
        limit = float(self.o.timeout_s or 300.0)
        while not flight.done.wait(0.1):
            stop = should_stop is not None and should_stop()
            if stop or time.monotonic() - t0 > limit:
                flight.abandon()
                partial = Reply("".join(flight.pieces), prompt_tokens, flight.chunks, 0, time.monotonic() - t0,
                                "stopped" if stop else "timed out")
                if stop:
                    raise _Stopped(partial)
                raise _Transient(f"no complete answer within timeout_s = {limit:g} s (the request was "
                                 "cancelled)", partial=partial)
        if flight.error is not None:
            raise flight.error
        assert flight.reply is not None
        self.ok_once = True
        r = flight.reply
        return Reply(r.text, r.tokens_in or prompt_tokens, r.tokens_out, r.tokens_cached, time.monotonic() - t0)

    def _call(self, system: str, messages: list[dict[str, str]], max_tokens: int | None, seed: int | None,
              response_format: dict[str, Any] | None, flight: _Flight) -> Reply:
        try:
            if self.o.provider == "openai":
                return self._openai(system, messages, max_tokens, seed, response_format, flight)
            return self._anthropic(system, messages, max_tokens)
        except self.sdk.AuthenticationError as e:
            raise NightlabError(
                f"{self.o.provider} rejected the API key (401) from ${self.key_env or '(none)'}: {_msg(e)}",
                f"export a valid key in {self.key_env or DEFAULT_KEY_ENV[self.o.provider]}, "
                "or set [researcher] api_key_env to the variable that holds it") from None
        except self.sdk.PermissionDeniedError as e:
            raise NightlabError(f"{self.o.provider} refused access (403) to model {self.o.model!r}: "
                                f"{_msg(e)}", "use a model your key may use, or a key with access to it",
                                ) from None
        except self.sdk.NotFoundError as e:
            raise NightlabError(
                f"model {self.o.model!r} or the endpoint was not found (404) at {self._where()}: {_msg(e)}",
                "check [researcher] model and base_url (an OpenAI-compatible base_url usually ends in /v1)",
            ) from None
        except self.sdk.APIConnectionError as e:  # includes timeouts, after the SDK's retries
            if flight.abandoned:
                raise _Transient("abandoned") from None
            if not self.ok_once and not isinstance(e, self.sdk.APITimeoutError):
                raise NightlabError(f"cannot reach {self._where()}: {_msg(e)}",
                                    "start the model server, or correct [researcher] base_url") from None
            raise _Transient(f"{type(e).__name__} after {self.o.max_retries} retries: {_msg(e)}") from None
        except self.sdk.APIStatusError as e:  # 429/5xx after retries; 400/422 at once
            msg = _msg(e)
            hint = ""
            if e.status_code == 400 and re.search(r"context|n_ctx|too long|exceed", msg, re.I):
                hint = (" -- the prompt plus max_tokens do not fit the server's context window: start the "
                        "server with a larger context (llama.cpp: -c 8192 / --n_ctx 8192), or lower "
                        "[researcher] context_tokens or max_tokens")
            raise _Transient(f"HTTP {e.status_code} ({type(e).__name__}): {msg}{hint}", e.status_code) from None

    def _where(self) -> str:
        return self.o.base_url or f"the {self.o.provider} API"

    def _openai(self, system: str, messages: list[dict[str, str]], max_tokens: int | None, seed: int | None,
                response_format: dict[str, Any] | None, flight: _Flight) -> Reply:
        o = self.o
        kw: dict[str, Any] = {"model": o.model,
                              "messages": [{"role": "system", "content": system}, *messages]}
        param = o.max_tokens_param
        if param == "auto":
            param = "max_completion_tokens" if o.base_url is None else "max_tokens"
        kw[param] = max_tokens or o.max_tokens
        if o.temperature is not None:
            kw["temperature"] = o.temperature
        if o.reasoning_effort is not None:
            kw["reasoning_effort"] = o.reasoning_effort
        if seed is not None:
            kw["seed"] = seed
        if response_format is not None:
            kw["response_format"] = response_format
        if o.extra_body:
            kw["extra_body"] = o.extra_body
        if not self.stream:
            r = self.client.chat.completions.create(**kw)
            text = (r.choices[0].message.content or "") if r.choices else ""
            t_in, t_out, cached = _openai_usage(r.usage, getattr(r, "model_extra", None))
            return Reply(text, t_in, t_out, cached, 0.0)
        stream = self.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        flight.closer = stream.close
        t_in = t_out = cached = 0
        try:
            for chunk in stream:
                if flight.abandoned:
                    break
                if chunk.choices:
                    piece = chunk.choices[0].delta.content if chunk.choices[0].delta else None
                    if piece:
                        flight.pieces.append(piece)
                        flight.chunks += 1
                extra = getattr(chunk, "model_extra", None)
                if chunk.usage is not None or (extra and extra.get("timings")):
                    a, b, c = _openai_usage(chunk.usage, extra)
                    t_in, t_out, cached = a or t_in, b or t_out, c or cached
        finally:
            stream.close()
        return Reply("".join(flight.pieces), t_in, t_out or flight.chunks, cached, 0.0)

    def _anthropic(self, system: str, messages: list[dict[str, str]], max_tokens: int | None) -> Reply:
        o = self.o
        kw: dict[str, Any] = {"model": o.model, "system": system, "messages": messages,
                              "max_tokens": max_tokens or o.max_tokens}
        if o.temperature is not None and o.thinking_budget is None:
            kw["temperature"] = o.temperature
        if o.thinking_budget is not None:
            kw["thinking"] = {"type": "enabled", "budget_tokens": o.thinking_budget}
        if o.reasoning_effort is not None:
            effort = {"none": "low", "minimal": "low"}.get(o.reasoning_effort, o.reasoning_effort)
            kw["output_config"] = {"effort": effort}
        if o.extra_body:
            kw["extra_body"] = o.extra_body
        r = self.client.messages.create(**kw)
        text = "".join(getattr(b, "text", "") for b in r.content if getattr(b, "type", "") == "text")
        u = r.usage
        read = int(getattr(u, "cache_read_input_tokens", 0) or 0)
        write = int(getattr(u, "cache_creation_input_tokens", 0) or 0)
        return Reply(text, int(u.input_tokens) + read + write, int(u.output_tokens), read, 0.0)


def _refused_format(e: _Transient) -> bool:
    """Did the server refuse the response_format? 400/422 (not a context overflow), or a 5xx naming it
    (llama-cpp-python answers 500 to ``json_schema``: "Input should be 'text' or 'json_object'")."""
    if e.status in (400, 422):
        return not re.search(r"context|n_ctx|too long|exceed", str(e), re.I)
    return bool(e.status and e.status >= 500 and re.search(r"response_format|json_object", str(e)))


def _openai_usage(u: Any, extra: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens: OpenAI's usage, llama.cpp's ``timings.cache_n`` as a fallback."""
    t_in = int(getattr(u, "prompt_tokens", 0) or 0) if u is not None else 0
    t_out = int(getattr(u, "completion_tokens", 0) or 0) if u is not None else 0
    cached = 0
    details = getattr(u, "prompt_tokens_details", None) if u is not None else None
    if details is not None:
        cached = int(getattr(details, "cached_tokens", 0) or 0)
    timings = (extra or {}).get("timings")
    if isinstance(timings, dict):
        if not cached and isinstance(timings.get("cache_n"), int | float):
            cached = int(timings["cache_n"])
        if not t_in and isinstance(timings.get("prompt_n"), int | float):
            t_in = int(timings["prompt_n"]) + cached
        if not t_out and isinstance(timings.get("predicted_n"), int | float):
            t_out = int(timings["predicted_n"])
    return t_in, t_out, cached


def _msg(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(e)[:300]


# --------------------------------------------------------------------------- the researcher


class _Bad(Exception):
    """An answer with no usable edit: the exact reason, the model's rationale, the SEARCH that failed."""

    def __init__(self, reason: str, rationale: str = "", search: str = "") -> None:
        super().__init__(reason)
        self.reason, self.rationale, self.search = reason, rationale, search


RESPONSE_FORMS = ("json_schema", "json_object")  # tried in this order by structured = "auto"


class LLMResearcher:
    name = "llm"
    concurrent = True  # propose() may run in several threads at once (prefetch)

    def __init__(self, options: Options, spec: Spec, lab_dir: Path, *, chat: _Chat | None = None) -> None:
        options = options.resolved()
        self.o = options
        self.prefetch = options.prefetch
        self.spec = spec
        self.lab_dir = lab_dir
        key_env = DEFAULT_KEY_ENV[options.provider] if options.api_key_env is None else options.api_key_env
        key = os.environ.get(key_env, "") if key_env else ""
        if key_env and not key:
            raise UsageError(f"the environment variable {key_env} (the {options.provider} API key) "
                             "is not set",
                             f"export {key_env}=<your key>, or set [researcher] api_key_env = \"\" for a "
                             "server that needs no key")
        self.secrets = secret_values(extra=[key] if key else [])
        self.chat = chat or _Chat(options, key, key_env)
        # which response_format the server takes: None until known ("" = none: text blocks)
        self.form: str | None = {"off": "", "on": None, "auto": None}[options.structured]
        if options.provider == "anthropic":
            self.form = ""
        self._lock = threading.Lock()
        self._counter: Callable[[str], int] | bool | None = False  # False: not probed yet
        self._rng = random.Random()

    # -- helpers

    def _count(self) -> Callable[[str], int] | None:
        """The provider's token counter (see the module docstring), probed once."""
        with self._lock:
            if self._counter is False:
                self._counter = token_counter(self.o)
            return self._counter if callable(self._counter) else None

    def _ctx_options(self, structured: bool) -> ContextOptions:
        return ContextOptions(budget_tokens=self.o.context_tokens, history_detail=self.o.history_detail,
                              history_lines=self.o.history_lines, log_tail_lines=self.o.log_tail_lines,
                              structured=structured, count=self._count())

    def _parse(self, ctx: Context, text: str, structured: bool) -> ParsedEdits:
        known = list(ctx.files)
        if structured or text.lstrip().startswith(("{", "```json")):
            try:
                return edits_from_json(text, known)
            except EditError as e:
                parsed = parse_edits(text, known)
                if parsed.empty and structured:
                    raise EditError(f"the answer is neither the JSON object asked for ({e}) nor "
                                    "SEARCH/REPLACE blocks") from None
                return parsed
        return parse_edits(text, known)

    def _check(self, ctx: Context, text: str, structured: bool = False) -> tuple[str, dict[str, str]]:
        """(rationale, new files) of an answer, or :class:`_Bad`: the cheap pre-check."""
        try:
            parsed = self._parse(ctx, text, structured)
        except EditError as e:
            raise _Bad(str(e)) from None
        rationale = parsed.rationale
        try:
            files = apply_edits(ctx.files, parsed)
        except EditError as e:
            m = re.match(r"block (\d+):", str(e))
            k = int(m.group(1)) - 1 if m else -1
            search = parsed.blocks[k].search if 0 <= k < len(parsed.blocks) else ""
            raise _Bad(str(e), rationale, search) from None
        protected = [*self.spec.files.protected, *IMPLICITLY_PROTECTED]
        for path in files:
            if matches(path, protected) or not matches(path, self.spec.files.editable):
                raise _Bad(f"{path} is not an editable file; edit only: {', '.join(self.spec.files.editable)}",
                           rationale)
        return rationale or "(no rationale given)", files

    def _response_format(self, form: str, ctx: Context) -> dict[str, Any]:
        lines = None
        if self.o.old_lines == "on" or (self.o.old_lines == "auto" and is_local(self.o.base_url)):
            lines = unique_lines(ctx.files)
        schema = edits_schema(list(ctx.files), lines)
        if form == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "edits", "schema": schema, "strict": True}}
        return {"type": "json_object", "schema": schema}

    def _rank(self, ctx: Context, prompt: Prompt, answers: list[str], log: list[dict[str, Any]],
              should_stop: Callable[[], bool] | None) -> int:
        listing = "\n\n".join(f"## Proposal {i}\n{a[:6000]}" for i, a in enumerate(answers, 1))
        question = (f"{prompt.user}\n\n# Proposals to choose from\n\n{listing}\n\n"
                    f"Which proposal is most likely to improve {ctx.metric_name}? "
                    "Reply with its number only.")
        assert self.o.max_tokens is not None
        reply = self._call(prompt.system.split("\n\n")[0], [{"role": "user", "content": question}], log,
                           "rank", should_stop, max_tokens=min(self.o.max_tokens, 1024 if self.o.thinking_budget
                                                               is None else self.o.thinking_budget + 256))
        m = re.search(r"\d+", reply.text)
        pick = int(m.group()) - 1 if m else 0
        return pick if 0 <= pick < len(answers) else 0

    def _call(self, system: str, messages: list[dict[str, str]], log: list[dict[str, Any]], what: str,
              should_stop: Callable[[], bool] | None, max_tokens: int | None = None, seed: int | None = None,
              response_format: dict[str, Any] | None = None, prompt_tokens: int = 0) -> Reply:
        try:
            reply = self.chat(system, messages, max_tokens, seed=seed, response_format=response_format,
                              should_stop=should_stop, prompt_tokens=prompt_tokens)
        except (_Stopped, _Transient) as e:
            if e.partial is not None:  # the usage of an abandoned call is still spent
                self._log(log, what, e.partial)
            raise
        self._log(log, what, reply)
        return reply

    @staticmethod
    def _log(log: list[dict[str, Any]], what: str, reply: Reply) -> None:
        entry = {"call": what, "tokens_in": reply.tokens_in, "tokens_out": reply.tokens_out,
                 "tokens_cached": reply.tokens_cached, "seconds": round(reply.seconds, 3), "text": reply.text}
        if reply.note:
            entry["note"] = reply.note
        log.append(entry)

    def _sample(self, ctx: Context, system: str, messages: list[dict[str, str]], log: list[dict[str, Any]],
                what: str, seed: int | None, prompt_tokens: int) -> tuple[Reply, bool]:
        """One answer, asked as JSON when the server takes it; (reply, structured?)."""
        while True:
            form = self.form
            if form == "":
                return self._call(system, messages, log, what, ctx.should_stop, seed=seed,
                                  prompt_tokens=prompt_tokens), False
            tries = [form] if form else list(RESPONSE_FORMS)
            for k, f in enumerate(tries):
                try:
                    reply = self._call(system, messages, log, what, ctx.should_stop, seed=seed,
                                       response_format=self._response_format(f, ctx), prompt_tokens=prompt_tokens)
                except _Transient as e:
                    refused = _refused_format(e)
                    if not refused or form:
                        raise
                    if k < len(tries) - 1:
                        continue
                    if self.o.structured == "on":
                        raise NightlabError(f"the server refused a JSON-schema response_format: {e}",
                                            "set [researcher] structured = \"auto\" (falls back to text) "
                                            "or \"off\"") from None
                    with self._lock:
                        self.form = ""  # refused both forms: text from now on
                    break
                with self._lock:
                    self.form = f
                return reply, True

    def _seeds(self, ctx: Context) -> list[int | None]:
        n = self.o.think
        if self.o.seed is not None:
            return [self.o.seed + 1000 * ctx.idx + i for i in range(n)]
        if n > 1:
            base = self._rng.randrange(1 << 30)
            return [base + i for i in range(n)]
        return [None]

    # -- protocol

    def propose(self, ctx: Context) -> Candidate:
        t0 = time.monotonic()
        log: list[dict[str, Any]] = []
        rationale, files, error = "", None, ""
        params: dict[str, Any] = {}
        prompt = build_prompt(ctx, self._ctx_options(self.form != ""), secrets=self.secrets)
        bad: list[_Bad] = []
        try:
            valid: list[tuple[int, str, dict[str, str]]] = []
            texts: list[str] = []
            first: list[dict[str, str]] = []
            structured = False
            for i, seed in enumerate(self._seeds(ctx)):
                was = self.form
                first = [{"role": "user", "content": prompt.user}]
                reply, structured = self._sample(ctx, prompt.system, first, log, f"sample {i + 1}", seed,
                                                 prompt.tokens)
                texts.append(reply.text)
                if was is None and not structured:  # fell back to text: later calls ask for blocks
                    prompt = build_prompt(ctx, self._ctx_options(False), secrets=self.secrets)
                try:
                    r, f = self._check(ctx, reply.text, structured)
                    valid.append((len(texts) - 1, r, f))
                except _Bad as e:
                    bad.append(e)
            if not valid and self.o.repair:
                how = ("Answer again with the JSON object: a short rationale and corrected edits whose \"old\" "
                       "text is copied exactly from the current files shown above." if structured else
                       "Answer again with a short rationale and corrected SEARCH/REPLACE blocks. Copy the "
                       "SEARCH lines exactly from the current files shown above.")
                fix = f"Your answer could not be used: {bad[0].reason}\n\n{how}"
                messages = [*first, {"role": "assistant", "content": texts[0]}, {"role": "user", "content": fix}]
                reply, structured = self._sample(ctx, prompt.system, messages, log, "repair",
                                                 None if self.o.seed is None else self.o.seed + 1000 * ctx.idx + 999,
                                                 prompt.tokens)
                params["retried"] = True
                try:
                    r, f = self._check(ctx, reply.text, structured)
                    texts.append(reply.text)
                    valid.append((len(texts) - 1, r, f))
                    params["repaired"] = True
                except _Bad as e:
                    bad.append(e)
            if valid:
                pick = 0
                if len(valid) > 1 and self.o.rank:
                    pick = self._rank(ctx, prompt, [texts[i] for i, _, _ in valid], log, ctx.should_stop)
                _, rationale, files = valid[pick]
                if self.o.think > 1:
                    params.update(think=self.o.think, valid=len(valid), picked=pick + 1)
            else:
                last = bad[-1] if bad else _Bad("no answer")
                error = f"no usable edit: {last.reason}"
                rationale = next((b.rationale for b in reversed(bad) if b.rationale), "")
                failed = next((b.search for b in reversed(bad) if b.search), "")
                if failed:
                    params["failed_search"] = failed[:1500]
        except _Stopped:
            error = "stopped while proposing (the request was cancelled)"
            files, rationale = None, ""
        except _Transient as e:
            error = f"{self.o.provider} call failed: {e}"
            files, rationale = None, ""
        params["structured"] = self.form if self.form is not None else "unknown"
        usage = Usage(
            tokens_in=sum(c["tokens_in"] for c in log), tokens_out=sum(c["tokens_out"] for c in log),
            tokens_cached=sum(c["tokens_cached"] for c in log),
            cost_usd=sum(cost_usd(self.o.price, c["tokens_in"], c["tokens_out"], c["tokens_cached"])
                         for c in log),
            seconds=time.monotonic() - t0,
        )
        if files is None and not error:
            error = "no usable edit"
        artifacts = self._artifacts(prompt, log, error)
        if files is not None:
            params.pop("failed_search", None)
        return Candidate(parent=ctx.parent, rationale=rationale or error,
                         files=files, params=params, usage=usage, researcher=self.name, artifacts=artifacts,
                         error=error if files is None else "")

    def _artifacts(self, prompt: Prompt, log: list[dict[str, Any]], error: str) -> dict[str, str]:
        responses = "\n\n".join(f"=== {c['call']} ({c['tokens_in']} in, {c['tokens_out']} out, "
                                f"{c['seconds']} s{', ' + c['note'] if c.get('note') else ''}) ===\n{c['text']}"
                                for c in log)
        t_in = sum(c["tokens_in"] for c in log)
        meta = {"provider": self.o.provider, "model": self.o.model, "base_url": self.o.base_url,
                "structured": self.form, "prompt_tokens": prompt.tokens, "prompt_counted_by": prompt.counted_by,
                "trimmed": list(prompt.trimmed), "error": error,
                "cached_share": round(sum(c["tokens_cached"] for c in log) / t_in, 4) if t_in else None,
                "calls": [{k: v for k, v in c.items() if k != "text"} for c in log]}
        return {"prompt.txt": redact(prompt.text(), self.secrets),
                "response.txt": redact(responses, self.secrets),
                "llm.json": redact(json.dumps(meta, indent=2), self.secrets)}

    def observe(self, experiment: Experiment) -> None:
        pass  # the history reaches the model through the context

    def close(self) -> None:
        close = getattr(getattr(self.chat, "client", None), "close", None)
        if callable(close):
            close()


def token_counter(o: Options) -> Callable[[str], int] | None:
    """The provider's tokenizer as a function, or None (then chars/4 with a margin is used)."""
    if o.tokenizer == "estimate":
        return None
    if o.tokenizer in ("auto", "server") and o.base_url and is_local(o.base_url):
        import httpx

        root = re.sub(r"/v1/?$", "", o.base_url.rstrip("/"))
        for path, field_name in (("/tokenize", "content"), ("/extras/tokenize", "input")):
            url = root + path

            def count(text: str, url: str = url, field_name: str = field_name) -> int:
                r = httpx.post(url, json={field_name: text, "model": o.model}, timeout=30)
                r.raise_for_status()
                return len(r.json()["tokens"])

            try:
                count("probe")
                return count
            except Exception:
                continue
    if o.tokenizer in ("auto", "tiktoken") and o.provider == "openai":
        try:
            import tiktoken

            try:
                enc = tiktoken.encoding_for_model(o.model)
            except KeyError:
                enc = tiktoken.get_encoding("o200k_base")
            return lambda text: len(enc.encode(text, disallowed_special=()))
        except Exception:  # not installed, or its vocabulary cannot be fetched offline
            return None
    return None


def create(options: Options, spec: Spec, lab_dir: Path) -> LLMResearcher:
    if spec.stop.max_cost_usd and options.price is None:
        raise SpecError("[stop] max_cost_usd is set but [researcher.price] is missing, so cost is unknown",
                        "add [researcher.price] with input and output (USD per 1M tokens)")
    if options.structured == "on" and options.provider == "anthropic":
        raise SpecError("[researcher] structured = \"on\" is not available with provider = \"anthropic\"",
                        "use structured = \"auto\" or \"off\" (Anthropic answers in SEARCH/REPLACE text)")
    return LLMResearcher(options, spec, lab_dir)
