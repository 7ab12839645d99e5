"""Context engineering: the prompt a researcher model sees, built to fit a token budget.

:func:`build_prompt` assembles, from a :class:`~nightlab.researchers.Context`:

1. ``program.md`` (the human's research program);
2. a summary of the spec: what may be edited, what is protected, the metric and its direction,
   baseline and incumbent, the run command and its budget, what is forbidden;
3. the incumbent's editable files (omitted for agents, which read them themselves);
4. the experiment history, compressed by a stated policy (below);
5. the last failure's log tail;
6. the task and, for models, the edit format (the system message).

**Token counting.** ``count_tokens`` is the approximation ``ceil(chars / 4)`` (close to BPE
tokenizers on English and code; no tokenizer is downloaded). The provider's own counts are
what usage and cost use.

**History policy.** The last ``history_detail`` experiments are shown in full (status,
metric, rationale up to 400 chars, the decision's reason); older ones one line each
(index, status, metric, the rationale's first line up to 100 chars); when more than
``history_lines`` older ones exist, the oldest are replaced by one summary line (count per
status and the best metric with its index).

**Trimming order.** While the prompt is over ``budget_tokens`` these steps apply, in this
order, each only as far as needed, and each is named in :attr:`Prompt.trimmed`:

1. history detail: ``history_detail`` halved down to 0;
2. the failure's log tail: 40 -> 10 lines -> dropped;
3. history lines: ``history_lines`` halved down to 0 (only the summary line is left);
4. ``program.md``: cut to 4000, then 1000 characters (the head is kept);
5. files: each file cut to 16000, 8000, 4000, 2000 characters (head kept, elision marked).

The system message and the spec summary are never trimmed. A prompt still over budget after
step 5 is sent anyway, with ``"over budget"`` in :attr:`Prompt.trimmed`.

**Secrets.** :func:`redact` replaces every secret value with ``[REDACTED]``: the API key, the
value of every environment variable whose name looks secret, and of every variable a run does
not get (the one rule of :mod:`nightlab.redaction`); the prompt is redacted before it is sent
or stored.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from nightlab.redaction import REDACTED as REDACTED  # re-exported
from nightlab.redaction import env_secrets
from nightlab.redaction import redact as redact  # re-exported
from nightlab.runenv import SECRET_NAME
from nightlab.types import Direction, Experiment

if TYPE_CHECKING:
    from nightlab.researchers import Context

CHARS_PER_TOKEN = 4
SECRET_ENV = SECRET_NAME  # the old name, kept for importers

EDIT_FORMAT = """\
Answer in two parts:
1. A short rationale (one to five sentences): what you change and why you expect it to improve the metric.
2. The change, as one or more SEARCH/REPLACE blocks:

path/to/file.py
<<<<<<< SEARCH
lines copied exactly from the current file
=======
the new lines
>>>>>>> REPLACE

Rules: the file's path goes on the line before <<<<<<< SEARCH. The SEARCH section must match the
current file exactly, line for line, including indentation, and match it only once: include enough
lines to make it unique. Keep blocks small. To create a new file, leave SEARCH empty. For a small
file you may instead give the whole new file: its path on one line, then the full text in a fenced
code block. Edit only the editable files. Make one focused change per answer."""

SYSTEM_LLM = ("You are a careful research engineer running experiments to improve a program's metric. "
              "Each answer you give is one experiment: it is applied, run under a fixed time budget, "
              "measured by code you cannot change, and kept only if the metric improves.\n\n" + EDIT_FORMAT)

TASK_LLM = ("Propose the next experiment: one change you expect to improve the metric. Learn from the "
            "history: do not repeat what was discarded or crashed unless you fix the reason.")

TASK_AGENT = ("Make the next experiment: edit the editable files in the current directory to make one "
              "change you expect to improve the metric. Do not edit protected files, do not commit, "
              "do not run long trainings (nightlab runs and measures the experiment after you finish). "
              "End with a one-paragraph rationale of what you changed and why.")


def count_tokens(text: str) -> int:
    """The stated approximation: ceil(characters / 4)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def secret_values(env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    """Values to redact, longest first: ``extra`` plus the secrets of ``env`` (default ``os.environ``)
    by :func:`nightlab.redaction.env_secrets`."""
    return [v for v, _ in env_secrets(env, extra=extra)]


@dataclass(frozen=True)
class ContextOptions:
    budget_tokens: int = 24000
    history_detail: int = 8
    history_lines: int = 40
    log_tail_lines: int = 40
    program_chars: int = 0  # 0: whole
    file_chars: int = 0  # 0: whole
    include_files: bool = True
    agent: bool = False


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str
    tokens: int  # count_tokens(system + user)
    trimmed: tuple[str, ...] = ()  # trimming steps applied, in order

    def text(self) -> str:
        """The whole prompt as stored in the artifacts."""
        return f"=== system ===\n{self.system}\n\n=== user ===\n{self.user}\n"


# --------------------------------------------------------------------------- sections


def fmt_metric(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def spec_summary(ctx: Context) -> str:
    spec = ctx.spec
    better = "lower is better" if ctx.direction is Direction.MINIMIZE else "higher is better"
    tried = [e for e in ctx.history if e.idx > 0]
    lines = [
        f"- editable files (globs): {', '.join(spec.files.editable)}",
        f"- protected, never edit: {', '.join([*spec.files.protected, 'nightlab.toml', 'program.md'])}",
        f"- metric: {ctx.metric_name}, {better}; baseline {fmt_metric(ctx.baseline_metric)}, "
        f"best so far (the incumbent, which you are editing) {fmt_metric(ctx.incumbent_metric)}",
        f"- each experiment runs `{spec.run.command}` with a time budget of {spec.run.budget_s:g} s "
        f"(killed at {spec.run.hard_timeout_s:g} s); network {'on' if spec.sandbox.network else 'off'}",
        "- forbidden: editing protected files or anything outside the editable files, changing how the "
        "metric is computed or reported, reading held-out data, using more time than the budget",
        f"- this is experiment #{ctx.idx}; {len(tried)} experiments were tried before it",
    ]
    return "\n".join(lines)


def _first_line(text: str, limit: int) -> str:
    s = (text or "").strip().splitlines()
    return (s[0] if s else "")[:limit]


def history_section(history: Iterable[Experiment], detail: int, max_lines: int, metric: str,
                    direction: Direction) -> str:
    tried = [e for e in history if e.idx > 0]
    if not tried:
        return "(no experiments yet besides the baseline)"
    detailed = tried[len(tried) - detail:] if detail > 0 else []
    older = tried[: len(tried) - len(detailed)]
    out: list[str] = []
    summarised = older[: max(0, len(older) - max_lines)]
    shown = older[len(summarised):]
    if summarised:
        counts = Counter(e.status.value for e in summarised)
        sign = 1.0 if direction is Direction.MINIMIZE else -1.0
        valid = [(sign * e.metric, e.idx, e) for e in summarised if e.metric is not None]
        best = min(valid, key=lambda t: (t[0], t[1]))[2] if valid else None
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        out.append(f"#{summarised[0].idx}-#{summarised[-1].idx}: {len(summarised)} experiments ({parts})"
                   + (f"; best {metric} {fmt_metric(best.metric)} at #{best.idx}" if best else ""))
    for e in shown:
        line = _first_line(e.rationale, 100)
        out.append(f"#{e.idx} {e.status.value} {metric}={fmt_metric(e.metric)}: {line}")
    for e in detailed:
        rat = " ".join((e.rationale or "").split())[:400]
        out.append(f"#{e.idx} {e.status.value} {metric}={fmt_metric(e.metric)}\n  rationale: {rat}"
                   + (f"\n  outcome: {e.reason[:300]}" if e.reason else ""))
    return "\n".join(out)


def failure_section(history: Iterable[Experiment], lines: int) -> str:
    last = None
    for e in history:
        if e.status.is_failure():
            last = e
    if last is None or lines <= 0:
        return ""
    tail = "\n".join((last.log_tail or "").splitlines()[-lines:])
    head = f"Experiment #{last.idx} ended {last.status.value}: {last.reason[:300]}"
    return head + (f"\nLast {lines} lines of its log:\n```\n{tail}\n```" if tail.strip() else "")


def _cut(text: str, limit: int) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    head = text[:limit]
    rest = text[limit:].count("\n")
    return head + f"\n[... {len(text) - limit} more characters ({rest} lines) not shown ...]\n"


def files_section(files: Mapping[str, str], limit: int) -> str:
    out = []
    for path in sorted(files):
        out.append(f"{path}\n```\n{_cut(files[path], limit).rstrip()}\n```")
    return "\n\n".join(out) if out else "(no editable text files)"


# --------------------------------------------------------------------------- assembly


def _assemble(ctx: Context, o: ContextOptions) -> tuple[str, str]:
    parts = []
    program = _cut(ctx.program.strip(), o.program_chars)
    if program:
        parts.append(f"# Research program (program.md)\n\n{program}")
    parts.append(f"# The lab\n\n{spec_summary(ctx)}")
    if o.include_files:
        parts.append(f"# Current editable files (the incumbent, commit {ctx.parent[:10]})\n\n"
                     + files_section(ctx.files, o.file_chars))
    hist = history_section(ctx.history, o.history_detail, o.history_lines, ctx.metric_name, ctx.direction)
    parts.append("# History of experiments (oldest first)\n\n" + hist)
    fail = failure_section(ctx.history, o.log_tail_lines)
    if fail:
        parts.append(f"# Last failure\n\n{fail}")
    parts.append("# Your task\n\n" + (TASK_AGENT if o.agent else TASK_LLM))
    system = "" if o.agent else SYSTEM_LLM
    return system, "\n\n".join(parts) + "\n"


def _steps(o: ContextOptions, files: Mapping[str, str]) -> list[tuple[str, ContextOptions]]:
    """The deterministic trimming sequence: (name, options after the step)."""
    steps: list[tuple[str, ContextOptions]] = []
    cur = o
    d = cur.history_detail
    while d > 0:
        d //= 2
        cur = replace(cur, history_detail=d)
        steps.append((f"history detail -> {d}", cur))
    for n in (10, 0):
        if cur.log_tail_lines > n:
            cur = replace(cur, log_tail_lines=n)
            steps.append((f"log tail -> {n} lines", cur))
    h = cur.history_lines
    while h > 0:
        h //= 2
        cur = replace(cur, history_lines=h)
        steps.append((f"history lines -> {h}", cur))
    for n in (4000, 1000):
        cur = replace(cur, program_chars=n)
        steps.append((f"program.md -> {n} chars", cur))
    if cur.include_files:
        biggest = max((len(t) for t in files.values()), default=0)
        for n in (16000, 8000, 4000, 2000):
            if biggest > n:
                cur = replace(cur, file_chars=n)
                steps.append((f"files -> {n} chars each", cur))
    return steps


def build_prompt(ctx: Context, options: ContextOptions | None = None, *,
                 secrets: Iterable[str] = ()) -> Prompt:
    """The prompt for ``ctx``, trimmed to ``options.budget_tokens`` (see the module docstring)."""
    o = options or ContextOptions()
    secrets = list(secrets)
    system, user = _assemble(ctx, o)
    trimmed: list[str] = []
    if count_tokens(system + user) > o.budget_tokens:
        for name, step in _steps(o, ctx.files):
            system, user = _assemble(ctx, step)
            trimmed.append(name)
            if count_tokens(system + user) <= o.budget_tokens:
                break
        else:
            trimmed.append("over budget")
    system, user = redact(system, secrets), redact(user, secrets)
    return Prompt(system=system, user=user, tokens=count_tokens(system + user), trimmed=tuple(trimmed))
