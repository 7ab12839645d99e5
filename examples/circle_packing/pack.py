"""Circle packing construction (editable): place 26 circles in the unit square, maximise the sum of radii.

Writes ``packing.json``: ``{"centers": [[x, y], ...], "radii": [r, ...]}`` with 26 entries each.
The protected ``evaluate.py`` checks and scores it; this file prints no summary block.

The baseline construction, valid by construction and no optimiser involved:
1. a lattice of ROWS rows whose counts alternate COLS and COLS + ODD_ROW_DELTA, odd rows
   shifted by ROW_SHIFT of a column gap, inside margins X_MARGIN and Y_MARGIN (cut at 26);
2. a seeded Gaussian jitter of the centres;
3. radii: each starts at the smaller of its wall distance and half the distance to its nearest
   neighbour (so no pair can overlap), then every circle in turn grows into the room its
   neighbours leave (GROW_ROUNDS sweeps);
4. while fewer than 26 circles: add one at the point of the HOLE_GRID x HOLE_GRID grid with the
   most room, with exactly that room as its radius; then grow again.
"""

from __future__ import annotations

import json

import numpy as np

N = 26  # nightlab: skip
ROWS = 5  # nightlab: 3..7
COLS = 5  # nightlab: 3..7
ODD_ROW_DELTA = 0  # nightlab: -1..1
ROW_SHIFT = 0.0  # nightlab: 0.0..1.0
X_MARGIN = 0.12  # nightlab: 0.05..0.2
Y_MARGIN = 0.12  # nightlab: 0.05..0.2
JITTER = 0.01  # nightlab: 1e-4..0.03 log
JITTER_SEED = 0  # nightlab: 0..1000
GROW_ROUNDS = 3  # nightlab: 0..30
HOLE_GRID = 201  # nightlab: skip
OUTPUT = "packing.json"


def lattice() -> np.ndarray:
    """Row-by-row centres, at most N of them."""
    pts: list[tuple[float, float]] = []
    rows = max(1, int(ROWS))
    for r in range(rows):
        count = max(1, int(COLS) + (r % 2) * int(ODD_ROW_DELTA))
        y = 0.5 if rows == 1 else Y_MARGIN + r * (1.0 - 2.0 * Y_MARGIN) / (rows - 1)
        gap = (1.0 - 2.0 * X_MARGIN) / max(1, count - 1)
        shift = ROW_SHIFT * gap if r % 2 else 0.0
        for c in range(count):
            x = 0.5 if count == 1 else X_MARGIN + c * gap + shift
            pts.append((x, y))
    return np.array(pts[:N], dtype=float).reshape(-1, 2)


def wall_room(p: np.ndarray) -> np.ndarray:
    return np.minimum.reduce([p[:, 0], p[:, 1], 1.0 - p[:, 0], 1.0 - p[:, 1]]).clip(min=0.0)


def grow(centers: np.ndarray, r: np.ndarray, rounds: int) -> np.ndarray:
    """Each circle in turn takes all the room left by the walls and the others (stays valid)."""
    d = np.hypot(*(centers[:, None, :] - centers[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    wall = wall_room(centers)
    r = r.copy()
    for _ in range(rounds):
        for i in range(len(r)):
            r[i] = max(0.0, min(wall[i], (d[i] - r).min()))
    return r


def initial_radii(centers: np.ndarray) -> np.ndarray:
    d = np.hypot(*(centers[:, None, :] - centers[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    return np.minimum(wall_room(centers), d.min(axis=1) / 2.0)  # r_i + r_j <= d_ij for every pair


def add_in_hole(centers: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = np.linspace(0.0, 1.0, HOLE_GRID)
    cand = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    room = wall_room(cand)
    if len(r):
        dist = np.hypot(*(cand[:, None, :] - centers[None, :, :]).transpose(2, 0, 1))
        room = np.minimum(room, (dist - r[None, :]).min(axis=1))
    best = int(np.argmax(room))
    return np.vstack([centers, cand[best]]), np.append(r, max(0.0, room[best]))


def main() -> None:
    rng = np.random.default_rng(int(JITTER_SEED))
    centers = lattice()
    centers = (centers + rng.normal(0.0, JITTER, size=centers.shape)).clip(0.0, 1.0)
    radii = grow(centers, initial_radii(centers), int(GROW_ROUNDS))
    while len(radii) < N:
        centers, radii = add_in_hole(centers, radii)
    radii = grow(centers, radii, int(GROW_ROUNDS)) * (1.0 - 1e-12)  # a hair of slack for rounding
    with open(OUTPUT, "w") as f:
        json.dump({"centers": centers.tolist(), "radii": radii.tolist()}, f)
    print(f"wrote {OUTPUT}: {len(radii)} circles, sum of radii {radii.sum():.6f}")


if __name__ == "__main__":
    main()
