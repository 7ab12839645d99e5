"""The audit log: every kind of tampering is detected and named; crashes are recovered visibly."""

from __future__ import annotations

import itertools
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests._cli import nl
from tests.conftest import cli_env, git

from nightlab.audit import (
    ANCHOR_FILE,
    AuditError,
    AuditLog,
    Signer,
    canonical,
    ledger_head,
    load_public_key,
    read_anchor,
    read_records,
    record_hash,
    verify,
    verify_lab,
)
from nightlab.engine import Engine
from nightlab.ledger import Ledger
from nightlab.researchers.scripted import ScriptedResearcher

cryptography = pytest.importorskip("cryptography")


def make_log(path: Path, n: int = 12, *, every: int = 100, signer: Signer | None = None, **kw) -> AuditLog:
    log = AuditLog(path, checkpoint_every=every, signer=signer, **kw)
    log.emit("session.start", tag="t", spec_sha256="ab" * 32)
    for i in range(1, n - 1):
        log.emit("decision", experiment=i, status="keep" if i % 3 else "discard", metric=1.0 / i,
                 reason=f"step {i}", note="ünïcödé ✓")
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_fresh_log_verifies_and_is_canonical(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = make_log(path, 12)
    log.close()
    recs = list(read_records(path))
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert recs[0]["kind"] == "audit.init" and recs[0]["prev_hash"] == "0" * 64
    for a, b in itertools.pairwise(recs):
        assert b["prev_hash"] == a["hash"] == record_hash(a)
    for line in lines_of(path):
        assert canonical(json.loads(line)) + b"\n" == line
    assert recs[0]["session"] is None and recs[1]["session"] == "t" and recs[2]["experiment"] == 1
    res = verify(path)
    assert res.ok and res.count == len(recs)
    assert res.head == recs[-1]["hash"] and res.log_id == recs[0]["hash"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_every_single_byte_change_is_detected_and_names_its_record(tmp_path):
    """Exhaustive on a small log: every byte of every record, two different flips each."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 4).close()
    original = path.read_bytes()
    starts = [0]
    for line in lines_of(path):
        starts.append(starts[-1] + len(line))
    checked = 0
    for seq in range(1, len(starts)):
        for pos in range(starts[seq - 1], starts[seq] - 1):  # every byte but the newline
            for mask in (0x01, 0x20):
                data = bytearray(original)
                data[pos] ^= mask
                path.write_bytes(bytes(data))
                res = verify(path)
                assert not res.ok and res.first_bad_seq == seq, (seq, pos, mask, res)
                assert f"record {seq}" in res.reason
                checked += 1
    assert checked > 1000


def test_a_byte_flip_in_any_record_of_a_longer_log(tmp_path):
    path = tmp_path / "audit.jsonl"
    make_log(path, 40, every=7).close()
    original = path.read_bytes()
    lines = lines_of(path)
    rng = random.Random(5)
    offset = 0
    for seq, line in enumerate(lines, 1):
        for pos in {0, len(line) - 2, *rng.sample(range(len(line) - 1), 6)}:
            data = bytearray(original)
            data[offset + pos] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            res = verify(path)
            assert not res.ok and res.first_bad_seq == seq, (seq, pos, res)
        offset += len(line)
    # a newline turned into another byte merges two records: the first of them is named
    nl_pos = len(lines[0]) + len(lines[1]) - 1
    data = bytearray(original)
    data[nl_pos] = ord(" ")
    path.write_bytes(bytes(data))
    res = verify(path)
    assert not res.ok and res.first_bad_seq == 2


def test_a_deleted_record_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    make_log(path, 12).close()
    lines = lines_of(path)
    for i in range(len(lines) - 1):  # the last one is the tail: see the truncation tests
        path.write_bytes(b"".join(lines[:i] + lines[i + 1:]))
        res = verify(path)
        assert not res.ok and res.first_bad_seq == i + 1, (i, res)
        assert "deleted" in res.reason


def test_reordered_records_are_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    make_log(path, 12).close()
    lines = lines_of(path)
    for i, j in [(0, 1), (4, 5), (3, 9), (len(lines) - 2, len(lines) - 1)]:
        swapped = list(lines)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        path.write_bytes(b"".join(swapped))
        res = verify(path)
        assert not res.ok and res.first_bad_seq == i + 1, (i, j, res)
        assert "reordered" in res.reason


def test_a_replaced_record_with_a_valid_hash_breaks_the_chain(tmp_path):
    """Someone who recomputes the edited record's own hash is still caught by the next prev_hash."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 8).close()
    lines = lines_of(path)
    rec = json.loads(lines[4])
    rec["data"]["status"] = "keep-forged"
    rec["hash"] = record_hash(rec)
    lines[4] = canonical(rec) + b"\n"
    path.write_bytes(b"".join(lines))
    res = verify(path)
    assert not res.ok and res.first_bad_seq == 6 and "prev_hash" in res.reason


def test_truncation_is_detected_against_the_ledger_count(tmp_path):
    path = tmp_path / "audit.jsonl"
    heads: list[tuple[int, str]] = []
    make_log(path, 12, anchor=lambda log_id, n, head: heads.append((n, head))).close()
    count, head = heads[-1]
    assert count == 12 and verify(path, expected_count=count, expected_head=head).ok
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:-3]))
    assert verify(path).ok  # the chain alone cannot see it ...
    res = verify(path, expected_count=count, expected_head=head)  # ... the anchor does
    assert not res.ok and res.first_bad_seq == 10 and "truncated" in res.reason and "10..12" in res.reason
    # cut in the middle of a record: a torn tail is named too
    path.write_bytes(b"".join(lines)[:-20])
    res = verify(path)
    assert not res.ok and res.first_bad_seq == 12 and "incomplete" in res.reason
    # a rewritten log of the same length: the head differs from the ledger's
    path.write_bytes(b"".join(lines))
    other = tmp_path / "other.jsonl"
    make_log(other, 12).close()
    res = verify(other, expected_count=count, expected_head=head)
    assert not res.ok and "rewritten" in res.reason


def test_truncation_is_detected_against_the_signed_checkpoint(tmp_path):
    path = tmp_path / "audit.jsonl"
    signer = Signer.load_or_create(tmp_path / "keys")
    make_log(path, 20, every=5, signer=signer).close()
    pub = load_public_key(tmp_path / "keys" / "audit_ed25519.pub")
    anchor = read_anchor(path)
    assert anchor is not None and anchor["signature"] and anchor["key_id"] == signer.key_id
    res = verify(path, public_key=pub, anchor=anchor)
    assert res.ok and res.signed_checkpoints >= 3 and "anchor file" in res.anchored
    checkpoints = [r for r in read_records(path) if r["kind"] == "checkpoint"]
    assert all(r["data"]["count"] == r["seq"] - 1 for r in checkpoints)
    last_cp = checkpoints[-1]["seq"]
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[: last_cp - 1]))  # cut the last checkpoint and what follows
    res = verify(path, public_key=pub, anchor=anchor)
    assert not res.ok and res.first_bad_seq == last_cp and "truncated" in res.reason
    # a forged anchor file that matches the cut log does not carry a valid signature
    recs = list(read_records(path))
    forged = {**anchor, "count": recs[-1]["seq"], "head": recs[-1]["hash"]}
    res = verify(path, public_key=pub, anchor=forged)
    assert not res.ok and "signature" in res.reason
    # the wrong public key fails the first signed checkpoint
    path.write_bytes(b"".join(lines))
    other = Signer.load_or_create(tmp_path / "other-keys").public_key
    res = verify(path, public_key=other)
    assert not res.ok and res.first_bad_seq == checkpoints[0]["seq"] and "signature" in res.reason


def test_key_files_are_private_and_loose_modes_are_refused(tmp_path):
    keys = tmp_path / "keys"
    signer = Signer.load_or_create(keys)
    key = keys / "audit_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert (keys / "audit_ed25519.pub").exists()
    assert Signer.load_or_create(keys).key_id == signer.key_id  # loaded, not regenerated
    os.chmod(key, 0o644)
    with pytest.raises(AuditError, match=r"readable by others"):
        Signer.load_or_create(keys)


def test_a_torn_last_line_is_cut_and_the_recovery_is_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    make_log(path, 6).close()
    with open(path, "ab") as f:
        f.write(b'{"data":{"partial":')
    log = AuditLog(path)
    log.emit("session.resume", tag="t")
    log.close()
    recs = list(read_records(path))
    rec = next(r for r in recs if r["kind"] == "recover")
    assert rec["seq"] == 7 and rec["data"]["bytes"] == 19 and "torn" in rec["data"]["reason"]
    assert recs[-1]["kind"] == "session.resume" and verify(path).ok


def test_a_corrupt_complete_last_line_is_not_silently_dropped(tmp_path):
    path = tmp_path / "audit.jsonl"
    make_log(path, 6).close()
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AuditError, match="corrupt"):
        AuditLog(path)
    assert path.read_bytes() == bytes(data)


def test_a_failed_write_stops_the_writer(tmp_path):
    """A real write failure (RLIMIT_FSIZE): AuditError, and the writer refuses every later record."""
    path = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from nightlab.audit import AuditLog, AuditError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = AuditLog({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        n = 0
        try:
            while True:
                log.emit("decision", experiment=n, reason="x" * 100)
                n += 1
        except AuditError as e:
            print("first:", e.message)
        try:
            log.emit("decision", experiment=n, reason="after")
        except AuditError as e:
            print("again:", e.message)
    """)
    res = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True,
                         timeout=30)
    assert "first:" in res.stdout and "write failed" in res.stdout, res.stdout + res.stderr
    assert "again:" in res.stdout and "stopped accepting" in res.stdout
    assert "after" not in path.read_text()
    # the next writer recovers the torn tail and records that it did
    log = AuditLog(path)
    log.close()
    assert verify(path).ok
    assert list(read_records(path))[-1]["kind"] == "recover"


def test_secrets_are_not_logged(tmp_path):
    path = tmp_path / "audit.jsonl"
    env = {"OPENAI_API_KEY": "sk-live-abcdefghijklmnop1234", "HOME": "/root", "MY_TOKEN": "hunter2hunter2"}
    log = AuditLog(path, environ=env)
    log.emit("researcher.response", experiment=1,
             rationale="used sk-live-abcdefghijklmnop1234 and hunter2hunter2",
             api_key="whatever-it-is", headers={"Authorization": "Bearer abcdefghijklmnopqrstuvwxyz"},
             env={"HOME": "/root", "PATH": "/usr/bin"}, tokens_in=12, max_tokens=1000,
             note="ghp_0123456789abcdefghijABCDEFGHIJ is a token")
    log.close()
    text = path.read_text()
    for secret in ("sk-live-abcdefghijklmnop1234", "hunter2hunter2", "whatever-it-is",
                   "abcdefghijklmnopqrstuvwxyz", "/usr/bin", "ghp_0123456789"):
        assert secret not in text, secret
    data = list(read_records(path))[-1]["data"]
    assert "[redacted:OPENAI_API_KEY]" in data["rationale"] and "[redacted:MY_TOKEN]" in data["rationale"]
    assert data["api_key"] == "[redacted]" and data["env"] == {"HOME": "[redacted]", "PATH": "[redacted]"}
    assert data["tokens_in"] == 12 and data["max_tokens"] == 1000
    assert verify(path).ok


def test_two_writers_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path), AuditLog(path)
    for i in range(5):
        a.emit("decision", experiment=i, who="a")
        b.emit("decision", experiment=i, who="b")
    a.close()
    b.close()
    res = verify(path)
    assert res.ok and res.count == 11


def test_non_finite_numbers_and_odd_values_are_recorded(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.emit("measurement", experiment=1, metric=float("nan"), secondary={"x": float("inf")}, path=tmp_path,
             items=("a", 1))
    log.close()
    data = list(read_records(path))[-1]["data"]
    assert data["metric"] == "nan" and data["secondary"] == {"x": "inf"} and data["path"] == str(tmp_path)
    assert data["items"] == ["a", 1] and verify(path).ok


# ---------------------------------------------------------------------------- through the engine and the CLI


TARGET_OPT = "X = 1.0"


def verify_cli(lab: Path) -> subprocess.CompletedProcess[str]:
    argv = nl("audit", "verify", "--lab", str(lab))
    return subprocess.run(argv, env=cli_env(), capture_output=True, text=True)


def _run_session(lab: Path, spec_extra: str = "", n: int = 2) -> Engine:
    if spec_extra:
        (lab / "nightlab.toml").write_text((lab / "nightlab.toml").read_text() + spec_extra)
        git(lab, "commit", "-qam", "spec")
    steps = [{"rationale": "opt", "replace": {"target.py": ["X = 3.0", "X = 1.0"]}},
             {"rationale": "bad", "files": {"evaluate.py": "x"}}]
    eng = Engine(lab, tag="t", researcher=ScriptedResearcher(steps), sandbox_mode="none", max_experiments=n)
    eng.run()
    return eng


def test_a_session_is_audited_and_anchored_in_the_ledger(make_lab):
    lab = make_lab()
    eng = _run_session(lab, "\n[audit]\nsign = true\ncheckpoint_every = 10\n")
    eng.close()
    path = lab / ".nightlab" / "audit.jsonl"
    recs = list(read_records(path))
    kinds = [r["kind"] for r in recs]
    for k in ("audit.init", "session.start", "researcher.request", "researcher.response", "candidate",
              "guard", "git.commit", "sandbox.start", "sandbox.exit", "measurement", "decision",
              "git.advance", "policy.violation", "session.stop", "checkpoint"):
        assert k in kinds, k
    assert kinds[-2:] == ["session.stop", "checkpoint"]
    start = recs[kinds.index("session.start")]
    assert len(start["data"]["spec_sha256"]) == 64 and start["data"]["autonomy"] == "auto"
    sb = next(r for r in recs if r["kind"] == "sandbox.start")
    assert sb["data"]["command"] == "python target.py" and sb["data"]["network"] is False
    assert stat.S_IMODE((lab / ".nightlab" / "keys" / "audit_ed25519").stat().st_mode) == 0o600
    with Ledger.for_lab(lab) as ledger:
        assert ledger_head(ledger, recs[0]["hash"]) == (len(recs), recs[-1]["hash"])
        result, note = verify_lab(lab / ".nightlab", ledger)
    assert result.ok and result.signed_checkpoints >= 2 and "ledger" in result.anchored, note
    # the CLI agrees, then names the break after a cut tail
    res = verify_cli(lab)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:-1]))
    res = verify_cli(lab)
    assert res.returncode == 1 and f"BROKEN at record {len(lines)}" in res.stdout
    assert "truncated" in res.stdout
    path.write_bytes(b"".join(lines[:3] + lines[4:]))
    res = verify_cli(lab)
    assert res.returncode == 1 and "BROKEN at record 4" in res.stdout and "deleted" in res.stdout


def test_truncation_without_signatures_is_caught_by_the_ledger(make_lab):
    lab = make_lab()
    _run_session(lab, n=1).close()
    path = lab / ".nightlab" / "audit.jsonl"
    assert not (lab / ".nightlab" / "keys").exists()
    (lab / ".nightlab" / ANCHOR_FILE).unlink()  # only the ledger is left to anchor the tail
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:-4]))
    res = verify_cli(lab)
    assert res.returncode == 1 and "truncated: the ledger records" in res.stdout, res.stdout


def test_audit_show_filters(make_lab):
    lab = make_lab()
    _run_session(lab).close()
    run = lambda *a: subprocess.run(nl("audit", "show", "--lab", str(lab), *a), env=cli_env(),  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout.splitlines()
    decisions = run("--kind", "decision", "--json")
    assert [json.loads(x)["data"]["status"] for x in decisions] == ["keep", "keep", "rejected"]
    exp2 = [json.loads(x) for x in run("--experiment", "2", "--json")]
    assert exp2 and all(r["experiment"] == 2 for r in exp2)
    assert any(r["kind"] == "policy.violation" and r["data"]["rule"] == "protected" for r in exp2)
    assert run("--since", "2999-01-01T00:00:00Z") == []
    assert len(run("--since", "2000-01-01")) == len(lines_of(lab / ".nightlab" / "audit.jsonl"))
    human = run("--kind", "session")
    assert len(human) == 2 and "session.start" in human[0] and "session.stop" in human[1]
