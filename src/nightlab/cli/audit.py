"""``nightlab audit verify|show`` and the approval queue: ``nightlab pending|approve|reject``."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path
from typing import Any

import click

from nightlab import approvals
from nightlab.audit import LOG_FILE, parse_time, read_records, verify_lab
from nightlab.errors import UsageError
from nightlab.ledger import Ledger
from nightlab.text import printable
from nightlab.types import Session

lab_option = click.option("--lab", "lab", type=click.Path(file_okay=False, path_type=Path), default=".",
                          show_default=True, help="The lab folder (holds nightlab.toml).")
db_option = click.option("--db", "db", default=None, envvar="NIGHTLAB_DB",
                         help="Ledger URL (default: sqlite at <lab>/.nightlab/ledger.db).")


def _state_dir(lab: Path) -> Path:
    return lab.resolve() / ".nightlab"


def _open_ledger(lab: Path, db: str | None) -> Ledger:
    if db is None and not (_state_dir(lab) / "ledger.db").exists():
        raise UsageError(f"no ledger at {_state_dir(lab) / 'ledger.db'}",
                         "pass --lab <your lab folder> (or --db URL); start a session with `nightlab run`")
    return Ledger.for_lab(lab.resolve(), db)


def _default_who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()} (cli)"


# --------------------------------------------------------------------------- audit


@click.group()
def audit() -> None:
    """Check and read the tamper-evident audit log (.nightlab/audit.jsonl)."""


@audit.command("verify")
@lab_option
@db_option
@click.option("--public-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="The ed25519 public key to check signatures with; best a copy kept off this machine "
                   "(default: .nightlab/keys/audit_ed25519.pub).")
def verify_cmd(lab: Path, db: str | None, public_key: Path | None) -> None:
    """Check the hash chain, checkpoint signatures and the tail; name the first broken record.

    The tail is checked against the ledger's anchor (record count and head hash, stored at every
    decision and at the start of every proposal, experiment and run) and the checkpoint file; the
    records after the last anchor are counted: cutting those cannot be detected. Exit status 0 when
    intact, 1 when broken (a record altered, deleted or reordered, or records an anchor counted missing).
    """
    state = _state_dir(lab)
    path = state / LOG_FILE
    if not path.exists():
        raise UsageError(f"no audit log at {path}", "pass --lab <your lab folder>")
    with _open_ledger(lab, db) as ledger:
        result, note = verify_lab(state, ledger, public_key_path=public_key)
    if result.ok:
        if result.last_anchor:
            tail = (f"{result.unanchored} record{'s' if result.unanchored != 1 else ''} after it "
                    f"{'are' if result.unanchored != 1 else 'is'} unanchored") if result.unanchored \
                else "nothing after it"
            where = f"last anchor at record {result.last_anchor} ({tail})"
        else:
            where = f"no anchor: a cut of its last records could not be detected ({result.count} unanchored)"
        click.echo(f"{path}: OK: {result.count} records, chain intact, {where}, head {result.head[:16]}")
        if result.signed_checkpoints:
            click.echo(f"  {result.signed_checkpoints} signed checkpoint(s) verified")
        if result.anchored:
            click.echo(f"  tail checked against {result.anchored}")
        if note:
            click.echo(f"  note: {note}")
        return
    click.secho(f"{path}: BROKEN at record {result.first_bad_seq}", fg="red", bold=True)
    click.echo(f"  {result.reason}")
    click.echo(f"  records 1..{result.count} verified" if result.count else "  no record verified")
    raise SystemExit(1)


def _brief(data: dict[str, Any], width: int = 160) -> str:
    text = printable(" ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(data.items())))
    return text if len(text) <= width else text[: width - 1] + "…"


@audit.command("show")
@lab_option
@click.option("--experiment", "-e", type=int, default=None, help="Only records of experiment N.")
@click.option("--kind", "-k", multiple=True,
              help="Only these kinds (repeatable); 'approval' matches approval.request and approval.answer.")
@click.option("--since", default=None, help="Only records at or after this ISO time (e.g. 2026-11-23T01:00).")
@click.option("--session", "tag", default=None, help="Only records of this session tag.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON lines.")
def show_cmd(lab: Path, experiment: int | None, kind: tuple[str, ...], since: str | None, tag: str | None,
             as_json: bool) -> None:
    """Print audit records, filtered. Run `nightlab audit verify` to check them."""
    path = _state_dir(lab) / LOG_FILE
    if not path.exists():
        raise UsageError(f"no audit log at {path}", "pass --lab <your lab folder>")
    try:
        t0 = parse_time(since) if since else None
    except ValueError:
        raise UsageError(f"--since {since!r} is not an ISO time", "e.g. --since 2026-11-23T01:30") from None
    for rec in read_records(path):
        k = str(rec.get("kind", ""))
        if experiment is not None and rec.get("experiment") != experiment:
            continue
        if kind and not any(k == want or k.startswith(want + ".") for want in kind):
            continue
        if tag is not None and rec.get("session") != tag:
            continue
        if t0 is not None:
            try:
                if parse_time(str(rec.get("time"))) < t0:
                    continue
            except ValueError:
                continue
        if as_json:
            click.echo(json.dumps(rec, sort_keys=True, separators=(",", ":")))
            continue
        exp = rec.get("experiment")
        click.echo(f"{rec.get('seq', '?'):>6} {rec.get('time', '')} {rec.get('session') or '-'} "
                   f"{'#' + str(exp) if exp is not None else '-':>4} {k:<20} {_brief(rec.get('data') or {})}")


# --------------------------------------------------------------------------- approvals


def _session(ledger: Ledger, tag: str | None) -> Session:
    s = ledger.get_session(tag) if tag else ledger.latest_session()
    if s is None:
        raise UsageError(f"no session {tag!r}" if tag else "no session yet", "see `nightlab status`")
    return s


def _answer(lab: Path, db: str | None, tag: str | None, idx: int, approved: bool, why: str, who: str) -> None:
    with _open_ledger(lab, db) as ledger:
        session = _session(ledger, tag)
        row = approvals.find_pending(ledger, session.id, idx)
        if row is None:
            raise UsageError(f"experiment {idx} of session {session.tag} has no pending approval",
                             "list the queue with `nightlab pending`")
        approvals.answer(ledger, row["id"], approved, why, who)
    verb = "approved" if approved else "rejected"
    what = "its run" if row["kind"] == "run" else "its keep"
    click.echo(f"{verb} {what}: experiment {idx} of session {session.tag} (approval {row['id']})")


@click.command()
@click.argument("n", type=int)
@lab_option
@db_option
@click.option("--tag", default=None, help="The session (default: the latest).")
@click.option("--why", default="", help="A note kept with the answer.")
@click.option("--who", default=None, help="Who answers (default: user@host).")
def approve(n: int, lab: Path, db: str | None, tag: str | None, why: str, who: str | None) -> None:
    """Approve experiment N's pending request (its run in review mode, its keep in approve-keep mode)."""
    _answer(lab, db, tag, n, True, why, who or _default_who())


@click.command()
@click.argument("n", type=int)
@lab_option
@db_option
@click.option("--tag", default=None, help="The session (default: the latest).")
@click.option("--why", required=True, help="Why: kept in the ledger and the audit log.")
@click.option("--who", default=None, help="Who answers (default: user@host).")
def reject(n: int, lab: Path, db: str | None, tag: str | None, why: str, who: str | None) -> None:
    """Reject experiment N's pending request: it does not run (review) or the branch does not advance."""
    _answer(lab, db, tag, n, False, why, who or _default_who())


@click.command()
@lab_option
@db_option
@click.option("--tag", default=None, help="Only this session (default: every session).")
@click.option("--interactive", "-i", is_flag=True, help="Ask approve/reject for each request in turn.")
@click.option("--who", default=None, help="Who answers (default: user@host).")
def pending(lab: Path, db: str | None, tag: str | None, interactive: bool, who: str | None) -> None:
    """List the requests waiting for a human, with their diff and rationale."""
    with _open_ledger(lab, db) as ledger:
        sid = _session(ledger, tag).id if tag else None
        rows = approvals.pending(ledger, sid)
        if not rows:
            click.echo("nothing waits for an answer")
            return
        tags = {s.id: s.tag for s in ledger.list_sessions()}
        for row in rows:
            what = "run" if row["kind"] == "run" else "keep (advance the branch)"
            where = f"experiment {row['experiment_idx']} of session {tags.get(row['session_id'], '?')}"
            click.secho(f"\n== {where}: may it {what}?  (approval {row['id']})", bold=True)
            # the researcher wrote both: an ESC sequence could hide a hunk from the human who approves
            click.echo(printable(row["rationale"].rstrip()) or "(no rationale)")
            click.echo("")
            click.echo(printable(row["diff"].rstrip()) or "(no diff)")
            if not interactive:
                continue
            choice = click.prompt("approve? [y]es / [n]o / [s]kip / [q]uit",
                                  type=click.Choice(["y", "n", "s", "q"]), show_choices=False)
            if choice == "q":
                return
            if choice == "s":
                continue
            why = click.prompt("why", default="" if choice == "y" else None, show_default=False)
            approvals.answer(ledger, row["id"], choice == "y", why, who or _default_who())
            click.echo("approved" if choice == "y" else "rejected")


COMMANDS = [audit, approve, reject, pending]
"""For ``main.add_command``: the group ``audit`` and the commands ``approve``, ``reject``, ``pending``."""
