"""``nightlab export --mlflow``: a session as MLflow runs (``pip install 'nightlab[mlflow]'``).

One MLflow experiment per session (``nightlab/<lab>/<tag>``), one run per nightlab experiment:

- params: the search researcher's parameters (``param.<NAME>``), else the rationale (first 500 characters),
  plus the researcher, seed and parent commit;
- metrics: the session's metric under its own name and every secondary figure, run/propose seconds, tokens
  and cost;
- tags: ``nightlab.status``, ``nightlab.trust``, ``nightlab.n``, ``nightlab.commit``, ``nightlab.reason`` and
  the lineage: ``nightlab.parent_n`` / ``nightlab.parent_run_id`` name the kept experiment whose commit this
  one started from;
- artifacts: ``diff.patch`` and ``log_tail.txt``.

Re-exporting is idempotent: a run is keyed by ``nightlab.key`` (session tag + experiment number); a run
already exported with the same status is left alone, one whose status changed (it was still running) is
replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nightlab.errors import UsageError


@dataclass(frozen=True)
class MlflowExport:
    experiment_id: str
    tracking_uri: str
    created: int
    replaced: int
    unchanged: int


def _client(tracking_uri: str | None) -> Any:
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError:
        raise UsageError("exporting to MLflow needs the mlflow extra", "pip install 'nightlab[mlflow]'") from None
    return MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()


def export_mlflow(lab: Any, tag: str | None = None, tracking_uri: str | None = None,
                  experiment_name: str | None = None) -> MlflowExport:
    """Export session ``tag`` (default: the latest) of ``lab`` (a :class:`nightlab.api.Lab`)."""
    client = _client(tracking_uri)
    session = lab.session(tag)
    name = experiment_name or f"nightlab/{lab.path.name}/{session.tag}"
    try:
        found = client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found is not None else client.create_experiment(
            name, tags={"nightlab.session": session.tag, "nightlab.lab": str(lab.path),
                        "nightlab.metric": session.metric_name, "nightlab.direction": session.direction.value})
    except Exception as err:  # an unreachable or misconfigured tracking server is the user's to fix
        raise UsageError(f"MLflow at {client.tracking_uri}: {type(err).__name__}: {str(err)[:300]}",
                         "check --tracking-uri (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)") from None
    existing: dict[str, Any] = {}
    for run in client.search_runs([exp_id], filter_string=f"tags.`nightlab.session` = '{session.tag}'",
                                  max_results=50_000):
        existing[run.data.tags.get("nightlab.key", "")] = run
    exps = lab.experiments(session.tag)
    by_commit = {e.commit: e for e in exps if e.status.value == "keep" and e.commit}
    run_ids: dict[int, str] = {}
    created = replaced = unchanged = 0
    for e in exps:
        key = f"{session.tag}:{e.idx}"
        old = existing.get(key)
        if old is not None and old.data.tags.get("nightlab.status") == e.status.value:
            run_ids[e.idx] = old.info.run_id
            unchanged += 1
            continue
        if old is not None:
            client.delete_run(old.info.run_id)
            replaced += 1
        else:
            created += 1
        parent = by_commit.get(e.parent_commit)
        tags = {
            "nightlab.key": key, "nightlab.session": session.tag, "nightlab.n": str(e.idx),
            "nightlab.status": e.status.value, "nightlab.trust": e.trust, "nightlab.commit": e.commit or "",
            "nightlab.reason": e.reason[:5000], "mlflow.note.content": e.rationale[:5000],
        }
        if parent is not None and parent.idx != e.idx:
            tags["nightlab.parent_n"] = str(parent.idx)
            if parent.idx in run_ids:
                tags["nightlab.parent_run_id"] = run_ids[parent.idx]
        run = client.create_run(exp_id, start_time=int(e.started_at * 1000), tags=tags,
                                run_name=f"#{e.idx} {e.status.value}")
        rid = run.info.run_id
        run_ids[e.idx] = rid
        params = {f"param.{k}": json.dumps(v) if not isinstance(v, str) else v
                  for k, v in e.params.items()}
        if not params and e.rationale:
            params["rationale"] = e.rationale[:500]
        params.update({"researcher": e.researcher, "seed": str(e.seed),
                       "parent_commit": e.parent_commit})
        for k, v in params.items():
            client.log_param(rid, k[:250], str(v)[:6000])
        ts = int((e.finished_at or e.started_at) * 1000)
        metrics = {"run_s": e.run_s, "propose_s": e.propose_s, "overhead_s": e.overhead_s,
                   "tokens_in": e.usage.tokens_in, "tokens_out": e.usage.tokens_out, "cost_usd": e.usage.cost_usd}
        if e.metric is not None:
            metrics[session.metric_name] = e.metric
        for k, v in (e.secondary or {}).items():
            if isinstance(v, int | float) and k != session.metric_name:
                metrics[k] = float(v)
        for k, v in metrics.items():
            client.log_metric(rid, k, float(v), timestamp=ts, step=0)
        client.log_text(rid, e.diff, "diff.patch")
        client.log_text(rid, e.log_tail or "", "log_tail.txt")
        done = {"keep": "FINISHED", "discard": "FINISHED", "running": "RUNNING"}.get(e.status.value, "FAILED")
        if done != "RUNNING":
            client.set_terminated(rid, done, end_time=ts)
    return MlflowExport(str(exp_id), str(client.tracking_uri), created, replaced, unchanged)
