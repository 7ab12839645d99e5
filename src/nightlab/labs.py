"""Many labs, one human: the lab registry and a summary of each lab's state.

The registry is a small TOML file in the user's config directory (``$NIGHTLAB_REGISTRY``, else
``$XDG_CONFIG_HOME/nightlab/labs.toml``, else ``~/.config/nightlab/labs.toml``)::

    [[lab]]
    name = "quickfit"
    path = "/home/me/labs/quickfit"
    db = ""                      # ledger URL; "" is the lab's own .nightlab/ledger.db

Labs whose sessions live in a shared PostgreSQL ledger appear without registration: every
distinct ``lab_path`` of that ledger's sessions is a lab (:func:`labs_in_ledger`).

:func:`lab_state` reads one lab's ledger (read-only: it never creates a ledger) and says what a
human wants to know at a glance: running / waiting for a human / stopped and why, the incumbent
and its verified improvement, experiments and spend in the last 24 hours, the best-so-far curve,
and the pending approvals. Nothing here writes to a lab.
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightlab.errors import UsageError

REGISTRY_ENV = "NIGHTLAB_REGISTRY"
DAY_S = 86_400.0


def default_registry() -> Path:
    if os.environ.get(REGISTRY_ENV):
        return Path(os.environ[REGISTRY_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nightlab" / "labs.toml"


@dataclass(frozen=True)
class LabEntry:
    name: str
    path: str
    db: str = ""  # ledger URL; "" means the lab's own SQLite ledger


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


class Registry:
    """The labs a user follows. Every change is written at once (atomically, by rename)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_registry()
        self.labs: list[LabEntry] = self._load()

    def _load(self) -> list[LabEntry]:
        if not self.path.exists():
            return []
        try:
            data = tomllib.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"{self.path}: cannot read the lab registry: {e}",
                             f"fix or delete {self.path}, then `nightlab labs add PATH` again") from None
        rows = data.get("lab", [])
        if not isinstance(rows, list):
            raise UsageError(f"{self.path}: 'lab' must be an array of tables ([[lab]])", f"fix {self.path}")
        out = []
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not isinstance(r.get("path"), str):
                raise UsageError(f"{self.path}: lab #{i + 1} needs string keys 'name' and 'path'", f"fix {self.path}")
            out.append(LabEntry(r["name"], r["path"], str(r.get("db", "") or "")))
        return out

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# nightlab's lab registry: `nightlab labs add|remove|list` edits it.", ""]
        for lab in self.labs:
            lines += ["[[lab]]", f"name = {_toml_str(lab.name)}", f"path = {_toml_str(lab.path)}"]
            if lab.db:
                lines.append(f"db = {_toml_str(lab.db)}")
            lines.append("")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(lines))
        os.replace(tmp, self.path)

    def get(self, name: str) -> LabEntry | None:
        return next((lab for lab in self.labs if lab.name == name), None)

    def add(self, path: Path, name: str | None = None, db: str = "") -> LabEntry:
        lab_dir = Path(path).expanduser().resolve()
        if not (lab_dir / "nightlab.toml").is_file():
            raise UsageError(f"{lab_dir} has no nightlab.toml", f"run `nightlab init` in {lab_dir} first")
        name = name or _lab_name(lab_dir)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise UsageError(f"lab name {name!r} is not usable in a URL", "pass --name with letters, digits, . _ -")
        for other in self.labs:
            if other.path == str(lab_dir):
                raise UsageError(f"{lab_dir} is already registered as '{other.name}'",
                                 f"`nightlab labs remove {other.name}` first to rename it")
            if other.name == name:
                raise UsageError(f"a lab named '{name}' is already registered ({other.path})",
                                 "pass --name to pick another name")
        entry = LabEntry(name, str(lab_dir), db)
        self.labs.append(entry)
        self.save()
        return entry

    def remove(self, name: str) -> LabEntry:
        entry = self.get(name)
        if entry is None:
            known = ", ".join(lab.name for lab in self.labs) or "none"
            raise UsageError(f"no lab named '{name}' in {self.path}", f"registered labs: {known}")
        self.labs.remove(entry)
        self.save()
        return entry


def _lab_name(lab_dir: Path) -> str:
    try:
        data = tomllib.loads((lab_dir / "nightlab.toml").read_text())
        name = (data.get("lab") or {}).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        name = None
    raw = str(name) if name else lab_dir.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "lab"


# ---------------------------------------------------------------------------- state


@dataclass(frozen=True)
class LabState:
    """What one lab looks like right now (its latest session)."""

    name: str
    path: str
    db: str
    state: str  # running | waiting | stopped | finished | failed | stale | idle | missing
    detail: str  # the stop reason, what waits, or why the lab cannot be read
    tag: str = ""
    metric_name: str = ""
    direction: str = ""
    incumbent: float | None = None
    baseline: float | None = None
    improvement_pct: float | None = None
    experiments: int = 0
    experiments_24h: int = 0
    cost_24h: float = 0.0
    best_so_far: list[float] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    updated_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def lab_state(entry: LabEntry, *, now: float | None = None, tag: str | None = None,
              points: int = 40) -> LabState:
    """The state of one lab's latest session (or ``tag``). Never raises for a missing or broken lab."""
    from nightlab import approvals
    from nightlab.ledger import Ledger

    now = time.time() if now is None else now
    lab_dir = Path(entry.path)
    if not entry.db and not (lab_dir / ".nightlab" / "ledger.db").is_file():
        what = "no session yet" if (lab_dir / "nightlab.toml").is_file() else f"{lab_dir} has no nightlab.toml"
        return LabState(entry.name, entry.path, entry.db, "idle" if "no session" in what else "missing", what)
    try:
        led = Ledger.for_lab(lab_dir, entry.db or None)
    except Exception as err:  # a broken ledger is a state to show, not a crash of the home page
        return LabState(entry.name, entry.path, entry.db, "missing", f"cannot open the ledger: {err}")
    with led:
        sessions = [s for s in led.list_sessions() if not entry.db or s.lab_path == entry.path]
        s = next((x for x in sessions if x.tag == tag), None) if tag else (
            max(sessions, key=lambda x: x.created_at) if sessions else None)
        if s is None:
            return LabState(entry.name, entry.path, entry.db, "idle", "no session yet")
        exps = led.experiments(s.id)
        pend = approvals.pending(led, s.id)
        cost_24h = _cost_since(led, s.id, now - DAY_S)
        run = _spec(led, s.id).get("run") or {}
    baseline = s.baseline_metric
    if baseline is None:
        base = next((e for e in exps if e.status.value == "keep"), None)
        baseline = base.metric if base else None
    best: list[float] = []
    cur: float | None = None
    for e in exps:
        if e.status.value == "keep" and e.metric is not None:
            cur = e.metric
        if cur is not None:
            best.append(cur)
    if len(best) > points:  # keep the shape: evenly spaced samples, the last one included
        step = (len(best) - 1) / (points - 1)
        best = [best[round(i * step)] for i in range(points)]
    last_activity = max([s.updated_at, *[(e.finished_at or e.started_at) for e in exps[-3:]]])
    state, detail = s.status, s.stop_reason
    if pend:
        state, detail = "waiting", f"{len(pend)} approval(s) waiting for you"
    elif s.status == "running":
        timeout = float(run.get("timeout_s") or 0) or float(run.get("budget_s") or 300) * 2 + 60
        quiet = now - last_activity
        if quiet > timeout * 2 + 600:
            state, detail = "stale", f"marked running, but nothing happened for {quiet / 3600:.1f} h " \
                                     f"(the harness may have died: `nightlab run --resume`)"
    return LabState(
        entry.name, entry.path, entry.db, state, detail, tag=s.tag, metric_name=s.metric_name,
        direction=s.direction.value, incumbent=s.incumbent_metric, baseline=baseline,
        improvement_pct=s.direction.improvement_pct(s.incumbent_metric, baseline), experiments=len(exps),
        experiments_24h=sum(1 for e in exps if e.started_at >= now - DAY_S), cost_24h=cost_24h,
        best_so_far=best, pending=pend, updated_at=last_activity,
    )


def _spec(led: Any, session_id: int) -> dict[str, Any]:
    from nightlab import queries

    return queries.spec_json(led, session_id)


def _cost_since(led: Any, session_id: int, since: float) -> float:
    import sqlalchemy as sa

    from nightlab.ledger import candidates, experiments

    q = (sa.select(sa.func.coalesce(sa.func.sum(candidates.c.cost_usd), 0.0))
         .select_from(candidates.join(experiments, experiments.c.id == candidates.c.experiment_id))
         .where(experiments.c.session_id == session_id, experiments.c.started_at >= since))
    with led.transaction() as conn:
        return float(conn.execute(q).scalar_one())


def labs_in_ledger(url: str) -> list[LabEntry]:
    """Every lab that has a session in the ledger at ``url`` (a shared PostgreSQL ledger)."""
    from nightlab.ledger import Ledger

    with Ledger(url) as led:
        paths = sorted({s.lab_path for s in led.list_sessions()})
    seen: set[str] = set()
    out = []
    for p in paths:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(p).name).strip("-.") or "lab"
        while name in seen:
            name += "-2"
        seen.add(name)
        out.append(LabEntry(name, p, url))
    return out


def all_labs(registry: Registry, db_urls: list[str] | None = None) -> list[LabEntry]:
    """The registered labs plus those found in shared ledgers (deduplicated by path)."""
    out = list(registry.labs)
    paths = {lab.path for lab in out}
    names = {lab.name for lab in out}
    for url in db_urls or []:
        for lab in labs_in_ledger(url):
            if lab.path in paths:
                continue
            name = lab.name
            while name in names:
                name += "-2"
            out.append(LabEntry(name, lab.path, lab.db))
            paths.add(lab.path)
            names.add(name)
    return out


def sparkline(values: list[float], direction: str = "minimize") -> str:
    """The best-so-far curve as text (for terminals): ▁ is the worst value, █ the best."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    if hi == lo:
        return bars[-1] * len(values)
    def level(v: float) -> int:
        good = (hi - v) if direction == "minimize" else (v - lo)
        return round(good / (hi - lo) * (len(bars) - 1))
    return "".join(bars[level(v)] for v in values)
