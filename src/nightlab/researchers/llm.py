"""The ``llm`` researcher: a chat model proposes SEARCH/REPLACE edits, through the official SDKs.

From ``nightlab.toml``::

    [researcher]
    kind = "llm"
    provider = "openai"              # or "anthropic"
    model = "gpt-5-mini"
    base_url = "http://127.0.0.1:8000/v1"   # any OpenAI-compatible server (vLLM, Ollama, ...)
    api_key_env = "OPENAI_API_KEY"   # the NAME of the variable; "" for servers without keys
    think = 2                        # sample 2 proposals per step, send the best one

    [researcher.price]               # USD per 1M tokens (see nightlab.pricing)
    input = 0.25
    output = 2.0

Each ``propose``: build the prompt (:mod:`nightlab.context`), sample ``think`` answers, keep
those whose edits parse, apply and stay inside the editable files (the cheap pre-check), let
the model pick among several valid ones (``rank``), and, when none is valid, show the first
answer's error back to the model once (``repair``). Still nothing valid: a candidate with no
edit and an ``error``, which the engine records as ``invalid``.

Faults: 429, 5xx, timeouts and dropped connections are retried by the SDK (``max_retries``,
exponential backoff with jitter, honouring ``retry-after``); when retries run out the
candidate is ``invalid``. 401/403/404 raise :class:`NightlabError` (the session stops with the
fix), and so does an unreachable server before any call succeeded. The key's value never
reaches the prompt, the artifacts, the ledger or the spec: only its variable's name is stored.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nightlab.context import ContextOptions, Prompt, build_prompt, redact, secret_values
from nightlab.edits import EditError, apply_edits, parse_edits
from nightlab.errors import NightlabError, SpecError, UsageError
from nightlab.guard import IMPLICITLY_PROTECTED
from nightlab.pricing import Price, cost_usd
from nightlab.spec import matches
from nightlab.types import Candidate, Experiment, Usage

if TYPE_CHECKING:
    from nightlab.researchers import Context
    from nightlab.spec import Spec

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Literal["openai", "anthropic"] = "openai"
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="name of the env var with the key; '' for none")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int = Field(4096, gt=0, description="output tokens per call")
    max_tokens_param: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto"
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    thinking_budget: int | None = Field(None, ge=1024, description="anthropic: extended thinking tokens")
    seed: int | None = None
    timeout_s: float = Field(300.0, gt=0)
    max_retries: int = Field(5, ge=0, le=20)
    context_tokens: int = Field(24000, ge=500, description="prompt budget, see nightlab.context")
    history_detail: int = Field(8, ge=0)
    history_lines: int = Field(40, ge=0)
    log_tail_lines: int = Field(40, ge=0)
    think: int = Field(1, ge=1, le=16, description="proposals sampled per step")
    rank: bool = Field(True, description="with think > 1: the model picks among the valid proposals")
    repair: bool = Field(True, description="show a failed edit's error back to the model once")
    price: Price | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields per request")


@dataclass(frozen=True)
class Reply:
    text: str
    tokens_in: int
    tokens_out: int
    tokens_cached: int
    seconds: float


class _Transient(Exception):
    """Retries ran out, or the provider refused this one request: an invalid candidate."""


# --------------------------------------------------------------------------- providers


class _Chat:
    """One provider's chat call, with its errors mapped to nightlab's."""

    def __init__(self, o: Options, key: str, key_env: str) -> None:
        self.o, self.key_env = o, key_env
        self.ok_once = False
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

    def __call__(self, system: str, messages: list[dict[str, str]], max_tokens: int | None = None) -> Reply:
        t0 = time.monotonic()
        try:
            reply = self._openai(system, messages, max_tokens) if self.o.provider == "openai" \
                else self._anthropic(system, messages, max_tokens)
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
            if not self.ok_once and not isinstance(e, self.sdk.APITimeoutError):
                raise NightlabError(f"cannot reach {self._where()}: {_msg(e)}",
                                    "start the model server, or correct [researcher] base_url") from None
            raise _Transient(f"{type(e).__name__} after {self.o.max_retries} retries: {_msg(e)}") from None
        except self.sdk.APIStatusError as e:  # 429/5xx after retries; 400/422 at once
            raise _Transient(f"HTTP {e.status_code} ({type(e).__name__}): {_msg(e)}") from None
        self.ok_once = True
        return Reply(reply.text, reply.tokens_in, reply.tokens_out, reply.tokens_cached,
                     time.monotonic() - t0)

    def _where(self) -> str:
        return self.o.base_url or f"the {self.o.provider} API"

    def _openai(self, system: str, messages: list[dict[str, str]], max_tokens: int | None) -> Reply:
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
        if o.seed is not None:
            kw["seed"] = o.seed
        if o.extra_body:
            kw["extra_body"] = o.extra_body
        r = self.client.chat.completions.create(**kw)
        text = (r.choices[0].message.content or "") if r.choices else ""
        u = r.usage
        cached = 0
        if u is not None and getattr(u, "prompt_tokens_details", None) is not None:
            cached = int(u.prompt_tokens_details.cached_tokens or 0)
        return Reply(text, int(u.prompt_tokens if u else 0), int(u.completion_tokens if u else 0),
                     cached, 0.0)

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


def _msg(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(e)[:300]


# --------------------------------------------------------------------------- the researcher


class LLMResearcher:
    name = "llm"

    def __init__(self, options: Options, spec: Spec, lab_dir: Path, *, chat: _Chat | None = None) -> None:
        self.o = options
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
        self.ctx_options = ContextOptions(budget_tokens=options.context_tokens,
                                          history_detail=options.history_detail,
                                          history_lines=options.history_lines,
                                          log_tail_lines=options.log_tail_lines)

    # -- helpers

    def _check(self, ctx: Context, text: str) -> tuple[str, dict[str, str]]:
        """(rationale, new files) of an answer, or EditError: the cheap pre-check."""
        parsed = parse_edits(text, list(ctx.files))
        files = apply_edits(ctx.files, parsed)
        protected = [*self.spec.files.protected, *IMPLICITLY_PROTECTED]
        for path in files:
            if matches(path, protected) or not matches(path, self.spec.files.editable):
                raise EditError(f"{path} is not an editable file; edit only: "
                                f"{', '.join(self.spec.files.editable)}")
        return parsed.rationale or "(no rationale given)", files

    def _rank(self, ctx: Context, prompt: Prompt, answers: list[str], log: list[dict[str, Any]]) -> int:
        listing = "\n\n".join(f"## Proposal {i}\n{a[:6000]}" for i, a in enumerate(answers, 1))
        question = (f"{prompt.user}\n\n# Proposals to choose from\n\n{listing}\n\n"
                    f"Which proposal is most likely to improve {ctx.metric_name}? "
                    "Reply with its number only.")
        reply = self._call(prompt.system.split("\n\n")[0], [{"role": "user", "content": question}], log,
                           "rank", max_tokens=min(self.o.max_tokens, 1024 if self.o.thinking_budget is None
                                                  else self.o.thinking_budget + 256))
        m = re.search(r"\d+", reply.text)
        pick = int(m.group()) - 1 if m else 0
        return pick if 0 <= pick < len(answers) else 0

    def _call(self, system: str, messages: list[dict[str, str]], log: list[dict[str, Any]], what: str,
              max_tokens: int | None = None) -> Reply:
        reply = self.chat(system, messages, max_tokens)
        log.append({"call": what, "tokens_in": reply.tokens_in, "tokens_out": reply.tokens_out,
                    "tokens_cached": reply.tokens_cached, "seconds": round(reply.seconds, 3),
                    "text": reply.text})
        return reply

    # -- protocol

    def propose(self, ctx: Context) -> Candidate:
        t0 = time.monotonic()
        prompt = build_prompt(ctx, self.ctx_options, secrets=self.secrets)
        log: list[dict[str, Any]] = []
        rationale, files, error = "", None, ""
        params: dict[str, Any] = {}
        first = [{"role": "user", "content": prompt.user}]
        try:
            valid: list[tuple[int, str, dict[str, str]]] = []
            errors: list[str] = []
            for i in range(self.o.think):
                reply = self._call(prompt.system, first, log, f"sample {i + 1}")
                try:
                    r, f = self._check(ctx, reply.text)
                    valid.append((i, r, f))
                except EditError as e:
                    errors.append(str(e))
            if not valid and self.o.repair:
                fix = (f"Your edit did not apply: {errors[0]}\n\nAnswer again with a short rationale and "
                       "corrected SEARCH/REPLACE blocks. Copy the SEARCH lines exactly from the current "
                       "files shown above.")
                messages = [*first, {"role": "assistant", "content": log[0]["text"]},
                            {"role": "user", "content": fix}]
                reply = self._call(prompt.system, messages, log, "repair")
                try:
                    r, f = self._check(ctx, reply.text)
                    valid.append((-1, r, f))
                    params["repaired"] = True
                except EditError as e:
                    errors.append(str(e))
            if valid:
                pick = 0
                if len(valid) > 1 and self.o.rank:
                    pick = self._rank(ctx, prompt, [log[i]["text"] for i, _, _ in valid], log)
                _, rationale, files = valid[pick]
                if self.o.think > 1:
                    params.update(think=self.o.think, valid=len(valid), picked=pick + 1)
            else:
                error = f"no usable edit: {errors[-1] if errors else 'no answer'}"
        except _Transient as e:
            error = f"{self.o.provider} call failed: {e}"
        usage = Usage(
            tokens_in=sum(c["tokens_in"] for c in log), tokens_out=sum(c["tokens_out"] for c in log),
            tokens_cached=sum(c["tokens_cached"] for c in log),
            cost_usd=sum(cost_usd(self.o.price, c["tokens_in"], c["tokens_out"], c["tokens_cached"])
                         for c in log),
            seconds=time.monotonic() - t0,
        )
        artifacts = self._artifacts(prompt, log, error)
        return Candidate(parent=ctx.parent, rationale=rationale or error, files=files, params=params,
                         usage=usage, researcher=self.name, artifacts=artifacts, error=error)

    def _artifacts(self, prompt: Prompt, log: list[dict[str, Any]], error: str) -> dict[str, str]:
        responses = "\n\n".join(f"=== {c['call']} ({c['tokens_in']} in, {c['tokens_out']} out, "
                                f"{c['seconds']} s) ===\n{c['text']}" for c in log)
        meta = {"provider": self.o.provider, "model": self.o.model, "base_url": self.o.base_url,
                "prompt_tokens_estimate": prompt.tokens, "trimmed": list(prompt.trimmed), "error": error,
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


def create(options: Options, spec: Spec, lab_dir: Path) -> LLMResearcher:
    if spec.stop.max_cost_usd and options.price is None:
        raise SpecError("[stop] max_cost_usd is set but [researcher.price] is missing, so cost is unknown",
                        "add [researcher.price] with input and output (USD per 1M tokens)")
    return LLMResearcher(options, spec, lab_dir)
