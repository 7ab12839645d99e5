"""tinygpt training (editable): a small byte-level GPT trained with AdamW for a fixed time budget.

Every hyperparameter is a module-level UPPER_CASE constant below (the `search` researcher tunes
them within the `# nightlab:` ranges; an LLM researcher may change anything in this file).
Reads the splits written by prepare.py from ``$NIGHTLAB_DATA_DIR`` (default ``./data``), trains
until ``$NIGHTLAB_BUDGET_S`` seconds (default 60) of training have passed (or, when
``$TINYGPT_STEPS`` is set, for that many optimizer steps: a budget of work, not of time, for
comparisons on a loaded machine, e.g. bench/efficiency.py's ``--tinygpt-steps``; on CPU it uses
``$TINYGPT_THREADS`` threads when set, else one per core), seeded by
``$NIGHTLAB_SEED`` (default 0), on CUDA when present else CPU. Saves ``ckpt.pt`` for the
protected evaluate.py / holdout.py and prints the summary block.

Contract with evaluate.py (it never imports this file): the model is a member of the protected
family in model.py, chosen by the config (``model.DEFAULTS`` lists the keys: sizes, position
encoding, norm, MLP kind, weight tying, biases); ``ckpt.pt`` holds ``{"config": cfg, "model":
state_dict}`` (tensors and plain values only: the evaluator loads it with ``weights_only=True``).
Everything about training is yours: optimiser, schedule, initialisation, data sampling, precision.
"""

from __future__ import annotations

import math
import os
import resource
import time

import torch
import torch.nn.functional as F
from model import build_model
from prepare import VOCAB_SIZE, evaluate_bpb, load_split

# model
SEQ_LEN = 128  # nightlab: 32..1024 log
N_LAYER = 2  # nightlab: 1..8
N_HEAD = 4  # nightlab: 1..8
HEAD_DIM = 16  # nightlab: 8..64 log
MLP_RATIO = 4  # nightlab: 1..6
DROPOUT = 0.0  # nightlab: 0.0..0.3
POS = "learned"  # nightlab: choices learned,rope,none
NORM = "layernorm"  # nightlab: choices layernorm,rmsnorm
MLP = "gelu"  # nightlab: choices gelu,relu2,swiglu
TIE_WEIGHTS = False  # nightlab: skip
BIAS = True  # nightlab: skip
# optimisation
BATCH_SIZE = 16  # nightlab: 4..128 log
LEARNING_RATE = 2e-3  # nightlab: 1e-4..3e-2 log
WEIGHT_DECAY = 0.1  # nightlab: 1e-3..0.5 log
BETA1 = 0.9  # nightlab: 0.7..0.98
BETA2 = 0.99  # nightlab: 0.9..0.999
WARMUP_FRAC = 0.05  # nightlab: 0.0..0.3
COOLDOWN_FRAC = 0.3  # nightlab: 0.0..0.9
MIN_LR_FRAC = 0.1  # nightlab: 0.0..0.5
GRAD_CLIP = 1.0  # nightlab: 0.1..10.0 log
EVAL_BATCH_SIZE = 32  # nightlab: skip
CHECKPOINT = "ckpt.pt"


def lr_at(progress: float) -> float:
    """Linear warm-up, flat, linear cool-down to MIN_LR_FRAC; ``progress`` in [0, 1] of the budget."""
    if WARMUP_FRAC > 0 and progress < WARMUP_FRAC:
        return LEARNING_RATE * progress / WARMUP_FRAC
    if COOLDOWN_FRAC > 0 and progress > 1.0 - COOLDOWN_FRAC:
        frac = (1.0 - progress) / COOLDOWN_FRAC
        return LEARNING_RATE * (MIN_LR_FRAC + (1.0 - MIN_LR_FRAC) * max(0.0, frac))
    return LEARNING_RATE


class AdamW:
    """AdamW with decoupled weight decay: the update ``torch.optim.AdamW`` makes (the same val_bpb to the
    last digit at 200 steps), in torch's multi-tensor ``_foreach`` ops.

    Written out rather than imported: building a ``torch.optim.Optimizer`` imports ``torch._dynamo``,
    ~1 s of every run's start-up on CPU whatever the run trains; and on CPU torch's AdamW takes its
    one-tensor-at-a-time path. Keeps ``param_groups`` (dicts with ``params``, ``lr``,
    ``weight_decay``) so the schedule sets ``group["lr"]`` as it would on torch's.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float = 1e-8) -> None:
        self.param_groups = [{"lr": lr, **g} for g in groups]
        self.betas, self.eps, self.t = betas, eps, 0
        self.state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for g in groups for p in g["params"]}

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, math.sqrt(1 - b2**self.t)
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            grads = [p.grad for p in ps]
            ms = [self.state[p][0] for p in ps]
            vs = [self.state[p][1] for p in ps]
            torch._foreach_mul_(ps, 1 - g["lr"] * g["weight_decay"])
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, c2)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(ps, ms, denom, value=-g["lr"] / c1)


def main() -> None:
    budget_s = float(os.environ.get("NIGHTLAB_BUDGET_S", "60"))
    max_steps = int(os.environ.get("TINYGPT_STEPS", "0"))  # > 0: a step budget instead of the time budget
    seed = int(os.environ.get("NIGHTLAB_SEED", "0"))
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # TINYGPT_THREADS: fewer threads than cores (on a machine other jobs share, 1 is much faster)
        torch.set_num_threads(int(os.environ.get("TINYGPT_THREADS", "0")) or max(1, len(os.sched_getaffinity(0))))
    cfg = {
        "vocab_size": VOCAB_SIZE,
        "seq_len": int(SEQ_LEN),
        "n_layer": int(N_LAYER),
        "n_head": int(N_HEAD),
        "head_dim": int(HEAD_DIM),
        "mlp_ratio": int(MLP_RATIO),
        "dropout": float(DROPOUT),
        "pos": str(POS),
        "norm": str(NORM),
        "mlp": str(MLP),
        "tie_weights": bool(TIE_WEIGHTS),
        "bias": bool(BIAS),
    }
    model = build_model(cfg).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(BETA1, BETA2),
    )
    train = torch.frombuffer(bytearray(load_split("train")), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    t_len, b = int(SEQ_LEN), int(BATCH_SIZE)
    offsets = torch.arange(t_len + 1)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    steps, tokens = 0, 0
    ema, reported = None, 0  # smoothed training loss; progress lines every 5% of the budget
    model.train()
    t0 = time.perf_counter()
    elapsed = 0.0

    def progress() -> float:
        return steps / max_steps if max_steps > 0 else elapsed / budget_s

    while progress() < 1.0:
        for group in opt.param_groups:
            group["lr"] = lr_at(progress())
        starts = torch.randint(0, len(train) - t_len - 1, (b,), generator=gen)
        chunk = train[starts[:, None] + offsets].to(device=device, dtype=torch.long)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        if GRAD_CLIP > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        steps += 1
        tokens += b * t_len
        if not math.isfinite(loss.item()):
            raise SystemExit(f"loss is {loss.item()} at step {steps}")
        elapsed = time.perf_counter() - t0
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        pct = min(100, int(100 * progress()))
        if pct >= reported + 5:  # nightlab's progress line: pruned on by [prune] figure = "train_bpb"
            reported = pct - pct % 5
            print(f"nightlab: step={reported} train_bpb={ema / math.log(2):.4f}", flush=True)
    training_seconds = elapsed

    model.eval()
    torch.save({"config": cfg, "model": model.state_dict()}, CHECKPOINT)
    val_bpb = evaluate_bpb(model, load_split("val"), t_len, device, EVAL_BATCH_SIZE)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_seconds:.1f}")
    print(f"peak_memory_mb:   {peak_mb:.1f}")
    print(f"num_params_M:     {num_params / 1e6:.3f}")
    print(f"total_tokens_M:   {tokens / 1e6:.3f}")
    print(f"num_steps:        {steps}")


if __name__ == "__main__":
    main()
