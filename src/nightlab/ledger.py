"""The ledger: sessions, experiments and candidates in one database (DESIGN.md, "Storage").

SQLAlchemy Core (Table objects, no ORM), so the storage URL picks the backend: SQLite by
default, PostgreSQL by URL. Queries are portable; JSON is stored as TEXT (``json.dumps``)
so both backends behave the same.

Contracts:

* **Durability.** Every state change is one short transaction. On SQLite the database runs
  in WAL mode with ``synchronous=FULL``: a committed row survives the writing process being
  killed (and an OS crash); readers (the dashboard, ``nightlab status``) never block the writer.
* **Thread safety.** Use one :class:`Ledger` per process. Its methods may be called from
  several threads at once: each call checks a connection out of SQLAlchemy's pool for the
  length of one transaction. On SQLite, write transactions start with ``BEGIN IMMEDIATE`` so
  concurrent writers (threads or processes) queue on ``busy_timeout`` instead of failing.
* **Idempotence.** :meth:`Ledger.start_experiment` keyed by ``(session_id, idx)`` and
  :meth:`Ledger.finish_experiment` may be repeated (tasks run at least once under Ray).
* **Migrations.** A ``schema_version`` table and the ordered :data:`MIGRATIONS` list; each
  pending migration runs in its own transaction when the ledger is opened. A ledger written
  by a newer nightlab is refused with a :class:`~nightlab.errors.LedgerError`.
* **Errors.** A file that is not a database, a folder that cannot be created, a schema that
  is too new, a write that fails (disk full, I/O error): :class:`LedgerError` with a fix.
  A failed write is never retried here (retrying after an fsync error can report success for
  data the kernel dropped); the caller stops.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine, make_url

from nightlab import escape
from nightlab.errors import LedgerError
from nightlab.types import Candidate, Direction, Experiment, Session, Status, Usage

DB_ENV = "NIGHTLAB_DB"
SESSION_STATUSES = ("running", "stopped", "finished", "failed")

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tag", sa.String(200), nullable=False, unique=True),
    sa.Column("branch", sa.Text, nullable=False),
    sa.Column("base_commit", sa.String(64), nullable=False),
    sa.Column("incumbent_commit", sa.String(64), nullable=False),
    sa.Column("incumbent_metric", sa.Double, nullable=True),
    sa.Column("baseline_metric", sa.Double, nullable=True),
    sa.Column("metric_name", sa.Text, nullable=False),
    sa.Column("direction", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stop_reason", sa.Text, nullable=False, default=""),
    sa.Column("sandbox", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("spec_hash", sa.Text, nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("lab_path", sa.Text, nullable=False),
    sa.Column("machine_json", sa.Text, nullable=False),
    sa.Column("researcher", sa.Text, nullable=False),
    sa.Column("noise_json", sa.Text, nullable=False, default="{}", server_default="{}"),
    sqlite_autoincrement=True,
)

experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("parent_commit", sa.String(64), nullable=False),
    sa.Column("commit", sa.String(64), nullable=True),
    sa.Column("metric", sa.Double, nullable=True),
    sa.Column("secondary_json", sa.Text, nullable=False),
    sa.Column("trust", sa.String(16), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("log_tail", sa.Text, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double, nullable=True),
    sa.Column("propose_s", sa.Double, nullable=False),
    sa.Column("run_s", sa.Double, nullable=False),
    sa.Column("overhead_s", sa.Double, nullable=False),
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("evidence_json", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("pid_start", sa.Double, nullable=True),
    sa.Column("worktree", sa.Text, nullable=False),
    # v4: the candidate's researcher, cost and tokens (in + out) copied here, NULL without a candidate (the
    # baseline), so that the dashboard sorts a session's experiments by them through one index
    sa.Column("sort_researcher", sa.Text, nullable=True),
    sa.Column("sort_cost_usd", sa.Double, nullable=True),
    sa.Column("sort_tokens", sa.Integer, nullable=True),
    sa.Index("ix_experiments_session_idx", "session_id", "idx", unique=True),
    sa.Index("ix_experiments_session_status", "session_id", "status"),
    sqlite_autoincrement=True,
)

candidates = sa.Table(
    "candidates",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiments.id"), nullable=False, unique=True),
    sa.Column("researcher", sa.Text, nullable=False),
    sa.Column("rationale", sa.Text, nullable=False),
    sa.Column("diff", sa.Text, nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
    sa.Column("tokens_in", sa.Integer, nullable=False),
    sa.Column("tokens_out", sa.Integer, nullable=False),
    sa.Column("tokens_cached", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Double, nullable=False),
    sa.Column("usage_s", sa.Double, nullable=False),
    sqlite_autoincrement=True,
)


runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("experiment_idx", sa.Integer, nullable=True),
    sa.Column("kind", sa.String(32), nullable=False),  # setup, run, evaluate, holdout, <sample label>
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("pid_start", sa.Double, nullable=True),
    sa.Index("ix_runs_session", "session_id"),
)
"""Every process tree nightlab started, written *before* the spawn: its ``NIGHTLAB_RUN_ID`` tag is
how ``--resume`` finds what a killed harness left running (``sandbox.kill_tagged``)."""


V4_COLUMNS = ("sort_researcher", "sort_cost_usd", "sort_tokens")  # experiments' columns that v4 added


def _migrate_1(conn: Connection) -> None:
    """v1: sessions, experiments, candidates and their indexes.

    The v1 definitions are frozen here: the current tables copied into a private MetaData, less
    the columns later migrations added (:data:`V4_COLUMNS`), so v1 keeps creating v1.
    """
    v1 = sa.MetaData()
    sessions.to_metadata(v1)
    columns = []
    for c in experiments.columns:
        if c.name not in V4_COLUMNS:
            copy = c._copy()  # a copy leaves out foreign keys bound to the table: add them back
            for fk in c.foreign_keys:
                copy.append_foreign_key(sa.ForeignKey(fk.target_fullname))
            columns.append(copy)
    sa.Table("experiments", v1, *columns,
             *(sa.Index(ix.name, *(c.name for c in ix.columns), unique=ix.unique) for ix in experiments.indexes),
             sqlite_autoincrement=True)
    candidates.to_metadata(v1)
    v1.create_all(conn, checkfirst=False)


spend = sa.Table(
    "spend",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),  # the experiment number the proposal was meant for
    sa.Column("researcher", sa.Text, nullable=False),
    sa.Column("why", sa.Text, nullable=False),
    sa.Column("tokens_in", sa.Integer, nullable=False),
    sa.Column("tokens_out", sa.Integer, nullable=False),
    sa.Column("tokens_cached", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Double, nullable=False),
    sa.Column("usage_s", sa.Double, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Index("ix_spend_session", "session_id"),
    sqlite_autoincrement=True,
)


def _migrate_2(conn: Connection) -> None:
    """v2: the ``runs`` table (run ids for crash recovery)."""
    metadata.create_all(conn, tables=[runs], checkfirst=True)


def _migrate_3(conn: Connection) -> None:
    """v3: ``spend``, the usage of proposals that never became an experiment (dropped at a stop)."""
    metadata.create_all(conn, tables=[spend], checkfirst=False)


def _migrate_4(conn: Connection) -> None:
    """v4: each experiment carries its candidate's researcher, cost and tokens (``sort_*``, back-filled from
    ``candidates``): the dashboard sorts a session by them through an index on one table instead of sorting
    the join of 100,000 rows (bench/dashboard.py, sort by cost at page 500)."""
    for name in V4_COLUMNS:
        col_type = experiments.c[name].type.compile(conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE experiments ADD COLUMN {name} {col_type}")
    fill_sort_columns(conn)


def fill_sort_columns(conn: Connection) -> None:
    """Set every experiment's ``sort_*`` columns from its candidate (NULL without one): migration 4's
    back-fill, and for tools that bulk-insert rows past :meth:`Ledger.start_experiment`."""
    c = candidates.c

    def of_candidate(expr: Any) -> Any:
        return sa.select(expr).where(c.experiment_id == experiments.c.id).scalar_subquery()

    conn.execute(experiments.update().values(sort_researcher=of_candidate(c.researcher),
                                             sort_cost_usd=of_candidate(c.cost_usd),
                                             sort_tokens=of_candidate(c.tokens_in + c.tokens_out)))


MIGRATIONS: list[Callable[[Connection], None]] = [_migrate_1, _migrate_2, _migrate_3, _migrate_4]
"""Migration ``i`` (0-based) brings the schema from version ``i`` to ``i + 1``. Append only."""

SCHEMA_VERSION = len(MIGRATIONS)

_SESSION_JSON = {"machine": "machine_json", "noise": "noise_json"}
_SESSION_COLUMNS = {c.name for c in sessions.columns} - {"id", "created_at", "updated_at"}
_EXPERIMENT_JSON = {"secondary": "secondary_json", "evidence": "evidence_json"}
_EXPERIMENT_COLUMNS = {c.name for c in experiments.columns} - {"id", "session_id"}


def _finite(x: float | None) -> float | None:
    """NaN and inf are not metrics: store NULL."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _safe(values: dict[str, Any]) -> dict[str, Any]:
    """Text a run controls (a log tail, a file name in a reason) made storable: bytes that are not
    UTF-8 as ``\\xNN``, NUL as ``\\x00`` (nightlab.escape); :func:`_dumps` does the same in JSON."""
    return {k: escape.text(v) if isinstance(v, str) else v for k, v in values.items()}


def _dumps(d: Any) -> str:
    return json.dumps(escape.deep(d if d is not None else {}), sort_keys=True, default=str)


class Ledger:
    """The database of sessions, experiments and candidates. See the module docstring.

    ``Ledger(url)`` opens (creating if needed) and migrates. Use as a context manager or
    call :meth:`close`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self._shown = parsed.render_as_string(hide_password=True)
        self._sqlite = parsed.get_backend_name() == "sqlite"
        self._path: Path | None = None
        if self._sqlite and parsed.database and parsed.database != ":memory:":
            self._path = Path(parsed.database)
            self._shown = str(self._path)
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LedgerError(
                    f"cannot create the ledger folder {self._path.parent}: {e.strerror}",
                    fix="check the path and its permissions, or pass another --db",
                ) from None
        try:
            self._engine: Engine = sa.create_engine(url)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
            raise LedgerError(f"cannot open ledger {self._shown}: {e}", fix="check the --db URL") from None
        if self._sqlite:
            event.listen(self._engine, "connect", _sqlite_on_connect)
            event.listen(self._engine, "begin", _sqlite_on_begin)
        try:
            self._migrate()
        except LedgerError:
            self._engine.dispose()
            raise
        except (exc.SQLAlchemyError, self._dbapi_error()) as e:
            self._engine.dispose()
            why = _root_message(e)
            if "locked" in why:
                fix = "another process is migrating or writing the ledger; try again in a moment"
            else:
                fix = "is it a nightlab ledger (a SQLite database)? Move the file aside or pass another --db"
            raise LedgerError(f"cannot open ledger {self._shown}: {why}", fix=fix) from None

    @classmethod
    def for_lab(cls, lab_dir: Path, url: str | None = None) -> Ledger:
        """``url``, else ``$NIGHTLAB_DB``, else SQLite at ``<lab_dir>/.nightlab/ledger.db``."""
        default = f"sqlite:///{(Path(lab_dir) / '.nightlab' / 'ledger.db').resolve()}"
        return cls(url or os.environ.get(DB_ENV) or default)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._shown!r})"

    @property
    def shown(self) -> str:
        """Where the ledger is, for messages: the SQLite file's path, or the URL without its password."""
        return self._shown

    # -- plumbing -----------------------------------------------------------------------

    def _dbapi_error(self) -> type[Exception]:
        dbapi = getattr(self._engine.dialect, "dbapi", None)
        err = getattr(dbapi, "Error", None)
        return err if isinstance(err, type) and issubclass(err, Exception) else exc.SQLAlchemyError

    @contextmanager
    def _tx_write(self) -> Iterator[Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        with self._engine.connect() as conn:
            conn.execution_options(nightlab_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """:meth:`_tx_write`, database failures raised as LedgerError."""
        try:
            with self._tx_write() as conn:
                yield conn
        except (exc.OperationalError, exc.InternalError) as e:
            raise LedgerError(
                f"ledger write failed ({self._shown}): {_root_message(e)}",
                fix="check free disk space and the disk; the session stopped so no result is lost silently",
            ) from e

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    def _stored_version(self, conn: Connection) -> int | None:
        """The schema version, or None when the database has no ``schema_version`` table."""
        if not sa.inspect(conn).has_table("schema_version"):
            return None
        version = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar_one()
        return int(version or 0)

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Connection]:
        """One transaction for modules that keep their own tables in the ledger (approvals, audit).

        ``write=True`` starts it as a write (``BEGIN IMMEDIATE`` on SQLite) and raises
        :class:`LedgerError` when the database fails, as the ledger's own writes do.
        """
        if write:
            with self._write() as conn:
                yield conn
        else:
            with self._read() as conn:
                yield conn

    def _migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION`, one transaction per migration.

        An up-to-date ledger is only read, so opening one never waits for a busy writer.
        """
        with self._read() as conn:
            version = self._stored_version(conn)
        while version != SCHEMA_VERSION:
            if version is not None and version > SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger {self._shown} has schema version {version}, "
                    f"this nightlab knows up to {SCHEMA_VERSION}",
                    fix="upgrade nightlab (pip install -U nightlab)",
                )
            with self._tx_write() as conn:
                # re-read under the write lock: another process may have migrated meanwhile
                version = self._stored_version(conn)
                if version is None:
                    schema_version.create(conn)
                    conn.execute(schema_version.insert().values(version=0))
                    version = 0
                if version < SCHEMA_VERSION:
                    MIGRATIONS[version](conn)
                    version += 1
                    conn.execute(schema_version.update().values(version=version))

    def ensure_tables(self, meta: sa.MetaData) -> None:
        """Create the tables of a module's own ``meta`` (approvals, comparisons) when missing: once per
        ledger object, idempotent and safe across processes (``checkfirst``)."""
        ready: set[int] = self.__dict__.setdefault("_tables_ready", set())
        if id(meta) in ready:
            return
        with self.transaction(write=True) as conn:
            meta.create_all(conn, checkfirst=True)
        ready.add(id(meta))

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar_one())

    # -- sessions -----------------------------------------------------------------------

    def create_session(
        self,
        *,
        tag: str,
        branch: str,
        base_commit: str,
        metric_name: str,
        direction: Direction,
        sandbox: str,
        spec_hash: str,
        spec_json: str,
        lab_path: str,
        machine: dict[str, Any],
        researcher: str,
    ) -> Session:
        """A new running session whose incumbent is ``base_commit``. A taken tag -> LedgerError."""
        now = time.time()
        values = dict(
            tag=tag,
            branch=branch,
            base_commit=base_commit,
            incumbent_commit=base_commit,
            incumbent_metric=None,
            baseline_metric=None,
            metric_name=metric_name,
            direction=Direction(direction).value,
            status="running",
            stop_reason="",
            sandbox=sandbox,
            created_at=now,
            updated_at=now,
            spec_hash=spec_hash,
            spec_json=spec_json,
            lab_path=lab_path,
            machine_json=_dumps(machine),
            researcher=researcher,
            noise_json="{}",
        )
        row = None
        try:
            with self._write() as conn:
                taken = conn.execute(sa.select(sessions.c.id).where(sessions.c.tag == tag)).first()
                if taken is None:
                    sid = _inserted_id(conn.execute(sessions.insert().values(**_safe(values))))
                    row = conn.execute(sa.select(sessions).where(sessions.c.id == sid)).one()
        except exc.IntegrityError:
            row = None
        if row is None:
            raise LedgerError(
                f"session '{tag}' exists",
                fix="continue it with --resume, or start a new one with --tag NAME",
            )
        return _session(row)

    def get_session(self, tag: str) -> Session | None:
        with self._read() as conn:
            row = conn.execute(sa.select(sessions).where(sessions.c.tag == tag)).first()
        return _session(row) if row is not None else None

    def get_session_by_id(self, session_id: int) -> Session | None:
        with self._read() as conn:
            row = conn.execute(sa.select(sessions).where(sessions.c.id == session_id)).first()
        return _session(row) if row is not None else None

    def latest_session(self) -> Session | None:
        """The most recently created session."""
        with self._read() as conn:
            row = conn.execute(sa.select(sessions).order_by(sessions.c.id.desc()).limit(1)).first()
        return _session(row) if row is not None else None

    def list_sessions(self) -> list[Session]:
        """All sessions, oldest first."""
        with self._read() as conn:
            rows = conn.execute(sa.select(sessions).order_by(sessions.c.id)).all()
        return [_session(r) for r in rows]

    def session_json(self, session_id: int) -> tuple[str, dict[str, Any]]:
        """``(spec_json, noise)`` of a session: the stored spec text and the noise record."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(sessions.c.spec_json, sessions.c.noise_json).where(sessions.c.id == session_id)
            ).first()
        if row is None:
            raise LedgerError(f"no session with id {session_id} in {self._shown}")
        return row.spec_json, json.loads(row.noise_json or "{}")

    def update_session(self, session_id: int, **fields: Any) -> Session:
        """Set columns of a session; ``updated_at`` is set to now.

        Known columns only (``TypeError`` otherwise). ``machine=``, ``noise=`` take dicts;
        ``direction`` a :class:`Direction`; metrics that are NaN/inf are stored as NULL;
        ``status`` is one of ``running``, ``stopped``, ``finished``, ``failed``.
        """
        values: dict[str, Any] = {}
        for key, value in fields.items():
            if key in _SESSION_JSON:
                values[_SESSION_JSON[key]] = _dumps(value)
            elif key in _SESSION_COLUMNS:
                values[key] = value
            else:
                raise TypeError(f"update_session() got an unknown field {key!r}")
        if "status" in values and values["status"] not in SESSION_STATUSES:
            raise ValueError(f"session status must be one of {SESSION_STATUSES}, not {values['status']!r}")
        if "direction" in values:
            values["direction"] = Direction(values["direction"]).value
        for key in ("incumbent_metric", "baseline_metric"):
            if key in values:
                values[key] = _finite(values[key])
        values["updated_at"] = time.time()
        with self._write() as conn:
            n = conn.execute(sessions.update().where(sessions.c.id == session_id).values(**_safe(values))).rowcount
            row = conn.execute(sa.select(sessions).where(sessions.c.id == session_id)).first()
        if n == 0 or row is None:
            raise LedgerError(f"no session with id {session_id} in {self._shown}")
        return _session(row)

    # -- experiments --------------------------------------------------------------------

    def next_idx(self, session_id: int) -> int:
        """One more than the session's highest ``idx`` (0 when it has none: the baseline)."""
        with self._read() as conn:
            top = conn.execute(
                sa.select(sa.func.max(experiments.c.idx)).where(experiments.c.session_id == session_id)
            ).scalar_one()
        return 0 if top is None else int(top) + 1

    def start_experiment(
        self,
        session_id: int,
        *,
        idx: int,
        parent_commit: str,
        seed: int,
        candidate: Candidate | None,
        description: str,
        propose_s: float,
        worktree: str = "",
        started_at: float | None = None,
        commit: str | None = None,
        diff: str | None = None,
        pid: int | None = None,
        pid_start: int | None = None,
    ) -> int:
        """Insert a running experiment and its candidate in one transaction; return its id.

        ``commit`` and ``diff`` (the canonical diff git computed, which replaces the candidate's):
        the experiment's commit, when it is made before the row (staging.py). ``pid``, ``pid_start``: the run's
        process, when the row is written right after its spawn (pipeline.py).

        Idempotent: when ``(session_id, idx)`` exists already, nothing is written and the
        existing id is returned.
        """
        exp_values = dict(
            session_id=session_id,
            idx=idx,
            status=Status.RUNNING.value,
            parent_commit=parent_commit,
            commit=commit,
            metric=None,
            secondary_json="{}",
            trust="inline",
            description=description,
            reason="",
            log_tail="",
            seed=seed,
            started_at=time.time() if started_at is None else started_at,
            finished_at=None,
            propose_s=float(propose_s),
            run_s=0.0,
            overhead_s=0.0,
            exit_code=None,
            evidence_json="{}",
            pid=pid,
            pid_start=pid_start,
            worktree=worktree,
            **_sort_values(candidate),
        )
        where = (experiments.c.session_id == session_id) & (experiments.c.idx == idx)
        try:
            with self._write() as conn:
                existing = conn.execute(sa.select(experiments.c.id).where(where)).scalar_one_or_none()
                if existing is not None:
                    return int(existing)
                exp_id = _inserted_id(conn.execute(experiments.insert().values(**_safe(exp_values))))
                if candidate is not None:
                    shown = candidate if diff is None else replace(candidate, diff=escape.text(diff))
                    conn.execute(candidates.insert().values(**_candidate_values(exp_id, shown)))
                return exp_id
        except exc.IntegrityError as e:
            # another writer inserted the same (session_id, idx) between our check and insert
            # (possible on backends without BEGIN IMMEDIATE); the other row stands
            with self._read() as conn:
                existing = conn.execute(sa.select(experiments.c.id).where(where)).scalar_one_or_none()
            if existing is None:
                raise LedgerError(
                    f"cannot start experiment {idx} of session {session_id} in {self._shown}: "
                    f"{_root_message(e)}",
                    fix="is the session id right?",
                ) from e
            return int(existing)

    def update_experiment(self, exp_id: int, **fields: Any) -> None:
        """Set columns of an experiment (``commit``, ``pid``, ``pid_start``, ``worktree``, ...).

        ``secondary=`` and ``evidence=`` take dicts; ``status`` a :class:`Status`; a NaN/inf
        ``metric`` is stored as NULL. ``diff=`` sets the candidate's diff (the canonical diff
        git computed), creating an empty candidate row when the experiment has none.
        Unknown fields raise ``TypeError``; an unknown ``exp_id`` raises LedgerError.
        """
        values: dict[str, Any] = {}
        diff = fields.pop("diff", None)
        for key, value in fields.items():
            if key in _EXPERIMENT_JSON:
                values[_EXPERIMENT_JSON[key]] = _dumps(value)
            elif key in _EXPERIMENT_COLUMNS:
                values[key] = value
            else:
                raise TypeError(f"update_experiment() got an unknown field {key!r}")
        if "status" in values:
            values["status"] = Status(values["status"]).value
        if "metric" in values:
            values["metric"] = _finite(values["metric"])
        with self._write() as conn:
            found = conn.execute(sa.select(experiments.c.id).where(experiments.c.id == exp_id)).first()
            if found is None:
                raise LedgerError(f"no experiment with id {exp_id} in {self._shown}")
            if values:
                conn.execute(experiments.update().where(experiments.c.id == exp_id).values(**_safe(values)))
            if diff is not None:
                diff = escape.text(diff)
                n = conn.execute(
                    candidates.update().where(candidates.c.experiment_id == exp_id).values(diff=diff)
                ).rowcount
                if n == 0:
                    empty = Candidate(parent="", rationale="", diff=diff)
                    conn.execute(candidates.insert().values(**_candidate_values(exp_id, empty)))
                    conn.execute(experiments.update().where(experiments.c.id == exp_id)
                                 .values(**_safe(_sort_values(empty))))

    def finish_experiment(
        self,
        exp_id: int,
        *,
        status: Status,
        metric: float | None = None,
        secondary: dict[str, Any] | None = None,
        trust: str = "inline",
        reason: str = "",
        log_tail: str = "",
        run_s: float = 0.0,
        overhead_s: float = 0.0,
        exit_code: int | None = None,
        evidence: dict[str, Any] | None = None,
        commit: str | None = None,
        finished_at: float | None = None,
        incumbent: tuple[str, float] | None = None,
    ) -> Experiment:
        """Record the outcome of an experiment in one transaction and return it as read back.

        With ``incumbent=(commit, metric)`` (a keep) the session's incumbent moves in the
        same transaction, so the ledger never shows a keep without its incumbent or the
        reverse. A NaN/inf metric is stored as NULL. ``commit=None`` leaves the stored
        commit as it is. Repeating the call rewrites the same values.
        """
        values: dict[str, Any] = dict(
            status=Status(status).value,
            metric=_finite(metric),
            secondary_json=_dumps(secondary),
            trust=trust,
            reason=reason,
            log_tail=log_tail,
            run_s=float(run_s),
            overhead_s=float(overhead_s),
            exit_code=exit_code,
            evidence_json=_dumps(evidence),
            finished_at=time.time() if finished_at is None else finished_at,
        )
        if commit is not None:
            values["commit"] = commit
        with self._write() as conn:
            session_id = conn.execute(
                sa.select(experiments.c.session_id).where(experiments.c.id == exp_id)
            ).scalar_one_or_none()
            if session_id is None:
                raise LedgerError(f"no experiment with id {exp_id} in {self._shown}")
            conn.execute(experiments.update().where(experiments.c.id == exp_id).values(**_safe(values)))
            if incumbent is not None:
                inc_commit, inc_metric = incumbent
                conn.execute(
                    sessions.update()
                    .where(sessions.c.id == session_id)
                    .values(
                        incumbent_commit=inc_commit,
                        incumbent_metric=_finite(inc_metric),
                        updated_at=time.time(),
                    )
                )
            row = conn.execute(_experiment_select().where(experiments.c.id == exp_id)).one()
        return _experiment(row)

    def get_experiment(self, session_id: int, idx: int) -> Experiment | None:
        with self._read() as conn:
            row = conn.execute(
                _experiment_select().where(experiments.c.session_id == session_id, experiments.c.idx == idx)
            ).first()
        return _experiment(row) if row is not None else None

    def experiments(
        self,
        session_id: int,
        *,
        status: Status | None = None,
        limit: int | None = None,
        offset: int = 0,
        order: str = "asc",
    ) -> list[Experiment]:
        """A session's experiments by ``idx`` (``order`` "asc" or "desc"), optionally one status."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        q = _experiment_select().where(experiments.c.session_id == session_id)
        if status is not None:
            q = q.where(experiments.c.status == Status(status).value)
        q = q.order_by(experiments.c.idx.asc() if order == "asc" else experiments.c.idx.desc())
        if limit is not None:
            q = q.limit(limit)
        if offset:
            q = q.offset(offset)
        with self._read() as conn:
            rows = conn.execute(q).all()
        return [_experiment(r) for r in rows]

    def experiments_by_id(self, ids: Sequence[int]) -> list[Experiment]:
        """The experiments with these ledger ids (any order; ids not found are left out)."""
        if not ids:
            return []
        with self._read() as conn:
            rows = conn.execute(_experiment_select().where(experiments.c.id.in_(list(ids)))).all()
        return [_experiment(r) for r in rows]

    def kept(self, session_id: int, commit: str) -> Experiment | None:
        """The latest kept experiment of the session whose commit is ``commit`` (one row read, whatever
        the session's length: the engine's decisions ask this instead of loading every keep)."""
        q = (_experiment_select()
             .where(experiments.c.session_id == session_id, experiments.c.status == Status.KEEP.value,
                    experiments.c.commit == commit)
             .order_by(experiments.c.idx.desc()).limit(1))
        with self._read() as conn:
            row = conn.execute(q).first()
        return _experiment(row) if row is not None else None

    def count_experiments(self, session_id: int, status: Status | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(experiments).where(experiments.c.session_id == session_id)
        if status is not None:
            q = q.where(experiments.c.status == Status(status).value)
        with self._read() as conn:
            return int(conn.execute(q).scalar_one())

    def count_by_status(self, session_id: int) -> dict[Status, int]:
        """How many experiments of the session have each status (statuses with none left out)."""
        q = (
            sa.select(experiments.c.status, sa.func.count())
            .where(experiments.c.session_id == session_id)
            .group_by(experiments.c.status)
        )
        with self._read() as conn:
            return {Status(s): int(n) for s, n in conn.execute(q).all()}

    def orphaned(self, session_id: int) -> list[Experiment]:
        """Experiments still marked running (after a crash of the harness, these are stale)."""
        return self.experiments(session_id, status=Status.RUNNING)

    def record_spend(self, session_id: int, idx: int, researcher: str, usage: Usage, why: str) -> None:
        """The usage of a proposal that did not become an experiment (dropped at a stop)."""
        with self._write() as conn:
            conn.execute(spend.insert().values(
                session_id=session_id, idx=idx, researcher=researcher, why=why[:500],
                tokens_in=int(usage.tokens_in), tokens_out=int(usage.tokens_out),
                tokens_cached=int(usage.tokens_cached), cost_usd=float(usage.cost_usd),
                usage_s=float(usage.seconds), at=time.time()))

    def spend_totals(self, session_id: int) -> Usage:
        """The summed usage of the session's dropped proposals (see :meth:`record_spend`)."""
        c = spend.c
        q = sa.select(
            sa.func.coalesce(sa.func.sum(c.tokens_in), 0), sa.func.coalesce(sa.func.sum(c.tokens_out), 0),
            sa.func.coalesce(sa.func.sum(c.tokens_cached), 0), sa.func.coalesce(sa.func.sum(c.cost_usd), 0.0),
            sa.func.coalesce(sa.func.sum(c.usage_s), 0.0),
        ).where(c.session_id == session_id)
        with self._read() as conn:
            t_in, t_out, t_cached, cost, secs = conn.execute(q).one()
        return Usage(int(t_in), int(t_out), int(t_cached), float(cost), float(secs))
    # -- runs (process trees, for crash recovery) -------------------------------------------

    def record_run(self, session_id: int, run_id: str, kind: str, experiment_idx: int | None = None) -> None:
        """Record a run id before its process starts (committed when this returns)."""
        with self._write() as conn:
            conn.execute(runs.insert().values(run_id=run_id, session_id=session_id, kind=kind,
                                              experiment_idx=experiment_idx, started_at=time.time()))

    def set_run_pid(self, run_id: str, pid: int, pid_start: int | None) -> None:
        with self._write() as conn:
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(pid=pid, pid_start=pid_start))

    def runs(self, session_id: int) -> list[dict[str, Any]]:
        """The session's runs, oldest first: ``run_id, kind, experiment_idx, started_at, pid, pid_start``."""
        q = sa.select(runs).where(runs.c.session_id == session_id).order_by(runs.c.started_at)
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def usage_totals(self, session_id: int) -> Usage:
        """The summed usage of every candidate of the session, dropped proposals included."""
        c = candidates.c
        q = (
            sa.select(
                sa.func.coalesce(sa.func.sum(c.tokens_in), 0),
                sa.func.coalesce(sa.func.sum(c.tokens_out), 0),
                sa.func.coalesce(sa.func.sum(c.tokens_cached), 0),
                sa.func.coalesce(sa.func.sum(c.cost_usd), 0.0),
                sa.func.coalesce(sa.func.sum(c.usage_s), 0.0),
            )
            .select_from(candidates.join(experiments, experiments.c.id == c.experiment_id))
            .where(experiments.c.session_id == session_id)
        )
        with self._read() as conn:
            t_in, t_out, t_cached, cost, secs = conn.execute(q).one()
        return Usage(int(t_in), int(t_out), int(t_cached), float(cost), float(secs)) + self.spend_totals(session_id)


# -- rows <-> dataclasses ---------------------------------------------------------------


def _sort_values(cand: Candidate | None) -> dict[str, Any]:
    """The experiment's copies of its candidate's researcher, cost and tokens (schema v4; NULL without one)."""
    if cand is None:
        return dict(sort_researcher=None, sort_cost_usd=None, sort_tokens=None)
    u = cand.usage
    return dict(sort_researcher=cand.researcher, sort_cost_usd=float(u.cost_usd),
                sort_tokens=int(u.tokens_in) + int(u.tokens_out))


def _candidate_values(exp_id: int, cand: Candidate) -> dict[str, Any]:
    u = cand.usage
    return _safe(dict(
        experiment_id=exp_id,
        researcher=cand.researcher,
        rationale=cand.rationale,
        diff=cand.diff or "",
        params_json=_dumps(cand.params),
        tokens_in=int(u.tokens_in),
        tokens_out=int(u.tokens_out),
        tokens_cached=int(u.tokens_cached),
        cost_usd=float(u.cost_usd),
        usage_s=float(u.seconds),
    ))


def _experiment_select() -> sa.Select[Any]:
    c = candidates.c
    return sa.select(
        experiments,
        c.researcher,
        c.rationale,
        c.diff,
        c.params_json,
        c.tokens_in,
        c.tokens_out,
        c.tokens_cached,
        c.cost_usd,
        c.usage_s,
    ).select_from(experiments.outerjoin(candidates, candidates.c.experiment_id == experiments.c.id))


def _experiment(r: sa.Row[Any]) -> Experiment:
    return Experiment(
        id=r.id,
        session_id=r.session_id,
        idx=r.idx,
        status=Status(r.status),
        parent_commit=r.parent_commit,
        commit=r.commit,
        metric=r.metric,
        secondary=json.loads(r.secondary_json or "{}"),
        trust=r.trust,
        description=r.description,
        reason=r.reason,
        log_tail=r.log_tail,
        seed=r.seed,
        started_at=r.started_at,
        finished_at=r.finished_at,
        propose_s=r.propose_s,
        run_s=r.run_s,
        overhead_s=r.overhead_s,
        exit_code=r.exit_code,
        evidence=json.loads(r.evidence_json or "{}"),
        researcher=r.researcher or "",
        rationale=r.rationale or "",
        diff=r.diff or "",
        params=json.loads(r.params_json or "{}"),
        usage=Usage(
            int(r.tokens_in or 0),
            int(r.tokens_out or 0),
            int(r.tokens_cached or 0),
            float(r.cost_usd or 0.0),
            float(r.usage_s or 0.0),
        ),
        pid=r.pid,
        pid_start=r.pid_start,
        worktree=r.worktree,
    )


def _session(r: sa.Row[Any]) -> Session:
    return Session(
        id=r.id,
        tag=r.tag,
        branch=r.branch,
        base_commit=r.base_commit,
        incumbent_commit=r.incumbent_commit,
        incumbent_metric=r.incumbent_metric,
        baseline_metric=r.baseline_metric,
        metric_name=r.metric_name,
        direction=Direction(r.direction),
        status=r.status,
        stop_reason=r.stop_reason,
        sandbox=r.sandbox,
        created_at=r.created_at,
        updated_at=r.updated_at,
        spec_hash=r.spec_hash,
        lab_path=r.lab_path,
        machine=json.loads(r.machine_json or "{}"),
        researcher=r.researcher,
    )


# -- SQLite connection setup --------------------------------------------------------------


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_on_begin), so DDL is transactional too
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get("nightlab_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])


def _root_message(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    return str(orig if orig is not None else e).strip()
