"""Two experiment scripts in the layouts nightlab must search out of the box (written for these tests).

``AR_TRAIN``/``AR_PREPARE`` imitate karpathy/autoresearch: UPPER_CASE knobs, ``2**19``, a tuple,
a string, a hardware figure, a divisibility assert against a constant imported from the protected
``prepare.py``, and a kernel fetched from the Hugging Face Hub at import (here a stand-in that,
like the real one, needs the network unless ``HF_HUB_OFFLINE=1``). ``NANO_TRAIN`` imitates
nanoGPT's lowercase module-level config. Both run in well under a second and print a summary
block whose metric is a known function of the knobs; they crash the way real runs would.
"""

AR_PREPARE = '''\
"""Data and the fixed evaluation (protected)."""
MAX_SEQ_LEN = 2048
TIME_BUDGET = 300


def evaluate_bpb(loss):
    return loss


if __name__ == "__main__":  # like the real prepare.py: the data lands in ~/.cache/autoresearch
    import os
    os.makedirs(os.path.expanduser("~/.cache/autoresearch"), exist_ok=True)
'''

AR_TRAIN = '''\
"""Pretraining script: single GPU, single file (a stand-in with autoresearch's layout)."""
import math
import os
import types

from prepare import MAX_SEQ_LEN, TIME_BUDGET, evaluate_bpb


def get_kernel(repo):
    """Stands in for kernels.get_kernel: it fetches from the Hub unless HF_HUB_OFFLINE=1 (cache)."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise OSError(f"cannot reach huggingface.co to fetch {repo} (no network in runs)")
    return types.SimpleNamespace(flash_attn_interface=object())


def device_capability():
    return (9, 0)


cap = device_capability()
repo = "varunneal/flash-attention-3" if cap == (9, 0) else "kernels-community/flash-attn3"
fa3 = get_kernel(repo).flash_attn_interface

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

# Model architecture
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128          # target head dimension for attention
WINDOW_PATTERN = "SSSL" # sliding window pattern: L=full, S=half context

# Optimization
TOTAL_BATCH_SIZE = 2**19 # ~524K tokens per optimizer step
EMBEDDING_LR = 0.6
UNEMBEDDING_LR = 0.004
MATRIX_LR = 0.04
SCALAR_LR = 0.5
WEIGHT_DECAY = 0.2
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0

# Model size
DEPTH = 8
DEVICE_BATCH_SIZE = 128  # per-device batch size (reduce if OOM)

H100_BF16_PEAK_FLOPS = 989.5e12

if __name__ == "__main__":
    assert H100_BF16_PEAK_FLOPS == 989.5e12, "the hardware figure was changed"
    assert all(ch in "SL" for ch in WINDOW_PATTERN)
    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    b1, b2 = ADAM_BETAS
    assert 0 < b1 < 1 and 0 < b2 < 1
    loss = (0.9 + (math.log10(MATRIX_LR) + 1.6) ** 2 + 0.05 * (math.log2(TOTAL_BATCH_SIZE) - 18) ** 2
            + 0.02 * (DEPTH - 10) ** 2 / 10 + (b2 - 0.98) ** 2 + 0.01 * WINDOW_PATTERN.count("L"))
    val_bpb = evaluate_bpb(loss)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"peak_vram_mb:     {DEVICE_BATCH_SIZE * 350.0:.1f}")
    print(f"grad_accum_steps: {grad_accum_steps}")
'''

NANO_TRAIN = '''\
"""Training script with nanoGPT's layout: lowercase config at module level (a stand-in)."""
import math
import os

# -----------------------------------------------------------------------------
# default config values
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
always_save_checkpoint = True
wandb_log = False # disabled by default
wandb_project = 'owt'
dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8 # used to simulate larger batch sizes
batch_size = 12 # if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0 # for pretraining 0 is good, for finetuning try 0.1+
bias = False # do we use bias inside LayerNorm and Linear layers?
# adamw optimizer
learning_rate = 6e-4 # max learning rate
max_iters = 600000 # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0 # clip gradients at this value, or disable if == 0.0
warmup_iters = 2000 # how many steps to warm up for
# system
device = 'cuda'
dtype = 'bfloat16'
compile = True
seed = 1337
vocab_size = 50304
# -----------------------------------------------------------------------------

assert n_embd % n_head == 0
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    gradient_accumulation_steps //= 8
iter_num = 0
best_val_loss = 1e9
if vocab_size < 50257:
    raise IndexError("index out of range in self: a GPT-2 token id above vocab_size")
if batch_size * block_size * n_layer > 12 * 1024 * 12:
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
loss = (2.8 + (math.log10(learning_rate) + 2.9) ** 2 + 0.5 * dropout + (beta2 - 0.99) ** 2
        + 0.01 * abs(math.log2(n_layer / 16)) + 0.001 * abs(math.log2(batch_size / 16)))
while iter_num < 3:  # the training loop: iter_num and best_val_loss are variables, not knobs
    iter_num += 1
    best_val_loss = min(best_val_loss, loss)
print("---")
print(f"loss: {loss:.6f}")
'''
