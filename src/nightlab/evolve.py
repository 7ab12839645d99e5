"""``nightlab evolve-program``: write better ``program.md`` files from the evidence of a comparison.

From a finished comparison (:mod:`nightlab.compare`) it builds a **dossier** — each arm's program.md, its
results (best metric reached with its interval, keep/crash/invalid rates), what worked (kept diffs with their
rationales) and what failed (the most frequent crash reasons) — and asks the configured LLM for ``n`` new
program.md variants, each with a one-sentence hypothesis. The variants are compared against the best program so
far under the same rules (seeds, budget, chunk, alpha) as the source comparison; a variant replaces the best only
when the comparison declares it the winner. This repeats for ``generations`` generations. Every program.md's
lineage (parent, hypothesis, generation, comparison, result) is stored in the ledger (``program_lineage``) and
shown by ``--lineage``; the best program is written to ``.nightlab/programs/<name>/best.md`` with
``best.json`` (its evidence). ``--dry-run`` prints the dossier and the prompt and spends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from nightlab import compare as cmp
from nightlab.errors import NightlabError, UsageError
from nightlab.ledger import Ledger
from nightlab.spec import PROGRAM_FILE, load_spec

lineage = sa.Table(  # registered with the comparison tables: cmp.ensure_tables creates it
    "program_lineage", cmp._meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("evolution", sa.String(200), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("parent", sa.Text, nullable=False),
    sa.Column("hypothesis", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("comparison", sa.Text, nullable=False),
    sa.Column("mean_best", sa.Double, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # seed | winner | kept | lost
    sa.Column("created_at", sa.Double, nullable=False),
    sqlite_autoincrement=True,
)

SYSTEM = ("You improve the research brief (program.md) that guides an autonomous research agent. You are given "
          "several briefs that were compared on equal budgets, their measured results, what their agents kept "
          "and where they crashed. Write new briefs that you expect to reach a better metric. Answer only with "
          "the requested blocks.")
FORMAT = """Answer with exactly {n} blocks, each:

=== VARIANT <short-name>
HYPOTHESIS: <one sentence: why this brief should do better>
---
<the complete program.md text>
=== END
"""


@dataclass(frozen=True)
class Best:
    name: str
    text: str
    comparison: str
    mean: float | None


@dataclass(frozen=True)
class Variant:
    name: str
    hypothesis: str
    text: str


def dossier(ledger: Ledger, lab: Path, comparison: str, *, max_diffs: int = 3, max_chars: int = 1500) -> str:
    """What the model needs to see of a comparison, as Markdown."""
    report = cmp.load_report(ledger, comparison)
    with ledger.transaction() as conn:
        cfg = json.loads(conn.execute(sa.select(cmp.comparisons.c.config_json)
                                      .where(cmp.comparisons.c.name == comparison)).scalar_one())
    programs: dict[str, str] = cfg.get("programs", {})
    own = (lab / PROGRAM_FILE).read_text(encoding="utf-8") if (lab / PROGRAM_FILE).exists() else ""
    out = [f"# Comparison {report.name}: {report.metric} ({report.direction}), budget {report.budget} per "
           f"session, {max((len(a.seeds) for a in report.arms), default=0)} seeds per arm", "",
           f"Verdict: {('winner ' + report.winner + '. ') if report.winner else ''}{report.verdict}", ""]
    for a in sorted(report.arms, key=lambda a: (a.mean is None, (a.mean or 0) * (1 if report.direction ==
                                                                                 "minimize" else -1))):
        ci = f" (95% CI {a.ci[0]:.6g} .. {a.ci[1]:.6g})" if a.ci else ""
        rates = ", ".join(f"{k} {100 * v:.0f}%" for k, v in (("keep", a.keep_rate), ("crash", a.crash_rate),
                                                               ("invalid", a.invalid_rate)) if v is not None)
        out += [f"## Arm {a.name}: mean best {a.mean if a.mean is None else f'{a.mean:.6g}'}{ci}; {rates}", "",
                "### Its program.md", "", "```markdown", (programs.get(a.name) or own).strip()[:6000], "```", ""]
        kept: list[Any] = []
        crashes: Counter[str] = Counter()
        for s in a.seeds:
            sess = ledger.get_session(s.tag)
            if sess is None:
                continue
            for e in ledger.experiments(sess.id):
                if e.idx > 0 and e.status.value == "keep":
                    kept.append(e)
                elif e.status.value in ("crash", "timeout", "invalid"):
                    crashes[re.sub(r"\d+(\.\d+)?", "N", e.reason)[:160]] += 1
        if kept:
            out += ["### What its agents kept", ""]
            for e in kept[:max_diffs]:
                out += [f"- #{e.idx} ({e.metric}): {e.rationale.strip()[:300]}", "", "```diff",
                        e.diff[:max_chars], "```", ""]
        if crashes:
            out += ["### Frequent failures", ""] + [f"- {n}x {why}" for why, n in crashes.most_common(5)] + [""]
    return "\n".join(out)


def prompt(dossier_text: str, n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": dossier_text + "\n\n" + FORMAT.format(n=n)}]


def parse_variants(text: str) -> list[Variant]:
    out = []
    for m in re.finditer(r"=== VARIANT\s+([A-Za-z0-9_-]{1,24})\s*\nHYPOTHESIS:\s*(.+?)\n---\n(.*?)\n=== END", text,
                         re.S):
        body = m.group(3).strip()
        if body:
            out.append(Variant(m.group(1), m.group(2).strip(), body + "\n"))
    return out


def llm_call(lab: Path) -> Callable[[str, list[dict[str, str]]], str]:
    """A chat call with the lab's ``[researcher]`` model (kind = "llm"), through the official SDK."""
    spec = load_spec(lab)
    if spec.researcher.kind != "llm":
        raise UsageError("evolve-program asks the lab's LLM for new program.md files, but [researcher] kind is "
                         f"{spec.researcher.kind!r}", 'set [researcher] kind = "llm" (provider, model, base_url)')
    o = spec.researcher.options
    provider, model, base_url = o.get("provider", "openai"), o["model"], o.get("base_url")
    key_env = o.get("api_key_env") or ("OPENAI_API_KEY" if provider == "openai" else "ANTHROPIC_API_KEY")
    key = os.environ.get(key_env, "") or "no-key"
    timeout = float(o.get("timeout_s", 300))
    if provider == "openai":
        import openai

        client: Any = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=2)

        def call(system: str, messages: list[dict[str, str]]) -> str:
            r = client.chat.completions.create(model=model, max_tokens=int(o.get("max_tokens", 4096)),
                                               messages=[{"role": "system", "content": system}, *messages])
            return (r.choices[0].message.content or "") if r.choices else ""
        return call
    import anthropic

    aclient: Any = anthropic.Anthropic(api_key=key, base_url=base_url, timeout=timeout, max_retries=2)

    def acall(system: str, messages: list[dict[str, str]]) -> str:
        r = aclient.messages.create(model=model, system=system, messages=messages,
                                    max_tokens=int(o.get("max_tokens", 4096)))
        return "".join(getattr(b, "text", "") for b in r.content)
    return acall


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def evolve(lab: Path, source: str, *, name: str | None = None, n: int = 2, generations: int = 1,
           db: str | None = None, sandbox: str | None = None, dry_run: bool = False,
           chat: Callable[[str, list[dict[str, str]]], str] | None = None,
           engine_factory: Callable[..., Any] | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Evolve from comparison ``source``; returns the best program's record (or the dossier on a dry run)."""
    lab = lab.resolve()
    name = name or f"{source}-evo"
    with Ledger.for_lab(lab, db) as led:
        cmp.ensure_tables(led)
        report = cmp.load_report(led, source)
        with led.transaction() as conn:
            row = conn.execute(sa.select(cmp.comparisons).where(cmp.comparisons.c.name == source)).mappings().one()
        cfg = json.loads(row["config_json"])
        plan0 = cmp.Plan.from_config(source, cfg)
        text0 = dossier(led, lab, source)
    if dry_run:
        msgs = prompt(text0, n)
        return {"dossier": text0, "system": SYSTEM, "prompt": msgs[0]["content"]}
    chat = chat or llm_call(lab)
    out_dir = lab / ".nightlab" / "programs" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    own = (lab / PROGRAM_FILE).read_text(encoding="utf-8") if (lab / PROGRAM_FILE).exists() else ""
    best_arm = report.winner or min(
        (a for a in report.arms if a.mean is not None),
        key=lambda a: (a.mean or 0) * (1 if report.direction == "minimize" else -1)).name
    best_text = cfg.get("programs", {}).get(best_arm) or own
    best = Best(f"g0-{best_arm}", best_text, source, next((a.mean for a in report.arms if a.name == best_arm), None))
    _record(lab, db, name, 0, best.name, "", "the best arm of the source comparison", best_text, out_dir,
            source, best.mean, "seed")
    last = source
    for g in range(1, generations + 1):
        with Ledger.for_lab(lab, db) as led:
            text = dossier(led, lab, last)
        answer = chat(SYSTEM, prompt(text, n))
        variants = parse_variants(answer)[:n]
        if not variants:
            raise NightlabError(f"generation {g}: the model's answer has no '=== VARIANT' block",
                                "check the model (a larger one follows the format better), then run again")
        arms = [cmp.Arm("best", _write(out_dir, f"g{g}-best.md", best.text, lab))]
        for v in variants:
            arms.append(cmp.Arm(f"g{g}-{v.name}"[:32], _write(out_dir, f"g{g}-{v.name}.md", v.text, lab)))
        plan = cmp.Plan(f"{name}-g{g}", arms, plan0.seeds, plan0.budget, plan0.chunk, plan0.alpha, plan0.base_seed)
        say(f"generation {g}: comparing {len(variants)} new program.md variant(s) against the best so far")
        rep = cmp.run_compare(lab, plan, db=db, sandbox=sandbox, engine_factory=engine_factory)
        means = {a.name: a.mean for a in rep.arms}
        parent = best.name
        for v in variants:
            arm_name = f"g{g}-{v.name}"[:32]
            won = rep.winner == arm_name
            _record(lab, db, name, g, arm_name, parent, v.hypothesis, v.text, out_dir, plan.name,
                    means.get(arm_name), "winner" if won else "lost")
            if won:
                best = Best(arm_name, v.text, plan.name, means.get(arm_name))
        say(f"generation {g}: {rep.verdict}")
        last = plan.name
    (out_dir / "best.md").write_text(best.text)
    evidence = {"name": best.name, "comparison": best.comparison, "mean": best.mean,
                "lineage": lineage_rows(lab, db, name)}
    (out_dir / "best.json").write_text(json.dumps(evidence, indent=2, default=str))
    return {**evidence, "path": str(out_dir / "best.md")}


def _write(out_dir: Path, fname: str, text: str, lab: Path) -> str:
    p = out_dir / fname
    p.write_text(text)
    return str(p.relative_to(lab))


def _record(lab: Path, db: str | None, evolution: str, gen: int, name: str, parent: str, hypothesis: str,
            text: str, out_dir: Path, comparison: str, mean: float | None, status: str) -> None:
    with Ledger.for_lab(lab, db) as led:
        cmp.ensure_tables(led)
        with led.transaction(write=True) as conn:
            conn.execute(sa.insert(lineage).values(
                evolution=evolution, generation=gen, name=name, parent=parent, hypothesis=hypothesis,
                sha256=_sha(text), path=str(out_dir / f"{name}.md"), comparison=comparison, mean_best=mean,
                status=status, created_at=time.time()))


def lineage_rows(lab: Path, db: str | None, evolution: str) -> list[dict[str, Any]]:
    with Ledger.for_lab(lab, db) as led:
        cmp.ensure_tables(led)
        with led.transaction() as conn:
            rows = conn.execute(sa.select(lineage).where(lineage.c.evolution == evolution).order_by(lineage.c.id))
            return [dict(r) for r in rows.mappings()]
