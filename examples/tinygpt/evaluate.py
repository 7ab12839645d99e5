"""tinygpt evaluator (protected): bits per byte of the saved checkpoint on the val split.

Usage: ``python evaluate.py [ckpt.pt]``. Loads the checkpoint train.py saved with
``torch.load(weights_only=True)`` (tensors and plain values: nothing is unpickled that could run
code), rebuilds the model with the protected :func:`model.build_model` from ``ckpt["config"]``
(refused unless it names a member of the family in model.py) and loads ``ckpt["model"]`` into it
(every key, every shape), checks that it is causal and does not look across batch rows
(:func:`prepare.check_causal`), then scores it with the protected :func:`prepare.evaluate_bpb`.
Prints the summary block: ``val_bpb``, ``floor_bpb`` (when the source is synthetic),
``eval_seconds``. Exits 1 with the reason when the checkpoint is missing or fails a check.

It never imports or runs the candidate's code: train.py is not imported (its module-level code
could patch torch or the scoring, or print a later summary block from an ``atexit`` hook), and
the model's forward pass is model.py's. What train.py controls reaches this process as data
only: a config checked key by key, and tensors.

Under nightlab it runs in a clean tree (the committed files and ``ckpt.pt`` only, see the lab's
``[evaluate] outputs``) with ``PYTHONSAFEPATH=1``: ``prepare`` and ``model`` come from
``$NIGHTLAB_TRUSTED_DIR`` (on ``PYTHONPATH``); the working directory is not on ``sys.path``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from model import build_model
from prepare import check_causal, evaluate_bpb, load_split, read_meta


def load_model(path: Path, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The protected model with the checkpoint's weights; SystemExit with the reason otherwise."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain values, or a bad file
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SystemExit(
            f"{path} is not a weights-only checkpoint ({type(e).__name__}: {first}); train.py must "
            "save {'config': dict, 'model': model.state_dict()} with torch.save"
        ) from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise SystemExit(f"{path} must hold a dict with keys 'config' and 'model'")
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SystemExit(f"{path}: 'model' must be a state_dict (names to tensors)")
    try:
        with torch.device("meta"):  # shapes first: a config can ask for more memory than the weights hold
            shapes = {k: tuple(v.shape) for k, v in build_model(ckpt["config"]).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != got:
            diff = sorted(set(shapes.items()) ^ set(got.items()))[:4]
            raise ValueError(f"the weights do not match the config's model (first differences: {diff})")
        model = build_model(ckpt["config"]).to(device)
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"{path} does not fit the model family in model.py: {e}") from None
    model.eval()
    return model, model.cfg


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
