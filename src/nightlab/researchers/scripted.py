"""The scripted researcher: a test double shipped in the package (like httpx's MockTransport).

It proposes a fixed list of steps, in order, then repeats the last one or stops.
From ``nightlab.toml``::

    [researcher]
    kind = "scripted"
    steps = "steps.json"   # a JSON list, relative to the lab folder

Each step is ``{"rationale": "...", "files": {"train.py": "<full text>"}}``,
``{"rationale": "...", "replace": {"train.py": ["old text", "new text"]}}`` or
``{"rationale": "...", "diff": "<unified diff>"}``. From Python, pass ``steps`` directly,
where a step may also be a callable ``(Context) -> Candidate``.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from nightlab.errors import NightlabError, UsageError
from nightlab.types import Candidate, Experiment

if TYPE_CHECKING:
    from nightlab.researchers import Context
    from nightlab.spec import Spec

Step = dict[str, Any] | Callable[["Context"], Candidate]
OBSERVED = 100  # experiments the scripted researcher remembers (observed)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: str | list[dict[str, Any]] = []
    cycle: bool = False


class ScriptedResearcher:
    name = "scripted"

    def __init__(self, steps: list[Step], *, cycle: bool = False) -> None:
        self.steps = list(steps)
        self.cycle = cycle
        self.observed: deque[Experiment] = deque(maxlen=OBSERVED)  # the last ones (a session may be long)
        self._i = 0

    def propose(self, ctx: Context) -> Candidate:
        if not self.steps:
            raise NightlabError("the scripted researcher has no steps", "give it at least one step")
        if self._i >= len(self.steps) and not self.cycle:
            step = self.steps[-1]
        else:
            step = self.steps[self._i % len(self.steps)]
        self._i += 1
        if callable(step):
            return step(ctx)
        rationale = str(step.get("rationale", f"scripted step {self._i}"))
        if "diff" in step:
            return Candidate(parent=ctx.parent, rationale=rationale, diff=step["diff"], researcher=self.name)
        files: dict[str, str] = {}
        for path, text in (step.get("files") or {}).items():
            files[path] = text
        for path, (old, new) in (step.get("replace") or {}).items():
            base = files.get(path, ctx.files.get(path))
            if base is None:
                base = (ctx.lab_dir / path).read_text() if (ctx.lab_dir / path).exists() else ""
            files[path] = base.replace(old, new)
        return Candidate(
            parent=ctx.parent, rationale=rationale, files=files, params=dict(step.get("params", {})),
            researcher=self.name,
        )

    def observe(self, experiment: Experiment) -> None:
        self.observed.append(experiment)

    def close(self) -> None:
        pass


def create(options: Options, spec: Spec, lab_dir: Path) -> ScriptedResearcher:
    steps: list[Step]
    if isinstance(options.steps, str):
        path = lab_dir / options.steps
        try:
            steps = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: cannot read the scripted steps: {e}", "write a JSON list of steps") from None
    else:
        steps = list(options.steps)
    return ScriptedResearcher(steps, cycle=options.cycle)
