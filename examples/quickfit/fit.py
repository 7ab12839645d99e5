"""quickfit model (editable): a two-layer tanh MLP in numpy, trained by mini-batch SGD with momentum.

Reads ``data.npz`` from ``$NIGHTLAB_DATA_DIR`` (default ``./data``), trains for EPOCHS epochs
(stopping early only if ``$NIGHTLAB_BUDGET_S`` runs out), and prints the summary block:

    ---
    val_loss:      <mean squared error on the validation set>
    train_seconds: <seconds spent training>

Deterministic for a given ``$NIGHTLAB_SEED`` (default 0).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one thread is faster and deterministic
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time
from pathlib import Path

import numpy as np

LEARNING_RATE = 0.004  # nightlab: 1e-4..0.5 log
MOMENTUM = 0.5  # nightlab: 0.0..0.99
HIDDEN = 12  # nightlab: 4..96
WEIGHT_DECAY = 0.003  # nightlab: 1e-6..0.1 log
BATCH_SIZE = 64  # nightlab: 8..256 log
EPOCHS = 30  # nightlab: 5..80
INIT_SCALE = 0.3  # nightlab: 0.05..3.0 log
# LR_DECAY: the fraction by which the learning rate has fallen linearly at the last epoch
LR_DECAY = 0.0  # nightlab: 0.0..0.99


def main() -> None:
    budget_s = float(os.environ.get("NIGHTLAB_BUDGET_S", "60"))
    seed = int(os.environ.get("NIGHTLAB_SEED", "0"))
    data = np.load(Path(os.environ.get("NIGHTLAB_DATA_DIR", "data")) / "data.npz")
    x, y = data["x_train"], data["y_train"][:, None]
    xv, yv = data["x_val"], data["y_val"][:, None]
    n, d = x.shape

    rng = np.random.default_rng(seed)
    h = int(HIDDEN)
    w1 = rng.standard_normal((d, h)) * INIT_SCALE / np.sqrt(d)
    b1 = np.zeros(h)
    w2 = rng.standard_normal((h, 1)) * INIT_SCALE / np.sqrt(h)
    b2 = np.zeros(1)
    params = [w1, b1, w2, b2]
    velocity = [np.zeros_like(p) for p in params]
    batch = max(1, int(BATCH_SIZE))
    epochs = max(1, int(EPOCHS))

    t0 = time.perf_counter()
    for epoch in range(epochs):
        lr = LEARNING_RATE * (1.0 - LR_DECAY * epoch / max(1, epochs - 1))
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            xb, yb = x[idx], y[idx]
            a = np.tanh(xb @ w1 + b1)
            err = (a @ w2 + b2) - yb  # d(0.5 * mse)/d(pred) times batch size
            g_w2 = a.T @ err / len(idx)
            g_b2 = err.mean(axis=0)
            da = (err @ w2.T) * (1.0 - a * a)
            g_w1 = xb.T @ da / len(idx)
            g_b1 = da.mean(axis=0)
            grads = [g_w1 + WEIGHT_DECAY * w1, g_b1, g_w2 + WEIGHT_DECAY * w2, g_b2]
            for p, v, g in zip(params, velocity, grads, strict=True):
                v *= MOMENTUM
                v -= lr * g
                p += v
        vloss = float(np.mean((np.tanh(xv @ w1 + b1) @ w2 + b2 - yv) ** 2))
        print(f"nightlab: step={epoch + 1} val_loss={vloss:.6f}", flush=True)  # progress (early stopping)
        if time.perf_counter() - t0 > budget_s:
            break
    train_seconds = time.perf_counter() - t0

    pred = np.tanh(xv @ w1 + b1) @ w2 + b2
    val_loss = float(np.mean((pred - yv) ** 2))
    print("---")
    print(f"val_loss:      {val_loss:.6f}")
    print(f"train_seconds: {train_seconds:.3f}")


if __name__ == "__main__":
    main()
