"""Researchers propose candidates and observe results; they never decide (ask/tell).

A researcher is any object with the :class:`Researcher` shape. The engine calls
``observe`` once for every finished experiment of the session (on resume, for the whole
history first, in order), and ``propose`` when it wants the next candidate.

Contract for ``propose``:
- return a :class:`~nightlab.types.Candidate` whose ``parent`` is ``ctx.parent``;
- paths in ``Candidate.files`` and in ``Candidate.diff`` are relative to the lab folder;
- never write to disk outside the folder the engine hands it (``ctx.workdir``, when set);
- raise :class:`~nightlab.errors.NightlabError` only for faults that must stop the
  session (a bad API key); anything else that goes wrong is a candidate the engine
  records as ``invalid``.

Researchers are registered by kind in ``KINDS``; each module has an ``Options`` pydantic
model (validated from ``[researcher]``) and ``create(options, ctx_factory_args)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from nightlab.errors import SpecError
from nightlab.types import Candidate, Direction, Experiment

if TYPE_CHECKING:
    from nightlab.spec import ResearcherSpec, Spec

KINDS: dict[str, str] = {
    "search": "nightlab.researchers.search",
    "scripted": "nightlab.researchers.scripted",
    "llm": "nightlab.researchers.llm",
    "agent": "nightlab.researchers.agent",
    "local": "nightlab.researchers.local",
}


@dataclass(frozen=True)
class Context:
    """Everything a researcher may see when proposing. Built by the engine."""

    spec: Spec
    lab_dir: Path
    program: str
    parent: str
    files: dict[str, str]  # the incumbent's editable files, lab-relative path -> text
    # the finished experiments, oldest first: a nightlab.history.History from the engine (rows read from
    # the ledger on demand, a summary from memory), any sequence of experiments elsewhere
    history: Sequence[Experiment]
    metric_name: str
    direction: Direction
    incumbent_metric: float | None
    baseline_metric: float | None
    idx: int  # the index the proposed experiment will get
    workdir: Path | None = None  # a scratch worktree at ``parent`` (for agent researchers)
    extra: dict[str, Any] = field(default_factory=dict)
    # True once the session is asked to stop (Ctrl-C, SIGTERM, the STOP file): a researcher that can
    # abandon a proposal should poll it and return early (its usage still counts)
    should_stop: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    @property
    def last_failure(self) -> Experiment | None:
        for e in reversed(self.history):
            if e.status.is_failure():
                return e
        return None


@runtime_checkable
class Researcher(Protocol):
    name: str

    def propose(self, ctx: Context) -> Candidate: ...

    def observe(self, experiment: Experiment) -> None: ...

    def close(self) -> None: ...


def _module(kind: str) -> Any:
    if kind not in KINDS:
        raise SpecError(
            f"unknown researcher kind {kind!r}",
            f"set [researcher] kind to one of: {', '.join(sorted(KINDS))}",
        )
    return importlib.import_module(KINDS[kind])


def validate_options(path: Path, rspec: ResearcherSpec) -> BaseModel:
    """Validate ``[researcher]`` options for its kind; a SpecError names the key."""
    if rspec.kind not in KINDS:
        raise SpecError(
            f"{path}: [researcher] kind = {rspec.kind!r} is not a known researcher",
            f"use one of: {', '.join(sorted(KINDS))}",
        )
    mod = _module(rspec.kind)
    try:
        return mod.Options.model_validate(rspec.options)
    except ValidationError as e:
        from nightlab.spec import _validation_to_spec_error

        err = _validation_to_spec_error(path, e, mod.Options)
        # _validation_to_spec_error names "[key]" for a top-level key; here it lives in [researcher]
        detail = err.message.split(": ", 2)[-1]
        key = ".".join(str(p) for p in e.errors()[0]["loc"])
        raise SpecError(f"{path}: [researcher] {key}: {detail}", err.fix) from None


def create(spec: Spec, lab_dir: Path, *, overrides: dict[str, Any] | None = None) -> Researcher:
    """Build the researcher named by ``[researcher] kind`` (options validated)."""
    mod = _module(spec.researcher.kind)
    opts = dict(spec.researcher.options)
    opts.update(overrides or {})
    options = mod.Options.model_validate(opts)
    return mod.create(options, spec, lab_dir)
