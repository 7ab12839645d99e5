"""Export a session's experiments: karpathy-compatible ``results.tsv``, CSV, JSONL.

* ``tsv`` is karpathy/autoresearch's ``results.tsv``: five tab-separated columns
  ``commit  <metric_name>  memory_gb  status  description``; commit is the 7-char sha of
  the attempted change (the baseline's is the commit it ran), the metric has 6 decimals,
  memory is GB with 1 decimal, status is ``keep``, ``discard`` or ``crash`` (a timeout is a
  crash, written ``0.000000`` and ``0.0`` as karpathy does). A row that never produced a
  measurement for another reason (``invalid``, ``rejected``, ``interrupted``, a stale
  rebase that conflicted) keeps its own status and has an *empty* metric and memory, and an
  empty commit when it has none of its own — never ``0.000000`` (which would read as the best
  result of the night) nor its parent's commit. Running experiments are left out, and so are
  the rows before a re-baseline that changed the metric's name (they measured another metric).
* ``csv``: one row per experiment with every scalar column, usage included, and the dicts
  (secondary, params, evidence) as JSON. The diff and the log tail are left to JSONL.
* ``jsonl``: one JSON object per experiment with every field, usage and trust included.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from nightlab.errors import UsageError
from nightlab.types import Experiment, Session, Status

if TYPE_CHECKING:  # the read commands export without importing SQLAlchemy
    from nightlab.ledger_read import LedgerReads

FORMATS = ("tsv", "csv", "jsonl")
DEFAULT_MEMORY_KEY = "peak_vram_mb"  # what autoresearch's train.py prints, in MB
JSONL_VERSION = 1

CSV_COLUMNS = (
    "session",
    "idx",
    "status",
    "metric",
    "trust",
    "parent_commit",
    "commit",
    "description",
    "reason",
    "seed",
    "started_at",
    "finished_at",
    "propose_s",
    "run_s",
    "overhead_s",
    "exit_code",
    "researcher",
    "rationale",
    "tokens_in",
    "tokens_out",
    "tokens_cached",
    "cost_usd",
    "usage_s",
    "secondary",
    "params",
    "evidence",
)


def export(ledger: LedgerReads, session: Session, fmt: str, out: TextIO, *, memory_key: str = "") -> int:
    """Write ``session``'s experiments to ``out`` in ``fmt``; return the number of rows written.

    ``memory_key`` names the secondary figure (in MB) for the TSV's ``memory_gb`` column;
    empty means ``peak_vram_mb``. An unknown ``fmt`` raises :class:`UsageError`.
    """
    writers: dict[str, Callable[[Session, list[Experiment], TextIO, str], int]] = {
        "tsv": _tsv,
        "csv": _csv,
        "jsonl": _jsonl,
    }
    if fmt not in writers:
        raise UsageError(f"unknown export format {fmt!r}", fix=f"use one of: {', '.join(FORMATS)}")
    exps = ledger.experiments(session.id)
    if fmt == "tsv":  # one metric column: rows measured under another metric name before a re-baseline stay out
        moves = [r for r in ledger.session_json(session.id)[1].get("rebaselines") or [] if isinstance(r, dict)
                 and r.get("metric_from", session.metric_name) != session.metric_name]
        if moves:
            exps = [e for e in exps if e.idx >= int(moves[-1].get("at_idx") or 0)]
    return writers[fmt](session, exps, out, memory_key or DEFAULT_MEMORY_KEY)


def tsv_status(status: Status) -> str:
    if status is Status.PRUNED:  # stopped early as worse than earlier runs: karpathy's "discard"
        return "discard"
    return "crash" if status is Status.TIMEOUT else status.value


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").splitlines()).strip()


def _tsv(session: Session, exps: list[Experiment], out: TextIO, memory_key: str) -> int:
    out.write(f"commit\t{_one_line(session.metric_name)}\tmemory_gb\tstatus\tdescription\n")
    n = 0
    for e in exps:
        if e.status is Status.RUNNING:
            continue
        crashed = e.status in (Status.CRASH, Status.TIMEOUT)
        measured = e.metric is not None
        # the baseline (no change of its own) ran its parent; a row that never ran has no commit of its own
        commit = (e.commit or (e.parent_commit if measured or crashed else ""))[:7]
        metric = f"{e.metric:.6f}" if e.metric is not None else "0.000000" if crashed else ""
        mem = e.secondary.get(memory_key)
        memory = f"{float(mem) / 1024:.1f}" if isinstance(mem, int | float) else "0.0" if measured or crashed else ""
        out.write(f"{commit}\t{metric}\t{memory}\t{tsv_status(e.status)}\t{_one_line(e.description)}\n")
        n += 1
    return n


def _csv_row(session: Session, e: Experiment) -> dict[str, Any]:
    return {
        "session": session.tag,
        "idx": e.idx,
        "status": e.status.value,
        "metric": "" if e.metric is None else repr(e.metric),
        "trust": e.trust,
        "parent_commit": e.parent_commit,
        "commit": e.commit or "",
        "description": e.description,
        "reason": e.reason,
        "seed": e.seed,
        "started_at": e.started_at,
        "finished_at": "" if e.finished_at is None else e.finished_at,
        "propose_s": e.propose_s,
        "run_s": e.run_s,
        "overhead_s": e.overhead_s,
        "exit_code": "" if e.exit_code is None else e.exit_code,
        "researcher": e.researcher,
        "rationale": e.rationale,
        "tokens_in": e.usage.tokens_in,
        "tokens_out": e.usage.tokens_out,
        "tokens_cached": e.usage.tokens_cached,
        "cost_usd": e.usage.cost_usd,
        "usage_s": e.usage.seconds,
        "secondary": json.dumps(e.secondary, sort_keys=True),
        "params": json.dumps(e.params, sort_keys=True, default=str),
        "evidence": json.dumps(e.evidence, sort_keys=True, default=str),
    }


def _csv(session: Session, exps: list[Experiment], out: TextIO, _memory_key: str) -> int:
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for e in exps:
        writer.writerow(_csv_row(session, e))
    return len(exps)


def _jsonl(session: Session, exps: list[Experiment], out: TextIO, _memory_key: str) -> int:
    for e in exps:
        record: dict[str, Any] = {
            "export_version": JSONL_VERSION,
            "session": session.tag,
            "metric_name": session.metric_name,
            "direction": session.direction.value,
            **dataclasses.asdict(e),
            "status": e.status.value,
        }
        out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    return len(exps)
