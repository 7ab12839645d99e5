"""tinygpt model family (protected): the architectures the evaluator can score, chosen by a plain config.

The evaluator never runs the candidate's Python: it rebuilds the model from ``ckpt["config"]``
with :func:`build_model` below and loads ``ckpt["model"]`` (tensors only) into it. So the
architecture is a family defined here; train.py picks a member through the config (and owns
everything about training: optimiser, schedule, initialisation, data sampling, precision).

The config (:data:`DEFAULTS` gives every key; :func:`check_config` refuses anything else):

- ``seq_len``, ``n_layer``, ``n_head``, ``head_dim``, ``mlp_ratio``, ``dropout``: sizes;
- ``pos``: ``"learned"`` (absolute embeddings), ``"rope"`` (rotary, on q and k) or ``"none"``;
- ``norm``: ``"layernorm"`` or ``"rmsnorm"``;
- ``mlp``: ``"gelu"``, ``"relu2"`` (squared ReLU) or ``"swiglu"`` (gated; hidden width
  ``mlp_ratio * d * 2 // 3``);
- ``tie_weights``: the output head shares the byte embedding's matrix;
- ``bias``: biases in the linear layers.

``model(idx)`` maps (B, T) int64 bytes to (B, T, 256) logits, causally (position t sees bytes
0..t of its own row), for any T up to ``seq_len``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_SIZE = 256
DEFAULTS: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "seq_len": 128,
    "n_layer": 2,
    "n_head": 4,
    "head_dim": 16,
    "mlp_ratio": 4,
    "dropout": 0.0,
    "pos": "learned",
    "norm": "layernorm",
    "mlp": "gelu",
    "tie_weights": False,
    "bias": True,
}
INT_RANGES = {"seq_len": (1, 8192), "n_layer": (1, 64), "n_head": (1, 64), "head_dim": (2, 512),
              "mlp_ratio": (1, 16)}
CHOICES = {"pos": ("learned", "rope", "none"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2", "swiglu")}
MAX_WIDTH = 8192  # n_head * head_dim


def check_config(cfg: Any) -> dict[str, Any]:
    """The full config (defaults filled in); ValueError naming the key when it is not one of the family."""
    if not isinstance(cfg, dict):
        raise ValueError(f"config is a {type(cfg).__name__}, not a dict")
    unknown = sorted(str(k) for k in cfg if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; the model family has {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if type(out["vocab_size"]) is not int or out["vocab_size"] != VOCAB_SIZE:
        raise ValueError(f"config vocab_size must be {VOCAB_SIZE}")
    for key, (lo, hi) in INT_RANGES.items():
        v = out[key]
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"config {key} = {v!r}: must be an int in {lo}..{hi}")
    if out["n_head"] * out["head_dim"] > MAX_WIDTH:
        raise ValueError(f"config n_head * head_dim > {MAX_WIDTH}")
    d = out["dropout"]
    if type(d) not in (int, float) or not 0.0 <= d < 1.0:
        raise ValueError(f"config dropout = {d!r}: must be a number in [0, 1)")
    for key, allowed in CHOICES.items():
        if type(out[key]) is not str or out[key] not in allowed:
            raise ValueError(f"config {key} = {out[key]!r}: must be one of {list(allowed)}")
    for key in ("tie_weights", "bias"):
        if type(out[key]) is not bool:
            raise ValueError(f"config {key} = {out[key]!r}: must be true or false")
    return out


def norm_layer(kind: str, d: int) -> nn.Module:
    return nn.LayerNorm(d) if kind == "layernorm" else nn.RMSNorm(d)


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (B, H, T, D) queries or keys (an odd D's last channel is left as is)."""
    t, dim = x.shape[-2], x.shape[-1] - x.shape[-1] % 2
    if dim < x.shape[-1]:
        return torch.cat((rope(x[..., :dim]), x[..., dim:]), dim=-1)
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class MLP(nn.Module):
    def __init__(self, d: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.kind, bias = cfg["mlp"], cfg["bias"]
        if self.kind == "swiglu":
            h = max(1, cfg["mlp_ratio"] * d * 2 // 3)
            self.gate = nn.Linear(d, h, bias=bias)
            self.up, self.down = nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)
        else:
            h = cfg["mlp_ratio"] * d
            self.up, self.down = nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        h = self.up(x)
        return self.down(F.gelu(h) if self.kind == "gelu" else F.relu(h).square())


class Block(nn.Module):
    def __init__(self, d: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.n_head, self.dropout, self.rope = cfg["n_head"], cfg["dropout"], cfg["pos"] == "rope"
        self.ln1, self.ln2 = norm_layer(cfg["norm"], d), norm_layer(cfg["norm"], d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=cfg["bias"]), nn.Linear(d, d, bias=cfg["bias"])
        self.mlp = MLP(d, cfg)
        self.drop = nn.Dropout(cfg["dropout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.rope:
            q, k = rope(q), rope(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg["n_head"] * cfg["head_dim"]
        self.tok = nn.Embedding(cfg["vocab_size"], d)
        self.pos = nn.Embedding(cfg["seq_len"], d) if cfg["pos"] == "learned" else None
        self.blocks = nn.ModuleList(Block(d, cfg) for _ in range(cfg["n_layer"]))
        self.ln_f = norm_layer(cfg["norm"], d)
        self.head = nn.Linear(d, cfg["vocab_size"], bias=False)
        self.apply(self._init)
        if cfg["tie_weights"]:
            self.head.weight = self.tok.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model(cfg: dict[str, Any]) -> GPT:
    """A member of the family; ValueError when ``cfg`` is not one (see :func:`check_config`)."""
    return GPT(check_config(cfg))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

