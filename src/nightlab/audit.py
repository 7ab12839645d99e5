"""The audit log: an append-only, hash-chained JSON-lines record of every action taken.

One file per lab, ``.nightlab/audit.jsonl``. Each line is one record in canonical JSON
(sorted keys, no whitespace, ASCII only)::

    {"data":{...},"experiment":3,"hash":"…","kind":"decision","prev_hash":"…","seq":42,
     "session":"nov23","time":"2026-11-23T01:02:03.456789Z","v":1}

Contracts:

* **Chain.** ``hash = sha256(b"nightlab-audit-v1\\x00" + canonical(record without "hash"))``
  (a domain-separation prefix, as RFC 6962 does for its leaves); ``prev_hash`` is the hash of
  the record before (64 zeros for the first); ``seq`` counts from 1 without gaps. The first
  record (``audit.init``) carries a random nonce; its hash is the log's id.
* **Durability.** Each record is written with one ``write`` before :meth:`AuditLog.emit` returns:
  from then on it survives a kill of the harness (SIGKILL included; the kernel holds it). By
  default (``flush_after=None``) it is also ``fsync``-ed before ``emit`` returns. With
  ``flush_after=S`` (the engine: 0.1 s) records are *grouped*: ``fsync``-ed and anchored together
  at the next record of ``anchor_kinds`` (before ``emit`` returns), or by a background flusher
  ``S`` seconds after the first record still unsynced, or on :meth:`close` -- one ``fsync`` and
  one ledger anchor for all the records of a fast experiment instead of one per record. The
  ledger anchor is written only after the ``fsync`` it vouches for, so a power cut never leaves
  the ledger counting records the file lost. A failed write or fsync raises :class:`AuditError`
  and the writer refuses every later record: it never retries (a retried fsync can report success
  for data the kernel dropped). What a SIGKILL or a power cut can lose: docs/security.md,
  "Durability".
* **Crash recovery.** A last line without its newline is a torn write: on open it is cut
  off and a ``recover`` record saying so (length and sha256 of the cut bytes) is appended.
  A complete last line that does not verify is not a torn write: opening refuses.
* **Anchors.** A plain chain cannot tell a log whose tail was cut from a shorter log. Every
  ``checkpoint_every`` records (and at session stop) a ``checkpoint`` record names the count
  and head hash before it, signed with ed25519 when signing is on; the latest checkpoint is
  also written beside the log (``audit.anchor.json``), and the ledger stores the record count
  and head after every record of the kinds it is told to anchor (:func:`store_head`; the engine
  anchors every decision, approval and session event and the start of every proposal, experiment
  and run). :func:`verify` checks all three and reports how many records follow the last anchor
  (:attr:`VerifyResult.unanchored`): those alone can be cut without a trace. :meth:`AuditLog.check_anchor`
  refuses to append to a log shorter than its ledger anchor (a resume after a cut tail).
* **Secrets.** String values under secret-looking keys, values of secret-looking environment
  variables, token-shaped strings and the values of any ``env`` mapping are replaced by
  ``[redacted…]`` before a record is built.
* **Writers.** Appends take an exclusive ``flock`` on the file, so several processes may
  append to one log (each re-reads the head when the file grew under it).

Not covered: someone who can write the lab folder, the ledger *and* the signing key can
rewrite history consistently. Keep a copy of the public key (and ideally of the log) off
the machine; ``nightlab audit verify --public-key`` checks against that copy.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from nightlab import escape
from nightlab.errors import NightlabError
from nightlab.redaction import env_secrets, redact

VERSION = 1
DOMAIN = b"nightlab-audit-v1\x00"
CHECKPOINT_DOMAIN = b"nightlab-audit-checkpoint-v1\x00"
GENESIS = "0" * 64
LOG_FILE = "audit.jsonl"
ANCHOR_FILE = "audit.anchor.json"
KEY_FILE = "audit_ed25519"
INSTALL_HINT = "pip install 'nightlab[audit]' (it adds the cryptography package)"

SECRET_KEY = re.compile(
    r"(^|[_\-.])(api_?key|token|secret|password|passwd|credentials?|private_?key|authorization|cookie)$", re.I
)
TOKEN_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}"
    r"|xox[abpr]-[A-Za-z0-9\-]{10,}|(?i:bearer)\s+[A-Za-z0-9._\-]{16,})"
)


class AuditError(NightlabError):
    """The audit log cannot be written or opened. The session stops: nothing runs unrecorded."""


# --------------------------------------------------------------------------- canonical form


def _plain(value: Any) -> Any:
    """JSON-able copy: non-finite floats as strings, tuples as lists, other objects as str; text
    escaped as the ledger stores it (bytes that are not UTF-8 as ``\\xNN``; nightlab.escape)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return escape.text(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, Mapping):
        return {escape.text(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    return str(value)


def canonical(record: Mapping[str, Any]) -> bytes:
    """The record's one byte form: sorted keys, no whitespace, ASCII, no NaN."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 over the domain prefix and the canonical record without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(DOMAIN + canonical(body)).hexdigest()


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    """An ISO 8601 time (``Z`` or offset; naive means UTC) as a unix timestamp."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# --------------------------------------------------------------------------- secrets


class Scrubber:
    """Replaces secrets in event data (see the module docstring). Built once per log.

    The environment's secret values are those of :func:`nightlab.redaction.env_secrets`, the rule
    the ledger's log tails and the stored prompts use too: secret-looking names, and the variables
    runs do not get (``DATABASE_URL``, ``NIGHTLAB_DB``, ...).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        # the one rule of nightlab.redaction: secret-named values and values runs do not get
        self.values = env_secrets(environ)  # (value, name), longest first

    def __call__(self, value: Any, key: str = "") -> Any:
        if isinstance(value, str):
            if key and SECRET_KEY.search(key) and value:
                return "[redacted]"
            value = redact(value, self.values, mark=lambda name: f"[redacted:{name}]")
            return TOKEN_SHAPES.sub("[redacted:token]", value)
        if isinstance(value, Mapping):
            if key.lower() in ("env", "environ", "environment"):
                return {str(k): "[redacted]" for k in value}
            return {str(k): self(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self(v, key) for v in value]
        return value


# --------------------------------------------------------------------------- signing


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise AuditError("signing the audit log needs the cryptography package", INSTALL_HINT) from None
    return ed25519


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def key_id(public_key: Any) -> str:
    """A short fingerprint of an ed25519 public key (first 16 hex of sha256 of its raw bytes)."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def load_public_key(path: Path | str) -> Any:
    """An ed25519 public key from a PEM file (as written beside the private key)."""
    _crypto()
    from cryptography.hazmat.primitives import serialization

    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (OSError, ValueError) as e:
        raise AuditError(f"cannot read the public key {p}: {e}",
                         "pass the .pub file written beside the key") from None
    return key


class Signer:
    """An ed25519 key under ``<keys_dir>/audit_ed25519`` (mode 0600; public key in ``.pub``)."""

    def __init__(self, private_key: Any, path: Path) -> None:
        self._key = private_key
        self.path = path
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> Signer:
        ed25519 = _crypto()
        from cryptography.hazmat.primitives import serialization

        keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(keys_dir, 0o700)
        path = keys_dir / KEY_FILE
        pub = path.with_name(KEY_FILE + ".pub")
        if not path.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
            return cls(key, path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise AuditError(f"the audit signing key {path} is readable by others (mode {mode:o})",
                             f"chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as e:
            raise AuditError(f"cannot read the audit signing key {path}: {e}",
                             "move it aside; a new key is made on the next run") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise AuditError(f"{path} is not an ed25519 key",
                             "move it aside; a new key is made on the next run")
        return cls(key, path)

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._key.sign(message)).decode()


def checkpoint_message(log_id: str, count: int, head: str) -> bytes:
    """What a checkpoint signature covers: the log's id, a record count and that record's hash."""
    return CHECKPOINT_DOMAIN + canonical({"count": count, "head": head, "log": log_id})


def _verify_sig(public_key: Any, signature: str, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- ledger anchor

_meta = sa.MetaData()
audit_heads = sa.Table(
    "audit_heads",
    _meta,
    sa.Column("log_id", sa.String(64), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("head", sa.String(64), nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)


def _ensure_table(ledger: Any) -> None:
    if getattr(ledger, "_audit_heads_ready", False):
        return
    with ledger.transaction(write=True) as conn:
        _meta.create_all(conn, checkfirst=True)
    ledger._audit_heads_ready = True


def store_head(ledger: Any, log_id: str, count: int, head: str) -> None:
    """Record in the ledger that log ``log_id`` holds ``count`` records ending in ``head``."""
    _ensure_table(ledger)
    with ledger.transaction(write=True) as conn:
        n = conn.execute(audit_heads.update().where(audit_heads.c.log_id == log_id)
                         .values(count=count, head=head, updated_at=time.time())).rowcount
        if n == 0:
            conn.execute(audit_heads.insert().values(log_id=log_id, count=count, head=head,
                                                     updated_at=time.time()))


def ledger_head(ledger: Any, log_id: str) -> tuple[int, str] | None:
    """``(count, head)`` the ledger holds for a log, or None."""
    _ensure_table(ledger)
    with ledger.transaction() as conn:
        row = conn.execute(sa.select(audit_heads.c.count, audit_heads.c.head)
                           .where(audit_heads.c.log_id == log_id)).first()
    return (int(row[0]), str(row[1])) if row is not None else None


# --------------------------------------------------------------------------- writing


def _check_line(line: bytes) -> dict[str, Any] | None:
    """The record of one complete line when it is canonical and its hash verifies, else None."""
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or canonical(rec) != line or rec.get("hash") != record_hash(rec):
        return None
    return rec


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """The writer. Implements :class:`~nightlab.events.EventSink`. See the module docstring.

    ``anchor(log_id, count, head)`` is called after every record of ``anchor_kinds`` (the engine
    stores it in the ledger), and with ``flush_after`` after every grouped flush; ``anchored(log_id)``
    returns what was stored, checked on open (:meth:`check_anchor`); ``signer`` signs checkpoints.
    Thread-safe (appends are serialised by a lock; a flush's ``fsync`` and anchor run outside it, so
    other threads go on appending meanwhile) and safe across processes (``flock``).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        checkpoint_every: int = 100,
        signer: Signer | None = None,
        anchor: Callable[[str, int, str], None] | None = None,
        anchor_kinds: frozenset[str] | None = None,
        environ: Mapping[str, str] | None = None,
        anchored: Callable[[str], tuple[int, str] | None] | None = None,
        flush_after: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.flush_after = flush_after
        self._mu = threading.RLock()  # appends (the chain's head) within this process
        self._flush_mu = threading.Lock()  # one flush at a time: anchors never go backwards
        self._wake = threading.Condition(self._mu)
        self._synced = 0  # records known to be fsynced (and anchored, in grouped mode)
        self._unsynced_since: float | None = None  # monotonic time of the oldest unsynced record
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._anchor_file_mu = threading.Lock()
        self._anchor_file_count = 0
        self.checkpoint_every = checkpoint_every
        self.signer = signer
        self.anchor = anchor
        self.anchor_kinds = anchor_kinds
        self.scrub = Scrubber(environ)
        self.session = ""
        self.count = 0
        self.head = GENESIS
        self.log_id = ""
        self._end = 0
        self._since_checkpoint = 0
        self._failed: str = ""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise AuditError(f"cannot open the audit log {self.path}: {e.strerror}",
                             "check the lab folder's permissions and free space") from None
        try:
            with self._mu:
                self._open(anchored)
        except AuditError:
            self.close()
            raise
        if flush_after is not None:
            self._flusher = threading.Thread(target=self._flush_loop, name="nightlab-audit-flush", daemon=True)
            self._flusher.start()

    def _open(self, anchored: Callable[[str], tuple[int, str] | None] | None) -> None:
        with self._locked():
            recovered = self._load()
            self._synced = self.count  # what the file held before this writer
            if anchored is not None and self.log_id:  # before any append re-anchors the log
                self.check_anchor(anchored(self.log_id))
            if self.count == 0:
                self._append_locked("audit.init", None, {
                    "nonce": secrets.token_hex(16), "version": VERSION, "host": socket.gethostname(),
                    "path": str(self.path.resolve()),
                    "signing_key": self.signer.key_id if self.signer else None,
                })
            if recovered:
                self._append_locked("recover", None, recovered)

    # -- file state --------------------------------------------------------------------

    def _locked(self) -> Any:
        log = self

        class _Lock:
            def __enter__(self) -> None:
                fcntl.flock(log._fd, fcntl.LOCK_EX)

            def __exit__(self, *exc: object) -> None:
                fcntl.flock(log._fd, fcntl.LOCK_UN)

        return _Lock()

    def _load(self) -> dict[str, Any] | None:
        """Read the head (count, hash, id) from the file; cut a torn last line. Lock held."""
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        recovered = None
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            torn = data[cut:]
            os.ftruncate(self._fd, cut)
            self._fsync()
            data = data[:cut]
            recovered = {"reason": "torn last line removed (an interrupted write)", "bytes": len(torn),
                         "sha256": hashlib.sha256(torn).hexdigest(), "offset": cut}
        self._end = len(data)
        if not data:
            self.count, self.head, self.log_id = 0, GENESIS, ""
            return recovered
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        last = _check_line(data[last_start:-1])
        if last is None:
            raise AuditError(f"the last record of the audit log {self.path} is corrupt (not a torn write)",
                             "run `nightlab audit verify` to see what broke; "
                             "move the log aside to start a new one")
        first = _check_line(data[: data.find(b"\n")])
        if first is None:
            raise AuditError(f"the first record of the audit log {self.path} is corrupt",
                             "run `nightlab audit verify`; move the log aside to start a new one")
        self.count, self.head, self.log_id = int(last["seq"]), str(last["hash"]), str(first["hash"])
        return recovered

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            self._failed = f"fsync failed: {e.strerror}"
            raise AuditError(f"the audit log {self.path}: {self._failed}",
                             "check the disk; the session stopped so nothing runs unrecorded") from None

    # -- appending ---------------------------------------------------------------------

    def emit(self, kind: str, *, experiment: int | None = None, **data: Any) -> None:
        with self._mu:
            if kind in ("session.start", "session.resume") and data.get("tag"):
                self.session = str(data["tag"])
            self.append(kind, experiment, data)
            due = self.checkpoint_every and self._since_checkpoint >= self.checkpoint_every
            checkpoint = self._checkpoint_record() if kind == "session.stop" or due else None
        if checkpoint is not None:  # outside the append lock: its flush may fsync
            self._write_anchor_file(checkpoint)
        elif self.flush_after is not None and (self.anchor_kinds is None or kind in self.anchor_kinds):
            self.flush()

    def append(self, kind: str, experiment: int | None, data: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record (scrubbed) and, unless grouped (``flush_after``), fsync it and update the
        anchors. Returns the record."""
        with self._mu:
            if self._failed:
                raise AuditError(f"the audit log {self.path} stopped accepting records: {self._failed}",
                                 "check the disk, then resume the session")
            with self._locked():
                if os.fstat(self._fd).st_size != self._end:  # another writer appended
                    recovered = self._load()
                    if recovered:
                        self._append_locked("recover", None, recovered)
                rec = self._append_locked(kind, experiment, data)
            return rec

    def flush(self) -> None:
        """Grouped mode: fsync every record written so far, then anchor the last one in the ledger.
        The ``fsync`` and the ledger write run outside the append lock (other threads append meanwhile;
        ``fsync`` covers what was written before it). Raises :class:`AuditError` when the fsync fails."""
        with self._flush_mu:
            with self._mu:
                if self._failed:
                    raise AuditError(f"the audit log {self.path} stopped accepting records: {self._failed}",
                                     "check the disk, then resume the session")
                count, head, log_id = self.count, self.head, self.log_id
                if count <= self._synced or self._fd < 0:
                    return
            self._fsync()
            with self._mu:
                self._synced = max(self._synced, count)
                if self._synced >= self.count:
                    self._unsynced_since = None
            if self.anchor is not None:
                self.anchor(log_id, count, head)

    def _flush_loop(self) -> None:
        """The background flusher of grouped mode: a record is synced at most ``flush_after`` seconds
        after it was written, so a harness that waits longer (a run, a proposal) leaves nothing unanchored."""
        assert self.flush_after is not None
        while True:
            with self._mu:
                while not self._closed and self._unsynced_since is None:
                    self._wake.wait()
                if self._closed:
                    return
                due = self._unsynced_since + self.flush_after if self._unsynced_since is not None else 0.0
                left = due - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
            try:
                self.flush()
            except Exception:  # the failure is kept (self._failed): the next append raises it
                with self._mu:
                    self._unsynced_since = None
                    if not self._failed:
                        self._failed = "a background flush failed"

    def _append_locked(self, kind: str, experiment: int | None, data: Mapping[str, Any]) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "v": VERSION, "seq": self.count + 1, "time": _now_iso(time.time()), "kind": kind,
            "session": self.session or None, "experiment": experiment,
            "data": self.scrub(_plain(dict(data))), "prev_hash": self.head,
        }
        rec["hash"] = record_hash(rec)
        line = canonical(rec) + b"\n"
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            self._failed = f"write failed: {e.strerror}"
            raise AuditError(f"the audit log {self.path}: {self._failed}",
                             "check free disk space; the session stopped so nothing runs unrecorded",
                             ) from None
        grouped = self.flush_after is not None
        if not grouped:
            self._fsync()
        self.count, self.head = rec["seq"], rec["hash"]
        self._end += len(line)
        if rec["seq"] == 1:
            self.log_id = rec["hash"]
        self._since_checkpoint += 1
        if grouped:
            if self._unsynced_since is None:
                self._unsynced_since = time.monotonic()
                self._wake.notify()
        else:
            self._synced = self.count
            if self.anchor is not None and (self.anchor_kinds is None or kind in self.anchor_kinds):
                self.anchor(self.log_id, self.count, self.head)
        return rec

    def checkpoint(self) -> dict[str, Any]:
        """Append a ``checkpoint`` record (signed when a signer is set) and rewrite the anchor file."""
        return self._write_anchor_file(self._checkpoint_record())

    def _checkpoint_record(self) -> dict[str, Any]:
        with self._mu:
            count, head = self.count, self.head
            data: dict[str, Any] = {"count": count, "head": head, "log": self.log_id}
            if self.signer is not None:
                data["key_id"] = self.signer.key_id
                data["signature"] = self.signer.sign(checkpoint_message(self.log_id, count, head))
            rec = self.append("checkpoint", None, data)
            self._since_checkpoint = 0
            return rec

    def _write_anchor_file(self, rec: dict[str, Any]) -> dict[str, Any]:
        if self.flush_after is not None:  # the anchor file vouches only for synced records
            self.flush()
        anchor: dict[str, Any] = {"log": self.log_id, "count": rec["seq"], "head": rec["hash"],
                                  "time": rec["time"]}
        if self.signer is not None:
            anchor["key_id"] = self.signer.key_id
            anchor["signature"] = self.signer.sign(checkpoint_message(self.log_id, rec["seq"], rec["hash"]))
        with self._anchor_file_mu:
            done = self._anchor_file_count
            if rec["seq"] <= done:  # a later checkpoint got there first
                return rec
            tmp = self.path.with_name(ANCHOR_FILE + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, canonical(anchor) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path.with_name(ANCHOR_FILE))
            _fsync_dir(self.path.parent)
            self._anchor_file_count = rec["seq"]
        return rec

    def check_anchor(self, held: tuple[int, str] | None) -> None:
        """Refuse a log that lost records an anchor vouched for: ``held`` is ``(count, head)`` as the
        ledger stored it (:func:`ledger_head`). Raises :class:`AuditError`; cheap (reads one line
        at most when the log grew past the anchor, else compares the head)."""
        if held is None:
            return
        n, head = held
        if self.count < n:
            raise AuditError(f"the audit log {self.path} holds {self.count} records but the ledger anchored "
                             f"{n}: records {self.count + 1}..{n} were cut",
                             "run `nightlab audit verify`; restore the log from a copy, or move it aside to "
                             "start a new one (the cut stays visible in the ledger)")
        if self.count == n and self.head != head:
            raise AuditError(f"the audit log {self.path}: record {n} differs from the one the ledger anchored",
                             "run `nightlab audit verify`; restore the log from a copy, or move it aside")

    def close(self) -> None:
        """Flush (grouped mode), stop the flusher, close the file. Idempotent."""
        if self.flush_after is not None and self._fd >= 0 and not self._failed:
            self.flush()
        with self._mu:
            self._closed = True
            self._wake.notify_all()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5)
        with self._flush_mu, self._mu:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# --------------------------------------------------------------------------- reading and verifying


@dataclass(frozen=True)
class VerifyResult:
    """``ok`` and, when not, the first record that fails (``first_bad_seq``) and why."""

    ok: bool
    count: int  # records read that verified
    first_bad_seq: int | None = None
    reason: str = ""
    head: str = GENESIS
    log_id: str = ""
    signed_checkpoints: int = 0  # checkpoint signatures that verified (0 without a public key)
    anchored: str = ""  # what the tail was checked against
    last_anchor: int = 0  # the highest record count an anchor (ledger, anchor file) vouches for

    @property
    def unanchored(self) -> int:
        """Records after the last anchor: a cut among them cannot be detected (docs/security.md)."""
        return max(0, self.count - self.last_anchor)


def read_anchor(log_path: Path | str) -> dict[str, Any] | None:
    p = Path(log_path).with_name(ANCHOR_FILE)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"corrupt": True}
    return data if isinstance(data, dict) else {"corrupt": True}


def verify(
    path: Path | str,
    *,
    public_key: Any = None,
    expected_count: int | None = None,
    expected_head: str | None = None,
    anchor: dict[str, Any] | None = None,
) -> VerifyResult:
    """Check the whole chain, checkpoint signatures (with ``public_key``) and the tail.

    The tail is checked against ``expected_count``/``expected_head`` (the ledger's record of
    the log) and ``anchor`` (the contents of ``audit.anchor.json``): the log must hold at
    least that many records and the record at that count must have that hash.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        data = b""
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""  # after the last newline: b"" when the file ends cleanly
    seqs: dict[int, int] = {}
    for i, line in enumerate(lines, 1):
        try:
            s = json.loads(line).get("seq")
            if isinstance(s, int):
                seqs.setdefault(s, i)
        except (ValueError, AttributeError):
            continue
    prev, log_id, signed, count = GENESIS, "", 0, 0
    hashes: dict[int, str] = {}

    def bad(seq: int, why: str) -> VerifyResult:
        return VerifyResult(False, count, seq, f"record {seq}: {why}", prev, log_id, signed)

    for lineno, line in enumerate(lines, 1):
        expected = count + 1
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return bad(expected, f"line {lineno} is not valid JSON (edited or corrupted)")
        if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
            return bad(expected, f"line {lineno} is not an audit record")
        if canonical(rec) != line:
            return bad(expected, f"line {lineno} is not in canonical form (its bytes were altered)")
        if rec.get("hash") != record_hash(rec):
            return bad(expected, f"line {lineno}: the hash does not match the content "
                                 "(the record was altered)")
        seq = rec["seq"]
        if seq != expected:
            later = seqs.get(expected)
            if later is not None and later > lineno:
                return bad(expected, f"found record {seq} at line {lineno} where record {expected} belongs "
                                     f"(record {expected} is at line {later}): records were reordered")
            if seq > expected:
                return bad(expected, f"missing (line {lineno} holds record {seq}): record(s) "
                                     f"{expected}..{seq - 1} were deleted")
            return bad(expected, f"line {lineno} holds record {seq} again: "
                                 "a record was duplicated or reordered")
        if rec.get("prev_hash") != prev:
            return bad(seq, "prev_hash does not match the hash of the record before "
                            "(a record before it was replaced)")
        if seq == 1:
            log_id = rec["hash"]
        if rec.get("kind") == "checkpoint":
            d = rec.get("data") or {}
            if d.get("count") != seq - 1 or d.get("head") != prev or d.get("log") != log_id:
                return bad(seq, "the checkpoint does not name the records before it")
            if public_key is not None and d.get("signature"):
                if not _verify_sig(public_key, d["signature"], checkpoint_message(log_id, seq - 1, prev)):
                    return bad(seq, "the checkpoint signature does not verify with this public key")
                signed += 1
        prev = rec["hash"]
        hashes[seq] = prev
        count = seq
    if torn:
        return bad(count + 1, "the last line is incomplete "
                              "(a torn write; the writer cuts it on its next open)")
    anchored: list[str] = []
    last = 0
    for source, n, head in (("the ledger", expected_count, expected_head),
                            ("the anchor file", (anchor or {}).get("count"), (anchor or {}).get("head"))):
        if source == "the anchor file" and anchor is not None:
            if anchor.get("corrupt") or not isinstance(n, int):
                return VerifyResult(False, count, count + 1, f"the anchor file {ANCHOR_FILE} is unreadable",
                                    prev, log_id, signed)
            if anchor.get("log") != log_id:
                return VerifyResult(False, count, 1, "the anchor file belongs to another log "
                                    "(the log was replaced)", prev, log_id, signed)
            if public_key is not None:
                sig = anchor.get("signature")
                if not sig or not _verify_sig(public_key, sig, checkpoint_message(log_id, n, str(head))):
                    return VerifyResult(False, count, n, "the anchor file's signature does not verify",
                                        prev, log_id, signed)
        if n is None:
            continue
        if count < n:
            return VerifyResult(False, count, count + 1,
                                f"truncated: {source} records {n} records, the log holds {count} "
                                f"(records {count + 1}..{n} are missing)", prev, log_id, signed)
        if head is not None and hashes.get(n) != head:
            return VerifyResult(False, count, n, f"record {n}: its hash differs from the one {source} "
                                                 "recorded (the log was rewritten)", prev, log_id, signed)
        anchored.append(f"{source} ({n})")
        last = max(last, n)
    return VerifyResult(True, count, None, "", prev, log_id, signed, ", ".join(anchored), last)


def verify_lab(
    state_dir: Path, ledger: Any, *, public_key_path: Path | None = None
) -> tuple[VerifyResult, str]:
    """Verify ``<state_dir>/audit.jsonl`` against the ledger's head and the anchor file.

    The public key is ``public_key_path`` or the ``.pub`` beside the lab's key. Returns the
    result and a note on what could not be checked (e.g. signatures without a key).
    """
    path = state_dir / LOG_FILE
    note = []
    pub = public_key_path or state_dir / "keys" / (KEY_FILE + ".pub")
    public_key = None
    if public_key_path is not None or pub.exists():
        try:
            public_key = load_public_key(pub)
        except AuditError as e:
            if public_key_path is not None:
                raise
            note.append(f"signatures not checked: {e.message}")
    else:
        note.append("signatures not checked: no public key")
    log_id = ""
    first = next(read_records(path), None)
    if first is not None and first.get("seq") == 1:
        log_id = str(first.get("hash", ""))
    held = ledger_head(ledger, log_id) if log_id else None
    if not log_id:  # empty, or its first record gone: the ledger may still know what it held
        _ensure_table(ledger)
        with ledger.transaction() as conn:
            row = conn.execute(sa.select(audit_heads.c.count, audit_heads.c.log_id)
                               .order_by(audit_heads.c.updated_at.desc())).first()
        if row is not None and first is None:
            return VerifyResult(False, 0, 1, f"truncated: the ledger records {int(row[0])} records of log "
                                f"{str(row[1])[:16]}, the log is empty"), "; ".join(note)
    if held is None:
        note.append("the ledger holds no record count for this log")
    anchor = read_anchor(path)
    if anchor is None:
        note.append(f"no {ANCHOR_FILE} (no checkpoint yet)")
    result = verify(path, public_key=public_key, expected_count=held[0] if held else None,
                    expected_head=held[1] if held else None, anchor=anchor)
    return result, "; ".join(note)


def read_records(path: Path | str) -> Iterator[dict[str, Any]]:
    """Every parseable record of a log, in file order (no verification; see :func:`verify`)."""
    p = Path(path)
    if not p.exists():
        return
    with p.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


__all__ = [
    "AuditError", "AuditLog", "Scrubber", "Signer", "VerifyResult", "canonical", "ledger_head",
    "load_public_key", "parse_time", "read_anchor", "read_records", "record_hash", "store_head", "verify",
    "verify_lab",
]
