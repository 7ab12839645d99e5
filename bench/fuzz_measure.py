"""Fuzz the metric readers: no input may raise, and no NaN/inf may come out as a metric.

    python bench/fuzz_measure.py [--stdout 1000000] [--json 100000] [--files 2000] [--seed 0]

Inputs are built two ways, half each: *mutational* (random byte flips, insertions, deletions,
splices and token insertions into valid logs and metric files) and *generated* (logs and JSON
built from hostile pieces: deep nesting, 400- to 10,000-digit integers, ``NaN``/``Infinity``
literals, ``1e999``, duplicate keys, UTF-8 BOMs, NUL, CR/CRLF and U+2028 line ends, bytes that
are not UTF-8, UTF-16, unterminated strings, lone surrogate escapes).

Each stdout input goes through the same code ``measure()`` runs after reading a log (decoding
its bytes as ``read_log`` does, then :func:`nightlab.measure.measure_summary_text`); each JSON
input through :func:`nightlab.measure.measure_json_bytes`. ``--files`` of each kind also go through
``measure()`` itself, from real files. Nothing catches exceptions around these calls but this
script, which counts them. Exit status 1 when any count that must be 0 is not.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nightlab.measure import measure, measure_json_bytes, measure_summary_text
from nightlab.spec import MetricSpec
from nightlab.types import Measurement

SUMMARY = MetricSpec(name="val_bpb", secondary=["peak_vram_mb", "mfu", "steps"])
JSONSPEC = MetricSpec(name="val_bpb", source="json", file="metrics.json", secondary=["peak_vram_mb", "mfu", "steps"])

NUMBERS = ["0.9979", "-1", "1e-4", ".5", "5.", "+3", "-0", "0", "1e308", "-1e308", "1e309", "-1e999", "nan", "NaN",
           "inf", "-inf", "Infinity", "-Infinity", "infinity", "1_000", "0x10", "١٢", "１２", "1e", "e5", "--1",
           "9" * 400, "9" * 4301, "1" * 10000, "0." + "0" * 500 + "1", "1.5 bits", "3 ms", "", " ", "\x00",
           "\N{MINUS SIGN}1", "1\x00", "4.2\r"]
KEYS = ["val_bpb", "peak_vram_mb", "mfu", "steps", "VAL_BPB", "val_bpb ", "_x", "a.b/c-d", "ключ", "val\x00bpb"]
LINE_ENDS = ["\n", "\r\n", "\r", "\u2028", "\x85", "\x0b", "\x1c"]
TOKENS = [b"---", b"\n---\n", b"\r\n", b"\x00", b"\xef\xbb\xbf", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80",
          b"val_bpb:", b" nan", b"inf", b"1e999", b"9" * 5000, b"\n", b":", b"\xe2\x80\xa8", b"\x85",
          b"{", b"[", b"}", b"]", b'"', b"\\", b"\\ud800", b"NaN", b"Infinity", b"-Infinity", b",", b"null",
          b"true", b"\t", b'"val_bpb"', b'"val_bpb": 1e400', b"[" * 1000, b"{\"a\":" * 200]

MAX_INPUT = 16 * 1024
VALID_LOG = (b"step 00100 | loss 3.21 | 1.2s\nstep 00200 | loss 2.97\n---\nval_bpb:          0.997900\n"
             b"training_seconds: 300.1\npeak_vram_mb:     45060.2\nmfu:              39.80\nsteps: 953\n")
VALID_JSON = b'{"val_bpb": 0.9979, "peak_vram_mb": 45060.2, "mfu": 39.8, "steps": 953, "hist": [1, 2, {"a": null}]}'


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(b))
        if op == 0 and b:  # flip a byte
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        elif op == 1:  # insert random bytes
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and b:  # delete a span
            del b[pos:pos + rng.randint(1, 16)]
        elif op == 3:  # insert a hostile token, maybe repeated
            b[pos:pos] = rng.choice(TOKENS) * rng.choice((1, 1, 1, 2, 50))
        elif op == 4:  # splice with another corpus entry
            other = rng.choice(corpus)
            j = rng.randint(0, len(other))
            b = b[:pos] + bytearray(other[j:])
        else:  # duplicate a span
            j = rng.randint(pos, min(len(b), pos + 64))
            b[pos:pos] = b[pos:j]
    if len(b) > MAX_INPUT:  # keep inputs small, as fuzzers do; the big cases are generated on purpose
        del b[rng.randint(1024, MAX_INPUT):]
    return bytes(b)


def gen_log(rng: random.Random) -> bytes:
    end = rng.choice(LINE_ENDS) if rng.random() < 0.3 else "\n"
    lines = [f"noise {rng.random()}" for _ in range(rng.randint(0, 4))]
    for _ in range(rng.randint(0, 3)):
        lines.append(rng.choice(["---", " --- ", "----", "--", "---\x00"]))
        for _ in range(rng.randint(0, 6)):
            sep = rng.choice([":", ": ", " : ", ":\t", "=", "::"])
            lines.append(f"{rng.choice(KEYS)}{sep}{rng.choice(NUMBERS)}")
    text = end.join(lines) + (end if rng.random() < 0.7 else "")
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.2:
        data = b"\xef\xbb\xbf" + data
    if rng.random() < 0.2:
        i = rng.randint(0, len(data))
        data = data[:i] + bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 4))) + data[i:]
    if rng.random() < 0.05:
        data = text.encode("utf-16")
    return data


def gen_value(rng: random.Random, depth: int = 0) -> str:
    r = rng.random()
    if r < 0.35 or depth > 3:
        return rng.choice(["0.5", "-1e308", "1e309", "-0", "NaN", "Infinity", "-Infinity", "9" * rng.choice(
            (20, 400, 4301, 10000)), "1e-400", "true", "null", '"0.5"', '"nan"', '"\\ud800"', "1.0e+2", "-",
            "0.1", "12"])
    if r < 0.55:
        return "[" + ",".join(gen_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    if r < 0.75:
        return gen_object(rng, depth + 1)
    if r < 0.85:  # deep nesting
        n = 100_000 if rng.random() < 0.01 else rng.choice((10, 63, 64, 65, 1000))
        opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
        return opener * n + "1" + closer * n
    return '"' + rng.choice(["x", "\\u0000", "\\\\", "\\\"", "é", "\\uDFFF", "a" * 1000]) + '"'


def gen_object(rng: random.Random, depth: int = 0) -> str:
    keys = [rng.choice([*KEYS, "val_bpb", "val_bpb"]) for _ in range(rng.randint(0, 6))]
    sep = rng.choice((", ", ",", ",\r\n", ",\n\t"))
    return "{" + sep.join(f'"{k}": {gen_value(rng, depth)}' for k in keys) + "}"


def gen_json(rng: random.Random) -> bytes:
    text = gen_object(rng) if rng.random() < 0.85 else gen_value(rng)
    data = text.encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.1:
        data = b"\xef\xbb\xbf" + data
    elif r < 0.15:
        data = data + b"\x00"
    elif r < 0.2:
        i = rng.randint(0, len(data))
        data = data[:i] + b"\xff" + data[i:]
    elif r < 0.23:
        data = text.encode("utf-16")
    elif r < 0.26:
        data = data[: rng.randint(0, len(data))]  # truncated
    return data


class Tally:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.n = self.uncaught = self.nonfinite = self.accepted = 0
        self.warned = 0
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []
        self.slowest = (0.0, b"")
        self.t = 0.0

    def check(self, fn, data: bytes) -> None:  # type: ignore[no-untyped-def]
        self.n += 1
        t0 = time.perf_counter()
        try:
            m: Measurement = fn(data)
        except BaseException as e:  # counting them is the point
            self.uncaught += 1
            if len(self.examples) < 5:
                self.examples.append(f"{type(e).__name__}: {str(e)[:100]} on {data[:80]!r}")
            return
        finally:
            dt = time.perf_counter() - t0
            self.t += dt
            if dt > self.slowest[0]:
                self.slowest = (dt, data[:60])
        values = [m.metric, *m.secondary.values()]
        if any(v is not None and not math.isfinite(v) for v in values):
            self.nonfinite += 1
            if len(self.examples) < 5:
                self.examples.append(f"non-finite accepted: {m} on {data[:80]!r}")
        if m.metric is not None:
            self.accepted += 1
        else:
            self.reasons[" ".join(m.error.replace("'", "").split()[:4])[:40]] += 1
        if m.warnings:
            self.warned += 1

    def report(self) -> None:
        rate = self.n / self.t if self.t else 0.0
        print(f"{self.kind}: {self.n:,} inputs, uncaught exceptions {self.uncaught}, NaN/inf accepted "
              f"{self.nonfinite}, metric accepted {self.accepted:,}, with warnings {self.warned:,}; "
              f"{self.t:.1f} s in the reader ({rate:,.0f} inputs/s), slowest {1000 * self.slowest[0]:.1f} ms")
        for why, n in self.reasons.most_common(6):
            print(f"    failed: {why:<42} {n:,}")
        for ex in self.examples:
            print(f"    ! {ex}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdout", type=int, default=1_000_000, help="stdout (summary block) inputs")
    ap.add_argument("--json", type=int, default=100_000, help="metric-file inputs")
    ap.add_argument("--files", type=int, default=2_000, help="of each kind, also through measure() from real files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()

    def from_log(data: bytes) -> Measurement:  # exactly what measure() does after reading the log
        return measure_summary_text(SUMMARY, data.decode("utf-8", errors="backslashreplace"))

    def from_json(data: bytes) -> Measurement:
        return measure_json_bytes(JSONSPEC, data)

    log_corpus, json_corpus = [VALID_LOG], [VALID_JSON]
    logs, jsons = Tally("stdout"), Tally("json")
    for i in range(args.stdout):
        data = gen_log(rng) if i % 2 else mutate(rng, rng.choice(log_corpus), log_corpus)
        if len(log_corpus) < 200 and rng.random() < 0.01:
            log_corpus.append(data)
        logs.check(from_log, data)
    for i in range(args.json):
        data = gen_json(rng) if i % 2 else mutate(rng, rng.choice(json_corpus), json_corpus)
        if len(json_corpus) < 200 and rng.random() < 0.01:
            json_corpus.append(data)
        jsons.check(from_json, data)

    files_log, files_json = Tally("stdout via measure() on files"), Tally("json via measure() on files")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log, mfile = root / "run.log", root / "metrics.json"

        def via_log(data: bytes) -> Measurement:
            log.write_bytes(data)
            return measure(SUMMARY, log, root)

        def via_json(data: bytes) -> Measurement:
            mfile.write_bytes(data)
            return measure(JSONSPEC, root / "none.log", root)

        for i in range(args.files):
            files_log.check(via_log, gen_log(rng) if i % 2 else mutate(rng, VALID_LOG, log_corpus))
            files_json.check(via_json, gen_json(rng) if i % 2 else mutate(rng, VALID_JSON, json_corpus))
        for special in ("fifo", "dir", "symlink"):  # and the ones no byte string can express
            os.remove(mfile)
            if special == "fifo":
                os.mkfifo(mfile)
            elif special == "dir":
                os.mkdir(mfile)
            else:
                os.symlink("/dev/zero", mfile)
            files_json.check(lambda _d: measure(JSONSPEC, root / "none.log", root), b"<" + special.encode() + b">")
            os.rmdir(mfile) if special == "dir" else os.remove(mfile)
            mfile.write_bytes(b"{}")

    total = time.perf_counter() - t0
    print(f"fuzz_measure: seed {args.seed}, {total:.1f} s wall, python {sys.version.split()[0]}")
    bad = 0
    for t in (logs, jsons, files_log, files_json):
        t.report()
        bad += t.uncaught + t.nonfinite
    print("RESULT:", "OK (0 uncaught exceptions, 0 NaN/inf accepted)" if not bad else f"FAIL ({bad})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
