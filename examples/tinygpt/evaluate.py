"""tinygpt evaluator (protected): bits per byte of the saved checkpoint on the val split.

Usage: ``python evaluate.py [ckpt.pt]``. Loads the checkpoint train.py saved (``weights_only``:
tensors and plain config, no pickled code), rebuilds the model with ``train.build_model``,
checks that it is causal and does not look across batch rows (:func:`prepare.check_causal`),
then scores it with the protected :func:`prepare.evaluate_bpb`, which does the log-softmax and
the sum itself. Prints the summary block: ``val_bpb``, ``floor_bpb`` (when the source is
synthetic), ``eval_seconds``. Exits 1 with the reason when the checkpoint is missing or the
model fails a check.

Under nightlab it runs in a clean tree (the committed files and ``ckpt.pt`` only, see the lab's
``[evaluate] outputs``) with ``PYTHONSAFEPATH=1``: ``prepare`` comes from ``$NIGHTLAB_TRUSTED_DIR``
(on ``PYTHONPATH``) and ``train`` from the working directory, appended to ``sys.path`` last.

What this does not cover: the model's forward pass is still train.py's code, and importing
train.py runs its module-level code inside this process, where a hostile train.py could tamper
with the scoring (patching torch, say). The checks here catch an honest mistake and the plain
cheats (reading later bytes, or other rows); a stronger evaluator would run the model in a
separate sandboxed process or load an exported graph instead of the module.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from prepare import check_causal, evaluate_bpb, load_split, read_meta


def load_model(path: Path, device: str) -> tuple[Any, dict[str, Any]]:
    # nightlab runs this in a clean tree with PYTHONSAFEPATH=1: the working directory (the committed
    # train.py and the run's ckpt.pt) is not on sys.path. Append it, after the standard library and
    # site-packages, so train.py can be imported but no file of the lab can shadow a module.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    import train  # the editable file: only its build_model is used

    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = ckpt["config"]
    model = train.build_model(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg


def score(split: str, path: Path) -> dict[str, float]:
    """The figures for one split; raises SystemExit with the reason on any failure."""
    if not path.exists():
        raise SystemExit(f"{path} does not exist: train.py must save the checkpoint there")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    t0 = time.perf_counter()
    model, cfg = load_model(path, device)
    data = load_split(split)
    seq_len = int(cfg["seq_len"])
    if seq_len < 1:
        raise SystemExit(f"config seq_len is {seq_len}")
    try:
        check_causal(model, data, seq_len, device)
        bpb = evaluate_bpb(model, data, seq_len, device)
    except ValueError as e:
        raise SystemExit(f"rejected: {e}") from None
    out = {f"{split}_bpb": bpb}
    floor = read_meta(split).get(f"floor_{split}_bpb")
    if floor is not None:
        out["floor_bpb"] = float(floor)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def print_summary(figures: dict[str, float]) -> None:
    print("---")
    width = max(len(k) for k in figures) + 2
    for k, v in figures.items():
        print(f"{k + ':':<{width}}{v:.6f}")


def main(split: str = "val") -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("ckpt.pt")
    print_summary(score(split, path))


if __name__ == "__main__":
    main()
