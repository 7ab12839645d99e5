"""Context engineering: the prompt a researcher model sees, built to fit a token budget.

:func:`build_prompt` assembles, from a :class:`~nightlab.researchers.Context`:

1. ``program.md`` (the human's research program);
2. a summary of the spec that does not change during a session: what may be edited, what is
   protected, the metric and its direction, the run command and its budget, what is forbidden;
3. the incumbent's editable files (omitted for agents, which read them themselves);
4. the experiment history, compressed by a stated policy (below);
5. the last failure: the last crash or timeout with its log tail, and, when more recent, the
   last ``invalid`` answer (the model's own format mistake: the exact error and its failed
   SEARCH text);
6. what changes every time: baseline and incumbent metric, the experiment number;
7. the task; for models, the edit format is the system message (SEARCH/REPLACE text, or the
   JSON object with ``structured``).

**Stable first.** The order runs from what never changes to what changes every experiment, so
that a server's prefix cache (llama.cpp) and providers' cached-token prices cover everything up
to the files; the cached share is reported in each call's ``llm.json`` and in ``nightlab status``.

**Token counting.** With ``ContextOptions.count`` (the provider's tokenizer: llama.cpp's
``/tokenize``, tiktoken), trimming uses real counts. Without it, ``estimate_tokens``:
``ceil(chars / 4)`` plus a 20% margin (chars/4 undercounted a real BPE tokenizer by 14% on a
lab's prompt). ``count_tokens`` is the bare ``ceil(chars / 4)``. The provider's own counts are
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from nightlab.history import briefs, rows_at
from nightlab.redaction import REDACTED as REDACTED  # re-exported
from nightlab.redaction import env_secrets
from nightlab.redaction import redact as redact  # re-exported
from nightlab.runenv import SECRET_NAME
from nightlab.types import Direction, Experiment, Status

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

EDIT_FORMAT_JSON = """\
Answer with one JSON object and nothing else:
{"rationale": "one to five sentences: what you change and why you expect it to improve the metric",
 "edits": [{"file": "path/to/file.py", "old": "lines copied exactly from the current file",
            "new": "the new lines"}]}

Rules: "old" must match the current file exactly, line for line, including indentation, and match it
only once: include enough lines to make it unique. Keep edits small. To create a new file, leave "old"
empty. Edit only the editable files. Make one focused change per answer."""

SYSTEM_LLM = ("You are a careful research engineer running experiments to improve a program's metric. "
              "Each answer you give is one experiment: it is applied, run under a fixed time budget, "
              "measured by code you cannot change, and kept only if the metric improves.\n\n" + EDIT_FORMAT)
SYSTEM_LLM_JSON = SYSTEM_LLM.replace(EDIT_FORMAT, EDIT_FORMAT_JSON)
MARGIN = 1.2  # the estimate's safety margin over chars/4

TASK_LLM = ("Propose the next experiment: one change you expect to improve the metric. Learn from the "
            "history: do not repeat what was discarded or crashed unless you fix the reason.")

TASK_AGENT = ("Make the next experiment: edit the editable files in the current directory to make one "
              "change you expect to improve the metric. Do not edit protected files, do not commit, "
              "do not run long trainings (nightlab runs and measures the experiment after you finish). "
              "End with a one-paragraph rationale of what you changed and why.")


def count_tokens(text: str) -> int:
    """The stated approximation: ceil(characters / 4)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_tokens(text: str) -> int:
    """ceil(characters / 4) with the safety margin, for trimming without a tokenizer."""
    return math.ceil(len(text) * MARGIN / CHARS_PER_TOKEN)


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
    structured: bool = False  # the system message asks for the JSON object instead of SEARCH/REPLACE
    count: Callable[[str], int] | None = field(default=None, compare=False)  # the provider's tokenizer


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str
    tokens: int  # tokens of system + user: the tokenizer's count, else estimate_tokens
    trimmed: tuple[str, ...] = ()  # trimming steps applied, in order
    counted_by: str = "estimate"  # "tokenizer" or "estimate"

    def text(self) -> str:
        """The whole prompt as stored in the artifacts."""
        return f"=== system ===\n{self.system}\n\n=== user ===\n{self.user}\n"


# --------------------------------------------------------------------------- sections


def fmt_metric(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def spec_static(ctx: Context) -> str:
    """The part of the spec summary that stays the same for the whole session."""
    spec = ctx.spec
    better = "lower is better" if ctx.direction is Direction.MINIMIZE else "higher is better"
    lines = [
        f"- editable files (globs): {', '.join(spec.files.editable)}",
        f"- protected, never edit: {', '.join([*spec.files.protected, 'nightlab.toml', 'program.md'])}",
        f"- metric: {ctx.metric_name}, {better}",
        f"- each experiment runs `{spec.run.command}` with a time budget of {spec.run.budget_s:g} s "
        f"(killed at {spec.run.hard_timeout_s:g} s); network {'on' if spec.sandbox.network else 'off'}",
        "- forbidden: editing protected files or anything outside the editable files, changing how the "
        "metric is computed or reported, reading held-out data, using more time than the budget",
    ]
    return "\n".join(lines)


def spec_now(ctx: Context) -> str:
    """The part that changes: baseline, incumbent, the experiment number."""
    tried = sum(1 for b in briefs(ctx.history) if b.idx > 0)
    return (f"- {ctx.metric_name}: baseline {fmt_metric(ctx.baseline_metric)}, best so far (the incumbent, "
            f"which you are editing) {fmt_metric(ctx.incumbent_metric)}\n"
            f"- this is experiment #{ctx.idx}; {tried} experiments were tried before it")


def spec_summary(ctx: Context) -> str:
    return spec_static(ctx) + "\n" + spec_now(ctx)


def _first_line(text: str, limit: int) -> str:
    s = (text or "").strip().splitlines()
    return (s[0] if s else "")[:limit]


def history_section(history: Sequence[Experiment], detail: int, max_lines: int, metric: str,
                    direction: Direction) -> str:
    """The older experiments summarised from their status and metric (no text read), the last
    ``max_lines`` as one line each, the last ``detail`` in full (only these rows are read in full)."""
    tried = [b for b in briefs(history) if b.idx > 0]
    if not tried:
        return "(no experiments yet besides the baseline)"
    detailed = tried[len(tried) - detail:] if detail > 0 else []
    older = tried[: len(tried) - len(detailed)]
    out: list[str] = []
    summarised = older[: max(0, len(older) - max_lines)]
    shown = older[len(summarised):]
    if summarised:
        counts = Counter(b.status.value for b in summarised)
        sign = 1.0 if direction is Direction.MINIMIZE else -1.0
        valid = [(sign * b.metric, b.idx, b) for b in summarised if b.metric is not None]
        best = min(valid, key=lambda t: (t[0], t[1]))[2] if valid else None
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        out.append(f"#{summarised[0].idx}-#{summarised[-1].idx}: {len(summarised)} experiments ({parts})"
                   + (f"; best {metric} {fmt_metric(best.metric)} at #{best.idx}" if best else ""))
    full = rows_at(history, [b.pos for b in (*shown, *detailed)])
    for e in full[:len(shown)]:
        line = _first_line(e.rationale, 100)
        out.append(f"#{e.idx} {e.status.value} {metric}={fmt_metric(e.metric)}: {line}")
    for e in full[len(shown):]:
        rat = " ".join((e.rationale or "").split())[:400]
        out.append(f"#{e.idx} {e.status.value} {metric}={fmt_metric(e.metric)}\n  rationale: {rat}"
                   + (f"\n  outcome: {e.reason[:300]}" if e.reason else ""))
    return "\n".join(out)


def failure_section(history: Sequence[Experiment], lines: int) -> str:
    """The last crash or timeout with its log tail; and the last invalid answer when it is more recent."""
    last_pos = invalid_pos = None
    for b in briefs(history):
        if b.status.is_failure():
            last_pos, invalid_pos = b.pos, None
        elif b.status is Status.INVALID and b.idx > 0:
            invalid_pos = b.pos
    last = rows_at(history, [last_pos])[0] if last_pos is not None and lines > 0 else None
    invalid = rows_at(history, [invalid_pos])[0] if invalid_pos is not None else None
    out = []
    if last is not None and lines > 0:
        tail = "\n".join((last.log_tail or "").splitlines()[-lines:])
        head = f"Experiment #{last.idx} ended {last.status.value}: {last.reason[:300]}"
        out.append(head + (f"\nLast {lines} lines of its log:\n```\n{tail}\n```" if tail.strip() else ""))
    if invalid is not None:
        text = (f"Experiment #{invalid.idx} was invalid (its answer could not be applied): "
                f"{invalid.reason[:1200]}")
        failed = str(invalid.params.get("failed_search") or "")
        if failed:
            text += f"\nThe SEARCH text that did not match:\n```\n{failed[:1200]}\n```"
        out.append(text)
    return "\n\n".join(out)


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
    """Sections from stable to changing (see "Stable first" above)."""
    parts = []
    program = _cut(ctx.program.strip(), o.program_chars)
    if program:
        parts.append(f"# Research program (program.md)\n\n{program}")
    parts.append(f"# The lab\n\n{spec_static(ctx)}")
    if o.include_files:
        parts.append("# Current editable files (the incumbent)\n\n" + files_section(ctx.files, o.file_chars))
    hist = history_section(ctx.history, o.history_detail, o.history_lines, ctx.metric_name, ctx.direction)
    parts.append("# History of experiments (oldest first)\n\n" + hist)
    fail = failure_section(ctx.history, o.log_tail_lines)
    if fail:
        parts.append(f"# Last failure\n\n{fail}")
    parts.append(f"# Now\n\n{spec_now(ctx)}\n- the incumbent is commit {ctx.parent[:10]}")
    parts.append("# Your task\n\n" + (TASK_AGENT if o.agent else TASK_LLM))
    system = "" if o.agent else (SYSTEM_LLM_JSON if o.structured else SYSTEM_LLM)
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
    counter: Callable[[str], int] = o.count or estimate_tokens
    by = "tokenizer" if o.count is not None else "estimate"

    def count(text: str) -> int:
        nonlocal counter, by
        try:
            return counter(text)
        except Exception:  # the tokenizer went away (server restarted): estimate from here on
            counter, by = estimate_tokens, "estimate"
            return counter(text)

    system, user = _assemble(ctx, o)
    trimmed: list[str] = []
    if count(system + user) > o.budget_tokens:
        for name, step in _steps(o, ctx.files):
            system, user = _assemble(ctx, step)
            trimmed.append(name)
            if count(system + user) <= o.budget_tokens:
                break
        else:
            trimmed.append("over budget")
    system, user = redact(system, secrets), redact(user, secrets)
    return Prompt(system=system, user=user, tokens=count(system + user), trimmed=tuple(trimmed), counted_by=by)
