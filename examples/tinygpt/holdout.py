"""tinygpt holdout scorer (protected): bits per byte of the checkpoint on the holdout split.

Usage: ``python holdout.py [ckpt.pt]``. Same checks and code path as evaluate.py, on
``holdout.bin`` from ``$NIGHTLAB_HOLDOUT_DIR`` (or the data dir when that is unset). Prints
``---`` then ``holdout_bpb``, ``floor_bpb`` (synthetic source), ``eval_seconds``.
"""

from __future__ import annotations

from evaluate import main

if __name__ == "__main__":
    main("holdout")
