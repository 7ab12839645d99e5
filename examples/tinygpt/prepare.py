"""tinygpt data and scoring (protected): a byte-level corpus with an exact floor, and the bpb evaluator.

Run once per session: ``python prepare.py [--text PATH] [--seed N]``. It writes into
``$NIGHTLAB_DATA_DIR`` (default ``./data``): ``train.bin``, ``val.bin`` (raw bytes) and
``meta.json``; and ``holdout.bin`` + ``holdout_meta.json`` into ``$NIGHTLAB_HOLDOUT_DIR`` when
that is set (a folder the runs cannot see), else into the data dir.

The default corpus comes from a seeded synthetic *source* whose next-byte distribution is a
function of the visible history only, so the best possible val_bpb (the floor no model can
beat in expectation) is known exactly: while generating val and holdout we add up
-log2 p(byte | history) under the source's own predictive distribution.

The source (short context and long context both matter):
- plain text: a variable-order Markov "tree source" over SYMBOLS (17 letters and space): the
  order (1..4) is picked by the last byte, the next-byte distribution by the last `order` bytes
  (a sparse Dirichlet draw, mixed with a little uniform);
- definitions: with probability E_DEF per text byte, ``{k`` (k one of KEYS) opens a definition
  whose body is tree-source text of MIN_LEN..MAX_LEN bytes, ended by ``}`` (probability Q_END per
  byte once MIN_LEN is reached);
- recalls: with probability E_REC per text byte (once some key is defined), ``<k`` (k uniform
  over the defined keys) followed by an exact copy of the most recent body defined for k, then
  ``>``. A recall is perfectly predictable, but only to a model that sees the definition,
  typically a few hundred bytes back.

``--text PATH`` builds the splits from any UTF-8 file instead (no floor): holdout the last 5%,
val the 5% before it, train the rest.

Also the shared, protected scoring code: :func:`evaluate_bpb` (used by train.py, evaluate.py
and holdout.py, so the numbers agree) and :func:`check_causal`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_SIZE = 256


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class SourceConfig:
    symbols: bytes = b"etaoinshrdlcumwf "
    keys: bytes = b"01234567"
    orders: tuple[int, ...] = (1, 2, 3, 4)
    order_weights: tuple[float, ...] = (0.2, 0.35, 0.3, 0.15)
    alpha: float = 0.15  # Dirichlet concentration: smaller is more predictable text
    uniform_mix: float = 0.05  # weight of the uniform distribution mixed into every context
    table_rows: int = 1 << 16  # contexts are hashed into this many distributions
    e_def: float = 0.02
    e_rec: float = 0.03
    min_len: int = 6
    max_len: int = 32
    q_end: float = 0.1
    seed: int = 0


OPEN_DEF, CLOSE_DEF, OPEN_REC, CLOSE_REC = b"{", b"}", b"<", b">"
TEXT, DEF_KEY, DEF_BODY, REC_KEY, REC_BODY = range(5)


@dataclass
class State:
    """Everything the next-byte distribution depends on: a pure function of the bytes pushed so far."""

    history: bytearray = field(default_factory=bytearray)
    mode: int = TEXT
    key: int = -1  # the key byte of the open definition or recall
    body: bytearray = field(default_factory=bytearray)  # the open definition's body so far
    pos: int = 0  # bytes copied so far in the open recall
    defs: dict[int, bytes] = field(default_factory=dict)  # key byte -> most recent complete body

    def push(self, b: int) -> None:
        self.history.append(b)
        if self.mode == TEXT:
            if b == OPEN_DEF[0]:
                self.mode = DEF_KEY
            elif b == OPEN_REC[0]:
                self.mode = REC_KEY
        elif self.mode == DEF_KEY:
            self.mode, self.key, self.body = DEF_BODY, b, bytearray()
        elif self.mode == DEF_BODY:
            if b == CLOSE_DEF[0]:
                self.defs[self.key] = bytes(self.body)
                self.mode = TEXT
            else:
                self.body.append(b)
        elif self.mode == REC_KEY:
            self.mode, self.key, self.pos = REC_BODY, b, 0
        elif self.mode == REC_BODY:
            if self.pos >= len(self.defs[self.key]):
                self.mode = TEXT  # b was the closing '>'
            else:
                self.pos += 1


class Source:
    """The generator. :meth:`sample` draws the next byte by a sequence of random choices;
    :meth:`predictive` gives the closed-form distribution of that byte. They must agree
    (tests check it by enumerating the choices)."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 7919])
        self.order_of = [
            int(o)
            for o in rng.choice(cfg.orders, size=256, p=np.array(cfg.order_weights) / sum(cfg.order_weights))
        ]
        g = rng.gamma(cfg.alpha, size=(cfg.table_rows, len(cfg.symbols))) + 1e-12
        table = g / g.sum(axis=1, keepdims=True)
        self.table: list[list[float]] = table.tolist()
        self.sym = list(cfg.symbols)
        self.keys = list(cfg.keys)

    # -- pieces shared by sample and predictive
    def row(self, history: Sequence[int]) -> int:
        """The table row of the tree-source context: the last ``order`` bytes, order set by the last byte."""
        if not history:
            return 0
        order = min(self.order_of[history[-1]], len(history))
        h = 1469598103934665603 ^ order  # FNV-1a over (order, context)
        for b in history[len(history) - order :]:
            h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        return h % self.cfg.table_rows

    def _event_probs(self, st: State) -> tuple[float, float, float]:
        e_rec = self.cfg.e_rec if st.defs else 0.0
        return 1.0 - self.cfg.e_def - e_rec, self.cfg.e_def, e_rec

    def _end_prob(self, st: State) -> float:
        n = len(st.body)
        if n >= self.cfg.max_len:
            return 1.0
        return self.cfg.q_end if n >= self.cfg.min_len else 0.0

    # -- the sampler: a procedure of random choices
    def sample(self, st: State, choose: Callable[[Sequence[float]], int]) -> int:
        """Draw the next byte; ``choose(weights)`` returns an index drawn with those probabilities."""
        if st.mode == TEXT:
            ev = choose(self._event_probs(st))
            if ev == 1:
                return OPEN_DEF[0]
            if ev == 2:
                return OPEN_REC[0]
            return self._sample_tree(st, choose)
        if st.mode == DEF_KEY:
            return self.keys[choose([1.0 / len(self.keys)] * len(self.keys))]
        if st.mode == DEF_BODY:
            q = self._end_prob(st)
            if q > 0.0 and choose([1.0 - q, q]) == 1:
                return CLOSE_DEF[0]
            return self._sample_tree(st, choose)
        if st.mode == REC_KEY:
            defined = sorted(st.defs)
            return defined[choose([1.0 / len(defined)] * len(defined))]
        body = st.defs[st.key]
        return body[st.pos] if st.pos < len(body) else CLOSE_REC[0]

    def _sample_tree(self, st: State, choose: Callable[[Sequence[float]], int]) -> int:
        m = self.cfg.uniform_mix
        n = len(self.sym)
        if choose([1.0 - m, m]) == 1:
            return self.sym[choose([1.0 / n] * n)]
        return self.sym[choose(self.table[self.row(st.history)])]

    # -- the closed form
    def predictive(self, st: State) -> dict[int, float]:
        """p(next byte | history) for every byte with non-zero probability."""
        if st.mode == TEXT:
            p_text, p_def, p_rec = self._event_probs(st)
            out = {b: p_text * q for b, q in self._tree(st).items()}
            out[OPEN_DEF[0]] = out.get(OPEN_DEF[0], 0.0) + p_def
            if p_rec > 0:
                out[OPEN_REC[0]] = out.get(OPEN_REC[0], 0.0) + p_rec
            return out
        if st.mode == DEF_KEY:
            return {k: 1.0 / len(self.keys) for k in self.keys}
        if st.mode == DEF_BODY:
            q = self._end_prob(st)
            out = {b: (1.0 - q) * p for b, p in self._tree(st).items()} if q < 1.0 else {}
            out[CLOSE_DEF[0]] = out.get(CLOSE_DEF[0], 0.0) + q
            return out
        if st.mode == REC_KEY:
            return {k: 1.0 / len(st.defs) for k in st.defs}
        body = st.defs[st.key]
        return {body[st.pos] if st.pos < len(body) else CLOSE_REC[0]: 1.0}

    def _tree(self, st: State) -> dict[int, float]:
        m = self.cfg.uniform_mix
        probs = self.table[self.row(st.history)]
        return {b: (1.0 - m) * p + m / len(self.sym) for b, p in zip(self.sym, probs, strict=True)}

    # -- generation
    def generate(self, n: int, stream_seed: int, score: bool) -> tuple[bytes, float]:
        """``n`` bytes of a fresh stream, and (if ``score``) the total -log2 p of them under the source."""
        rnd = random.Random(stream_seed)
        st = State()
        bits = 0.0

        def choose(w: Sequence[float]) -> int:
            u = rnd.random()
            acc = 0.0
            for i, p in enumerate(w):
                acc += p
                if u < acc:
                    return i
            return len(w) - 1

        for _ in range(n):
            if score:
                pred = self.predictive(st)
            b = self.sample(st, choose)
            if score:
                bits -= math.log2(pred[b])
            st.push(b)
        return bytes(st.history), bits


# --------------------------------------------------------------------------- files


def data_dir() -> Path:
    return Path(os.environ.get("NIGHTLAB_DATA_DIR", "data")).resolve()


def holdout_dir() -> Path:
    h = os.environ.get("NIGHTLAB_HOLDOUT_DIR")
    return Path(h).resolve() if h else data_dir()


def split_path(split: str) -> Path:
    if split not in ("train", "val", "holdout"):
        raise ValueError(f"unknown split {split!r}")
    return (holdout_dir() if split == "holdout" else data_dir()) / f"{split}.bin"


def load_split(split: str) -> bytes:
    path = split_path(split)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python prepare.py` first (it writes the splits)")
    return path.read_bytes()


def read_meta(split: str = "val") -> dict[str, Any]:
    path = holdout_dir() / "holdout_meta.json" if split == "holdout" else data_dir() / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_splits(
    train: bytes, val: bytes, holdout: bytes, meta: dict[str, Any], floor_holdout: float | None
) -> None:
    d, h = data_dir(), holdout_dir()
    d.mkdir(parents=True, exist_ok=True)
    h.mkdir(parents=True, exist_ok=True)
    (d / "train.bin").write_bytes(train)
    (d / "val.bin").write_bytes(val)
    (h / "holdout.bin").write_bytes(holdout)
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    hmeta = {"holdout_bytes": len(holdout), "floor_holdout_bpb": floor_holdout, "source": meta["source"]}
    (h / "holdout_meta.json").write_text(json.dumps(hmeta, indent=2) + "\n")


# --------------------------------------------------------------------------- scoring (shared)


def evaluate_bpb(model: Any, data: bytes, seq_len: int, device: str = "cpu", batch_size: int = 32) -> float:
    """Bits per byte of ``model`` on ``data``: every byte but the first is predicted once.

    The data is cut into consecutive windows of ``seq_len`` predictions (the last may be shorter);
    ``model(idx)`` with ``idx`` a (B, T) int64 tensor must return (B, T, 256) logits, position t
    predicting byte t+1 from bytes 0..t of its window. The log-softmax and the sum are done here.
    """
    import torch
    import torch.nn.functional as F

    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    n_pred = len(buf) - 1
    starts = list(range(0, n_pred, seq_len))
    total_bits = 0.0
    with torch.no_grad():
        for lengths in (seq_len, None):  # full windows batched, then the short tail alone
            group = [s for s in starts if (s + seq_len <= n_pred) == (lengths is not None)]
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                t = min(seq_len, n_pred - chunk[0])
                x = torch.stack([buf[s : s + t] for s in chunk]).to(device)
                y = torch.stack([buf[s + 1 : s + 1 + t] for s in chunk]).to(device)
                logits = model(x)
                if tuple(logits.shape) != (len(chunk), t, VOCAB_SIZE):
                    raise ValueError(
                        f"model returned logits of shape {tuple(logits.shape)}, "
                        f"expected {(len(chunk), t, VOCAB_SIZE)}"
                    )
                logp = F.log_softmax(logits.float(), dim=-1)
                nll = -logp.gather(-1, y.unsqueeze(-1)).sum()
                total_bits += float(nll) / math.log(2)
    return total_bits / n_pred


def check_causal(
    model: Any, data: bytes, seq_len: int, device: str = "cpu", seed: int = 0, tol: float = 1e-3
) -> None:
    """Raise ValueError when the model's prediction at position t depends on bytes after t,
    or on the other rows of its batch (either would let it read the bytes it is scored on)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    t = min(seq_len, len(buf) - 1)
    rows = 4
    starts = torch.randint(0, len(buf) - t, (rows,), generator=g)
    x = torch.stack([buf[int(s) : int(s) + t] for s in starts])
    k = int(torch.randint(0, max(1, t - 1), (1,), generator=g))
    x2 = x.clone()
    x2[0, k + 1 :] = torch.randint(0, VOCAB_SIZE, (t - k - 1,), generator=g)
    x2[1:] = torch.randint(0, VOCAB_SIZE, x2[1:].shape, generator=g)
    with torch.no_grad():
        a = model(x.to(device))[0, : k + 1].float().cpu()
        b = model(x2.to(device))[0, : k + 1].float().cpu()
    diff = float((a - b).abs().max())
    scale = float(a.abs().max()) + 1.0
    if not diff <= tol * scale:
        raise ValueError(
            f"the model is not causal: logits at positions <= {k} changed by {diff:.3g} "
            "when later bytes (or other rows of the batch) changed"
        )


# --------------------------------------------------------------------------- main


def split_text(raw: bytes) -> tuple[bytes, bytes, bytes]:
    n = len(raw)
    cut = max(2, n // 20)
    if n < 6 * cut or n < 64:
        raise SystemExit(f"text too short ({n} bytes): need at least 64")
    return raw[: n - 2 * cut], raw[n - 2 * cut : n - cut], raw[n - cut :]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, help="build the splits from this UTF-8 text file instead")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic source")
    ap.add_argument("--train-bytes", type=int, default=500_000)
    ap.add_argument("--val-bytes", type=int, default=32_768)
    ap.add_argument("--holdout-bytes", type=int, default=32_768)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.text:
        raw = args.text.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"{args.text} is not UTF-8 text: {e}") from None
        train, val, holdout = split_text(raw)
        meta: dict[str, Any] = {"source": "text", "path": str(args.text), "floor_val_bpb": None}
        floor_val = floor_holdout = None
    else:
        cfg = SourceConfig(seed=args.seed)
        src = Source(cfg)
        train, _ = src.generate(args.train_bytes, stream_seed=args.seed * 3 + 1, score=False)
        val, bits_val = src.generate(args.val_bytes, stream_seed=args.seed * 3 + 2, score=True)
        holdout, bits_h = src.generate(args.holdout_bytes, stream_seed=args.seed * 3 + 3, score=True)
        # evaluate_bpb predicts every byte but the first; the first byte's cost is excluded likewise
        floor_val = (bits_val - first_byte_bits(src, val)) / (len(val) - 1)
        floor_holdout = (bits_h - first_byte_bits(src, holdout)) / (len(holdout) - 1)
        cfg_json = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in asdict(cfg).items()}
        meta = {"source": "synthetic", "config": cfg_json, "floor_val_bpb": floor_val}
    meta.update(train_bytes=len(train), val_bytes=len(val), vocab_size=VOCAB_SIZE)
    write_splits(train, val, holdout, meta, floor_holdout)
    print(
        f"wrote {len(train)} train, {len(val)} val bytes to {data_dir()}; "
        f"{len(holdout)} holdout bytes to {holdout_dir()} ({time.perf_counter() - t0:.1f} s)"
    )
    if floor_val is not None:
        print(f"floor (best possible bits per byte): val {floor_val:.6f}, holdout {floor_holdout:.6f}")


def first_byte_bits(src: Source, stream: bytes) -> float:
    return -math.log2(src.predictive(State())[stream[0]])


if __name__ == "__main__":
    main()
