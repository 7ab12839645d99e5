"""quickfit data (protected): a seeded synthetic regression problem, written once per session.

Eight inputs, three of them pure noise; the target is a linear part, smooth one-input bumps
and two interactions of the other five (easy, medium and hard to learn) plus Gaussian noise
(sigma = NOISE). A small training set makes regularisation matter.

Writes ``data.npz`` (x_train, y_train, x_val, y_val) and ``meta.json`` into
``$NIGHTLAB_DATA_DIR`` (default ``./data``).

The noise floor: no model can have an expected val_loss (MSE) below NOISE**2 = 0.01.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SEED = 1234
N_TRAIN = 600
N_VAL = 2000
N_FEATURES = 8
NOISE = 0.1


def target(x: np.ndarray) -> np.ndarray:
    """The noise-free function the model has to learn (inputs 5..7 are irrelevant)."""
    return (
        0.6 * x[:, 0]
        - 0.4 * x[:, 1]
        + 0.7 * np.sin(2.0 * x[:, 2])
        + 0.5 * np.cos(2.5 * x[:, 3])
        + 0.6 * np.tanh(2.0 * x[:, 0] * x[:, 4])
        + 0.3 * x[:, 1] * x[:, 3]
    )


def make(seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL
    x = rng.uniform(-1.5, 1.5, size=(n, N_FEATURES))
    y = target(x) + NOISE * rng.standard_normal(n)
    return {
        "x_train": x[:N_TRAIN],
        "y_train": y[:N_TRAIN],
        "x_val": x[N_TRAIN:],
        "y_val": y[N_TRAIN:],
    }


def data_dir() -> Path:
    return Path(os.environ.get("NIGHTLAB_DATA_DIR", "data")).resolve()


def main() -> None:
    out = data_dir()
    out.mkdir(parents=True, exist_ok=True)
    arrays = make()
    np.savez(out / "data.npz", **arrays)
    meta = {"seed": SEED, "n_train": N_TRAIN, "n_val": N_VAL, "noise_floor_val_loss": NOISE**2}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / 'data.npz'}: {N_TRAIN} train, {N_VAL} val rows; noise floor val_loss {NOISE**2:.4f}")


if __name__ == "__main__":
    main()
